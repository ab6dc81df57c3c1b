"""A cluster for real: ``twistd -n elevgw`` processes on one redis-server, devices and the
backend talking to them over real sockets, nodes killed with SIGKILL, Redis restarted."""

from __future__ import annotations

import base64
import time
from collections import Counter

import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList

import cluster_support
from cluster_support import LEASE, Node, eventually, sleep
from images import tiny_png
from wsclient import connect_device

pytest_plugins = ["redis_support"]

cluster = cluster_support.cluster


async def register(node, count: int = 1) -> list[dict]:
    devices = []
    for i in range(count):
        status, body = await node.call("POST", "/api/v1/devices/register", {"location": f"L{i}"})
        assert status == 201, body
        devices.append(body)
    return devices


async def connect(node, device: dict):
    return await connect_device(node.ws_port, device["device_id"], device["token"])


async def held_by(node, device_id: str) -> str | None:
    status, body = await node.call("GET", f"/api/v1/devices/{device_id}")
    assert status == 200, body
    return body["node"]


def _ensure(coroutine) -> Deferred:
    return Deferred.fromCoroutine(coroutine)


@pytest_twisted.ensureDeferred
async def test_any_node_lists_and_reaches_a_device_on_any_node(cluster):
    a, b = await cluster.start("a", "b")
    on_a, on_b = await register(a, 2)
    device_a = await connect(a, on_a)
    device_b = await connect(b, on_b)
    await eventually(lambda: len(cluster.statuses(status="online")) == 2)

    for node in (a, b):
        status, body = await node.call("GET", "/api/v1/devices")
        assert status == 200
        where = {d["device_id"]: (d["online"], d["node"]) for d in body["devices"]}
        assert where == {on_a["device_id"]: (True, "a"), on_b["device_id"]: (True, "b")}

    # /api/send through the other node: written to the device, the id answered.
    status, body = await b.call(
        "POST", "/api/send", {"device_id": on_a["device_id"], "command": "REBOOT", "data": 7}
    )
    assert status == 200 and body["ok"], body
    frame = await device_a.frame()
    assert frame == {"type": "command", "id": body["id"], "payload": "REBOOT", "data": 7}

    # A snapshot requested on a, answered by the device on b.
    path = f"/api/v1/devices/remote/{on_b['device_id']}/snapshot?timeout=5"
    asked = _ensure(a.call("GET", path))
    command = await device_b.frame()
    assert command["payload"] == "snapshot"
    device_b.send(
        {
            "type": "snapshot",
            "id": command["id"],
            "payload": base64.b64encode(tiny_png()).decode(),
        }
    )
    status, body = await asked
    assert status == 200, body
    assert body["device_id"] == on_b["device_id"] and body["content_type"] == "image/png"

    # A device that answers nothing: 504 through the other node, like on its own.
    status, body = await b.call(
        "GET", f"/api/v1/devices/remote/{on_a['device_id']}/snapshot?timeout=0.3"
    )
    assert status == 504 and body["error"] == "device_timeout", body
    await device_a.frame()  # the snapshot command it ignored

    # Revoked through the node that does not hold it: closed 4003 where it is.
    status, body = await b.call("DELETE", f"/api/v1/devices/{on_a['device_id']}")
    assert status == 200 and body["was_online"] is True, body
    code, _ = await device_a.closed
    assert code == 4003
    await eventually(lambda: cluster.statuses(on_a["device_id"], "offline"))
    assert cluster.statuses(on_a["device_id"], "offline")[0]["reason"] == "revoked"

    # Offline: 404 at once from any node.
    await device_b.close()
    await eventually(lambda: cluster.statuses(on_b["device_id"], "offline"))
    status, body = await a.call(
        "POST", "/api/send", {"device_id": on_b["device_id"], "command": "X"}
    )
    assert status == 404 and body["error"] == "device_offline"
    status, body = await a.call("GET", "/healthz")
    assert body["cluster"]["bus"] == "ok" and body["cluster"]["lease"] == "held"
    status, metrics = await b.call("GET", "/metrics")
    assert b'elevgw_cluster_routed_seconds_count{kind="send",outcome="ok"} 1.0' in metrics

    # SIGTERM: a's device gets its offline (shutdown) event, and is offline for b at once.
    (last,) = await register(b)
    leaving = await connect(a, last)
    await eventually(lambda: cluster.statuses(last["device_id"], "online"))
    a.stop()
    code, _ = await leaving.closed
    assert code == 1001
    await eventually(lambda: cluster.statuses(last["device_id"], "offline"))
    assert [e["reason"] for e in cluster.statuses(last["device_id"], "offline")] == ["shutdown"]
    assert await held_by(b, last["device_id"]) is None


