"""One behaviour for every ``IEventLog`` (SQLite table, Redis stream), on real stores."""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from elevgw.stores.interfaces import BadCursor, EventRecord, IEventLog, StoreUnavailable
from elevgw.stores.redis import RedisStore
from elevgw.stores.redis_events import RedisEventLog
from elevgw.stores.sqlite import SQLiteStore
from elevgw.stores.sqlite_events import SQLiteEventLog
from test_store_contract import failure_of, within

pytest_plugins = ["redis_support"]

NOW_MS = int(time.time() * 1000)


def record(device_id="dev_a", type="status", ts=None, n=0, **body):
    """A record of an event that happened just now (``ts`` is what the age limit reads)."""
    ts = ts if ts is not None else NOW_MS
    return EventRecord(
        type=type,
        device_id=device_id,
        ts=ts + n,
        event_id=f"evt_{device_id}_{n}",
        body=body or {"status": "online", "reason": "connected"},
    )


@pytest.fixture(params=["sqlite", "redis"])
def make_log(request, tmp_path):
    """``make_log()`` -> an unstarted (store, event log) pair of the parametrized kind."""
    if request.param == "sqlite":
        path = str(tmp_path / "store.sqlite3")

        def sqlite():
            store = SQLiteStore(path)
            return store, SQLiteEventLog(store)

        return sqlite
    url = request.getfixturevalue("redis_url")

    def redis():
        store = RedisStore(url, timeout=2.0)
        return store, RedisEventLog(store)

    return redis


@pytest_twisted.async_yield_fixture
async def event_log(make_log):
    store, log = make_log()
    await within(store.start())
    await within(log.start())
    yield log
    await within(store.stop())


def test_logs_provide_the_interface(make_log):
    assert verifyObject(IEventLog, make_log()[1])


@pytest_twisted.ensureDeferred
async def test_appended_records_read_back_in_order_with_growing_cursors(event_log):
    first = await within(event_log.append([record(n=0), record(n=1)]))
    second = await within(event_log.append([record("dev_b", n=2, url="u", request_id=None)]))
    cursors = first + second
    assert len(cursors) == 3
    keys = [event_log.parse_cursor(c) for c in cursors]
    assert keys == sorted(keys) and len(set(keys)) == 3
    page = await within(event_log.read(None, 10))
    assert [r.cursor for r in page.records] == cursors
    assert page.records[2] == record("dev_b", n=2, url="u", request_id=None).__class__(
        type="status",
        device_id="dev_b",
        ts=NOW_MS + 2,
        event_id="evt_dev_b_2",
        body={"url": "u", "request_id": None},
        cursor=cursors[2],
    )
    assert page.next == cursors[2]


@pytest_twisted.ensureDeferred
async def test_reading_after_a_cursor_resumes_there(event_log):
    cursors = await within(event_log.append([record(n=i) for i in range(5)]))
    page = await within(event_log.read(cursors[1], 2))
    assert [r.cursor for r in page.records] == cursors[2:4]
    assert page.next == cursors[3]
    rest = await within(event_log.read(page.next, 10))
    assert [r.cursor for r in rest.records] == cursors[4:]
    assert rest.next == cursors[4]
    empty = await within(event_log.read(rest.next, 10))
    assert empty.records == [] and empty.next == cursors[4]


@pytest_twisted.ensureDeferred
async def test_an_empty_log_reads_empty_from_the_start(event_log):
    page = await within(event_log.read(None, 10))
    assert page.records == [] and page.next == event_log.start_cursor
    assert await within(event_log.last_cursor()) == event_log.start_cursor
    again = await within(event_log.read(page.next, 10))
    assert again.records == []


@pytest_twisted.ensureDeferred
async def test_filters_by_device_and_type_and_next_skips_what_was_examined(event_log):
    records = [
        record("dev_a", n=0),
        record("dev_b", n=1),
        record("dev_a", "snapshot", n=2, url="u"),
        record("dev_b", "snapshot", n=3, url="v"),
        record("dev_a", n=4),
    ]
    cursors = await within(event_log.append(records))
    page = await within(event_log.read(None, 10, device_id="dev_a"))
    assert [r.cursor for r in page.records] == [cursors[0], cursors[2], cursors[4]]
    page = await within(event_log.read(None, 10, type="snapshot"))
    assert [r.cursor for r in page.records] == [cursors[2], cursors[3]]
    assert page.next == cursors[4]  # the last entry was examined and did not match
    page = await within(event_log.read(None, 1, device_id="dev_b", type="snapshot"))
    assert [r.cursor for r in page.records] == [cursors[3]] and page.next == cursors[3]
    page = await within(event_log.read(None, 10, device_id="dev_nobody"))
    assert page.records == [] and page.next == cursors[4]


