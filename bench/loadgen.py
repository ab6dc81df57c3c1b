#!/usr/bin/env python3
"""Load generator for elevgw (and for ``bench/baseline.py``): thousands of devices on loopback.

Scenarios (``MODE``), each printing one JSON line with its figures on stdout:

``flood``
    ``--devices`` devices each keep ``--in-flight`` heartbeats outstanding (a pong releases the
    next one) for ``--duration`` seconds after ``--warmup``: round trips per second, RTT.
``capacity`` (alias ``idle``)
    every device heartbeats every ``--interval`` seconds at a phase of its own (``--schedule
    fixed``, the default; ``jitter``: each period drawn anew, jittered by ``--jitter``): pong RTT
    percentiles and how many sessions were closed under the devices.
``storm``
    connect every device at ``--concurrency`` attempts in flight: handshakes per second,
    refusals by HTTP status, connect errors, handshake latency percentiles.
``commands``
    with every device connected and heartbeating, ``POST /api/send`` at ``--rate`` per second
    to random devices over ``--http-connections`` keep-alive HTTP/1.1 connections: latency
    from the HTTP call to the command frame arriving on the device, HTTP latency, errors.
``snapshots``
    ``--senders`` devices each send a ``--snapshot-size`` byte binary frame (PNG magic, then
    random bytes) every ``--snapshot-interval`` seconds while the others heartbeat: the
    heartbeat RTT of the others, snapshot acks.

Credentials come from a JSON-lines cache (``--credentials``, one ``{"device_id", "token"}``
a line), filled by ``provision``::

    # only generate and cache credentials (for bench/baseline.py, which checks none):
    python bench/loadgen.py provision --local --devices 15000
    # through the API of a running gateway (concurrent, bounded):
    python bench/loadgen.py provision --api-url http://127.0.0.1:8000 --devices 1000
    # or in bulk, straight into a (stopped or running) gateway's SQLite file:
    python bench/loadgen.py provision --sqlite elevgw.sqlite3 --devices 15000

Bulk provisioning writes rows into the ``devices`` table of ``elevgw.stores.sqlite.SCHEMA``
(``device_id``, ``location``, ``token_hash`` = ``elevgw.stores.interfaces.hash_token(token)``, ``created``
in epoch seconds, ``last_seen`` NULL), creating the schema if the file is new; tokens missing
from the cache are generated the way the API does (``dev_`` + 16 hex, 32 random bytes
url-safe). The cache is reused across runs, so every fresh store gets the same devices.

Devices are spread over worker processes (at most ``--per-worker`` sockets each, 9,000 by
default, to stay under a 20,000 open-files limit); the parent starts them, lets them connect,
starts the measured window in all of them at once (``CLOCK_MONOTONIC`` is shared by all
processes) and merges their figures. Each worker reports its CPU time, so the result shows
whether the load generator itself was the bottleneck.

Two client implementations (``--client``): ``raw``, a minimal RFC 6455 client written on a
plain Twisted protocol (validates the 101 answer and ``Sec-WebSocket-Accept``, masks every
frame, no extensions), and ``autobahn``, Autobahn's ``WebSocketClientProtocol`` (no
compression offered, no auto-ping). ``raw`` is the default because it costs about a fifth of
the CPU per round trip, which keeps the generator off the critical path on one core.

Only loopback addresses are accepted as targets. Every phase is bounded in time
(``--connect-timeout``, ``--duration``, ``--max-runtime``) and the processes stop by themselves.
"""

from __future__ import annotations

import argparse
import base64
import collections
import gc
import hashlib
import ipaddress
import json
import math
import os
import random
import re
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from array import array
from typing import Any
from urllib.parse import quote, urlsplit

PER_WORKER_DEFAULT = 9000
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODES = ("flood", "capacity", "idle", "storm", "commands", "snapshots")

# ---------------------------------------------------------------------------------------------
# Small pure helpers
# ---------------------------------------------------------------------------------------------


def percentiles(samples: Any, points: tuple[float, ...] = (50, 90, 99, 99.9)) -> dict:
    """Nearest-rank percentiles of ``samples`` (seconds) in milliseconds, plus max and count."""
    values = sorted(samples)
    n = len(values)
    result: dict[str, Any] = {"count": n}
    if not n:
        return result
    for p in points:
        rank = max(1, math.ceil(p / 100 * n))
        result["p" + (str(p).rstrip("0").rstrip(".") if "." in str(p) else str(p))] = round(
            values[rank - 1] * 1000, 3
        )
    result["max"] = round(values[-1] * 1000, 3)
    result["mean"] = round(sum(values) / n * 1000, 3)
    return result