@pytest_twisted.ensureDeferred
async def test_a_device_moving_between_nodes_is_one_takeover_and_never_offline(cluster):
    a, b = await cluster.start("a", "b")
    (creds,) = await register(a)
    device_id = creds["device_id"]
    first = await connect(a, creds)
    await eventually(lambda: cluster.statuses(device_id, "online"))
    await sleep(0.2)
    second = await connect(b, creds)
    code, _ = await first.closed
    assert code == 4001
    await eventually(lambda: len(cluster.statuses(device_id, "online")) == 2)
    online = cluster.statuses(device_id, "online")
    assert online[0]["reason"] == "connected"
    assert online[0]["node"] == "a"
    assert online[1]["reason"] == "takeover" and online[1]["previous_node"] == "a"
    assert online[1]["node"] == "b"
    assert 150 <= online[1]["gap_ms"] < 5000
    assert await held_by(a, device_id) == "b"

    # And back again: the one event names b.
    third = await connect(a, creds)
    code, _ = await second.closed
    assert code == 4001
    await eventually(lambda: len(cluster.statuses(device_id, "online")) == 3)
    assert cluster.statuses(device_id, "online")[2]["previous_node"] == "b"

    # A storm: the device reconnects to alternate nodes 20 times, never closing the old one.
    sockets = [third]
    for i in range(20):
        sockets.append(await connect((b, a)[i % 2], creds))
    await DeferredList([s.closed for s in sockets[:-1]])
    assert [s.close_code for s in sockets[:-1]] == [4001] * 20
    await eventually(lambda: len(cluster.statuses(device_id, "online")) == 23)
    await sleep(0.5)
    assert cluster.statuses(device_id, "offline") == []
    sessions = 0
    for node in (a, b):
        status, health = await node.call("GET", "/healthz")
        sessions += health["sessions"]
    assert sessions == 1
    assert await held_by(b, device_id) == "a"  # the 20th reconnect went to a
    last = sockets[-1]
    last.send({"type": "heartbeat", "device_id": device_id})
    assert (await last.frame())["type"] == "pong"

    # Only now the device leaves: one offline.
    await last.close()
    await eventually(lambda: cluster.statuses(device_id, "offline"))
    await sleep(0.3)
    offline = cluster.statuses(device_id, "offline")
    assert len(offline) == 1 and offline[0]["reason"] == "closed"


