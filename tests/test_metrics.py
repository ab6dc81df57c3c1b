"""``/metrics`` read from a live gateway while devices connect, send and drop."""

import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor

from test_devices import handshake_status
from wsclient import connect_device


async def scrape(gateway) -> dict:
    """``{(name, frozenset(labels)): value}`` of every sample."""
    response = await treq.get(gateway.base + "/metrics", reactor=reactor)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain")
    text = (await response.content()).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest_twisted.ensureDeferred
async def test_metrics_follow_devices_as_they_connect_send_and_drop(gateway):
    before = await scrape(gateway)
    assert value(before, "elevgw_sessions") == 0
    assert value(before, "elevgw_info", version="0.1.0", node_id="test-node") == 1

    creds = [await gateway.register(f"L{n}") for n in range(3)]
    devices = [await connect_device(gateway.ws_port, c["device_id"], c["token"]) for c in creds]
    assert await handshake_status(gateway.ws_port, "device_id=dev_x&token=y") == 401
    for device in devices:
        for _ in range(2):
            await device.request({"type": "heartbeat"})
    await devices[0].request({"type": "log", "id": "l1", "payload": "p"})
    await devices[0].request(b"{broken")
    await devices[1].request({"type": "dance"})
    status, _ = await gateway.call(
        "POST", "/api/send", {"device_id": creds[2]["device_id"], "command": "REBOOT"}
    )
    assert status == 200
    await devices[2].frame()
    await gateway.call("POST", "/api/send", {"device_id": "dev_gone", "command": "REBOOT"})
    status, _ = await gateway.call(
        "GET", "/api/v1/devices/remote/{}/snapshot?timeout=0.05".format(creds[1]["device_id"])
    )
    assert status == 504

    mid = await scrape(gateway)
    assert value(mid, "elevgw_sessions") == 3
    assert value(mid, "elevgw_handshakes_total", outcome="accepted") == 3
    assert value(mid, "elevgw_handshakes_total", outcome="unauthorized") == 1
    assert value(mid, "elevgw_frames_in_total", type="heartbeat") == 6
    assert value(mid, "elevgw_frames_in_total", type="log") == 1
    assert value(mid, "elevgw_frames_in_total", type="invalid") == 2
    assert value(mid, "elevgw_frames_out_total", type="pong") == 6
    assert value(mid, "elevgw_frames_out_total", type="ack") == 1
    assert value(mid, "elevgw_frames_out_total", type="command") == 2  # REBOOT + snapshot
    assert value(mid, "elevgw_frame_errors_total", code="bad_json") == 1
    assert value(mid, "elevgw_frame_errors_total", code="unknown_type") == 1
    assert value(mid, "elevgw_commands_total", outcome="sent") == 2
    assert value(mid, "elevgw_commands_total", outcome="offline") == 1
    assert value(mid, "elevgw_snapshot_requests_total", outcome="timeout") == 1
    assert value(mid, "elevgw_store_seconds_count", operation="append_log") == 1
    # Four handshakes, and /api/send asking whether dev_gone (not connected) exists at all.
    assert value(mid, "elevgw_store_seconds_count", operation="get_device") == 5
    assert value(mid, "elevgw_api_requests_total", method="POST", status="201") == 3
    assert value(mid, "elevgw_api_requests_total", method="POST", status="404") == 1

    takeover = await connect_device(gateway.ws_port, creds[0]["device_id"], creds[0]["token"])
    await devices[0].closed
    await devices[1].drop()
    await devices[2].close()
    status, _ = await gateway.call("DELETE", "/api/v1/devices/" + creds[0]["device_id"])
    await takeover.closed

    after = await scrape(gateway)
    assert value(after, "elevgw_sessions") == 0
    assert value(after, "elevgw_takeovers_total") == 1
    assert value(after, "elevgw_offline_total", reason="closed") == 2
    assert value(after, "elevgw_offline_total", reason="revoked") == 1
    assert value(after, "elevgw_closes_total", code="4001") == 1
    assert value(after, "elevgw_closes_total", code="1006") == 1
    assert value(after, "elevgw_closes_total", code="4003") == 1


@pytest_twisted.ensureDeferred
async def test_snapshot_sizes_and_store_latency_are_recorded(gateway):
    from images import tiny_png

    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    device.send_binary(tiny_png())
    await device.frame()
    samples = await scrape(gateway)
    assert value(samples, "elevgw_snapshot_bytes_count") == 1
    assert value(samples, "elevgw_snapshot_bytes_sum") == len(tiny_png())
    assert value(samples, "elevgw_snapshot_store_seconds_count", outcome="ok") == 1
    await device.close()


@pytest_twisted.ensureDeferred
async def test_metrics_need_the_api_key_when_one_is_set(gateway_factory):
    gateway = await gateway_factory(api_key="k")
    response = await treq.get(gateway.base + "/metrics", reactor=reactor)
    assert response.code == 401
    await response.content()
    status, _ = await gateway.call("GET", "/metrics")
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_readyz_turns_503_while_draining(gateway_factory):
    gateway = await gateway_factory()
    status, body = await gateway.call("GET", "/readyz")
    assert (status, body["status"]) == (200, "ok")
    gateway.service.api.draining = True
    status, body = await gateway.call("GET", "/readyz")
    assert (status, body["status"]) == (503, "draining")
    status, _ = await gateway.call("GET", "/healthz")
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_unknown_http_methods_share_one_label_value(gateway):
    for method in ("BREW", "WHEN", "GET"):
        response = await treq.request(method, gateway.base + "/api/send", reactor=reactor)
        assert response.code == 405
        await response.content()
    samples = await scrape(gateway)
    assert value(samples, "elevgw_api_requests_total", method="other", status="405") == 2
    assert value(samples, "elevgw_api_requests_total", method="GET", status="405") == 1
    methods = {dict(labels).get("method") for name, labels in samples if "api_requests" in name}
    assert methods == {"other", "GET"}


@pytest_twisted.ensureDeferred
async def test_metrics_carry_no_created_series(gateway):
    """prometheus_client's ``_created`` timestamps are a third of the text and read by nobody."""
    samples = await scrape(gateway)
    assert value(samples, "elevgw_api_requests_total", method="GET", status="200") >= 0
    assert not [name for name, _ in samples if name.endswith("_created")]
    assert [name for name, _ in samples if name == "elevgw_sweep_seconds_count"]