@pytest_twisted.ensureDeferred
async def test_last_cursor_is_the_newest_entry(event_log):
    cursors = await within(event_log.append([record(n=i) for i in range(3)]))
    assert await within(event_log.last_cursor()) == cursors[-1]


@pytest_twisted.ensureDeferred
async def test_bodies_keep_unicode_and_lone_surrogates(event_log):
    body = {"location": "上海中心01号", "odd": "\ud800", "nested": {"a": [1, 2.5, None]}}
    await within(event_log.append([record(**body)]))
    page = await within(event_log.read(None, 1))
    assert page.records[0].body == body


@pytest.mark.parametrize("cursor", ["", "abc", "-1", "1.5", "1-2-3", "1-", "x-1", "9" * 40])
@pytest_twisted.ensureDeferred
async def test_a_malformed_cursor_fails_with_bad_cursor(event_log, cursor):
    error, _ = await failure_of(event_log.read(cursor, 10))
    assert isinstance(error, BadCursor)
    with pytest.raises(BadCursor):
        event_log.parse_cursor(cursor)


@pytest_twisted.ensureDeferred
async def test_trim_keeps_the_newest_entries(event_log):
    cursors = await within(event_log.append([record(n=i) for i in range(10)]))
    left = await within(event_log.trim(max_age=3600, max_entries=4, now=time.time()))
    assert left == 4
    page = await within(event_log.read(None, 100))
    assert [r.cursor for r in page.records] == cursors[6:]
    more = await within(event_log.append([record(n=10)]))
    assert event_log.parse_cursor(more[0]) > event_log.parse_cursor(cursors[-1])


@pytest_twisted.ensureDeferred
async def test_trim_drops_entries_older_than_the_age_limit(event_log):
    now = time.time()
    await within(event_log.append([record(ts=int(now * 1000), n=i) for i in range(3)]))
    assert await within(event_log.trim(max_age=3600, max_entries=100, now=now)) == 3
    assert await within(event_log.trim(max_age=3600, max_entries=100, now=now + 7200)) == 0
    page = await within(event_log.read(None, 100))
    assert page.records == []
    cursors = await within(event_log.append([record(ts=int(now * 1000), n=9)]))
    assert (await within(event_log.read(None, 10))).records[0].cursor == cursors[0]


@pytest_twisted.ensureDeferred
async def test_a_stopped_store_fails_with_store_unavailable(make_log):
    store, log = make_log()
    await within(store.start())
    await within(log.start())
    await within(store.stop())
    for call in (
        lambda: log.append([record()]),
        lambda: log.read(None, 10),
        lambda: log.last_cursor(),
        lambda: log.trim(1, 1, time.time()),
    ):
        error, _ = await failure_of(call())
        assert isinstance(error, StoreUnavailable)


@pytest_twisted.ensureDeferred
async def test_redis_cursors_grow_across_nodes_sharing_the_stream(redis_url):
    stores = [RedisStore(redis_url, timeout=2.0) for _ in range(2)]
    for store in stores:
        await within(store.start())
    try:
        logs = [RedisEventLog(store) for store in stores]
        cursors = []
        for i in range(6):
            cursors += await within(logs[i % 2].append([record(n=i)]))
        keys = [logs[0].parse_cursor(c) for c in cursors]
        assert keys == sorted(keys) and len(set(keys)) == 6
        page = await within(logs[1].read(None, 10))
        assert [r.cursor for r in page.records] == cursors
    finally:
        for store in stores:
            await within(store.stop())


@pytest_twisted.ensureDeferred
async def test_redis_append_caps_the_stream(redis_url, redis_server):
    store = RedisStore(redis_url, timeout=2.0)
    await within(store.start())
    try:
        log = RedisEventLog(store, maxlen=100)
        for start in range(0, 1000, 100):
            await within(log.append([record(n=start + i) for i in range(100)]))
        assert redis_server.command("XLEN", log.key) < 400
    finally:
        await within(store.stop())
