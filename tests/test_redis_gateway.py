"""The gateway on a real redis-server, end to end: the three-step flow, outages, recovery.

Every test here runs a real ``GatewayService`` with ``--store redis://…`` against the test
session's redis-server (``redis_support``), talks real WebSocket and HTTP to it, and takes Redis
away under it: killed (``stop``), frozen (``pause``, SIGSTOP: connected but silent) and brought
back, without restarting the gateway.

``RedisServer.command`` is a blocking socket client. It is called on the reactor thread for tiny
local commands while the server runs, and never while it is paused.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions

from elevgw.stores.interfaces import hash_token
from elevgw.stores.redis import RedisStore
from elevgw.stores.redis_url import RedisAddress
from elevgw.tap import Options, makeService
from images import tiny_png
from waiting import eventually, within
from wsclient import connect_device

#: The gateways' ``store_timeout`` (seconds): how long a handshake may wait on a silent Redis.
STORE_TIMEOUT = 0.5

#: Slack (seconds) on top of a deadline the gateway promises, for a loaded test machine.
SLACK = 0.5

#: A pong must come this fast (seconds) while Redis is down: the heartbeat has no store round trip.
FAST = 0.5

#: How long a gateway may take to use Redis again once it is back. txredisapi retries at once,
#: then after about 1 s, 2.7 s, and every ``RedisStore.reconnect_max_delay`` (5 s) at most.
RECOVERY = RedisStore.reconnect_max_delay * 2

#: A log frame that is valid JSON but whose string has no UTF-8 form.
LONE_SURROGATE_LOG = b'{"type": "log", "id": "s1", "payload": {"msg": "broken \\ud800 text"}}'


async def timed(awaitable, seconds: float = 10.0):
    """``(result, seconds it took)`` of ``awaitable``, bounded by ``seconds``."""
    began = time.monotonic()
    result = await within(awaitable, seconds)
    return result, time.monotonic() - began


async def handshake_status(port: int, device_id: str, token: str) -> int:
    """The HTTP status a device's WebSocket handshake gets (101 when admitted)."""
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    url = f"http://127.0.0.1:{port}/ws?device_id={device_id}&token={token}"
    response = await treq.get(url, headers=headers, reactor=reactor, persistent=False, timeout=10)
    if response.code != 101:
        await response.content()
    return response.code


async def healthy(gateway) -> bool:
    status, _ = await gateway.call("GET", "/healthz")
    return status == 200


def fields_of(flat: list) -> dict:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def redis_connections(port: int) -> list:
    """The reactor's open connections to ``port``."""

    def peer_port(selectable):
        get_peer = getattr(selectable, "getPeer", None)
        return getattr(get_peer(), "port", None) if get_peer else None

    return [s for s in reactor.getReaders() + reactor.getWriters() if peer_port(s) == port]


@pytest.fixture
def redis_gateway(gateway_factory, redis_url):
    """Start gateways on the test's (empty, running) Redis; the fixture stops them."""

    def start(**overrides):
        settings = {"store": redis_url, "store_timeout": STORE_TIMEOUT, **overrides}
        return gateway_factory(**settings)

    return start


@pytest.fixture
def persistent_redis(redis_server):
    """Lets a test snapshot Redis's data (``SAVE``) so that it survives ``restart()``.

    The session's server runs without persistence; the snapshot file is removed afterwards, so
    later restarts come back empty as ``redis_support`` promises.
    """
    dump = Path(redis_server.directory) / "dump.rdb"
    yield lambda: redis_server.command("SAVE")
    dump.unlink(missing_ok=True)


# The three-step flow on Redis.


