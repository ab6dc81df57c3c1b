"""One behaviour for every ``IDeviceStore``, then what only the Redis store promises.

The contract tests run against SQLite (a file in ``tmp_path``) and Redis (a real redis-server);
the Redis tests take that server away and bring it back under a running store.
"""

from __future__ import annotations

import json
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from elevgw.stores.interfaces import (
    Device,
    IDeviceStore,
    LogEntry,
    StoreUnavailable,
    hash_token,
    new_device_id,
    new_token,
)
from elevgw.stores.redis import RedisStore
from elevgw.stores.redis_url import RedisAddress, parse_redis_url
from elevgw.stores.sqlite import SQLiteStore
from waiting import within

#: Deadline a test gives any single store call: a store that hangs fails the test instead.
CALL_DEADLINE = 10.0


async def eventually(check, timeout: float = 20.0, interval: float = 0.05):
    """Await ``check()`` until it succeeds (returns its value) or ``timeout`` runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await within(check())
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
        await deferLater(reactor, interval, lambda: None)


async def failure_of(d: Deferred) -> tuple[Exception, float]:
    """The exception ``d`` fails with and how many seconds that took."""
    began = time.monotonic()
    try:
        result = await within(d)
    except Exception as error:
        return error, time.monotonic() - began
    raise AssertionError(f"expected a failure, got {result!r}")


def device(device_id: str | None = None, created: float = 1700000000.25, **fields) -> Device:
    return Device(
        device_id=device_id or new_device_id(),
        location=fields.pop("location", "上海中心01号"),
        token_hash=fields.pop("token_hash", hash_token(new_token())),
        created=created,
        **fields,
    )


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request, tmp_path):
    """Build unstarted stores of the parametrized kind, all on the same data."""
    if request.param == "sqlite":
        path = str(tmp_path / "store.sqlite3")
        return lambda: SQLiteStore(path)
    url = request.getfixturevalue("redis_url")
    return lambda: RedisStore(url, timeout=2.0)


@pytest_twisted.async_yield_fixture
async def store(make_store):
    started = make_store()
    await within(started.start())
    yield started
    await within(started.stop())


# The contract, for every store.


def test_stores_provide_the_interface(make_store):
    assert verifyObject(IDeviceStore, make_store())


@pytest_twisted.ensureDeferred
async def test_started_store_answers_ping(store):
    assert await within(store.ping()) is None


@pytest_twisted.ensureDeferred
async def test_added_device_reads_back_as_stored(store):
    added = device(location="上海中心01号 B座", created=1700000000.123)
    assert await within(store.add_device(added)) is None
    assert await within(store.get_device(added.device_id)) == added


@pytest_twisted.ensureDeferred
async def test_added_device_keeps_its_last_seen(store):
    added = device(last_seen=1700000123.654)
    await within(store.add_device(added))
    assert await within(store.get_device(added.device_id)) == added


@pytest_twisted.ensureDeferred
async def test_unknown_device_is_none(store):
    assert await within(store.get_device("dev_unknown")) is None


@pytest_twisted.ensureDeferred
async def test_devices_are_listed_by_created_then_device_id(store):
    devices = [
        device("dev_c", created=30.0),
        device("dev_b", created=10.0),
        device("dev_z", created=20.0),
        device("dev_a", created=20.0),
    ]
    for each in devices:
        await within(store.add_device(each))
    listed = await within(store.list_devices())
    assert [d.device_id for d in listed] == ["dev_b", "dev_a", "dev_z", "dev_c"]
    assert listed[0] == devices[1]


@pytest_twisted.ensureDeferred
async def test_empty_store_lists_no_devices(store):
    assert await within(store.list_devices()) == []


@pytest_twisted.ensureDeferred
async def test_deleted_device_is_gone(store):
    kept, deleted = device("dev_kept"), device("dev_deleted")
    await within(store.add_device(kept))
    await within(store.add_device(deleted))
    assert await within(store.delete_device("dev_deleted")) is True
    assert await within(store.get_device("dev_deleted")) is None
    assert await within(store.list_devices()) == [kept]
    assert await within(store.delete_device("dev_deleted")) is False


@pytest_twisted.ensureDeferred
async def test_new_token_hash_replaces_the_old_one(store):
    added = device()
    await within(store.add_device(added))
    assert await within(store.set_token_hash(added.device_id, "f" * 64)) is True
    stored = await within(store.get_device(added.device_id))
    assert stored.token_hash == "f" * 64
    assert stored.location == added.location


@pytest_twisted.ensureDeferred
async def test_token_hash_of_unknown_device_is_refused_and_creates_nothing(store):
    assert await within(store.set_token_hash("dev_unknown", "f" * 64)) is False
    assert await within(store.get_device("dev_unknown")) is None
    assert await within(store.list_devices()) == []


@pytest_twisted.ensureDeferred
async def test_last_seen_only_moves_forward(store):
    added = device()
    await within(store.add_device(added))
    await within(store.record_last_seen({added.device_id: 1700000100.123}))
    await within(store.record_last_seen({added.device_id: 1700000050.0}))
    assert (await within(store.get_device(added.device_id))).last_seen == 1700000100.123
    await within(store.record_last_seen({added.device_id: 1700000200.5}))
    assert (await within(store.get_device(added.device_id))).last_seen == 1700000200.5


@pytest_twisted.ensureDeferred
async def test_last_seen_of_unknown_devices_is_ignored(store):
    known = device()
    await within(store.add_device(known))
    result = store.record_last_seen({"dev_unknown": 1700000100.0, known.device_id: 1700000100.0})
    assert await within(result) is None
    assert await within(store.get_device("dev_unknown")) is None
    assert [d.device_id for d in await within(store.list_devices())] == [known.device_id]
    assert (await within(store.get_device(known.device_id))).last_seen == 1700000100.0


@pytest_twisted.ensureDeferred
async def test_recording_no_last_seen_is_harmless(store):
    assert await within(store.record_last_seen({})) is None


@pytest_twisted.ensureDeferred
async def test_logs_come_newest_first_up_to_limit(store):
    for ts in (1000, 2000, 3000, 4000):
        assert await within(store.append_log("dev_a", LogEntry(ts=ts, payload=ts))) is None
    logs = await within(store.get_logs("dev_a", 3))
    assert logs == [LogEntry(4000, 4000), LogEntry(3000, 3000), LogEntry(2000, 2000)]


@pytest_twisted.ensureDeferred
async def test_logs_before_a_time_exclude_it(store):
    for ts in (1000, 2000, 3000, 4000):
        await within(store.append_log("dev_a", LogEntry(ts=ts, payload=ts)))
    assert [e.ts for e in await within(store.get_logs("dev_a", 10, before=3000))] == [2000, 1000]
    assert [e.ts for e in await within(store.get_logs("dev_a", 1, before=3001))] == [3000]
    assert await within(store.get_logs("dev_a", 10, before=1000)) == []


@pytest_twisted.ensureDeferred
async def test_paging_with_before_reads_every_log_once(store):
    times = list(range(1700000000000, 1700000000000 + 25 * 7, 7))
    for ts in times:
        await within(store.append_log("dev_a", LogEntry(ts=ts, payload={"n": ts})))
    seen, before = [], None
    while True:
        page = await within(store.get_logs("dev_a", 4, before=before))
        if not page:
            break
        seen.extend(entry.ts for entry in page)
        before = page[-1].ts
    assert seen == times[::-1]


@pytest_twisted.ensureDeferred
async def test_logs_belong_to_their_device(store):
    await within(store.append_log("dev_a", LogEntry(ts=1000, payload="a")))
    await within(store.append_log("dev_b", LogEntry(ts=2000, payload="b")))
    assert await within(store.get_logs("dev_a", 10)) == [LogEntry(1000, "a")]
    assert await within(store.get_logs("dev_b", 10)) == [LogEntry(2000, "b")]
    assert await within(store.get_logs("dev_unknown", 10)) == []


@pytest.mark.parametrize(
    "payload",
    [
        "上海中心01号",
        {"level": "warn", "msg": "门未关闭 🚪", "floor": 12, "ratio": 0.25},
        ["a", 1, None, True, {"nested": ["上海"]}],
        None,
        42,
        "",
        # Lone surrogates: valid JSON ("\ud800"), but no UTF-8 form.
        "broken \ud800 text",
        {"msg": "\udfff", "where": "上海", "pair": "\U0001f6aa"},
    ],
)
@pytest_twisted.ensureDeferred
async def test_log_payloads_round_trip(store, payload):
    await within(store.append_log("dev_a", LogEntry(ts=1700000000000, payload=payload)))
    assert await within(store.get_logs("dev_a", 1)) == [LogEntry(1700000000000, payload)]


@pytest_twisted.ensureDeferred
async def test_data_outlives_the_store_object(make_store):
    first = make_store()
    await within(first.start())
    kept = device(last_seen=1700000001.5)
    await within(first.add_device(kept))
    await within(first.append_log(kept.device_id, LogEntry(ts=1700000000000, payload="x")))
    await within(first.stop())

    second = make_store()
    await within(second.start())
    try:
        assert await within(second.get_device(kept.device_id)) == kept
        assert await within(second.get_logs(kept.device_id, 5)) == [LogEntry(1700000000000, "x")]
    finally:
        await within(second.stop())


@pytest_twisted.ensureDeferred
async def test_stopped_store_fails_with_store_unavailable(make_store):
    stopped = make_store()
    await within(stopped.start())
    await within(stopped.stop())
    error, _ = await failure_of(stopped.ping())
    assert isinstance(error, StoreUnavailable)


# Redis only: its URL, key layout, failures and recovery.


def test_redis_urls_are_parsed():
    assert parse_redis_url("redis://cache.internal:6380/2") == RedisAddress(
        "cache.internal", 6380, 2
    )
    assert parse_redis_url("redis://localhost") == RedisAddress("localhost", 6379, 0)
    assert parse_redis_url("redis://:s%40cret@10.0.0.5:6379/0") == RedisAddress(
        "10.0.0.5", 6379, 0, None, "s@cret"
    )
    assert parse_redis_url("redis://gw:pw@[::1]:7000/1") == RedisAddress(
        "::1", 7000, 1, "gw", "pw"
    )


@pytest.mark.parametrize(
    "url",
    ["sqlite:elevgw.sqlite3", "redis://", "redis://host:port/0", "redis://host/db1", "http://h/0"],
)
def test_bad_redis_urls_are_refused_before_connecting(url):
    with pytest.raises(ValueError):
        RedisStore(url)


def test_password_is_not_shown_in_the_address():
    assert "pw" not in str(parse_redis_url("redis://:pw@host:6379/0"))


@pytest_twisted.async_yield_fixture
async def redis_store(redis_url):
    started = RedisStore(redis_url, timeout=0.5)
    await within(started.start())
    yield started
    await within(started.stop())


@pytest_twisted.ensureDeferred
async def test_devices_follow_the_documented_key_layout(redis_store, redis_server):
    added = device("dev_layout", created=1700000000.25, last_seen=1700000001.5)
    await within(redis_store.add_device(added))
    fields = redis_server.command("HGETALL", "elevgw:device:dev_layout")
    assert dict(zip(fields[::2], fields[1::2], strict=True)) == {
        "location": added.location,
        "token_hash": added.token_hash,
        "created": "1700000000250",
        "last_seen": "1700000001500",
    }
    assert redis_server.command("ZRANGE", "elevgw:devices", 0, -1, "WITHSCORES") == [
        "dev_layout",
        "1700000000250",
    ]
    await within(redis_store.delete_device("dev_layout"))
    assert redis_server.command("EXISTS", "elevgw:device:dev_layout") == 0
    assert redis_server.command("ZCARD", "elevgw:devices") == 0


@pytest_twisted.ensureDeferred
async def test_times_written_in_seconds_by_earlier_versions_still_read(redis_store, redis_server):
    """Before 0.1.0 ``created`` and ``last_seen`` were epoch seconds (``repr(float)``)."""
    redis_server.command(
        "HSET", "elevgw:device:dev_old", "location", "L", "token_hash", "h",
        "created", "1700000000.25", "last_seen", "1700000001.5",
    )  # fmt: skip
    redis_server.command("ZADD", "elevgw:devices", "1700000000.25", "dev_old")
    await within(redis_store.add_device(device("dev_new", created=1700000002.0)))
    old = await within(redis_store.get_device("dev_old"))
    assert (old.created, old.last_seen) == (1700000000.25, 1700000001.5)
    # Old devices (seconds) still list before newer ones (milliseconds).
    listed = await within(redis_store.list_devices())
    assert [d.device_id for d in listed] == ["dev_old", "dev_new"]
    # The next record writes milliseconds, although the number is smaller than it looks.
    await within(redis_store.record_last_seen({"dev_old": 1700000003.0}))
    assert redis_server.command("HGET", "elevgw:device:dev_old", "last_seen") == "1700000003000"
    assert (await within(redis_store.get_device("dev_old"))).last_seen == 1700000003.0


@pytest_twisted.ensureDeferred
async def test_logs_are_readable_with_plain_xrevrange(redis_store, redis_server):
    await within(redis_store.append_log("dev_a", LogEntry(1700000000001, {"msg": "上海"})))
    await within(redis_store.append_log("dev_a", LogEntry(1700000000002, "second")))
    await within(redis_store.append_log("dev_a", LogEntry(1700000000002, "same ms")))
    entries = redis_server.command("XREVRANGE", "elevgw:log:dev_a", "+", "-")
    assert entries == [
        ["1700000000002-1", ["ts", "1700000000002", "payload", '"same ms"']],
        ["1700000000002-0", ["ts", "1700000000002", "payload", '"second"']],
        ["1700000000001-0", ["ts", "1700000000001", "payload", '{"msg":"上海"}']],
    ]


@pytest_twisted.ensureDeferred
async def test_late_log_is_kept_in_stream_order_at_the_latest_time(redis_store):
    await within(redis_store.append_log("dev_a", LogEntry(1700000005000, "first")))
    await within(redis_store.append_log("dev_a", LogEntry(1700000004000, "clock stepped back")))
    assert await within(redis_store.get_logs("dev_a", 5)) == [
        LogEntry(1700000005000, "clock stepped back"),
        LogEntry(1700000005000, "first"),
    ]


@pytest_twisted.ensureDeferred
async def test_logs_go_on_after_a_reader_deletes_the_newest_entry(redis_store, redis_server):
    await within(redis_store.append_log("dev_a", LogEntry(1700000005000, "read")))
    redis_server.command("XDEL", "elevgw:log:dev_a", "1700000005000-0")
    await within(redis_store.append_log("dev_a", LogEntry(1700000005000, "next")))
    assert await within(redis_store.get_logs("dev_a", 5)) == [LogEntry(1700000005000, "next")]


@pytest_twisted.ensureDeferred
async def test_log_with_a_lone_surrogate_is_stored_as_valid_utf8(redis_store, redis_server):
    payload = {"msg": "broken \ud800 text", "where": "上海"}
    await within(redis_store.append_log("dev_a", LogEntry(1700000000000, payload)))
    assert await within(redis_store.get_logs("dev_a", 1)) == [LogEntry(1700000000000, payload)]
    [[_, fields]] = redis_server.command("XREVRANGE", "elevgw:log:dev_a", "+", "-")
    assert json.loads(fields[3]) == payload


@pytest_twisted.ensureDeferred
async def test_log_stream_is_capped_near_log_maxlen(redis_url, redis_server):
    capped = RedisStore(redis_url, log_maxlen=100)
    await within(capped.start())
    try:
        for ts in range(1, 501):
            await within(capped.append_log("dev_a", LogEntry(ts, ts)))
        length = redis_server.command("XLEN", "elevgw:log:dev_a")
        assert 100 <= length < 300
        assert (await within(capped.get_logs("dev_a", 1)))[0].ts == 500
    finally:
        await within(capped.stop())


@pytest_twisted.ensureDeferred
async def test_prefixes_keep_gateways_apart(redis_url, redis_server):
    other = RedisStore(redis_url, prefix="other:")
    mine = RedisStore(redis_url)
    await within(other.start())
    await within(mine.start())
    try:
        await within(mine.add_device(device("dev_mine")))
        await within(mine.append_log("dev_mine", LogEntry(1, "x")))
        assert await within(other.get_device("dev_mine")) is None
        assert await within(other.list_devices()) == []
        assert await within(other.get_logs("dev_mine", 5)) == []
        assert all(key.startswith("elevgw:") for key in redis_server.command("KEYS", "*"))
    finally:
        await within(other.stop())
        await within(mine.stop())


@pytest_twisted.ensureDeferred
async def test_database_number_of_the_url_is_used(redis_server, redis_url):
    on_db_3 = RedisStore(redis_url.rsplit("/", 1)[0] + "/3")
    await within(on_db_3.start())
    try:
        await within(on_db_3.add_device(device("dev_db3")))
        assert redis_server.command("EXISTS", "elevgw:device:dev_db3", db=3) == 1
        assert redis_server.command("EXISTS", "elevgw:device:dev_db3") == 0
    finally:
        await within(on_db_3.stop())


@pytest_twisted.ensureDeferred
async def test_existing_device_is_never_overwritten(redis_store):
    original = device("dev_twice")
    await within(redis_store.add_device(original))
    error, _ = await failure_of(redis_store.add_device(device("dev_twice", location="elsewhere")))
    assert isinstance(error, ValueError)
    assert await within(redis_store.get_device("dev_twice")) == original


def _calls(store: RedisStore) -> list:
    return [
        store.ping,
        lambda: store.get_device("dev_a"),
        lambda: store.list_devices(),
        lambda: store.append_log("dev_a", LogEntry(1, "lost")),
        lambda: store.get_logs("dev_a", 10),
        lambda: store.record_last_seen({"dev_a": 1.0}),
    ]


def _store_connections(redis_server) -> set:
    """Ids of the clients connected to Redis, but for the one asking."""
    listing = redis_server.command("CLIENT", "LIST").splitlines()
    return {line.split()[0] for line in listing if "cmd=client" not in line}


@pytest_twisted.ensureDeferred
async def test_stopped_redis_fails_calls_at_once_and_the_same_store_recovers(
    redis_url, redis_server
):
    patient = RedisStore(redis_url, timeout=5.0)
    await within(patient.start())
    try:
        await within(patient.add_device(device("dev_a")))
        redis_server.stop()

        for call in _calls(patient):
            error, took = await failure_of(call())
            assert isinstance(error, StoreUnavailable), error
            assert took < 1.0, "with no connection, calls must not wait for the timeout"

        redis_server.restart()
        await eventually(patient.ping)
        assert await within(patient.get_device("dev_a")) is None  # a fresh, empty Redis
        await within(patient.add_device(device("dev_b")))
        assert (await within(patient.get_device("dev_b"))).device_id == "dev_b"
    finally:
        await within(patient.stop())


@pytest_twisted.ensureDeferred
async def test_silent_redis_times_out_with_store_unavailable_then_recovers(
    redis_store, redis_server
):
    silenced = _store_connections(redis_server)
    redis_server.pause()
    try:
        error, took = await failure_of(redis_store.ping())
        assert isinstance(error, StoreUnavailable), error
        assert redis_store.timeout * 0.9 <= took <= redis_store.timeout + 0.5
        for call in _calls(redis_store):
            error, took = await failure_of(call())
            assert isinstance(error, StoreUnavailable), error
            assert took <= redis_store.timeout + 0.5
    finally:
        redis_server.resume()
    await eventually(redis_store.ping)
    await within(redis_store.append_log("dev_a", LogEntry(2, "after")))
    assert (await within(redis_store.get_logs("dev_a", 5)))[0] == LogEntry(2, "after")
    assert not silenced & _store_connections(redis_server), "the silent connection is dropped"


@pytest_twisted.ensureDeferred
async def test_store_starts_without_redis_and_connects_when_it_appears(redis_url, redis_server):
    redis_server.stop()
    late = RedisStore(redis_url, timeout=0.5)
    began = time.monotonic()
    try:
        await within(late.start())
        assert time.monotonic() - began <= late.timeout + 0.5
        error, _ = await failure_of(late.ping())
        assert isinstance(error, StoreUnavailable)
        redis_server.start()
        await eventually(late.ping)
    finally:
        await within(late.stop())


@pytest_twisted.ensureDeferred
async def test_a_call_made_while_the_store_starts_waits_for_the_first_connection(redis_url):
    """The event log and the cluster lease call the store as the gateway starts: that the
    connection is not up yet must not read as a failure."""
    store = RedisStore(redis_url, timeout=2.0)
    starting = store.start()
    try:
        assert await within(store.ping()) is None
        await within(starting)
    finally:
        await within(store.stop())


@pytest_twisted.ensureDeferred
async def test_a_call_made_while_the_store_starts_without_redis_fails_within_the_timeout(
    redis_url, redis_server
):
    redis_server.stop()
    store = RedisStore(redis_url, timeout=0.5)
    starting = store.start()
    try:
        error, took = await failure_of(store.ping())
        assert isinstance(error, StoreUnavailable) and took <= store.timeout + 0.5
        await within(starting)
    finally:
        await within(store.stop())


@pytest_twisted.ensureDeferred
async def test_wrong_password_fails_start(redis_url, redis_server):
    redis_server.command("CONFIG", "SET", "requirepass", "right")
    try:
        url = redis_url.replace("redis://", "redis://:wrong@")
        error, took = await failure_of(RedisStore(url, timeout=0.5).start())
        assert isinstance(error, StoreUnavailable)
        with_password = RedisStore(redis_url.replace("redis://", "redis://:right@"))
        await within(with_password.start())
        try:
            assert await within(with_password.ping()) is None
        finally:
            await within(with_password.stop())
    finally:
        redis_server.command("CONFIG", "SET", "requirepass", "", password="right")


def _active_timers() -> set:
    return {call for call in reactor.getDelayedCalls() if call.active()}


def _leftovers(port: int, timers_before: set) -> list:
    """Connections to ``port`` and timers started since ``timers_before`` still in the reactor."""

    def peer_port(selectable):
        get_peer = getattr(selectable, "getPeer", None)
        return getattr(get_peer(), "port", None) if get_peer else None

    selectables = reactor.getReaders() + reactor.getWriters()
    return [s for s in selectables if peer_port(s) == port] + list(
        _active_timers() - timers_before
    )


@pytest_twisted.ensureDeferred
async def test_stop_leaves_no_connection_or_timer_behind(redis_url, redis_server):
    timers_before = _active_timers()
    connected = RedisStore(redis_url)
    await within(connected.start())
    assert _leftovers(redis_server.port, timers_before), "the check must see a live store"
    await within(connected.stop())
    assert _leftovers(redis_server.port, timers_before) == []


@pytest_twisted.ensureDeferred
async def test_stop_while_redis_is_down_leaves_nothing_behind(redis_url, redis_server):
    redis_server.stop()
    timers_before = _active_timers()
    waiting = RedisStore(redis_url, timeout=0.5)
    await within(waiting.start())
    assert _leftovers(redis_server.port, timers_before), "the check must see the retry timer"
    await within(waiting.stop())
    assert _leftovers(redis_server.port, timers_before) == []


@pytest_twisted.ensureDeferred
async def test_stop_during_start_ends_the_start(redis_url, redis_server):
    redis_server.stop()
    timers_before = _active_timers()
    waiting = RedisStore(redis_url, timeout=30)
    starting = waiting.start()
    await within(waiting.stop())
    assert starting.called
    assert _leftovers(redis_server.port, timers_before) == []
