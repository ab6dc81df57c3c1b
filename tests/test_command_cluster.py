"""The command queue across a cluster of real ``twistd`` nodes on one redis-server: a call on
one node reaches a device held by another, and a queue filled on one node drains on another."""

from __future__ import annotations

import time

import pytest_twisted
from twisted.internet.defer import Deferred

import cluster_support
from cluster_support import eventually
from test_cluster import connect, register

pytest_plugins = ["redis_support"]

cluster = cluster_support.cluster


def commands_path(device: dict) -> str:
    return f"/api/v1/devices/{device['device_id']}/commands"


@pytest_twisted.ensureDeferred
async def test_a_wait_on_one_node_is_answered_by_the_device_on_another(cluster):
    a, b = await cluster.start("a", "b")
    (device,) = await register(a)
    socket = await connect(b, device)
    await eventually(lambda: cluster.statuses(device["device_id"], "online"))

    call = Deferred.fromCoroutine(
        a.call("POST", commands_path(device), {"command": "VOL", "data": 4, "wait": 5})
    )
    frame = await socket.frame()
    socket.send({"type": "ack", "id": frame["id"], "payload": "ok"})
    status, body = await call
    assert (status, body) == (200, {"id": frame["id"], "state": "acked", "result": "ok"})

    call = Deferred.fromCoroutine(
        a.call("POST", commands_path(device), {"command": "X", "wait": 30, "ttl": 60})
    )
    unacked = await socket.frame()
    began = time.monotonic()
    await socket.drop()
    status, body = await call
    assert time.monotonic() - began < 5
    assert (status, body["error"], body["state"]) == (504, "device_disconnected", "sent")

    # Queued on a while the device is offline, delivered when it connects to b.
    await eventually(lambda: cluster.statuses(device["device_id"], "offline"))
    status, queued = await a.call("POST", commands_path(device), {"command": "Y", "ttl": 60})
    assert (status, queued["state"]) == (202, "queued")
    again = await connect(b, device)
    frames = [await again.frame(), await again.frame()]
    assert [f["id"] for f in frames] == [unacked["id"], queued["id"]]
    for frame in frames:
        again.send({"type": "ack", "id": frame["id"]})
    await eventually(lambda: _all_acked(a, device))
    await again.close()


async def _all_acked(node, device) -> bool:
    status, body = await node.call("GET", commands_path(device))
    assert status == 200, body
    return [c["state"] for c in body["commands"]] == ["acked", "acked", "acked"]
