#!/usr/bin/env python3
"""The command queue under load: queue commands for offline devices, then reconnect them all.

1. Starts a fresh gateway (``twistd -n elevgw``) on the chosen store (``sqlite``: a new file;
   ``redis``: a fresh ``redis-server`` without persistence), provisions ``--devices`` devices
   straight into the store and keeps them offline.
2. Queues ``--per-device`` commands for each one through ``POST /api/v1/devices/{id}/commands``
   with a ``ttl`` (``--http-concurrency`` calls in flight, each device's commands one after
   the other): queueing rate, HTTP latency.
3. Connects every device (``--connect-concurrency`` handshakes in flight); each device acks
   every command as it arrives: delivery rate from the first connect to the last command,
   and the checks: every queued command delivered (nothing lost), in order per device, and
   how many came twice (a device connects once here, so at-least-once allows none).
4. Once the acks are in (queue depth 0 in ``/metrics``), reconnects every device and counts
   the commands that come again: after an ack, none may.

Prints one JSON line; ``docs/benchmarks.rst`` has the figures and the command. Run it alone
(``flock /work/bench.lock …`` on a shared machine)::

    python bench/command_queue.py --store sqlite --devices 10000 --per-device 10
    python bench/command_queue.py --store redis --devices 10000 --per-device 10
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.join(REPO, "src"))

sys.path.insert(2, os.path.join(REPO, "tests"))

import loadgen  # noqa: E402
from run import free_port, http_ok, wait_for  # noqa: E402

from redis_support import RedisServer, _encode  # noqa: E402


def provision_redis(port: int, creds: list[tuple[str, str]], prefix: str = "elevgw:") -> None:
    """Write the devices with the documented key layout (``docs/redis.rst``), pipelined."""
    from elevgw.stores.interfaces import hash_token

    now = repr(time.time())
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:  # pipelined
        reader = s.makefile("rb")
        for start in range(0, len(creds), 1000):
            chunk = creds[start : start + 1000]
            batch = []
            for i, (device_id, token) in enumerate(chunk):
                batch.append(_encode("HSET", f"{prefix}device:{device_id}", "location",
                                   f"bench-{start + i:05d}", "token_hash", hash_token(token),
                                   "created", now))  # fmt: skip
                batch.append(_encode("ZADD", f"{prefix}devices", now, device_id))
            s.sendall(b"".join(batch))
            for _ in batch:
                reader.readline()


class QueueDevice:
    """One device for ``loadgen``'s raw WebSocket client: acks every command, remembers them."""

    def __init__(self, bench: Bench, device_id: str, token: str) -> None:
        self.worker = bench.worker
        self.bench = bench
        self.device_id = device_id
        self.token = token
        self.conn: Any = None
        self.heartbeat = b""
        self.done = False
        self.opened = False
        self.received: list[str] = []

    def handshake_done(self) -> None:
        self.opened = True
        self.bench.opened(self)

    def refused(self, status: Any) -> None:
        self.done = True
        self.bench.failed(self, f"refused:{status}")

    def connect_failed(self, why: str) -> None:
        self.done = True
        self.bench.failed(self, f"connect_failed:{why}")

    def text_received(self, payload: bytes) -> None:
        frame = json.loads(payload)
        if frame.get("type") != "command":
            return
        self.received.append(frame["id"])
        self.conn.send_text(b'{"type":"ack","id":"%s"}' % frame["id"].encode())
        self.bench.command_received()

    def closed(self, code: Any, reason: str) -> None:
        self.opened = False
        self.conn = None


