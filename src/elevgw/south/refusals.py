"""What the device port answers to anything that is not a device's WebSocket handshake.

Autobahn answers a request without ``Upgrade`` (a browser, a port scanner, a load balancer's
HTTP check) with 200 and an HTML page naming Autobahn and its version, on every path, and puts
``Server: AutobahnPython/<version>`` on its handshake answers: free reconnaissance for whoever
probes the port. Here every refusal is a plain HTTP answer that names no software: 404 off
``/ws``, 426 on ``/ws`` without an upgrade, and the handshake's own refusals (401, 503, …)
with their standard reason phrase and the detail in a short text body.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from autobahn.twisted.websocket import WebSocketServerProtocol

WS_PATH = "/ws"


def reason_phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Error"


def refusal(code: int, detail: str, headers: Any = None) -> bytes:
    """A complete HTTP/1.1 answer: status line, ``headers``, a one-line text body, then close."""
    body = detail.encode("utf-8", "replace") + b"\n"
    lines = [f"HTTP/1.1 {code} {reason_phrase(code)}"]
    lines += [f"{name}: {value}" for name, value in headers or ()]
    lines += [
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


class PlainRefusalsProtocol(WebSocketServerProtocol):
    """Autobahn's server protocol with refusals that name no software; the device protocol's base.

    The factory must also set Autobahn's ``webStatus`` option off (so a request without
    ``Upgrade`` is refused rather than shown a status page) and its ``server`` to ``None``.
    """

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        """Refuse the opening handshake; written to the log by whoever decided it, not here.

        Autobahn writes an info line and then a warning per refused handshake, which in a
        reconnect storm of devices with revoked tokens is thousands of lines saying what
        ``elevgw_handshakes_total`` and the gateway's own ``handshake refused`` line say.
        """
        headers = list(responseHeaders or ())
        if code == 426:  # no Upgrade header: only /ws is a WebSocket, elsewhere nothing is
            if getattr(self, "http_request_path", None) == WS_PATH:
                headers.append(("Upgrade", "websocket"))
                reason = f"{WS_PATH} is a WebSocket: send the upgrade handshake"
            else:
                code, reason = 404, "not found"
        self.wasNotCleanReason = reason
        self.sendData(refusal(code, reason, headers))
        # A refusal is an answer we chose, not a broken connection: no "dropping" warning.
        self.wasClean = True
        self.dropConnection(abort=False)
