#!/usr/bin/env python3
"""The stack's ceiling: the smallest Autobahn (Twisted) server that answers heartbeats.

It speaks the device framing of elevgw (text frame ``{"type": "heartbeat", …}`` in,
``{"type": "pong", "ts": <epoch ms>}`` out) with no authentication, no store and no
sessions, and with the same Autobahn options that change per-frame cost in the gateway
(no compression, no auto-ping, no incoming UTF-8 validation), so a benchmark figure divided
by this server's figure is the share of the stack's ceiling that elevgw reaches::

    python bench/baseline.py 9001            # ws://127.0.0.1:9001/ws
    python bench/baseline.py 9001 --interface 127.0.0.1

Any path and any query are accepted, so ``bench/loadgen.py`` drives it exactly like the
gateway. Frames that are not a heartbeat get no answer. It runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor


class PongProtocol(WebSocketServerProtocol):
    def onMessage(self, payload, isBinary):
        if isBinary:
            return
        try:
            frame = json.loads(payload)
        except ValueError:
            return
        if isinstance(frame, dict) and frame.get("type") == "heartbeat":
            self.sendMessage(b'{"type":"pong","ts":%d}' % int(time.time() * 1000))


def make_factory() -> WebSocketServerFactory:
    factory = WebSocketServerFactory()
    factory.protocol = PongProtocol
    factory.setProtocolOptions(
        utf8validateIncoming=False,
        failByDrop=False,
        autoPingInterval=0,
        perMessageCompressionAccept=lambda offers: None,
        openHandshakeTimeout=10,
        closeHandshakeTimeout=5,
    )
    return factory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int, help="TCP port to listen on")
    parser.add_argument("--interface", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument(
        "--backlog",
        type=int,
        default=1024,
        help="listen backlog (1024 like the gateway's listener; Twisted's own default is 50)",
    )
    args = parser.parse_args(argv)
    reactor.listenTCP(args.port, make_factory(), backlog=args.backlog, interface=args.interface)
    print(f"baseline pong server on ws://{args.interface}:{args.port}/ws", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