@pytest_twisted.ensureDeferred
async def test_register_connect_log_and_snapshot_with_the_redis_store(redis_gateway, redis_server):
    gateway = await redis_gateway(redis_prefix="lift:")
    creds = await gateway.register("上海中心01号")
    device_id, token = creds["device_id"], creds["token"]
    stored = fields_of(redis_server.command("HGETALL", f"lift:device:{device_id}"))
    assert stored["location"] == "上海中心01号"
    assert stored["token_hash"] == hash_token(token) != token

    device = await within(connect_device(gateway.ws_port, device_id, token), 10)
    pong = await device.request({"type": "heartbeat", "device_id": device_id})
    assert pong["type"] == "pong" and isinstance(pong["ts"], int)

    payloads = [{"n": n, "楼层": "上海"} for n in range(3)]
    for n, payload in enumerate(payloads):
        ack = await device.request({"type": "log", "id": f"log-{n}", "payload": payload})
        assert ack == {"type": "ack", "id": f"log-{n}"}
    status, body = await gateway.call("GET", f"/api/v1/devices/{device_id}/logs")
    assert status == 200, body
    assert [entry["payload"] for entry in body["logs"]] == payloads[::-1]

    # The documented stream, read as a backend would, without the gateway.
    entries = redis_server.command("XREVRANGE", f"lift:log:{device_id}", "+", "-")
    assert [json.loads(fields_of(fields)["payload"]) for _, fields in entries] == payloads[::-1]
    assert [int(fields_of(fields)["ts"]) for _, fields in entries] == [
        entry["ts"] for entry in body["logs"]
    ]
    assert all(entry_id.split("-")[0] == fields_of(fields)["ts"] for entry_id, fields in entries)

    snapshot_call = ensureDeferred(
        gateway.call("GET", f"/api/v1/devices/remote/{device_id}/snapshot?timeout=5")
    )
    command = await device.frame()
    assert command["type"] == "command" and command["payload"] == "snapshot"
    png = tiny_png()
    device.send(
        {"type": "snapshot", "id": command["id"], "payload": base64.b64encode(png).decode()}
    )
    ack = await device.frame()
    assert ack["type"] == "ack" and ack["id"] == command["id"]
    status, body = await within(snapshot_call, 10)
    assert status == 200, body
    assert body["url"] == ack["url"] and body["size"] == len(png)

    status, listing = await gateway.call("GET", "/api/v1/devices")
    assert status == 200
    [listed] = listing["devices"]
    assert listed["device_id"] == device_id and listed["online"] is True

    await within(gateway.service.stopService(), 10)
    assert (await within(device.closed, 5))[0] == 1001
    assert redis_connections(redis_server.port) == []


@pytest_twisted.ensureDeferred
async def test_log_with_a_lone_surrogate_is_acked_and_stored_as_valid_utf8(
    redis_gateway, redis_server
):
    gateway = await redis_gateway()
    creds = await gateway.register()
    device = await within(connect_device(gateway.ws_port, creds["device_id"], creds["token"]), 10)
    assert await device.request(LONE_SURROGATE_LOG) == {"type": "ack", "id": "s1"}
    [[_, fields]] = redis_server.command("XREVRANGE", "elevgw:log:" + creds["device_id"], "+", "-")
    assert json.loads(fields_of(fields)["payload"]) == {"msg": "broken \ud800 text"}
    await device.close()


@pytest.mark.parametrize("store", ["sqlite", "redis"])
@pytest_twisted.ensureDeferred
async def test_logs_with_a_lone_surrogate_are_listed(gateway_factory, request, store):
    overrides = {"store": request.getfixturevalue("redis_url")} if store == "redis" else {}
    gateway = await gateway_factory(**overrides)
    creds = await gateway.register()
    device = await within(connect_device(gateway.ws_port, creds["device_id"], creds["token"]), 10)
    assert await device.request(LONE_SURROGATE_LOG) == {"type": "ack", "id": "s1"}
    status, body = await gateway.call("GET", "/api/v1/devices/{}/logs".format(creds["device_id"]))
    await device.close()
    assert status == 200, body
    assert body["logs"][0]["payload"] == {"msg": "broken \ud800 text"}


# Redis goes away and comes back under a running gateway.