def mask_payload(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte masking ``key`` (RFC 6455 5.3), in C via big integers."""
    n = len(payload)
    if not n:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(
        n, "little"
    )


def client_frame(opcode: int, payload: bytes, key: bytes) -> bytes:
    """One final, masked client frame."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return header + key + mask_payload(payload, key)


def heartbeat_payload(device_id: str) -> bytes:
    return b'{"type":"heartbeat","device_id":"%s"}' % device_id.encode("ascii")


def snapshot_image(size: int) -> bytes:
    """``size`` bytes that pass the gateway's PNG magic check (the rest is random)."""
    return PNG_MAGIC + os.urandom(max(0, size - len(PNG_MAGIC)))


def check_loopback_url(url: str) -> tuple[str, int]:
    """``(host, port)`` of ``url``; refuses anything that is not a loopback address."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"refusing non-loopback target {url!r}: benchmarks stay on 127.0.0.0/8")
    default = 443 if parts.scheme in ("wss", "https") else 80
    return host, parts.port or default


def spread_hosts(host: str, count: int) -> list[str]:
    """The addresses to connect to: ``127.0.0.1`` becomes ``127.0.0.1`` … ``127.0.0.<count>``.

    Linux picks a client's ephemeral port per destination (address, port), preferring even
    ports: past about 14,000 connections from one address to one destination, every
    ``connect()`` scans the whole range in the kernel (we measured it taking over half the
    load generator's core at the end of a 15,000-device storm, capping it near 1,500
    handshakes/s). Real fleets come from many addresses; spreading the destination over
    loopback addresses gives each a port range of its own. The server must listen on all
    interfaces (``bench/run.py`` does) or on each of these addresses.
    """
    if count <= 1 or host != "127.0.0.1":
        return [host]
    return [f"127.0.0.{i}" for i in range(1, min(count, 254) + 1)]


def load_credentials(path: str, count: int | None = None) -> list[tuple[str, str]]:
    creds: list[tuple[str, str]] = []
    if not os.path.exists(path):
        return creds
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                entry = json.loads(line)
                creds.append((entry["device_id"], entry["token"]))
                if count is not None and len(creds) >= count:
                    break
    return creds


def append_credentials(path: str, creds: list[tuple[str, str]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for device_id, token in creds:
            f.write(json.dumps({"device_id": device_id, "token": token}) + "\n")


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_kb() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------------------------
# Provisioning
# ---------------------------------------------------------------------------------------------


def ensure_local_credentials(path: str, count: int) -> list[tuple[str, str]]:
    """The first ``count`` cached credentials, generating and caching the missing ones."""
    creds = load_credentials(path, count)
    if len(creds) < count:
        fresh = [
            ("dev_" + secrets.token_hex(8), secrets.token_urlsafe(32))
            for _ in range(count - len(creds))
        ]
        append_credentials(path, fresh)
        creds.extend(fresh)
    return creds


def provision_sqlite(db_path: str, creds: list[tuple[str, str]]) -> int:
    """Insert ``creds`` into the gateway's SQLite store (schema from ``elevgw.stores.sqlite``)."""
    import sqlite3

    from elevgw.stores.interfaces import hash_token
    from elevgw.stores.sqlite import SCHEMA

    connection = sqlite3.connect(db_path, timeout=30)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        for statement in SCHEMA:
            connection.execute(statement)
        now = time.time()
        rows = [
            (device_id, f"bench-{i:05d}", hash_token(token), now, None)
            for i, (device_id, token) in enumerate(creds)
        ]
        with connection:
            cursor = connection.executemany(
                "INSERT OR IGNORE INTO devices (device_id, location, token_hash, created,"
                " last_seen) VALUES (?, ?, ?, ?, ?)",
                rows,
            )
        return cursor.rowcount
    finally:
        connection.close()


def provision_api(api_url: str, count: int, concurrency: int, timeout: float) -> list:
    """Register ``count`` devices through ``POST /api/v1/devices/register`` (treq, bounded)."""
    from treq.client import HTTPClient
    from twisted.internet import defer, reactor
    from twisted.web.client import Agent, HTTPConnectionPool

    check_loopback_url(api_url)
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = concurrency
    client = HTTPClient(Agent(reactor, pool=pool))
    semaphore = defer.DeferredSemaphore(concurrency)
    headers = {"Content-Type": ["application/json"]}
    api_key = os.environ.get("ELEVGW_API_KEY")
    if api_key:
        headers["Authorization"] = ["Bearer " + api_key]
    registered: list[tuple[str, str]] = []
    failures: list[str] = []

    async def register(i: int) -> None:
        body = json.dumps({"location": f"bench-{i:05d}"}).encode()
        response = await client.post(
            api_url.rstrip("/") + "/api/v1/devices/register",
            data=body,
            headers=headers,
            timeout=timeout,
            reactor=reactor,
        )
        content = await response.content()
        if response.code != 201:
            failures.append(f"{response.code} {content[:200]!r}")
            return
        answer = json.loads(content)
        registered.append((answer["device_id"], answer["token"]))

    def one(i: int) -> defer.Deferred:
        d = semaphore.run(lambda: defer.Deferred.fromCoroutine(register(i)))
        return d.addErrback(lambda f: failures.append(f.getErrorMessage()))

    def run() -> None:
        d = defer.DeferredList([one(i) for i in range(count)])
        d.addBoth(lambda _: pool.closeCachedConnections())
        d.addBoth(lambda _: reactor.stop())

    stopper = reactor.callLater(max(60.0, count * timeout / concurrency), reactor.stop)
    reactor.callWhenRunning(run)
    reactor.run()
    if stopper.active():
        stopper.cancel()
    if failures:
        print(f"{len(failures)} registrations failed, e.g. {failures[0]}", file=sys.stderr)
    return registered


# ---------------------------------------------------------------------------------------------
# Worker: devices on one reactor
# ---------------------------------------------------------------------------------------------


class Stats:
    """What one worker counts; merged by the parent."""

    def __init__(self) -> None:
        self.counters: collections.Counter = collections.Counter()
        self.refused: collections.Counter = collections.Counter()
        self.close_codes: collections.Counter = collections.Counter()
        self.rtt = array("d")
        self.handshake = array("d")
        self.command = array("d")
        self.http = array("d")
        self.snapshot_ack = array("d")
        self.connect_starts = array("d")
        self.connect_ends = array("d")


class Device:
    """One simulated device: its credentials, its connection and its outstanding frames."""

    __slots__ = (
        "worker",
        "device_id",
        "token",
        "role",
        "conn",
        "opened",
        "t_connect",
        "sent",
        "timer",
        "heartbeat",
        "done",
        "attempts",
        "next_at",
    )

    def __init__(self, worker: Worker, device_id: str, token: str, role: str) -> None:
        self.worker = worker
        self.device_id = device_id
        self.token = token
        self.role = role
        self.conn: Any = None
        self.opened = False
        self.t_connect = 0.0
        self.sent: collections.deque = collections.deque()
        self.timer: Any = None
        self.heartbeat: bytes = b""
        self.done = False
        self.attempts = 0
        self.next_at = 0.0

    # events from the connection

    def handshake_done(self) -> None:
        worker = self.worker
        now = time.monotonic()
        self.opened = True
        worker.stats.handshake.append(now - self.t_connect)
        worker.stats.connect_ends.append(now)
        worker.stats.counters["opened"] += 1
        worker.attempt_finished(self)
        worker.device_opened(self, now)

    def refused(self, status: int | str) -> None:
        self.done = True
        worker = self.worker
        worker.stats.connect_ends.append(time.monotonic())
        if worker.retry(self, "refused:" + str(status)):
            return
        worker.stats.refused[str(status)] += 1
        worker.attempt_finished(self)

    def connect_failed(self, why: str) -> None:
        self.done = True
        worker = self.worker
        worker.stats.connect_ends.append(time.monotonic())
        if worker.retry(self, "connect_failed:" + why):
            return
        worker.stats.counters["connect_failed"] += 1
        worker.stats.counters["connect_failed:" + why] += 1
        worker.attempt_finished(self)

    def text_received(self, payload: bytes) -> None:
        worker = self.worker
        now = time.monotonic()
        if payload.startswith(b'{"type":"pong"'):
            if self.sent:
                sent = self.sent.popleft()
                if worker.in_window(now):
                    worker.stats.rtt.append(now - sent)
                    worker.stats.counters["pongs"] += 1
            else:
                worker.stats.counters["unexpected_pongs"] += 1
            if worker.mode == "flood" and worker.flooding:
                self.send_heartbeat(now)
            return
        try:
            frame = json.loads(payload)
        except ValueError:
            worker.stats.counters["bad_frames"] += 1
            return
        kind = frame.get("type") if isinstance(frame, dict) else None
        if kind == "command":
            data = frame.get("data")
            if isinstance(data, dict) and "t" in data:
                worker.stats.command.append(now - data["t"])
            worker.stats.counters["commands_received"] += 1
            if worker.ack_commands and frame.get("id"):
                ack = json.dumps(
                    {"type": "ack", "id": frame["id"], "payload": {"ok": True}},
                    separators=(",", ":"),
                ).encode()
                self.conn.send_text(ack)
        elif kind == "ack" and self.role == "snapshot":
            if self.sent:
                sent = self.sent.popleft()
                if worker.in_window(now):
                    worker.stats.snapshot_ack.append(now - sent)
            worker.stats.counters["snapshot_acks"] += 1
        elif kind == "error":
            if self.sent:
                self.sent.popleft()
            worker.stats.counters["error_frames"] += 1
            worker.stats.counters["error:" + str(frame.get("error"))] += 1
        else:
            worker.stats.counters["other_frames"] += 1

    def closed(self, code: int | None, reason: str) -> None:
        worker = self.worker
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        was_open = self.opened
        self.opened = False
        self.conn = None
        if self.done or worker.stopping:
            return
        if not was_open:
            # closed before the handshake finished: a refusal Autobahn reports as a close
            match = re.search(r"\b([1-5]\d\d)\b", reason or "")
            self.refused(match.group(1) if match else "dropped")
            return
        self.done = True
        worker.stats.counters["disconnects"] += 1
        if worker.in_window(time.monotonic()):
            worker.stats.counters["disconnects_in_window"] += 1
        worker.stats.close_codes[str(code)] += 1

    # sending

    def send_heartbeat(self, now: float) -> None:
        self.sent.append(now)
        self.conn.send_heartbeat()
        if self.worker.in_window(now):
            self.worker.stats.counters["heartbeats_sent"] += 1

    def tick(self) -> None:
        """The periodic timer: a heartbeat (or a snapshot for a snapshot sender)."""
        worker = self.worker
        self.timer = None
        if self.conn is None or worker.stopping:
            return
        now = time.monotonic()
        if self.role == "snapshot":
            self.sent.append(now)
            self.conn.send_prepared(worker.snapshot_frame, worker.snapshot_frame_autobahn, True)
            worker.stats.counters["snapshots_sent"] += 1
            interval = worker.args.snapshot_interval
        else:
            self.send_heartbeat(now)
            interval = worker.args.interval
        if worker.args.schedule == "fixed":
            # The device's own phase, start + k × interval: a late tick (the load
            # generator was busy) does not move the next one, so delays never gather
            # devices into bursts; a tick more than a period late is skipped.
            self.next_at += interval
            while self.next_at <= now:
                self.next_at += interval
            delay = self.next_at - now
        else:
            jitter = worker.args.jitter
            delay = interval * worker.rng.uniform(1 - jitter, 1 + jitter)
        self.timer = worker.reactor.callLater(delay, self.tick)


def _raw_client_class():
    from twisted.internet import protocol

    class RawClient(protocol.Protocol):
        """A minimal RFC 6455 client: enough framing for the benchmark, cheap per frame."""

        device: Device
        key: bytes

        def __init__(self, device: Device, host: str, port: int, path: str) -> None:
            self.device = device
            self.host = host
            self.port = port
            self.path = path
            self.buffer = b""
            self.open = False
            self.mask_key = os.urandom(4)
            self.handshake_timer: Any = None
            self.close_code: int | None = None

        def connectionMade(self) -> None:
            device = self.device
            device.conn = self
            self.transport.setTcpNoDelay(True)  # type: ignore[attr-defined]
            self.key = base64.b64encode(os.urandom(16))
            device.heartbeat = client_frame(
                0x1, heartbeat_payload(device.device_id), self.mask_key
            )
            self.transport.write(
                b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                b"Sec-WebSocket-Version: 13\r\nUser-Agent: elevgw-bench\r\n\r\n"
                % (self.path.encode(), self.host.encode(), self.port, self.key)
            )
            timeout = device.worker.args.handshake_timeout
            self.handshake_timer = device.worker.reactor.callLater(timeout, self._too_slow)

        def _too_slow(self) -> None:
            self.handshake_timer = None
            if not self.open:
                self.device.worker.stats.counters["handshake_timeouts"] += 1
                self.device.refused("timeout")
                self.transport.abortConnection()  # type: ignore[attr-defined]

        def dataReceived(self, data: bytes) -> None:
            buffer = self.buffer + data if self.buffer else data
            if not self.open:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    self.buffer = buffer
                    return
                if not self._handshake(buffer[:end]):
                    return
                buffer = buffer[end + 4 :]
            pos = 0
            size = len(buffer)
            device = self.device
            while size - pos >= 2:
                b0 = buffer[pos]
                length = buffer[pos + 1] & 0x7F
                head = 2
                if length == 126:
                    if size - pos < 4:
                        break
                    length = int.from_bytes(buffer[pos + 2 : pos + 4], "big")
                    head = 4
                elif length == 127:
                    if size - pos < 10:
                        break
                    length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
                    head = 10
                if size - pos < head + length:
                    break
                payload = buffer[pos + head : pos + head + length]
                pos += head + length
                opcode = b0 & 0x0F
                if opcode == 0x1:
                    device.text_received(payload)
                elif opcode == 0x8:
                    self.close_code = (
                        int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                    )
                    self.transport.write(client_frame(0x8, payload[:2], self.mask_key))
                    self.transport.loseConnection()
                    self.buffer = b""
                    return
                elif opcode == 0x9:
                    self.transport.write(client_frame(0xA, payload, self.mask_key))
            self.buffer = buffer[pos:] if pos < size else b""

        def _handshake(self, head: bytes) -> bool:
            if self.handshake_timer is not None and self.handshake_timer.active():
                self.handshake_timer.cancel()
            self.handshake_timer = None
            lines = head.split(b"\r\n")
            status = lines[0].split(b" ", 2)
            code = status[1].decode("ascii", "replace") if len(status) > 1 else "bad"
            if code != "101":
                self.device.refused(code)
                self.transport.loseConnection()
                return False
            expected = base64.b64encode(hashlib.sha1(self.key + WS_GUID).digest())
            accept = b""
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-accept":
                    accept = value.strip()
            if accept != expected:
                self.device.refused("bad_accept")
                self.transport.abortConnection()  # type: ignore[attr-defined]
                return False
            self.open = True
            self.device.handshake_done()
            return True

        def connectionLost(self, reason: Any = None) -> None:
            if self.handshake_timer is not None and self.handshake_timer.active():
                self.handshake_timer.cancel()
            if not self.open and not self.device.done:
                self.device.refused("dropped")
                return
            self.device.closed(self.close_code, str(reason.value) if reason else "")

        # what a Device calls

        def send_heartbeat(self) -> None:
            self.transport.write(self.device.heartbeat)

        def send_text(self, payload: bytes) -> None:
            self.transport.write(client_frame(0x1, payload, self.mask_key))

        def send_prepared(self, raw_frame: bytes, payload: bytes, binary: bool) -> None:
            self.transport.write(raw_frame)

    return RawClient


def _connector_class():
    from twisted.internet import protocol

    class Connector(protocol.ClientFactory):
        """Builds the one connection of one device (a factory per connection attempt)."""

        noisy = False

        def __init__(self, worker: Worker, device: Device, resource_path: str) -> None:
            self.worker = worker
            self.device = device
            self.resource_path = resource_path

        def buildProtocol(self, addr):
            worker = self.worker
            if worker.ws_factory is not None:
                p = worker.client_class()
                p.factory = worker.ws_factory
                p.device = self.device
                p.resource = self.resource_path
                return p
            return worker.client_class(self.device, worker.host, worker.port, self.resource_path)

        def clientConnectionFailed(self, connector, reason):
            self.device.connect_failed(type(reason.value).__name__)

    return Connector


def _autobahn_client_class():
    from autobahn.twisted.websocket import WebSocketClientProtocol
    from autobahn.websocket.types import ConnectingRequest

    class AutobahnClient(WebSocketClientProtocol):
        """Autobahn's client protocol, feeding the same ``Device`` as the raw client."""

        device: Device
        resource: str

        def onConnecting(self, transport_details):
            factory = self.factory
            return ConnectingRequest(host=factory.host, port=factory.port, resource=self.resource)

        def connectionMade(self):
            self.device.conn = self
            super().connectionMade()

        def onOpen(self):
            payload = heartbeat_payload(self.device.device_id)
            self.device.heartbeat = payload
            self.device.handshake_done()

        def onMessage(self, payload, isBinary):
            if not isBinary:
                self.device.text_received(payload)

        def onClose(self, wasClean, code, reason):
            device = self.device
            if not device.opened and not device.done:
                device.closed(None, reason or "dropped")
                return
            device.closed(code, reason or "")

        def send_heartbeat(self):
            self.sendMessage(self.device.heartbeat)

        def send_text(self, payload):
            self.sendMessage(payload)

        def send_prepared(self, raw_frame, payload, binary):
            self.sendMessage(payload, isBinary=binary)

    return AutobahnClient


class Worker:
    """The devices of one process, driven by one reactor."""

    def __init__(self, args: argparse.Namespace, creds: list[tuple[str, str]]) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.args = args
        self.mode = "capacity" if args.mode == "idle" else args.mode
        self.rng = random.Random(f"{args.seed}-{args.worker_index}")
        self.stats = Stats()
        self.host, self.port = check_loopback_url(args.ws_url)
        self.path = urlsplit(args.ws_url).path or "/ws"
        self.connect_hosts = spread_hosts(self.host, args.spread)
        self.window = (math.inf, -math.inf)
        self.flooding = False
        self.stopping = False
        self.finished = False
        self.ack_commands = not args.no_ack
        self.pending: collections.deque = collections.deque()
        self.in_progress = 0
        self.concurrency = max(1, args.concurrency)
        self.connect_done: Any = None
        self.devices: list[Device] = []
        senders = args.senders if self.mode == "snapshots" else 0
        for i, (device_id, token) in enumerate(creds):
            role = "snapshot" if args.first_index + i < senders else "heartbeat"
            self.devices.append(Device(self, device_id, token, role))
        self.snapshot_frame = b""
        self.snapshot_frame_autobahn = b""
        if senders and any(d.role == "snapshot" for d in self.devices):
            image = snapshot_image(args.snapshot_size)
            self.snapshot_frame_autobahn = image
            self.snapshot_frame = client_frame(0x2, image, os.urandom(4))
        self.ws_factory: Any = None
        if args.client == "autobahn":
            from autobahn.twisted.websocket import WebSocketClientFactory

            self.client_class = _autobahn_client_class()
            factory = WebSocketClientFactory(args.ws_url)
            factory.protocol = self.client_class
            factory.setProtocolOptions(
                autoPingInterval=0,
                perMessageCompressionOffers=[],
                openHandshakeTimeout=args.handshake_timeout,
                closeHandshakeTimeout=2,
                utf8validateIncoming=False,
                failByDrop=True,
            )
            self.ws_factory = factory
        else:
            self.client_class = _raw_client_class()
        self.connector_class = _connector_class()

    def in_window(self, now: float) -> bool:
        return self.window[0] <= now <= self.window[1]

    # connecting

    def connect_all(self):
        from twisted.internet import defer

        self.connect_done = defer.Deferred()
        self.pending.extend(self.devices)
        if not self.pending:
            self.connect_done.callback(None)
            return self.connect_done
        self._pump()
        return self.connect_done

    def _pump(self) -> None:
        while self.pending and self.in_progress < self.concurrency:
            device = self.pending.popleft()
            self.in_progress += 1
            self._connect(device)

    def _connect(self, device: Device) -> None:
        query = f"device_id={quote(device.device_id)}&token={quote(device.token)}"
        device.t_connect = time.monotonic()
        self.stats.connect_starts.append(device.t_connect)
        hosts = self.connect_hosts
        self.reactor.connectTCP(
            hosts[hash(device.device_id) % len(hosts)],
            self.port,
            self.connector_class(self, device, f"{self.path}?{query}"),
            timeout=self.args.connect_timeout,
        )

    def retry(self, device: Device, why: str) -> bool:
        """Try a failed connect again after 1-2 s, up to ``--connect-retries`` times (not in a
        storm, which measures first attempts); ``True`` if a retry is scheduled."""
        if self.mode == "storm" or device.attempts >= self.args.connect_retries:
            return False
        if self.stopping:
            return False
        device.attempts += 1
        self.stats.counters["connect_retries"] += 1
        self.stats.counters["retry:" + why] += 1

        def again() -> None:
            device.done = False
            device.opened = False
            self._connect(device)

        self.reactor.callLater(self.rng.uniform(1.0, 2.0), again)
        return True

    def attempt_finished(self, device: Device) -> None:
        self.in_progress -= 1
        if self.pending:
            self._pump()
        elif self.in_progress == 0 and self.connect_done is not None:
            d, self.connect_done = self.connect_done, None
            d.callback(None)

    def device_opened(self, device: Device, now: float) -> None:
        if self.mode == "flood" or (self.mode == "storm" and not self.args.storm_heartbeats):
            return
        if device.role == "snapshot":
            delay = self.rng.uniform(0, self.args.snapshot_interval)
        else:
            delay = self.rng.uniform(0, self.args.interval)
        device.next_at = now + delay
        device.timer = self.reactor.callLater(delay, device.tick)

    # the measured window

    def start_window(self, t_go: float) -> None:
        args = self.args
        start = t_go + (args.warmup if self.mode in ("flood",) else 0.0)
        self.window = (start, start + args.duration)
        delay = max(0.0, t_go - time.monotonic())
        self.reactor.callLater(delay, self._go)

    def _go(self) -> None:
        if self.mode == "flood":
            self.flooding = True
            now = time.monotonic()
            for device in self.devices:
                if device.conn is not None and device.opened:
                    for _ in range(self.args.in_flight):
                        device.send_heartbeat(now)
        start, end = self.window
        self.reactor.callLater(max(0.0, start - time.monotonic()), self._window_opened)
        self.reactor.callLater(max(0.0, end - time.monotonic()), self._window_closed)

    def _window_opened(self) -> None:
        self.cpu_at_start = cpu_seconds()
        self.t_cpu_start = time.monotonic()

    def _window_closed(self) -> None:
        self.cpu_window = cpu_seconds() - getattr(self, "cpu_at_start", cpu_seconds())
        self.t_cpu_end = time.monotonic()
        self.stopping = True
        self.flooding = False
        # commands: answers and frames still on their way are counted for --grace seconds
        grace = self.args.grace if self.mode == "commands" else 0.0
        self.reactor.callLater(grace, self.finish)

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        result = self.result()
        emit(result)
        # stay connected a moment so the parent can end a profile before the teardown
        self.reactor.callLater(self.args.linger, self.reactor.stop)

    def result(self) -> dict:
        stats = self.stats
        samples = {}
        for name in ("rtt", "handshake", "command", "http", "snapshot_ack", "connect_starts"):
            values = getattr(stats, name)
            path = os.path.join(self.args.samples_dir, f"w{self.args.worker_index}-{name}.f64")
            with open(path, "wb") as f:
                values.tofile(f)
            samples[name] = path
        ends = stats.connect_ends
        return {
            "event": "result",
            "worker": self.args.worker_index,
            "devices": len(self.devices),
            "counters": dict(stats.counters),
            "refused": dict(stats.refused),
            "close_codes": dict(stats.close_codes),
            "samples": samples,
            "first_connect_end": min(ends) if ends else None,
            "last_connect_end": max(ends) if ends else None,
            "window": list(self.window),
            "cpu_window_s": round(getattr(self, "cpu_window", 0.0), 3),
            "cpu_window_wall_s": round(
                getattr(self, "t_cpu_end", 0.0) - getattr(self, "t_cpu_start", 0.0), 3
            ),
            "cpu_total_s": round(cpu_seconds(), 3),
            "rss_kb": rss_kb(),
            "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        }


class CommandSender:
    """``POST /api/send`` at a fixed rate over a pool of keep-alive HTTP/1.1 connections."""

    def __init__(self, args: argparse.Namespace, device_ids: list[str], worker: Worker) -> None:
        from twisted.internet import protocol

        self.args = args
        self.worker = worker
        self.reactor = worker.reactor
        self.device_ids = device_ids
        self.host, self.port = check_loopback_url(args.api_url)
        self.idle: list = []
        self.queue: collections.deque = collections.deque()
        self.issued = 0
        self.reconnects = 0
        self.t0 = 0.0
        self.end = 0.0
        sender = self
        api_key = os.environ.get("ELEVGW_API_KEY")
        self.auth = b"Authorization: Bearer %s\r\n" % api_key.encode() if api_key else b""

        class HTTPConnection(protocol.Protocol):
            def connectionMade(self):
                self.transport.setTcpNoDelay(True)
                self.buffer = b""
                self.current = None
                sender.idle.append(self)
                sender.dispatch()

            def request(self, body: bytes, started: float) -> None:
                self.current = started
                self.buffer = b""
                self.transport.write(
                    b"POST /api/send HTTP/1.1\r\nHost: %s:%d\r\n"
                    b"Content-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
                    % (sender.host.encode(), sender.port, len(body), sender.auth, body)
                )

            def dataReceived(self, data):
                self.buffer += data
                parsed = _parse_http_response(self.buffer)
                if parsed is None:
                    return
                status, _body, keep_alive = parsed
                started, self.current = self.current, None
                self.buffer = b""
                sender.answered(status, started)
                if keep_alive:
                    sender.idle.append(self)
                    sender.dispatch()
                else:
                    self.transport.loseConnection()

            def connectionLost(self, reason=None):
                if self in sender.idle:
                    sender.idle.remove(self)
                if self.current is not None:
                    sender.answered("connection_lost", self.current)
                    self.current = None
                sender.connection_lost()

        self.connection_class = HTTPConnection

    def _open(self) -> None:
        from twisted.internet import protocol

        factory = protocol.ClientFactory()
        factory.protocol = self.connection_class
        factory.noisy = False
        sender = self

        def failed(connector, reason):
            sender.worker.stats.counters["http_connect_failed"] += 1

        factory.clientConnectionFailed = failed  # type: ignore[method-assign]
        self.reactor.connectTCP(self.host, self.port, factory, timeout=5)

    def start(self) -> None:
        for _ in range(self.args.http_connections):
            self._open()

    def run_window(self, start: float, end: float) -> None:
        self.t0 = start
        self.end = end
        self.reactor.callLater(max(0.0, start - time.monotonic()), self._fire)

    def _fire(self) -> None:
        now = time.monotonic()
        if now >= self.end:
            return
        due = int((now - self.t0) * self.args.rate) + 1 - self.issued
        rng = self.worker.rng
        for _ in range(max(0, due)):
            self.issued += 1
            started = time.monotonic()
            body = json.dumps(
                {
                    "device_id": rng.choice(self.device_ids),
                    "command": "BENCH",
                    "data": {"t": started, "n": self.issued},
                },
                separators=(",", ":"),
            ).encode()
            self.queue.append((body, started))
        self.worker.stats.counters["http_issued"] = self.issued
        self.dispatch()
        next_due = self.t0 + self.issued / self.args.rate
        self.reactor.callLater(max(0.0, next_due - time.monotonic()), self._fire)

    def dispatch(self) -> None:
        while self.queue and self.idle:
            connection = self.idle.pop()
            body, started = self.queue.popleft()
            connection.request(body, started)
        self.worker.stats.counters["http_queue_max"] = max(
            self.worker.stats.counters["http_queue_max"], len(self.queue)
        )

    def answered(self, status: Any, started: float) -> None:
        now = time.monotonic()
        stats = self.worker.stats
        stats.http.append(now - started)
        stats.counters[f"http_{status}"] += 1
        if status != 200:
            stats.counters["http_errors"] += 1

    def connection_lost(self) -> None:
        if self.worker.stopping or self.reconnects >= 100:
            return
        self.reconnects += 1
        self.worker.stats.counters["http_reconnects"] += 1
        self._open()


def _parse_http_response(buffer: bytes) -> tuple[int, bytes, bool] | None:
    """``(status, body, keep_alive)`` once ``buffer`` holds a whole response, else ``None``."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buffer[:end].split(b"\r\n")
    status = int(head[0].split(b" ", 2)[1])
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    rest = buffer[end + 4 :]
    keep_alive = headers.get(b"connection", b"").lower() != b"close"
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        if len(rest) < length:
            return None
        return status, rest[:length], keep_alive
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = b""
        pos = 0
        while True:
            line_end = rest.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(rest[pos:line_end].split(b";")[0], 16)
            if size == 0:
                if rest.find(b"\r\n", line_end + 2) < 0:
                    return None
                return status, body, keep_alive
            start = line_end + 2
            if len(rest) < start + size + 2:
                return None
            body += rest[start : start + size]
            pos = start + size + 2
    return status, rest, False


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def run_worker(args: argparse.Namespace) -> int:
    """One worker process: connect its devices, report ready, wait for ``go T``, measure."""
    from twisted.internet import reactor, stdio
    from twisted.protocols.basic import LineReceiver

    raise_fd_limit()
    all_creds = load_credentials(args.credentials, args.devices)
    mine = all_creds[args.first_index : args.first_index + args.count]
    worker = Worker(args, mine)
    command_sender = None
    if args.role == "commander":
        command_sender = CommandSender(args, [c[0] for c in all_creds], worker)
    # A worker lives for one run and makes next to no cyclic garbage; a full collection of its
    # thousands of connections stops it for 200+ ms, which would show up as the server's
    # latency. So: no cyclic collector in the workers.
    gc.collect()
    gc.freeze()
    gc.disable()

    def hard_stop() -> None:
        worker.stats.counters["hard_stopped"] += 1
        worker.stopping = True
        worker.finish()

    reactor.callLater(args.max_runtime, hard_stop)

    class Control(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line):
            words = line.decode().split()
            if words and words[0] == "go":
                t_go = float(words[1])
                if worker.mode == "storm":
                    worker.window = (t_go, t_go + args.duration)
                    reactor.callLater(max(0.0, t_go - time.monotonic()), storm)
                else:
                    worker.start_window(t_go)
                    if command_sender is not None:
                        command_sender.run_window(*worker.window)

        def connectionLost(self, reason=None):
            if not worker.stopping:
                hard_stop()

    def storm() -> None:
        worker._window_opened()
        d = worker.connect_all()

        def finished(_):
            if not worker.stopping:
                worker._window_closed()

        d.addCallback(finished)

    def ready(_=None) -> None:
        emit(
            {
                "event": "ready",
                "worker": args.worker_index,
                "opened": worker.stats.counters["opened"],
            }
        )

    def start() -> None:
        stdio.StandardIO(Control())
        if command_sender is not None:
            command_sender.start()
            reactor.callLater(0.5, ready)
        elif worker.mode == "storm":
            ready()
        else:
            worker.connect_all().addCallback(ready)

    reactor.callWhenRunning(start)
    reactor.run()
    return 0


# ---------------------------------------------------------------------------------------------
# Parent: spawn workers, synchronise, merge
# ---------------------------------------------------------------------------------------------


def _read_event(worker: subprocess.Popen, deadline: float) -> dict:
    import select

    assert worker.stdout is not None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("worker did not answer in time")
        ready, _, _ = select.select([worker.stdout], [], [], remaining)
        if not ready:
            continue
        line = worker.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {worker.wait()}")
        try:
            event = json.loads(line)
        except ValueError:
            print(line.rstrip(), file=sys.stderr)
            continue
        return event


def _read_samples(path: str) -> array:
    values = array("d")
    with open(path, "rb") as f:
        data = f.read()
    values.frombytes(data)
    return values


def run_parent(args: argparse.Namespace) -> dict:
    mode = "capacity" if args.mode == "idle" else args.mode
    check_loopback_url(args.ws_url)
    creds = load_credentials(args.credentials, args.devices)
    if len(creds) < args.devices:
        raise SystemExit(
            f"{args.credentials} has {len(creds)} credentials, {args.devices} needed:"
            " run `loadgen.py provision` first"
        )
    workers_needed = max(args.workers, math.ceil(args.devices / args.per_worker))
    per = math.ceil(args.devices / workers_needed)
    samples_dir = tempfile.mkdtemp(prefix="elevgw-loadgen-")
    base = [sys.executable, os.path.abspath(__file__), args.mode, "--worker"]
    passthrough = _passthrough(args)
    slices = []
    for i in range(workers_needed):
        first = i * per
        count = max(0, min(per, args.devices - first))
        slices.append(("devices", first, count))
    if mode == "commands":
        slices.append(("commander", 0, 0))
    concurrency = max(1, args.concurrency // workers_needed)
    procs = []
    started_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    t_started = time.monotonic()
    for i, (role, first, count) in enumerate(slices):
        command = base + passthrough
        command += [
            "--worker-index",
            str(i),
            "--role",
            role,
            "--first-index",
            str(first),
            "--count",
            str(count),
            "--samples-dir",
            samples_dir,
            "--concurrency",
            str(concurrency),
        ]
        procs.append(
            subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        )
    results = []
    try:
        deadline = time.monotonic() + args.connect_timeout + args.devices / 100 + 60
        readies = [_read_event(p, deadline) for p in procs]
        t_ready = time.monotonic()
        t_go = time.monotonic() + 0.5
        start = t_go + (args.warmup if mode == "flood" else 0.0)
        emit({"event": "window", "start": start, "end": start + args.duration})
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(f"go {t_go!r}\n")
            p.stdin.flush()
        deadline = time.monotonic() + args.duration + args.warmup + args.connect_timeout + 60
        for p in procs:
            event = _read_event(p, deadline)
            results.append(event)
        emit({"event": "measured"})
    finally:
        for p in procs:
            try:
                if p.stdin is not None:
                    p.stdin.close()
            except OSError:
                pass
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    ended_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    merged = merge_results(args, mode, results, readies, t_go)
    merged["loadgen"]["workers"] = len(procs)
    merged["loadgen"]["cpu_total_s"] = round(
        (ended_cpu.ru_utime + ended_cpu.ru_stime) - (started_cpu.ru_utime + started_cpu.ru_stime),
        3,
    )
    merged["loadgen"]["wall_s"] = round(time.monotonic() - t_started, 3)
    merged["connect_phase_s"] = round(t_ready - t_started, 3)
    for name in os.listdir(samples_dir):
        os.unlink(os.path.join(samples_dir, name))
    os.rmdir(samples_dir)
    return merged


def _passthrough(args: argparse.Namespace) -> list[str]:
    names = (
        "ws_url",
        "api_url",
        "credentials",
        "devices",
        "duration",
        "warmup",
        "in_flight",
        "interval",
        "jitter",
        "schedule",
        "rate",
        "http_connections",
        "senders",
        "snapshot_size",
        "snapshot_interval",
        "connect_timeout",
        "handshake_timeout",
        "connect_retries",
        "max_runtime",
        "grace",
        "linger",
        "client",
        "seed",
        "spread",
    )
    out = []
    for name in names:
        value = getattr(args, name)
        if value is not None:
            out += ["--" + name.replace("_", "-"), str(value)]
    if args.no_ack:
        out.append("--no-ack")
    if args.storm_heartbeats:
        out.append("--storm-heartbeats")
    return out


def merge_results(
    args: argparse.Namespace, mode: str, results: list, readies: list, t_go: float
) -> dict:
    counters: collections.Counter = collections.Counter()
    refused: collections.Counter = collections.Counter()
    close_codes: collections.Counter = collections.Counter()
    samples: dict[str, array] = collections.defaultdict(lambda: array("d"))
    cpu_window = 0.0
    for r in results:
        counters.update(r["counters"])
        refused.update(r["refused"])
        close_codes.update(r["close_codes"])
        cpu_window += r["cpu_window_s"]
        for name, path in r["samples"].items():
            samples[name].extend(_read_samples(path))
    window = results[0]["window"] if results else [t_go, t_go]
    wall = max((r["cpu_window_wall_s"] for r in results), default=0.0) or args.duration
    out: dict[str, Any] = {
        "mode": mode,
        "client": args.client,
        "devices": args.devices,
        "opened": counters["opened"],
        "connect_failed": counters["connect_failed"],
        "connect_retries": counters["connect_retries"],
        "refused": dict(refused),
        "disconnects": counters["disconnects"],
        "disconnects_in_window": counters["disconnects_in_window"],
        "close_codes": dict(close_codes),
        "error_frames": counters["error_frames"],
        "window_s": round(window[1] - window[0], 3),
        "window_monotonic": window,
        "loadgen": {
            "cpu_window_s": round(cpu_window, 3),
            "cpu_window_pct_of_one_core": round(100 * cpu_window / wall, 1) if wall else None,
            "rss_kb": sum(r["rss_kb"] for r in results),
            "fd_limit": min((r["fd_limit"] for r in results), default=None),
        },
        "counters": {k: v for k, v in counters.items() if ":" in k or k.startswith("http")},
    }
    if mode == "flood":
        out["in_flight"] = args.in_flight
        out["round_trips"] = counters["pongs"]
        out["round_trips_per_s"] = round(counters["pongs"] / args.duration, 1)
        out["rtt_ms"] = percentiles(samples["rtt"])
    elif mode in ("capacity", "snapshots", "commands"):
        out["interval_s"] = args.interval
        out["pongs"] = counters["pongs"]
        out["heartbeats_sent"] = counters["heartbeats_sent"]
        out["rtt_ms"] = percentiles(samples["rtt"])
        out["handshake_ms"] = percentiles(samples["handshake"])
    if mode == "storm":
        starts = samples["connect_starts"]
        ends = [r["last_connect_end"] for r in results if r["last_connect_end"]]
        first = min(starts) if starts else t_go
        last = max(ends) if ends else first
        span = max(last - first, 1e-9)
        out["concurrency"] = args.concurrency
        out["handshakes"] = counters["opened"]
        out["storm_s"] = round(span, 3)
        out["handshakes_per_s"] = round(counters["opened"] / span, 1)
        out["handshake_ms"] = percentiles(samples["handshake"])
        out["handshake_timeouts"] = counters["handshake_timeouts"]
        out["refused_total"] = sum(refused.values())
    if mode == "commands":
        out["rate"] = args.rate
        out["commands_issued"] = counters["http_issued"]
        out["commands_ok"] = counters["http_200"]
        out["commands_received"] = counters["commands_received"]
        out["http_errors"] = counters["http_errors"]
        out["command_ms"] = percentiles(samples["command"])
        out["http_ms"] = percentiles(samples.get("http", array("d")))
    if mode == "snapshots":
        out["senders"] = args.senders
        out["snapshot_size"] = args.snapshot_size
        out["snapshots_sent"] = counters["snapshots_sent"]
        out["snapshot_acks"] = counters["snapshot_acks"]
        out["snapshot_ack_ms"] = percentiles(samples["snapshot_ack"])
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="elevgw load generator (loopback only); see the module docstring.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("mode", choices=MODES + ("provision",))
    parser.add_argument("--ws-url", default="ws://127.0.0.1:8080/ws")
    parser.add_argument("--api-url", default="http://127.0.0.1:8000")
    parser.add_argument(
        "--credentials",
        default=os.path.join(tempfile.gettempdir(), "elevgw-bench-creds.jsonl"),
        help="JSON-lines credential cache (the one bench/run.py uses)",
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="flood: seconds not counted")
    parser.add_argument("--in-flight", type=int, default=8, help="flood: heartbeats per device")
    parser.add_argument("--interval", type=float, default=5.0, help="heartbeat period, s")
    parser.add_argument(
        "--schedule",
        choices=("fixed", "jitter"),
        default="fixed",
        help="fixed: each device at its own phase + k × interval; jitter: each period drawn"
        " from interval × (1 ± --jitter) after the last heartbeat",
    )
    parser.add_argument("--jitter", type=float, default=0.1, help="± share of the period")
    parser.add_argument("--concurrency", type=int, default=500, help="connects in flight")
    parser.add_argument(
        "--storm-heartbeats",
        action="store_true",
        help="storm: heartbeat once connected (off: the client's CPU goes to connecting; a"
        " storm shorter than the heartbeat timeout loses no session)",
    )
    parser.add_argument("--rate", type=float, default=500.0, help="commands: /api/send per s")
    parser.add_argument("--http-connections", type=int, default=16)
    parser.add_argument("--senders", type=int, default=50, help="snapshots: sending devices")
    parser.add_argument("--snapshot-size", type=int, default=200_000)
    parser.add_argument("--snapshot-interval", type=float, default=1.0)
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    parser.add_argument(
        "--spread",
        type=int,
        default=1,
        help="connect to 127.0.0.1 … 127.0.0.N (the server must listen on all of them): each"
        " destination gets its own ephemeral port range",
    )
    parser.add_argument("--handshake-timeout", type=float, default=30.0)
    parser.add_argument(
        "--connect-retries", type=int, default=3, help="per device, except in a storm"
    )
    parser.add_argument("--max-runtime", type=float, default=900.0, help="hard stop, s")
    parser.add_argument("--workers", type=int, default=1, help="at least this many processes")
    parser.add_argument("--per-worker", type=int, default=PER_WORKER_DEFAULT)
    parser.add_argument("--client", choices=("raw", "autobahn"), default="raw")
    parser.add_argument("--no-ack", action="store_true", help="commands: do not ack")
    parser.add_argument(
        "--linger", type=float, default=1.0, help="s connected after reporting, then exit"
    )
    parser.add_argument(
        "--grace", type=float, default=2.0, help="commands: s to collect late answers"
    )
    parser.add_argument("--seed", default="elevgw")
    # provision
    parser.add_argument("--sqlite", help="provision: bulk-insert into this SQLite store")
    parser.add_argument(
        "--local", action="store_true", help="provision: only fill the credential cache"
    )
    parser.add_argument(
        "--register-concurrency", type=int, default=50, help="provision via API: in flight"
    )
    # internal (worker processes)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--role", default="devices", help=argparse.SUPPRESS)
    parser.add_argument("--first-index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--samples-dir", default=".", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mode == "provision":
        t0 = time.monotonic()
        if args.local:
            creds = ensure_local_credentials(args.credentials, args.devices)
            inserted, how = 0, "cache"
        elif args.sqlite:
            creds = ensure_local_credentials(args.credentials, args.devices)
            inserted = provision_sqlite(args.sqlite, creds)
            how = "sqlite"
        else:
            creds = provision_api(args.api_url, args.devices, args.register_concurrency, 30.0)
            append_credentials(args.credentials, creds)
            inserted = len(creds)
            how = "api"
        emit(
            {
                "mode": "provision",
                "via": how,
                "devices": len(creds),
                "inserted": inserted,
                "seconds": round(time.monotonic() - t0, 3),
                "credentials": args.credentials,
            }
        )
        return 0
    if args.worker:
        return run_worker(args)
    raise_fd_limit()
    emit(run_parent(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
