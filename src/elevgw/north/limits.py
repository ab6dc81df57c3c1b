"""What one API client may cost: the URL's length, the body's size, calls waiting at once.

Twisted's HTTP channel drops a connection whose request line is over 16 KiB without a word,
reads a body of any size (to a temporary file past 100 KB) before a route sees it, and lets
any number of calls wait on devices at once. Here each is a clear JSON answer instead: 414
for a URL over 16 KiB, 431 for a header line over it, 413 as soon as a declared or received
body passes ``--max-body-size``, 503 past ``--max-waiting-calls``; each counted in
``elevgw_limit_hits_total``.
"""

from __future__ import annotations

from typing import Any

from twisted.web.http import HTTPChannel
from twisted.web.server import Request

from elevgw.util import dumps_json

#: Twisted's limit for the request line and each header line (``HTTPChannel.MAX_LENGTH``).
MAX_LINE = HTTPChannel.MAX_LENGTH


def error_response(status: int, reason: str, code: str, detail: str) -> bytes:
    """A complete HTTP/1.1 JSON error answer that closes the connection."""
    body = dumps_json({"error": code, "detail": detail})
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class APIChannel(HTTPChannel):
    """An HTTP channel that answers an over-long line instead of dropping the connection."""

    site: Any

    def lineLengthExceeded(self, line: bytes) -> None:
        # HTTPChannel's own flag: set until a request line is parsed (tests pin its meaning).
        if getattr(self, "_HTTPChannel__first_line", 1):
            self.site.limit_hit("url_length")
            answer = error_response(
                414, "URI Too Long", "url_too_long", f"request line over {MAX_LINE} bytes"
            )
        else:
            self.site.limit_hit("header_size")
            answer = error_response(
                431,
                "Request Header Fields Too Large",
                "header_too_large",
                f"a header line over {MAX_LINE} bytes",
            )
        self.transport.write(answer)  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


class LimitedRequest(Request):
    """A request that refuses a body over the site's ``max_body`` as soon as it is declared
    (``Content-Length``) or received (chunked), before it is buffered or written to disk."""

    _refused = False
    _received = 0

    def _max_body(self) -> int:
        channel: Any = self.channel
        return channel.site.max_body

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._max_body():
            self._refuse_body()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._max_body():
            self._refuse_body()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def _refuse_body(self) -> None:
        self._refused = True
        channel: Any = self.channel
        site = channel.site
        site.limit_hit("body_size")
        transport = channel.transport
        transport.write(
            error_response(
                413,
                "Content Too Large",
                "body_too_large",
                f"request body over {site.max_body} bytes",
            )
        )
        transport.loseConnection()


class WaitingCalls:
    """Counts API calls that have not been answered yet; past ``maximum`` a new one is
    answered 503 at once (a snapshot request or an event stream can hold a call for minutes,
    and each holds memory and a socket)."""

    def __init__(self, maximum: int, on_refused: Any) -> None:
        self.maximum = maximum
        self.waiting = 0
        self._on_refused = on_refused

    def admit(self, request: Any) -> bool:
        """Count ``request`` until it finishes; ``False`` (and nothing counted) if full."""
        if self.waiting >= self.maximum:
            self._on_refused()
            return False
        self.waiting += 1
        request.notifyFinish().addBoth(self._finished)
        return True

    def _finished(self, _: Any) -> None:
        self.waiting -= 1