@pytest_twisted.ensureDeferred
async def test_killed_redis_gives_503s_keeps_sessions_and_recovers_without_restart(
    redis_gateway, redis_server, persistent_redis
):
    gateway = await redis_gateway()
    first, second, latecomer = [await gateway.register(f"B{n}") for n in range(3)]
    devices = [
        await within(connect_device(gateway.ws_port, creds["device_id"], creds["token"]), 10)
        for creds in (first, second)
    ]
    device = devices[0]
    ack = await device.request({"type": "log", "id": "a", "payload": "before"})
    assert ack == {"type": "ack", "id": "a"}
    persistent_redis()
    redis_server.stop()

    status, took = await timed(
        handshake_status(gateway.ws_port, latecomer["device_id"], latecomer["token"])
    )
    assert status == 503 and took <= STORE_TIMEOUT + SLACK, (status, took)
    # Not 401: the gateway cannot tell an unknown device now, and a device must not give up.
    status, _ = await timed(handshake_status(gateway.ws_port, "dev_nobody", "token"))
    assert status == 503

    for each in devices:
        pong, took = await timed(each.request({"type": "heartbeat"}))
        assert pong["type"] == "pong" and took < FAST, (pong, took)

    reply = await within(device.request({"type": "log", "id": "b", "payload": "during"}), 5)
    assert (reply["type"], reply["error"], reply["id"]) == ("error", "store_unavailable", "b")
    assert (await device.request({"type": "heartbeat"}))["type"] == "pong"
    assert device.pending_frames() == 0, "no ack may follow the error"

    (status, body), took = await timed(gateway.call("GET", "/healthz"))
    assert (status, body["status"]) == (503, "unavailable") and took <= STORE_TIMEOUT + SLACK
    for path in ("/api/v1/devices", "/api/v1/devices/{}/logs".format(first["device_id"])):
        status, body = await within(gateway.call("GET", path), STORE_TIMEOUT + SLACK)
        assert (status, body["error"]) == (503, "store_unavailable"), path
    assert len(gateway.service.gateway.registry) == 2

    redis_server.restart()  # loads the data saved above, as a Redis with persistence would
    await eventually(lambda: healthy(gateway), RECOVERY)

    newcomer = await within(
        connect_device(gateway.ws_port, latecomer["device_id"], latecomer["token"]), 10
    )
    assert (await newcomer.request({"type": "heartbeat"}))["type"] == "pong"
    for n, each in enumerate(devices):
        ack = await each.request({"type": "log", "id": f"c{n}", "payload": "after"})
        assert ack == {"type": "ack", "id": f"c{n}"}
    status, body = await gateway.call("GET", "/api/v1/devices/{}/logs".format(first["device_id"]))
    assert status == 200
    assert [entry["payload"] for entry in body["logs"]] == ["after", "before"]
    entries = redis_server.command("XREVRANGE", "elevgw:log:" + first["device_id"], "+", "-")
    assert [fields_of(fields)["payload"] for _, fields in entries] == ['"after"', '"before"']
    registered = await gateway.register("after the outage")
    assert redis_server.command("EXISTS", "elevgw:device:" + registered["device_id"]) == 1
    for each in [*devices, newcomer]:
        await within(each.close(), 5)


@pytest_twisted.ensureDeferred
async def test_frozen_redis_gives_503s_within_the_store_timeout_then_recovers(
    redis_gateway, redis_server
):
    # A longer timeout than FAST, so a pong that waited on the store would fail the test.
    store_timeout = 1.0
    gateway = await redis_gateway(store_timeout=store_timeout)
    connected, latecomer = await gateway.register("A"), await gateway.register("B")
    device = await within(
        connect_device(gateway.ws_port, connected["device_id"], connected["token"]), 10
    )
    assert (await device.request({"type": "log", "id": "a", "payload": "before"}))["type"] == "ack"

    redis_server.pause()
    try:
        began = time.monotonic()
        device.send({"type": "log", "id": "b", "payload": "during"})
        device.send({"type": "heartbeat"})
        pong = await device.frame(timeout=5)
        assert pong["type"] == "pong", "the heartbeat must not wait behind the log's store call"
        assert time.monotonic() - began < FAST
        reply = await device.frame(timeout=5)
        took = time.monotonic() - began
        assert (reply["type"], reply["error"], reply["id"]) == ("error", "store_unavailable", "b")
        assert took <= store_timeout + SLACK, took

        status, took = await timed(
            handshake_status(gateway.ws_port, latecomer["device_id"], latecomer["token"])
        )
        assert status == 503 and took <= store_timeout + SLACK, (status, took)
        (status, _), took = await timed(gateway.call("GET", "/healthz"))
        assert status == 503 and took <= store_timeout + SLACK, (status, took)
        (status, body), took = await timed(gateway.call("GET", "/api/v1/devices"))
        assert (status, body["error"]) == (503, "store_unavailable")
        assert took <= store_timeout + SLACK
        pong, took = await timed(device.request({"type": "heartbeat"}))
        assert pong["type"] == "pong" and took < FAST
    finally:
        redis_server.resume()

    await eventually(lambda: healthy(gateway), RECOVERY)
    newcomer = await within(
        connect_device(gateway.ws_port, latecomer["device_id"], latecomer["token"]), 10
    )
    assert (await device.request({"type": "log", "id": "c", "payload": "after"}))["type"] == "ack"
    status, body = await gateway.call(
        "GET", "/api/v1/devices/{}/logs".format(connected["device_id"])
    )
    assert status == 200
    payloads = [entry["payload"] for entry in body["logs"]]
    # "during" timed out but sat in the frozen server's socket buffer, so Redis may run it on
    # resume: an error after a timeout means "not known to be stored", never "acked".
    assert payloads in (["after", "before"], ["after", "during", "before"]), payloads
    await within(device.close(), 5)
    await within(newcomer.close(), 5)


