"""The cluster's parts one by one, on a real redis-server, with time driven by a ``Clock``
where the logic is about time (lease renewal, fencing, bus probes)."""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater

from elevgw.cluster.bus import BUS_DOWN, BUS_OK, Bus
from elevgw.cluster.keys import ClusterKeys
from elevgw.cluster.leases import LeaseKeeper
from elevgw.cluster.lifecycle import ClusterAnnouncer
from elevgw.cluster.reaper import Reaper
from elevgw.cluster.routing import ClusterCommands
from elevgw.core.commands import CommandRouter
from elevgw.core.sessions import SessionRegistry
from elevgw.presence.redis import LeaseLost, RedisPresence
from elevgw.stores.interfaces import StoreUnavailable
from elevgw.stores.redis import RedisStore
from elevgw.stores.redis_connection import RedisConnection
from elevgw.testing import FakeConnection, RecordingSink

pytest_plugins = ["redis_support"]

KEYS = ClusterKeys("elevgw:")


async def eventually(check, timeout: float) -> None:
    """Wait (real time) until ``check()`` is true; the reactor runs meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if hasattr(value, "__await__"):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, f"still false after {timeout} s"
        await deferLater(reactor, 0.02, lambda: None)


class NoSessions:
    def get(self, device_id):
        return None


@pytest_twisted.async_yield_fixture
async def redis_calls(redis_url):
    store = RedisStore(redis_url, reactor=reactor, timeout=2.0)
    await store.start()
    yield store.connection
    await store.stop()


def keeper(redis_calls, clock, **kwargs) -> LeaseKeeper:
    calls: dict[str, list] = {"fence": [], "instance": [], "reassert": []}
    lease = LeaseKeeper(
        redis_calls,
        KEYS,
        "n1",
        clock,
        lease=3.0,
        on_fence=lambda: calls["fence"].append(clock.seconds()),
        on_instance=lambda old, new: calls["instance"].append((old, new)),
        on_reassert=lambda instance: calls["reassert"].append(instance),
        **kwargs,
    )
    lease.calls = calls  # type: ignore[attr-defined]
    return lease


async def tick(lease: LeaseKeeper) -> None:
    lease.tick()
    if lease._in_flight is not None:
        await lease._in_flight


@pytest_twisted.ensureDeferred
async def test_a_lease_is_timed_by_redis_and_renewed(redis_calls, redis_server):
    clock = Clock()
    lease = keeper(redis_calls, clock)
    await tick(lease)
    assert lease.holding and lease.age() == 0
    expiry = float(redis_server.command("ZSCORE", KEYS.leases, lease.instance))
    seconds, micros = redis_server.command("TIME")
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    assert 2000 < expiry - now_ms <= 3000
    await deferLater(reactor, 0.01, lambda: None)  # Redis's clock moves on
    clock.advance(0.6)
    await tick(lease)
    assert float(redis_server.command("ZSCORE", KEYS.leases, lease.instance)) > expiry
    assert lease.age() == 0 and lease.calls["fence"] == []


@pytest_twisted.ensureDeferred
async def test_a_node_that_cannot_renew_fences_itself_before_its_lease_expires(
    redis_calls, redis_server
):
    clock = Clock()
    lease = keeper(redis_calls, clock)
    await tick(lease)
    first = lease.instance
    redis_server.stop()
    for _ in range(3):
        clock.advance(0.6)
        await tick(lease)
    assert lease.holding and lease.calls["fence"] == []  # 1.8 s < fence_after (2 s)
    clock.advance(0.3)
    await tick(lease)
    assert not lease.holding and lease.calls["fence"] == [pytest.approx(2.1)]
    assert lease.calls["instance"] == [(first, lease.instance)] and lease.instance != first
    clock.advance(0.6)
    await tick(lease)
    assert len(lease.calls["fence"]) == 1  # fenced once, not on every failed tick
    # Redis back: the node holds a lease again, as a new instance; the old one is left to
    # expire and be reaped.
    redis_server.start()
    await eventually(lambda: _tick_and_check(lease, clock), timeout=15)
    assert redis_server.command("ZSCORE", KEYS.leases, first) is None  # Redis restarted empty


async def _tick_and_check(lease: LeaseKeeper, clock: Clock) -> bool:
    clock.advance(0.6)
    await tick(lease)
    return lease.holding


@pytest_twisted.ensureDeferred
async def test_an_expired_lease_fences_and_a_forgotten_one_is_registered_again(
    redis_calls, redis_server
):
    clock = Clock()
    lease = keeper(redis_calls, clock)
    await tick(lease)
    first = lease.instance
    redis_server.command("ZADD", KEYS.leases, 0, first)  # as if Redis had not heard in time
    clock.advance(0.6)
    await tick(lease)
    assert len(lease.calls["fence"]) == 1 and lease.instance != first
    clock.advance(0.6)
    await tick(lease)
    assert lease.holding
    second = lease.instance

    redis_server.command("FLUSHALL")  # Redis lost its data: not a reason to drop devices
    clock.advance(0.6)
    await tick(lease)
    assert lease.calls["reassert"] == [second] and len(lease.calls["fence"]) == 1
    assert lease.instance == second and lease.holding
    assert redis_server.command("ZSCORE", KEYS.leases, second) is not None


@pytest_twisted.ensureDeferred
async def test_a_retired_lease_stays_given_back(redis_calls, redis_server):
    """A drained node gives its lease back; a renewal already on its way or a later tick
    must not take it again (it would read as Redis having lost it, and register anew)."""
    clock = Clock()
    lease = keeper(redis_calls, clock)
    lease.startService()
    await lease._in_flight
    lease.tick()
    renewing = lease._in_flight
    await lease.retire()
    await renewing
    clock.advance(5)
    if lease._in_flight is not None:
        await lease._in_flight
    assert redis_server.command("ZSCORE", KEYS.leases, lease.instance) is None
    assert lease.calls["reassert"] == [] and not lease.holding


@pytest_twisted.ensureDeferred
async def test_claims_need_a_live_lease_and_releases_compare_the_session(
    redis_calls, redis_server
):
    clock = Clock()
    lease = keeper(redis_calls, clock)
    presence = RedisPresence(redis_calls, KEYS, NoSessions(), "n1", lambda: lease.instance)
    try:
        await presence.claim("dev_1", "ses_1")
        raise AssertionError("claimed without a lease")
    except LeaseLost:
        pass
    await tick(lease)
    claimed = await presence.claim("dev_1", "ses_1")
    assert claimed.previous_node is None and claimed.epoch == 1
    claimed = await presence.claim("dev_1", "ses_2")
    assert (claimed.previous_node, claimed.previous_session, claimed.epoch) == ("n1", "ses_1", 2)
    first = await presence.claim("dev_1", "ses_2")
    assert first.epoch == 3
    assert await presence.release([("dev_1", "ses_1", None)]) == [False]  # a late close
    assert (await presence.holder("dev_1")).session_id == "ses_2"
    assert await presence.release([("dev_1", "ses_2", first)]) == [True]
    assert await presence.holder("dev_1") is None
    # Redis ran a release whose answer was lost: the retry says so again (the offline event
    # is not lost), unless the device was claimed since or the lease is gone.
    assert await presence.release([("dev_1", "ses_2", first)]) == [True]
    assert await presence.release([("dev_1", "ses_2", None)]) == [False]
    again = await presence.claim("dev_1", "ses_3")
    await presence.release([("dev_1", "ses_3", again)])
    assert await presence.release([("dev_1", "ses_2", first)]) == [False]
    redis_server.command("ZADD", KEYS.leases, 0, lease.instance)
    assert await presence.release([("dev_1", "ses_3", again)]) == [False]


async def dead_instance_with(redis_calls, redis_server, count: int) -> tuple[str, list[str]]:
    clock = Clock()
    lease = keeper(redis_calls, clock)
    await tick(lease)
    presence = RedisPresence(redis_calls, KEYS, NoSessions(), "n1", lambda: lease.instance)
    devices = [f"dev_{i:04d}" for i in range(count)]
    for device_id in devices:
        await presence.claim(device_id, "ses_" + device_id)
    redis_server.command("ZADD", KEYS.leases, 0, lease.instance)
    return lease.instance, devices


def reaper(redis_calls, name: str, sink: RecordingSink, **kwargs) -> Reaper:
    return Reaper(redis_calls, KEYS, sink, Clock(), consumer=lambda: name, batch=50, **kwargs)


@pytest_twisted.ensureDeferred
async def test_survivors_reaping_at_once_report_each_device_once(redis_calls, redis_server):
    instance, devices = await dead_instance_with(redis_calls, redis_server, 300)
    # A device that reconnected elsewhere before the reaping is not reported.
    other = RedisPresence(redis_calls, KEYS, NoSessions(), "n2", lambda: "n2/x")
    redis_server.command("ZADD", KEYS.leases, "9999999999999", "n2/x")
    await other.claim(devices[0], "ses_new")

    sinks = [RecordingSink() for _ in range(3)]
    reapers = [reaper(redis_calls, f"r{i}", sink) for i, sink in enumerate(sinks)]
    await DeferredList([r.tick() for r in reapers])
    await DeferredList([r.tick() for r in reapers])
    events = [e for sink in sinks for e in sink.events]
    assert len(events) == 299
    assert {e.device_id for e in events} == set(devices[1:])
    assert len({e.event_id for e in events}) == 299
    assert {(e.status, e.reason) for e in events} == {("offline", "node_lost")}
    assert redis_server.command("ZSCORE", KEYS.leases, instance) is None
    assert redis_server.command("ZSCORE", KEYS.reaped, instance) is not None
    assert redis_server.command("XLEN", KEYS.outbox) == 0
    assert redis_server.command("HLEN", KEYS.presence) == 1


@pytest_twisted.ensureDeferred
async def test_a_reaper_that_dies_mid_way_loses_nothing(redis_calls, redis_server):
    await dead_instance_with(redis_calls, redis_server, 40)
    dying = reaper(redis_calls, "dying", RecordingSink())
    while await dying.reap_once():
        pass
    await dying._ensure_group()
    taken = await dying._read_outbox()  # read, then the node dies before emitting
    assert len(taken) == 40
    survivor_sink = RecordingSink()
    survivor = reaper(redis_calls, "survivor", survivor_sink, claim_idle=0.0)
    await survivor.tick()
    assert sorted(e.device_id for e in survivor_sink.events) == [f"dev_{i:04d}" for i in range(40)]
    ids = {dict(zip(f[::2], f[1::2], strict=True))["event_id"] for _, f in taken}
    assert {e.event_id for e in survivor_sink.events} == ids
    # The dead consumers owe nothing now and hold no lease: the group forgets them.
    assert await survivor.forget_consumers() == 2
    assert redis_server.command("XINFO", "CONSUMERS", KEYS.outbox, "reapers") == []


@pytest_twisted.ensureDeferred
async def test_the_bus_subscribes_again_after_missed_probes(redis_calls, redis_url):
    clock = Clock()
    bus = Bus(
        redis_calls, redis_calls.address, KEYS, lambda: "n1/probe", clock, reactor, probe_every=1.0
    )
    bus.startService()
    try:
        await eventually(lambda: bus.state == BUS_OK, timeout=10)
        clock.advance(1.0)
        await eventually(lambda: bus.last_probe_ms is not None, timeout=5)
        assert bus.missed_probes == 0
        # The subscription goes silent (a proxy that forgot it): probes stop coming back.
        await bus._protocol.unsubscribe(KEYS.inbox("n1/probe"))
        clock.advance(1.0)
        clock.advance(1.0)
        assert bus.missed_probes == 1 and bus.state != BUS_OK
        clock.advance(1.0)
        assert bus.resubscribes == 1
        await eventually(lambda: bus._channel is not None, timeout=10)
        clock.advance(1.0)
        await eventually(lambda: bus.missed_probes == 0 and bus.state == BUS_OK, timeout=5)
    finally:
        await bus.stopService()


class OwnInstance:
    """The bus as the announcer sees it when no other node is involved."""

    def __init__(self, instance) -> None:
        self.instance = instance


@pytest_twisted.ensureDeferred
async def test_a_session_whose_kick_was_lost_is_closed_once_the_inbox_is_heard_again(
    redis_calls, redis_server
):
    clock = Clock()
    lease = keeper(redis_calls, clock)
    await tick(lease)
    sink = RecordingSink()
    registry = SessionRegistry(clock, sink, 30.0)
    presence = RedisPresence(redis_calls, KEYS, registry, "n1", lambda: lease.instance)
    announcer = ClusterAnnouncer(
        presence, OwnInstance(lambda: lease.instance), registry, sink, clock, "n1"
    )
    registry.announcer = announcer
    moved, stays = FakeConnection(), FakeConnection()
    registry.attach("dev_moved", moved)
    registry.attach("dev_stays", stays)
    await eventually(lambda: len(sink.events) == 2, timeout=5)
    # Another node claims dev_moved while this one does not hear its inbox.
    redis_server.command("ZADD", KEYS.leases, "9999999999999", "n2/x")
    other = RedisPresence(redis_calls, KEYS, NoSessions(), "n2", lambda: "n2/x")
    await other.claim("dev_moved", "ses_elsewhere")

    assert await announcer.reconcile() == 1
    assert moved.closed_with == (4001, "taken over by another node")
    assert stays.closed_with is None and registry.get("dev_stays") is not None
    clock.advance(0)
    await announcer.settled()
    assert [e.status for e in sink.events] == ["online", "online"]  # no offline for it
    assert (await presence.holder("dev_moved")).node_id == "n2"


@pytest_twisted.ensureDeferred
async def test_a_node_not_listening_to_its_inbox_refuses_routed_calls_at_once(redis_calls):
    clock = Clock()
    registry = SessionRegistry(clock, RecordingSink(), 30.0)
    bus = Bus(redis_calls, redis_calls.address, KEYS, lambda: "n1/x", clock, reactor)
    assert bus.state == BUS_DOWN  # never subscribed
    presence = RedisPresence(redis_calls, KEYS, registry, "n1", lambda: "n1/x")
    commands = ClusterCommands(
        CommandRouter(registry, clock), registry, presence, bus, lambda: "n1/x"
    )
    with pytest.raises(StoreUnavailable):
        await commands.send("dev_elsewhere", "REBOOT")


class SlowRedis(Protocol):
    """A Redis that answers one command at a time, ``delay`` seconds each (``SELECT`` at
    once); ``HANG`` is never answered."""

    delay = 0.2

    def connectionMade(self) -> None:
        self.buffer = b""
        self.queue: list[list[bytes]] = []
        self.busy = False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            command, self.buffer = _parse_command(self.buffer)
            if command is None:
                break
            self.queue.append(command)
        self._next()

    def _next(self) -> None:
        if self.busy or not self.queue:
            return
        command = self.queue.pop(0)
        name = command[0].upper()
        if name == b"SELECT":
            self.transport.write(b"+OK\r\n")
            self._next()
        elif name != b"HANG":
            self.busy = True
            reactor.callLater(self.delay, self._answer)

    def _answer(self) -> None:
        self.busy = False
        if self.transport.connected:
            self.transport.write(b"+PONG\r\n")
            self._next()


def _parse_command(buffer: bytes) -> tuple[list[bytes] | None, bytes]:
    """One RESP array of bulk strings off the front of ``buffer``."""
    if not buffer.startswith(b"*") or b"\r\n" not in buffer:
        return None, buffer
    head, rest = buffer.split(b"\r\n", 1)
    parts = []
    for _ in range(int(head[1:])):
        if b"\r\n" not in rest:
            return None, buffer
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line[1:])
        if len(rest) < size + 2:
            return None, buffer
        parts.append(rest[:size])
        rest = rest[size + 2 :]
    return parts, rest


@pytest_twisted.async_yield_fixture
async def slow_redis():
    port = reactor.listenTCP(0, Factory.forProtocol(SlowRedis), interface="127.0.0.1")
    yield f"redis://127.0.0.1:{port.getHost().port}/0"
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_call_behind_a_queue_that_keeps_moving_is_not_a_timeout(slow_redis):
    """Five calls sent at once to a Redis that takes 0.2 s over each: the last answer comes
    after a second, three times the 0.3 s timeout, but an answer came every 0.2 s: Redis was
    busy, not gone. A call that gets no answer at all still fails after the timeout."""
    connection = RedisConnection(slow_redis, reactor, timeout=0.3)
    await connection.start()
    try:
        results = await DeferredList(
            [connection.command("PING") for _ in range(5)], consumeErrors=True
        )
        assert [ok for ok, _ in results] == [True] * 5, results
        began = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await connection.command("HANG")
        assert 0.25 < time.monotonic() - began < 1.0
    finally:
        await connection.stop()
