#!/usr/bin/env python3
"""A webhook receiver for trying elevgw out: prints every webhook it gets on one line.

    python mock/mock_backend.py                      # listens on tcp:5000:interface=127.0.0.1
    ELEVGW_WEBHOOK_SECRET=s3cret python mock/mock_backend.py --fail-every 3

and run the gateway with ``--backend-url http://127.0.0.1:5000`` (and the same secret).

Each line: time, path, event id, signature check, body. With a secret (``--secret`` or
``ELEVGW_WEBHOOK_SECRET``) a missing or wrong ``X-Elevgw-Signature`` prints BAD SIGNATURE and
is answered 401 (which elevgw does not retry). ``--fail-every N`` answers every Nth webhook
with 500, to watch elevgw retry it with the same event id. Everything else gets 200
``{"ok": true}``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import hmac
import json
import os
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import react
from twisted.web.resource import Resource
from twisted.web.server import Site

WEBHOOK_PATHS = {
    b"/api/device/status",
    b"/api/v1/devices/remote/snapshot/callback",
}


def signature_ok(secret: bytes, body: bytes, header: bytes | None) -> bool:
    """Whether ``header`` is ``sha256=<hex HMAC-SHA256 of body>`` under ``secret``."""
    if header is None:
        return False
    expected = b"sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
    return hmac.compare_digest(expected, header.strip())


class WebhookReceiver(Resource):
    isLeaf = True

    def __init__(self, secret: bytes | None, fail_every: int, out: Any = sys.stdout) -> None:
        super().__init__()
        self.secret = secret
        self.fail_every = fail_every
        self.out = out
        self.received = 0

    def render_POST(self, request: Any) -> bytes:
        if request.path not in WEBHOOK_PATHS:
            request.setResponseCode(404)
            return self._json({"error": "not_found", "detail": request.path.decode()})
        body = request.content.read()
        event_id = (request.getHeader(b"x-elevgw-event-id") or b"-").decode()
        self.received += 1

        if self.secret is not None and not signature_ok(
            self.secret, body, request.getHeader(b"x-elevgw-signature")
        ):
            self._print(request.path, event_id, "BAD SIGNATURE", body)
            request.setResponseCode(401)
            return self._json({"error": "bad_signature", "detail": "X-Elevgw-Signature"})

        check = "signed" if self.secret is not None else "unsigned"
        if self.fail_every and self.received % self.fail_every == 0:
            self._print(request.path, event_id, check + ", answered 500", body)
            request.setResponseCode(500)
            return self._json({"error": "planned_failure", "detail": "--fail-every"})

        self._print(request.path, event_id, check, body)
        return self._json({"ok": True})

    def _print(self, path: bytes, event_id: str, check: str, body: bytes) -> None:
        now = datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3]
        text = body.decode("utf-8", errors="replace")
        print(f"{now} {path.decode()} {event_id} [{check}] {text}", file=self.out, flush=True)

    @staticmethod
    def _json(value: dict[str, Any]) -> bytes:
        return json.dumps(value).encode()

    def render(self, request: Any) -> bytes:
        if request.method != b"POST":
            request.setResponseCode(405)
            request.setHeader(b"allow", b"POST")
            request.setHeader(b"content-type", b"application/json")
            return self._json({"error": "method_not_allowed", "detail": "POST only"})
        request.setHeader(b"content-type", b"application/json")
        return super().render(request)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--listen",
        default="tcp:5000:interface=127.0.0.1",
        metavar="ENDPOINT",
        help="Twisted server endpoint to listen on (default: %(default)s)",
    )
    parser.add_argument(
        "--secret",
        default=os.environ.get("ELEVGW_WEBHOOK_SECRET"),
        help="webhook secret to check signatures with (default: $ELEVGW_WEBHOOK_SECRET)",
    )
    parser.add_argument(
        "--fail-every",
        type=int,
        default=0,
        metavar="N",
        help="answer every Nth webhook with 500 (default: never)",
    )
    args = parser.parse_args(argv)
    if args.fail_every < 0:
        parser.error("--fail-every must be 0 or more")
    return args


async def main(reactor: Any, argv: list[str]) -> None:
    args = parse_args(argv)
    secret = args.secret.encode("utf-8") if args.secret else None
    port = await serverFromString(reactor, args.listen).listen(
        Site(WebhookReceiver(secret, args.fail_every))
    )
    address = port.getHost()
    print(
        f"mock backend listening on {address.host}:{address.port} "
        f"({'checking signatures' if secret else 'not checking signatures'})",
        flush=True,
    )
    await Deferred()  # until Ctrl-C / SIGTERM stops the reactor


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
