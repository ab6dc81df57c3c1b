"""Real clusters for tests: ``twistd -n elevgw`` processes on one real redis-server.

Each node is its own process (so ``kill -9`` is a real node death) with short cluster
timings (``LEASE`` seconds of lease), posting its webhooks to a ``Receiver`` that runs in the
test's reactor. Everything the tests ask of a node goes over real HTTP and WebSocket.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater

from webhook_receiver import Receiver, TrackingSite

#: Lease of the test nodes (seconds): a dead node's devices are reaped this long after it died.
LEASE = 1.5
PROBE_EVERY = 0.5
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def eventually(check, timeout: float = 15.0, interval: float = 0.05):
    """Await ``check()`` (sync or async) until it is true; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if hasattr(value, "__await__"):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout} s")
        await sleep(interval)


class Node:
    """One ``twistd -n elevgw`` process of the cluster."""

    def __init__(self, node_id: str, store: str, backend_url: str | None, directory: Path) -> None:
        self.node_id = node_id
        self.ws_port = free_port()
        self.api_port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.log_path = directory / f"{node_id}.log"
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        )
        args = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--pidfile",
            "",
            "--logfile",
            str(self.log_path),
            "-n",
            "elevgw",
            "--node-id",
            node_id,
            "--store",
            store,
            "--ws-endpoint",
            f"tcp:{self.ws_port}:interface=127.0.0.1",
            "--api-endpoint",
            f"tcp:{self.api_port}:interface=127.0.0.1",
            "--snapshots",
            f"file:{directory / ('snapshots-' + node_id)}",
            "--cluster-lease",
            str(LEASE),
            "--bus-probe-interval",
            str(PROBE_EVERY),
            "--drain-timeout",
            "3",
            "--store-timeout",
            "2",
        ]  # fmt: skip
        if backend_url is not None:
            args += ["--backend-url", backend_url]
        self.process = subprocess.Popen(
            args,
            cwd=str(directory),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    async def call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        response = await treq.request(
            method, self.base + path, data=data, reactor=reactor, timeout=20, persistent=False
        )
        content = await response.content()
        try:
            return response.code, json.loads(content) if content else None
        except ValueError:
            return response.code, content

    async def healthy(self) -> bool:
        try:
            status, _ = await self.call("GET", "/healthz")
        except Exception:
            return False
        return status == 200

    async def wait_healthy(self, timeout: float = 30.0) -> None:
        try:
            await eventually(self.healthy, timeout, 0.1)
        except AssertionError:
            raise AssertionError(f"node {self.node_id} not healthy:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """``kill -9``: the node dies without a word to anyone."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


class Cluster:
    def __init__(self, redis_url: str, receiver: Receiver, backend_url: str, directory: Path):
        self.redis_url = redis_url
        self.receiver = receiver
        self.backend_url = backend_url
        self.directory = directory
        self.nodes: list[Node] = []

    async def start(self, *node_ids: str) -> list[Node]:
        started = [
            Node(node_id, self.redis_url, self.backend_url, self.directory) for node_id in node_ids
        ]
        self.nodes.extend(started)
        for node in started:
            await node.wait_healthy()
        return started

    def statuses(self, device_id: str | None = None, status: str | None = None) -> list[dict]:
        """Status webhooks received so far (optionally of one device / one status)."""
        found = []
        for request in self.receiver.requests:
            if request.path != "/api/device/status":
                continue
            body = dict(request.json, event_id=request.event_id)
            if device_id is not None and body["device_id"] != device_id:
                continue
            if status is not None and body["status"] != status:
                continue
            found.append(body)
        return found

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest_twisted.async_yield_fixture
async def cluster(redis_url, tmp_path):
    """A ``Cluster`` on the test's empty Redis with a webhook receiver; nodes are stopped
    afterwards (SIGTERM, or SIGKILL if that hangs)."""
    receiver = Receiver()
    site = TrackingSite(receiver)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    running = Cluster(
        redis_url, receiver, f"http://127.0.0.1:{port.getHost().port}", tmp_path / "cluster"
    )
    try:
        yield running
    finally:
        running.stop()
        await port.stopListening()
        for closed in list(site.open_connections):
            await closed
