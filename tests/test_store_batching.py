"""SQLite lookups asked for in one reactor turn share one query; the listener's backlog."""

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList

from elevgw.listener import with_backlog
from elevgw.stores.interfaces import Device, StoreUnavailable
from elevgw.stores.sqlite import SQLiteStore


@pytest_twisted.async_yield_fixture
async def store(tmp_path):
    store = SQLiteStore(str(tmp_path / "s.sqlite3"), reactor)
    await store.start()
    yield store
    await store.stop()


@pytest_twisted.ensureDeferred
async def test_a_burst_of_lookups_answers_each_one_right(store):
    for number in range(1200):  # more than one SELECT … IN batch
        await store.add_device(Device("dev_{:04d}".format(number), "L", "h{}".format(number), 1.0))
    wanted = ["dev_{:04d}".format(n) for n in range(0, 1200, 3)] + ["dev_nobody", "dev_0003"]
    results = await DeferredList([store.get_device(d) for d in wanted], fireOnOneErrback=True)
    found = [device for _, device in results]
    assert found[-2] is None
    assert found[-1].token_hash == "h3"
    assert [d.device_id for d in found[:-2]] == wanted[:-2]
    assert all(d.token_hash == "h" + str(int(d.device_id[4:])) for d in found[:-2])


@pytest_twisted.ensureDeferred
async def test_a_burst_of_lookups_fails_together_when_the_store_is_down(store):
    await store.add_device(Device("dev_a", "L", "h", 1.0))
    pending = [store.get_device("dev_a") for _ in range(5)]
    await store.stop()  # the store goes away under the queued batch
    for d in pending:
        with pytest.raises(StoreUnavailable):
            await d


@pytest.mark.parametrize(
    "description, expected",
    [
        ("tcp:8080", "tcp:8080:backlog=1024"),
        ("tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1:backlog=1024"),
        ("tcp:8080:backlog=4096", "tcp:8080:backlog=4096"),
        ("unix:/run/e.sock", "unix:/run/e.sock:backlog=1024"),
    ],
)
def test_listeners_get_a_storm_sized_backlog_unless_given_one(description, expected):
    assert with_backlog(description) == expected
