"""``page_devices``: the device listing a page at a time, on SQLite, on a real Redis, and on
the in-memory store the unit tests use."""

from __future__ import annotations

import pytest_twisted

from elevgw.stores.interfaces import position_of
from elevgw.stores.redis import RedisStore
from elevgw.stores.sqlite import SQLiteStore
from elevgw.testing import MemoryDeviceStore
from test_store_contract import device
from waiting import within

pytest_plugins = ["redis_support"]


@pytest_twisted.async_yield_fixture(params=["sqlite", "redis", "memory"])
async def store(request, tmp_path):
    if request.param == "sqlite":
        started = SQLiteStore(str(tmp_path / "store.sqlite3"))
    elif request.param == "redis":
        started = RedisStore(request.getfixturevalue("redis_url"), timeout=2.0)
    else:
        started = MemoryDeviceStore()
    await within(started.start())
    yield started
    await within(started.stop())


async def add(store, *devices):
    for each in devices:
        await within(store.add_device(each))


async def walk(store, limit, query=None):
    """Every page until ``next`` is ``None``: the ids of each page."""
    pages, after = [], None
    while True:
        devices, after = await within(store.page_devices(after, limit, query))
        pages.append([d.device_id for d in devices])
        if after is None:
            return pages
        assert len(pages) < 100, "paging does not end"


@pytest_twisted.ensureDeferred
async def test_pages_follow_list_order_and_end_with_no_next(store):
    await add(
        store,
        device("dev_c", created=30.0),
        device("dev_b", created=10.0),
        device("dev_z", created=20.0),
        device("dev_a", created=20.0),
        device("dev_d", created=40.0),
    )
    assert await walk(store, 2) == [["dev_b", "dev_a"], ["dev_z", "dev_c"], ["dev_d"]]
    assert await walk(store, 5) == [["dev_b", "dev_a", "dev_z", "dev_c", "dev_d"]]


@pytest_twisted.ensureDeferred
async def test_a_page_holds_the_devices_as_stored(store):
    stored = device("dev_a", created=1700000000.123, last_seen=1700000100.654)
    await add(store, stored)
    devices, after = await within(store.page_devices(None, 10))
    assert devices == [stored] and after is None


@pytest_twisted.ensureDeferred
async def test_empty_store_has_one_empty_page(store):
    assert await within(store.page_devices(None, 20)) == ([], None)


@pytest_twisted.ensureDeferred
async def test_paging_goes_on_after_the_last_device_seen_is_deleted(store):
    devices = [device(f"dev_{n}", created=1700000000.5 + n) for n in range(4)]
    await add(store, *devices)
    first, after = await within(store.page_devices(None, 2))
    assert after == position_of(devices[1])
    await within(store.delete_device("dev_1"))
    rest, after = await within(store.page_devices(position_of(devices[1]), 2))
    assert [d.device_id for d in rest] == ["dev_2", "dev_3"] and after is None


@pytest_twisted.ensureDeferred
async def test_query_matches_id_or_location_ignoring_ascii_case(store):
    await add(
        store,
        device("dev_00aa", created=1.0, location="上海中心01号 Tower B"),
        device("dev_00bb", created=2.0, location="北京国贸 tower a"),
        device("dev_AAcc", created=3.0, location="广州塔"),
    )
    assert await walk(store, 10, "TOWER") == [["dev_00aa", "dev_00bb"]]
    assert await walk(store, 10, "aa") == [["dev_00aa", "dev_AAcc"]]
    assert await walk(store, 10, "上海中心") == [["dev_00aa"]]
    assert await walk(store, 10, "nowhere") == [[]]
    assert await walk(store, 1, "tower") == [["dev_00aa"], ["dev_00bb"]]


@pytest_twisted.ensureDeferred
async def test_query_characters_are_literal_not_patterns(store):
    await add(store, device("dev_1", created=1.0, location="50% off_sale"))
    await add(store, device("dev_2", created=2.0, location="5 off sale"))
    assert await walk(store, 10, "0% off_") == [["dev_1"]]
    assert await walk(store, 10, ".") == [[]]


@pytest_twisted.ensureDeferred
async def test_bounded_scans_still_find_every_match(store):
    """A store may stop early (Redis does after ``page_scan_budget`` devices); following
    ``next`` still yields every match once, in order."""
    if hasattr(store, "page_scan_budget"):
        store.page_scan_budget = 3
    await add(store, *(device(f"dev_{n:02}", created=float(n)) for n in range(10)))
    await add(store, device("dev_match1", created=3.5), device("dev_match2", created=9.5))
    found = [i for page in await walk(store, 1, "match") for i in page]
    assert found == ["dev_match1", "dev_match2"]
    everything = [i for page in await walk(store, 4) for i in page]
    assert len(everything) == 12 and len(set(everything)) == 12