@pytest_twisted.ensureDeferred
async def test_a_killed_node_s_devices_go_offline_once_each_and_moved_ones_not_at_all(cluster):
    a, b, c = await cluster.start("a", "b", "c")
    devices = await register(a, 220)
    sockets = {}
    for creds in devices:
        sockets[creds["device_id"]] = await connect(c, creds)
    await eventually(lambda: len(cluster.statuses(status="online")) == 220, timeout=30)
    status, body = await a.call("GET", "/api/v1/devices")
    assert Counter(d["node"] for d in body["devices"]) == {"c": 220}

    # b calls a device on c, and remembers that c holds it.
    status, body = await b.call(
        "POST", "/api/send", {"device_id": devices[0]["device_id"], "command": "BEFORE"}
    )
    assert status == 200, body
    assert (await sockets[devices[0]["device_id"]].frame())["payload"] == "BEFORE"
    # A snapshot asked through a of a device on c, which never answers: c dies meanwhile.
    asked = _ensure(
        a.call("GET", f"/api/v1/devices/remote/{devices[-1]['device_id']}/snapshot?timeout=60")
    )
    await sockets[devices[-1]["device_id"]].frame()
    c.kill()
    killed_at = time.monotonic()
    # 20 devices notice first and come back through a before the lease has run out.
    moved = devices[:20]
    reconnected = {}
    for creds in moved:
        reconnected[creds["device_id"]] = await connect(a, creds)
    moved_ids = {creds["device_id"] for creds in moved}
    # b's memory of c is stale: the call finds the device on a all the same.
    status, body = await b.call(
        "POST", "/api/send", {"device_id": devices[0]["device_id"], "command": "AFTER"}
    )
    assert status == 200, body
    assert (await reconnected[devices[0]["device_id"]].frame())["payload"] == "AFTER"
    # A device on a dead node is offline for the API at once if its lease is gone; the rest
    # are reaped: one node_lost each, whoever reaps.
    await eventually(lambda: len(cluster.statuses(status="offline")) >= 200, timeout=LEASE * 10)
    await sleep(LEASE * 2)
    # The waiting call ended once c was known dead, not at its own 60 s timeout.
    status, body = await asked
    assert status == 504 and body["error"] == "device_disconnected", body
    assert time.monotonic() - killed_at < LEASE * 6
    offline = cluster.statuses(status="offline")
    assert len(offline) == 200
    assert {(e["reason"], e["node"]) for e in offline} == {("node_lost", "c")}
    assert len({e["device_id"] for e in offline}) == 200
    assert len({e["event_id"] for e in offline}) == 200
    assert not moved_ids & {e["device_id"] for e in offline}
    takeovers = [e for e in cluster.statuses(status="online") if e["device_id"] in moved_ids]
    assert [e["reason"] for e in takeovers].count("takeover") == 20
    assert all(e["previous_node"] == "c" for e in takeovers if e["reason"] == "takeover")

    status, body = await b.call("GET", "/api/v1/devices")
    where = Counter(d["node"] for d in body["devices"])
    assert where == {"a": 20, None: 200}
    status, body = await b.call(
        "POST", "/api/send", {"device_id": devices[100]["device_id"], "command": "X"}
    )
    assert status == 404


@pytest_twisted.ensureDeferred
async def test_nodes_recover_by_themselves_when_redis_loses_its_data_or_restarts(
    cluster, redis_server
):
    a, b = await cluster.start("a", "b")
    on_a, on_b = await register(a, 2)
    device_a = await connect(a, on_a)
    device_b = await connect(b, on_b)
    await eventually(lambda: len(cluster.statuses(status="online")) == 2)

    async def reaches(node, device_id: str) -> bool:
        status, _ = await node.call("POST", "/api/send", {"device_id": device_id, "command": "P"})
        return status == 200

    # Redis forgets everything (a failover to an empty replica): the nodes notice at their
    # next renewal and put their sessions back; no device is dropped.
    redis_server.command("FLUSHALL")
    await eventually(lambda: _ensure(reaches(b, on_a["device_id"])), timeout=10)
    assert (await device_a.frame())["payload"] == "P"
    assert device_a.close_code is None and device_b.close_code is None

    # Redis down for longer than a node may go without renewing: the nodes fence (1001, no
    # offline event from them), and come back by themselves once Redis is.
    redis_server.stop()
    code, _ = await device_a.closed
    assert code == 1001
    await device_b.closed
    redis_server.start()
    await eventually(lambda: _ensure(a.healthy()), timeout=20)
    await eventually(lambda: _ensure(b.healthy()), timeout=20)
    assert cluster.statuses(status="offline") == []
    (again,) = await register(b)
    device = await connect(b, again)
    await eventually(lambda: _ensure(reaches(a, again["device_id"])), timeout=10)
    assert (await device.frame())["payload"] == "P"


@pytest_twisted.ensureDeferred
async def test_a_second_node_on_one_sqlite_file_says_sqlite_is_single_node(tmp_path):
    store = f"sqlite:{tmp_path / 'shared.sqlite3'}"
    first = Node("first", store, None, tmp_path)
    try:
        await first.wait_healthy()
        second = Node("second", store, None, tmp_path)
        try:
            await second.wait_healthy()
            assert "SQLite is single-node: node first" in second.log_path.read_text()
        finally:
            second.stop()
        assert "SQLite is single-node" not in first.log_path.read_text()
    finally:
        first.stop()
    # Both stopped cleanly: a node starting now finds nobody.
    third = Node("third", store, None, tmp_path)
    try:
        await third.wait_healthy()
        assert "single-node" not in third.log_path.read_text()
    finally:
        third.stop()
