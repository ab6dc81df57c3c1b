#!/usr/bin/env python3
"""One broken device: pipelines log frames as fast as its socket takes them, and reconnects
at once whenever the gateway closes it. ``bench/run.py --flooder`` runs it beside a scenario
to show what one such device costs everyone else.

    python bench/flooder.py --ws-url ws://127.0.0.1:8080/ws --credentials creds.jsonl \\
        --index 15000 --duration 60

``--index`` picks the credential line (0-based) of the JSON-lines cache ``bench/loadgen.py
provision`` fills, so the flooder is not one of the scenario's own devices. It reads and
discards whatever the gateway answers. It stops after ``--duration`` seconds or on SIGTERM
and prints one JSON line: frames and bytes sent, connections opened, how they ended (close
codes seen, resets), and the handshake refusals met.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import signal
import socket
import sys
import time
from urllib.parse import quote, urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loadgen import check_loopback_url, client_frame, load_credentials  # noqa: E402

BATCH = 200  # frames written per send call


def handshake(sock: socket.socket, path: str, host: str, device_id: str, token: str) -> int:
    """Send the opening handshake; the HTTP status of the answer (101 when open)."""
    key = base64.b64encode(os.urandom(16)).decode()
    query = f"device_id={quote(device_id)}&token={quote(token)}"
    sock.sendall(
        (
            f"GET {path}?{query} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            return 0
        answer += chunk
    return int(answer.split(b" ", 2)[1])


def close_code(data: bytes) -> int | None:
    """The code of a server close frame found in ``data`` (unmasked), if any."""
    at = data.find(b"\x88")
    if at < 0 or at + 4 > len(data):
        return None
    if data[at + 1] & 0x7F < 2:
        return 1005
    return int.from_bytes(data[at + 2 : at + 4], "big")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ws-url", required=True)
    parser.add_argument("--credentials", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--duration", type=float, default=60.0)
    args = parser.parse_args()
    host, port = check_loopback_url(args.ws_url)
    path = urlsplit(args.ws_url).path or "/ws"
    creds = load_credentials(args.credentials, args.index + 1)
    if len(creds) <= args.index:
        raise SystemExit(f"no credential line {args.index} in {args.credentials}")
    device_id, token = creds[args.index]
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    batch = b"".join(
        client_frame(
            0x1,
            b'{"type":"log","id":"f%d","payload":{"level":"error","msg":"sensor fault"}}' % n,
            os.urandom(4),
        )
        for n in range(BATCH)
    )
    stats: dict = {
        "device_id": device_id,
        "frames_sent": 0,
        "bytes_sent": 0,
        "connections": 0,
        "refused": {},
        "closes": {},
        "resets": 0,
    }
    end = time.monotonic() + args.duration
    while time.monotonic() < end and not stopping:
        sock = socket.create_connection((host, port), timeout=5)
        try:
            status = handshake(sock, path, f"{host}:{port}", device_id, token)
            if status != 101:
                stats["refused"][str(status)] = stats["refused"].get(str(status), 0) + 1
                time.sleep(0.1)
                continue
            stats["connections"] += 1
            sock.setblocking(False)
            code = None
            while time.monotonic() < end and not stopping and code is None:
                readable, writable, _ = select.select([sock], [sock], [], 0.5)
                if readable:
                    data = sock.recv(65536)
                    if not data:
                        code = code or 1006
                        break
                    code = close_code(data)
                if writable:
                    try:
                        sent = sock.send(batch)
                    except BlockingIOError:
                        continue
                    stats["bytes_sent"] += sent
                    stats["frames_sent"] += sent * BATCH // len(batch)
            if code is not None:
                stats["closes"][str(code)] = stats["closes"].get(str(code), 0) + 1
        except (ConnectionError, OSError):
            stats["resets"] += 1
        finally:
            sock.close()
    stats["seconds"] = round(args.duration - max(0.0, end - time.monotonic()), 1)
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