class Bench:
    def __init__(self, args: argparse.Namespace, api: str, ws_port: int, creds: list) -> None:
        from twisted.internet import reactor

        self.args = args
        self.api = api
        self.ws_port = ws_port
        self.reactor = reactor
        self.worker = SimpleNamespace(
            reactor=reactor,
            args=SimpleNamespace(handshake_timeout=60.0),
            stats=SimpleNamespace(counters=collections.Counter()),
        )
        self.creds = creds
        self.expected: dict[str, list[str]] = {}
        self.errors: collections.Counter = collections.Counter()
        self.attempts: collections.Counter = collections.Counter()
        self.http_latency: list[float] = []
        self.devices: list[QueueDevice] = []
        self.received = 0
        self.waiting_for: int | None = 0
        self.all_received: Any = None
        self.connect_queue: collections.deque = collections.deque()
        self.connecting = 0
        self.last_frame_at = 0.0

    # queueing through the API

    async def queue_all(self) -> float:
        from treq.client import HTTPClient
        from twisted.internet import defer
        from twisted.web.client import Agent, HTTPConnectionPool

        pool = HTTPConnectionPool(self.reactor, persistent=True)
        pool.maxPersistentPerHost = self.args.http_concurrency
        client = HTTPClient(Agent(self.reactor, pool=pool))
        pending = collections.deque(device_id for device_id, _ in self.creds)
        headers = {"Content-Type": ["application/json"]}

        async def one_device(device_id: str) -> None:
            ids = self.expected.setdefault(device_id, [])
            for n in range(self.args.per_device):
                body = json.dumps({"command": "SET", "data": {"n": n}, "ttl": self.args.ttl})
                started = time.monotonic()
                response = await client.post(
                    f"{self.api}/api/v1/devices/{quote(device_id)}/commands",
                    data=body.encode(),
                    headers=headers,
                    timeout=60,
                    reactor=self.reactor,
                )
                answer = json.loads(await response.content())
                self.http_latency.append(time.monotonic() - started)
                if response.code != 202 or answer.get("state") != "queued":
                    self.errors[f"queue:{response.code}:{answer.get('error')}"] += 1
                    continue
                ids.append(answer["id"])

        async def lane() -> None:
            while pending:
                await one_device(pending.popleft())

        started = time.monotonic()
        lanes = [defer.ensureDeferred(lane()) for _ in range(self.args.http_concurrency)]
        await defer.gatherResults(lanes, consumeErrors=True)
        elapsed = time.monotonic() - started
        await pool.closeCachedConnections()
        return elapsed

    # reconnecting

    def connect_all(self, expect: int | None) -> Any:
        """Connect every device; the Deferred fires once ``expect`` commands arrived (never
        when ``expect`` is ``None``: the caller only counts)."""
        from twisted.internet import defer

        self.devices = [QueueDevice(self, d, t) for d, t in self.creds]
        self.attempts.clear()
        self.received = 0
        self.waiting_for = expect
        self.all_received = defer.Deferred() if expect is not None else None
        self.connect_queue.extend(self.devices)
        self._pump()
        return self.all_received

    def _pump(self) -> None:
        from twisted.internet import protocol

        raw_client = loadgen._raw_client_class()
        while self.connect_queue and self.connecting < self.args.connect_concurrency:
            device = self.connect_queue.popleft()
            self.connecting += 1
            path = f"/ws?device_id={quote(device.device_id)}&token={quote(device.token)}"

            class Factory(protocol.ClientFactory):
                noisy = False

                def buildProtocol(self, addr, device=device, path=path, port=self.ws_port):
                    return raw_client(device, "127.0.0.1", port, path)

                def clientConnectionFailed(self, connector, reason, device=device):
                    device.connect_failed(type(reason.value).__name__)

            self.reactor.connectTCP("127.0.0.1", self.ws_port, Factory(), timeout=30)

    def opened(self, device: QueueDevice) -> None:
        self.connecting -= 1
        self._pump()

    def failed(self, device: QueueDevice, why: str) -> None:
        """A connect that failed is tried again after a second, three times at most (a device
        reconnects with backoff); only the last failure is an error."""
        self.connecting -= 1
        self.attempts[device.device_id] += 1
        if self.attempts[device.device_id] <= 3:
            self.errors["retried:" + why] += 1
            device.done = False
            self.reactor.callLater(1.0, self._retry, device)
        else:
            self.errors[why] += 1
        self._pump()

    def _retry(self, device: QueueDevice) -> None:
        self.connect_queue.append(device)
        self._pump()

    def command_received(self) -> None:
        self.received += 1
        self.last_frame_at = time.monotonic()
        if self.all_received is not None and self.received >= self.waiting_for:
            d, self.all_received = self.all_received, None
            d.callback(None)

    def close_all(self) -> None:
        for device in self.devices:
            if device.conn is not None:
                device.conn.transport.loseConnection()

    def check(self) -> dict:
        lost = duplicated = out_of_order = 0
        for device in self.devices:
            expected = self.expected.get(device.device_id, [])
            got = device.received
            first_seen = list(dict.fromkeys(got))
            lost += len(set(expected) - set(got))
            duplicated += len(got) - len(first_seen)
            if [c for c in first_seen if c in set(expected)] != expected:
                out_of_order += 1
        return {"lost": lost, "duplicated": duplicated, "devices_out_of_order": out_of_order}