@pytest_twisted.ensureDeferred
async def test_gateway_started_before_redis_serves_once_redis_appears(redis_gateway, redis_server):
    redis_server.stop()
    began = time.monotonic()
    gateway = await within(redis_gateway(), 10)
    assert time.monotonic() - began <= STORE_TIMEOUT + SLACK + 1.0
    assert not await healthy(gateway)
    status, body = await gateway.call("POST", "/api/v1/devices/register", {"location": "A"})
    assert (status, body["error"]) == (503, "store_unavailable")

    redis_server.start()
    await eventually(lambda: healthy(gateway), RECOVERY)
    creds = await gateway.register()
    device = await within(connect_device(gateway.ws_port, creds["device_id"], creds["token"]), 10)
    assert (await device.request({"type": "log", "id": "x", "payload": 1}))["type"] == "ack"
    await within(device.close(), 5)


# twistd elevgw --store redis://…


@pytest.fixture
def twistd():
    """Parse a ``twistd`` command line, then make the service as twistd does (not started)."""

    def run(*args):
        config = ServerOptions()
        config.parseOptions(["-n", *args])
        root = config.loadedPlugins[config.subCommand].makeService(config.subOptions)
        return root.getServiceNamed("gateway")

    return run


def test_twistd_store_option_selects_the_redis_store(twistd):
    service = twistd(
        "elevgw",
        "--store=redis://127.0.0.1:6390/0",
        "--redis-prefix=lift:",
        "--log-maxlen=500",
        "--store-timeout=0.5",
    )
    store = service.store.wrapped
    assert isinstance(store, RedisStore)
    assert store.address == RedisAddress("127.0.0.1", 6390, 0)
    assert (store.prefix, store.log_maxlen, store.timeout) == ("lift:", 500, 0.5)


def test_store_url_can_come_from_the_environment(twistd, monkeypatch):
    monkeypatch.setenv("ELEVGW_STORE", "redis://:s%40cret@cache.internal:6380/2")
    store = twistd("elevgw").store.wrapped
    assert store.address == RedisAddress("cache.internal", 6380, 2, None, "s@cret")


@pytest.mark.parametrize(
    "url", ["redis://host:notaport/x", "redis://host:6379/db1", "redis://", "redis://h/0?x=1"]
)
def test_bad_redis_url_is_a_one_line_usage_error_from_make_service(monkeypatch, url):
    options = Options()
    options.parseOptions([])
    options["store"] = url  # past any check in parseOptions: makeService must refuse it too
    with pytest.raises(SystemExit) as raised:
        makeService(options)
    assert "\n" not in str(raised.value) and str(raised.value).startswith("elevgw: --store")


def test_bad_redis_url_is_refused_while_twistd_parses_options():
    with pytest.raises(SystemExit) as raised:
        ServerOptions().parseOptions(["-n", "elevgw", "--store=redis://host:notaport/x"])
    assert str(raised.value).startswith("elevgw: --store: ") and "\n" not in str(raised.value)


@pytest.mark.parametrize("args", [["--store-timeout", "0"], ["--log-maxlen", "0"]])
def test_bad_redis_tuning_is_a_usage_error(args):
    with pytest.raises(usage.UsageError):
        Options().parseOptions(args)
