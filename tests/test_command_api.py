"""Commands through the API over real HTTP and WebSocket: acks, waits, queues, cancels."""

from __future__ import annotations

import base64

import pytest_twisted
from twisted.internet.defer import ensureDeferred

from images import tiny_png
from wsclient import online_device


@pytest_twisted.ensureDeferred
async def test_an_ack_of_the_snapshot_command_is_a_receipt_and_the_image_answers(gateway):
    device_id, device = await online_device(gateway)
    waiting = ensureDeferred(gateway.call("GET", f"/api/v1/devices/remote/{device_id}/snapshot"))
    command = await device.frame()
    assert command["payload"] == "snapshot"
    device.send({"type": "ack", "id": command["id"], "payload": "ok"})
    assert (await device.request({"type": "heartbeat"}))["type"] == "pong"
    assert not waiting.called
    device.send(
        {"type": "snapshot", "id": command["id"], "payload": base64.b64encode(tiny_png()).decode()}
    )
    assert (await device.frame())["type"] == "ack"
    status, body = await waiting
    assert status == 200, body
    assert body["content_type"] == "image/png" and body["url"]
    await device.close()