def metric(api: str, name: str) -> float | None:
    import urllib.request

    with urllib.request.urlopen(api + "/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def run(args: argparse.Namespace) -> dict:
    folder = tempfile.mkdtemp(prefix="elevgw-cmdq-")
    redis: RedisServer | None = None
    gateway = None
    try:
        creds = loadgen.ensure_local_credentials(args.credentials, args.devices)
        t0 = time.monotonic()
        if args.store == "sqlite":
            db = os.path.join(folder, "elevgw.sqlite3")
            loadgen.provision_sqlite(db, creds)
            store = "sqlite:" + db
        else:
            redis = RedisServer()
            redis.start()
            store = redis.url
            provision_redis(redis.port, creds)
        provision_s = time.monotonic() - t0
        ws_port, api_port = free_port(), free_port()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "src"), REPO]))
        command = [
            args.twistd, "-n", "--pidfile=", "-l", os.path.join(folder, "twistd.log"), "elevgw",
            "--ws-endpoint", f"tcp:{ws_port}:interface=127.0.0.1",
            "--api-endpoint", f"tcp:{api_port}:interface=127.0.0.1",
            "--store", store, "--snapshots", "file:" + os.path.join(folder, "snapshots"),
            "--heartbeat-timeout", "3600", "--sweep-interval", "60", "--log-level", "warn",
            "--command-queue-size", str(max(100, args.per_device)), "--node-id", "bench",
        ]  # fmt: skip
        if args.server_cpu:
            command = ["taskset", "-c", args.server_cpu] + command
        gateway = subprocess.Popen(command, cwd=folder, env=env, stderr=subprocess.DEVNULL)
        api = f"http://127.0.0.1:{api_port}"
        wait_for(lambda: http_ok(api + "/healthz"), 30, "the gateway")
        loadgen.raise_fd_limit()

        from twisted.internet import defer, reactor
        from twisted.internet.task import deferLater

        bench = Bench(args, api, ws_port, creds)
        result: dict[str, Any] = {}

        async def main() -> None:
            queue_s = await bench.queue_all()
            queued = sum(len(ids) for ids in bench.expected.values())
            lat = loadgen.percentiles(bench.http_latency)
            await deferLater(reactor, 1.5, lambda: None)  # the depth gauge: once a second
            result.update(
                queued=queued,
                queue_seconds=round(queue_s, 2),
                queue_rate=round(queued / queue_s),
                queue_http_ms={k: round(v, 2) for k, v in lat.items()},
                depth_before=metric(api, "elevgw_command_queue_depth"),
            )
            started = time.monotonic()
            done = bench.connect_all(queued)
            done.addTimeout(args.deadline, reactor)
            try:
                await done
            except defer.TimeoutError:
                result["timed_out"] = True
            delivered_s = bench.last_frame_at - started
            result.update(
                delivered=bench.received,
                delivery_seconds=round(delivered_s, 2),
                delivery_rate=round(bench.received / delivered_s) if delivered_s > 0 else None,
                **bench.check(),
            )
            depth = None
            for _ in range(60):  # the acks land in the store behind the frames
                depth = metric(api, "elevgw_command_queue_depth")
                if depth == 0:
                    break
                await deferLater(reactor, 1.0, lambda: None)
            result["depth_after_acks"] = depth
            bench.close_all()
            await deferLater(reactor, 2.0, lambda: None)
            bench.connect_all(None)
            await deferLater(reactor, args.settle, lambda: None)
            result["sent_again_after_ack"] = bench.received
            bench.close_all()
            await deferLater(reactor, 1.0, lambda: None)

        def finish(outcome: Any) -> None:
            if isinstance(outcome, Exception) or hasattr(outcome, "getTraceback"):
                result["error"] = str(getattr(outcome, "value", outcome))
            reactor.stop()

        reactor.callWhenRunning(lambda: defer.ensureDeferred(main()).addBoth(finish))
        reactor.run()
        result.update(
            store=args.store,
            devices=args.devices,
            per_device=args.per_device,
            provision_seconds=round(provision_s, 2),
            errors=dict(bench.errors),
        )
        return result
    finally:
        if gateway is not None:
            gateway.terminate()
            try:
                gateway.wait(30)
            except subprocess.TimeoutExpired:
                gateway.kill()
        if redis is not None:
            redis.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    bin_dir = os.path.dirname(sys.executable)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", choices=("sqlite", "redis"), default="sqlite")
    parser.add_argument("--devices", type=int, default=10000)
    parser.add_argument("--per-device", type=int, default=10)
    parser.add_argument("--ttl", type=float, default=3600.0)
    parser.add_argument("--http-concurrency", type=int, default=32)
    parser.add_argument("--connect-concurrency", type=int, default=200)
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds for delivery")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to watch resends")
    parser.add_argument(
        "--credentials", default=os.path.join(tempfile.gettempdir(), "elevgw-cmdq-creds.jsonl")
    )
    parser.add_argument("--twistd", default=os.path.join(bin_dir, "twistd"))
    parser.add_argument("--server-cpu", default="", help="pin the gateway (taskset -c)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
