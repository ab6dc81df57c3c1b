"""``--workers``: ports shared through SO_REUSEPORT, a supervising parent, and its refusals."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import pytest_twisted
import treq
from twisted.internet import endpoints, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from elevgw.listener import Listener
from elevgw.workers import worker_arguments
from redis_support import free_port
from webhook_receiver import Receiver, TrackingSite
from wsclient import connect_device

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
SOURCE = os.pathsep.join(
    [os.path.join(os.path.dirname(__file__), "..", "src"), os.path.dirname(__file__) + "/.."]
)


def test_worker_arguments_drop_workers_and_add_the_index():
    args = ["--workers", "2", "--store=redis://r/0", "--workers=3", "--node-id", "gw"]
    assert worker_arguments(args, 1) == [
        "--store=redis://r/0",
        "--node-id",
        "gw",
        "--worker-index=1",
    ]


def test_the_shared_listener_reads_what_twisted_parsed():
    """``listen_reusing_port`` reads these private attributes of Twisted's endpoints."""
    endpoint = endpoints.serverFromString(reactor, "tcp:8080:interface=127.0.0.1:backlog=7")
    assert (endpoint._port, endpoint._interface, endpoint._backlog) == (8080, "127.0.0.1", 7)


class _Counting(Protocol):
    def connectionMade(self):
        self.factory.connections += 1
        self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_two_listeners_share_one_port_and_both_take_connections():
    port = free_port()
    factories = []
    listeners = []
    for _ in range(2):
        factory = Factory.forProtocol(_Counting)
        factory.connections = 0
        factories.append(factory)
        listener = Listener(reactor, f"tcp:{port}:interface=127.0.0.1", factory, reuse_port=True)
        listener.startService()
        listeners.append(listener)
    try:
        client = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        for _ in range(40):
            protocol = await client.connect(Factory.forProtocol(Protocol))
            protocol.transport.loseConnection()
        await deferLater(reactor, 0.2, lambda: None)
    finally:
        for listener in listeners:
            await listener.stopService()
    counts = [f.connections for f in factories]
    assert sum(counts) == 40 and min(counts) > 0, counts


def run_twistd(tmp_path, *args, env=None):
    return subprocess.Popen(
        [*TWISTD, "-n", "--pidfile=", "elevgw", *args],
        cwd=str(tmp_path),
        env=dict(os.environ, PYTHONPATH=SOURCE, **(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_several_workers_on_sqlite_are_refused_with_one_line(tmp_path):
    process = run_twistd(tmp_path, "--workers", "2")
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 1
    lines = out.decode().strip().splitlines()
    assert len(lines) == 1 and "SQLite is single-node" in lines[0], lines


def health(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as answer:
            return json.loads(answer.read())
    except OSError:
        return None


async def until(check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        await deferLater(reactor, 0.1, lambda: None)
    raise AssertionError("timed out")


def free_port_pair() -> list[int]:
    """Two consecutive free ports (worker I serves on the base + I), below the kernel's
    ephemeral range so that no outgoing connection takes one while a worker restarts."""
    for _ in range(200):
        base = random.randrange(20000, 32000)
        try:
            for port in (base, base + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return [base, base + 1]
    raise AssertionError("no two consecutive free ports")


@pytest_twisted.async_yield_fixture
async def backend():
    """A webhook receiver on loopback: ``(receiver, url)``."""
    receiver = Receiver()
    site = TrackingSite(receiver)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    yield receiver, f"http://127.0.0.1:{port.getHost().port}"
    await port.stopListening()
    for closed in list(site.open_connections):
        await closed


@pytest.fixture
def workers(tmp_path, redis_url, backend):
    ws_port, api_port = free_port(), free_port()
    worker_ports = free_port_pair()
    process = run_twistd(
        tmp_path,
        "--workers=2",
        f"--store={redis_url}",
        f"--ws-endpoint=tcp:{ws_port}:interface=127.0.0.1",
        f"--api-endpoint=tcp:{api_port}:interface=127.0.0.1",
        f"--worker-api-port={worker_ports[0]}",
        f"--backend-url={backend[1]}",
        "--drain-timeout=3",
        "--cluster-lease=1.5",
        "--bus-probe-interval=0.5",
    )
    yield process, ws_port, api_port, worker_ports
    if process.poll() is None:
        process.kill()
        out, _ = process.communicate()
        print(out.decode()[-3000:])


async def api(port, method, path, body=None):
    response = await treq.request(
        method, f"http://127.0.0.1:{port}{path}", json=body, reactor=reactor, timeout=10
    )
    return response.code, await response.json()


def statuses(receiver, device_id):
    return [
        (r.json["status"], r.json["reason"])
        for r in receiver.requests
        if r.path == "/api/device/status" and r.json["device_id"] == device_id
    ]


@pytest_twisted.ensureDeferred
async def test_two_workers_are_one_cluster_that_survives_a_killed_worker_and_drains(
    workers, backend
):
    process, ws_port, api_port, worker_ports = workers
    receiver = backend[0]
    first = await until(
        lambda: all(health(p) for p in worker_ports) and [health(p) for p in worker_ports]
    )
    nodes = [h["node_id"] for h in first]
    pids = [int(node.rsplit("-", 1)[1]) for node in nodes]
    assert len(set(pids)) == 2

    devices = {}
    for _ in range(24):
        _, creds = await api(api_port, "POST", "/api/v1/devices/register", {"location": "lobby"})
        devices[creds["device_id"]] = (
            creds,
            await connect_device(ws_port, creds["device_id"], creds["token"]),
        )
    sessions = [health(p)["sessions"] for p in worker_ports]
    assert sum(sessions) == 24 and min(sessions) > 0, sessions  # the kernel spread them

    # Every worker sees the whole host's devices and where each is held.
    _, listed = await api(worker_ports[1], "GET", "/api/v1/devices")
    held = {d["device_id"]: d["node"] for d in listed["devices"]}
    assert set(held.values()) == set(nodes)
    on_first = [device_id for device_id, node in held.items() if node == nodes[0]]

    # A command through worker 1's API reaches a device held by worker 0.
    target = on_first[0]
    status, sent = await api(
        worker_ports[1], "POST", "/api/send", {"device_id": target, "command": "REBOOT"}
    )
    assert status == 200, sent
    frame = await devices[target][1].frame()
    assert (frame["type"], frame["id"], frame["payload"]) == ("command", sent["id"], "REBOOT")

    # kill -9 worker 0: it comes back as a new node; each of its devices goes offline once.
    os.kill(pids[0], signal.SIGKILL)
    restarted = await until(
        lambda: (h := health(worker_ports[0])) and h["node_id"] != nodes[0] and h
    )
    assert restarted["sessions"] == 0
    await until(lambda: all(("offline", "node_lost") in statuses(receiver, d) for d in on_first))
    for device_id in devices:
        offline = [s for s in statuses(receiver, device_id) if s[0] == "offline"]
        assert offline == ([("offline", "node_lost")] if device_id in on_first else [])

    # They reconnect, to whichever worker the kernel picks.
    for device_id in on_first:
        creds = devices[device_id][0]
        devices[device_id] = (creds, await connect_device(ws_port, device_id, creds["token"]))
    assert sum(health(p)["sessions"] for p in worker_ports) == 24

    process.send_signal(signal.SIGTERM)
    await until(lambda: process.poll() is not None, timeout=20)
    out = process.stdout.read().decode()
    assert [d.close_code for _, d in devices.values()] == [1001] * 24
    assert "worker 0 (pid" in out and "restarting it in" in out
    assert out.count("Server Shut Down.") >= 3  # each worker's, relayed, and the parent's
