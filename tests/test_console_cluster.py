"""The console on one node of a real cluster (``twistd`` processes on one redis-server) shows
the whole fleet: devices held by other nodes are online, with their node, and the fleet page
reports the cluster bus."""

from __future__ import annotations

import pytest_twisted

import cluster_support
from browser import Browser
from wsclient import connect_device

pytest_plugins = ["redis_support", "browser"]
cluster = cluster_support.cluster


@pytest_twisted.ensureDeferred
async def test_one_node_s_console_shows_devices_held_by_every_node(cluster, browser: Browser):
    a, b = await cluster.start("a", "b")
    registered = []
    for location in ("上海中心A1", "上海中心B1", "北京国贸X"):
        status, body = await a.call("POST", "/api/v1/devices/register", {"location": location})
        assert status == 201, body
        registered.append(body)
    on_a = await connect_device(a.ws_port, registered[0]["device_id"], registered[0]["token"])
    on_b = await connect_device(b.ws_port, registered[1]["device_id"], registered[1]["token"])
    try:
        await browser.open(f"{a.base}/console/#/devices?online=true")
        await browser.wait_text(".devices tbody", registered[1]["device_id"])
        rows = await browser.script(
            "return [...document.querySelectorAll('.devices tbody tr')]"
            ".map(r => [r.dataset.device, r.cells[4].textContent])"
        )
        assert dict(rows) == {registered[0]["device_id"]: "a", registered[1]["device_id"]: "b"}

        await browser.open(f"{a.base}/console/#/fleet")
        await browser.wait_text(".facts", "lease held")
        await browser.wait_text(".figure.online .value", "2")
    finally:
        await on_a.close()
        await on_b.close()
