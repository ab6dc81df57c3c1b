"""One behaviour for every ``ICommandQueue``: SQLite (a file), Redis (a real redis-server) and
the in-memory fake of ``elevgw.testing``."""

from __future__ import annotations

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from elevgw.stores.interfaces import (
    ACKED,
    CANCELED,
    EXPIRED,
    QUEUED,
    SENT,
    SUPERSEDED,
    CommandRecord,
    ICommandQueue,
    QueueFull,
)
from elevgw.stores.redis import RedisStore
from elevgw.stores.redis_commands import RedisCommandQueue
from elevgw.stores.sqlite import SQLiteStore
from elevgw.stores.sqlite_commands import SQLiteCommandQueue
from elevgw.testing import MemoryCommandQueue
from test_store_contract import within

pytest_plugins = ["redis_support"]

NOW = 1_700_000_000_000


@pytest.fixture(params=["sqlite", "redis", "memory"])
def make_queue(request, tmp_path):
    """Build ``(store, queue)`` pairs of the parametrized kind, unstarted, on the same data.

    ``memory`` is the fake unit tests use: held to the same contract, it proves them right.
    """
    if request.param == "memory":
        shared: dict = {}

        def memory(history=100):
            queue = shared.setdefault("queue", MemoryCommandQueue(history=history))
            return queue, queue

        return memory
    if request.param == "sqlite":
        path = str(tmp_path / "store.sqlite3")

        def sqlite(history=100):
            store = SQLiteStore(path)
            return store, SQLiteCommandQueue(store, history=history)

        return sqlite
    url = request.getfixturevalue("redis_url")

    def redis(history=100):
        store = RedisStore(url, timeout=2.0)
        return store, RedisCommandQueue(store, history=history)

    return redis


@pytest_twisted.async_yield_fixture
async def started(make_queue):
    """Start queues with ``await started(history=…)``; all are stopped afterwards."""
    stores = []

    async def start(history=100):
        store, queue = make_queue(history)
        await within(store.start())
        await within(queue.start())
        stores.append(store)
        return queue

    yield start
    for store in stores:
        await within(store.stop())


def command(
    number: int,
    device_id: str = "dev_a",
    ttl: int | None = 60_000,
    state: str = QUEUED,
    collapse_key: str | None = None,
    created: int = NOW,
) -> CommandRecord:
    return CommandRecord(
        id=f"cmd_{device_id}_{number:04d}",
        device_id=device_id,
        command="SET",
        data={"n": number, "text": "上海"},
        state=state,
        created=created,
        updated=created,
        expires=None if ttl is None else created + ttl,
        collapse_key=collapse_key,
    )


def ids(records):
    return [record.id for record in records]


def test_queues_provide_the_interface(make_queue):
    assert verifyObject(ICommandQueue, make_queue()[1])


@pytest_twisted.ensureDeferred
async def test_added_command_reads_back_as_stored(started):
    queue = await started()
    added = command(1)
    assert await within(queue.add(added, 100)) == []
    assert await within(queue.get("dev_a", added.id)) == added
    assert await within(queue.get("dev_b", added.id)) is None
    assert await within(queue.get("dev_a", "cmd_unknown")) is None


@pytest_twisted.ensureDeferred
async def test_take_sends_queued_commands_in_order_once_and_resends_unacked_ones(started):
    queue = await started()
    for number in (1, 2, 3):
        await within(queue.add(command(number), 100))
    await within(queue.add(command(1, "dev_b"), 100))
    taken = await within(queue.take(["dev_a", "dev_c"], NOW + 1, resend=False))
    assert list(taken) == ["dev_a"]
    assert ids(taken["dev_a"].send) == [command(n).id for n in (1, 2, 3)]
    assert {record.state for record in taken["dev_a"].send} == {SENT}
    assert await within(queue.take(["dev_a"], NOW + 2, resend=False)) == {}
    await within(queue.finish("dev_a", command(2).id, ACKED, {"ok": True}, NOW + 3))
    again = await within(queue.take(["dev_a"], NOW + 4, resend=True))
    assert ids(again["dev_a"].send) == [command(1).id, command(3).id]


@pytest_twisted.ensureDeferred
async def test_finish_moves_a_command_once(started):
    queue = await started()
    await within(queue.add(command(1), 100))
    record, changed = await within(queue.finish("dev_a", command(1).id, ACKED, [1, "二"], NOW + 5))
    assert changed and record.state == ACKED and record.result == [1, "二"]
    assert record.updated == NOW + 5
    record, changed = await within(queue.finish("dev_a", command(1).id, CANCELED, None, NOW + 6))
    assert not changed and record.state == ACKED
    assert await within(queue.finish("dev_b", command(1).id, ACKED, None, NOW)) == (None, False)
    assert await within(queue.take(["dev_a"], NOW + 7, resend=True)) == {}


@pytest_twisted.ensureDeferred
async def test_expired_commands_are_skipped_and_reported_not_sent(started):
    queue = await started()
    await within(queue.add(command(1, ttl=1000), 100))
    await within(queue.add(command(2, ttl=60_000), 100))
    taken = await within(queue.take(["dev_a"], NOW + 1000, resend=True))
    assert ids(taken["dev_a"].expired) == [command(1).id]
    assert taken["dev_a"].expired[0].state == EXPIRED
    assert ids(taken["dev_a"].send) == [command(2).id]
    assert (await within(queue.get("dev_a", command(1).id))).state == EXPIRED


@pytest_twisted.ensureDeferred
async def test_expire_due_finds_expired_commands_of_every_device(started):
    queue = await started()
    await within(queue.add(command(1, "dev_a", ttl=1000), 100))
    await within(queue.add(command(1, "dev_b", ttl=2000), 100))
    await within(queue.add(command(2, "dev_b", ttl=9000), 100))
    assert await within(queue.depth()) == 3
    expired = await within(queue.expire_due(NOW + 2000, 100))
    assert sorted(ids(expired)) == [command(1, "dev_a").id, command(1, "dev_b").id]
    assert {record.state for record in expired} == {EXPIRED}
    assert await within(queue.expire_due(NOW + 2000, 100)) == []
    assert await within(queue.depth()) == 1


@pytest_twisted.ensureDeferred
async def test_a_full_queue_refuses_more_pending_commands(started):
    queue = await started()
    for number in range(3):
        await within(queue.add(command(number), 3))
    with pytest.raises(QueueFull):
        await within(queue.add(command(9), 3))
    await within(queue.add(command(10, ttl=None, state=SENT), 3))  # without ttl: not queued
    await within(queue.add(command(9, "dev_b"), 3))
    await within(queue.finish("dev_a", command(0).id, ACKED, None, NOW))
    await within(queue.add(command(9), 3))
    assert await within(queue.depth()) == 4


@pytest_twisted.ensureDeferred
async def test_a_collapse_key_supersedes_queued_commands_with_that_key(started):
    queue = await started()
    await within(queue.add(command(1, collapse_key="volume"), 100))
    await within(queue.add(command(2, collapse_key="brightness"), 100))
    superseded = await within(queue.add(command(3, collapse_key="volume"), 100))
    assert ids(superseded) == [command(1).id]
    assert superseded[0].state == SUPERSEDED
    taken = await within(queue.take(["dev_a"], NOW + 1, resend=False))
    assert ids(taken["dev_a"].send) == [command(2).id, command(3).id]
    # Sent commands are not superseded: the device may have carried them out.
    assert await within(queue.add(command(4, collapse_key="volume"), 100)) == []


@pytest_twisted.ensureDeferred
async def test_collapsing_makes_room_in_a_full_queue(started):
    queue = await started()
    await within(queue.add(command(1, collapse_key="volume"), 2))
    await within(queue.add(command(2), 2))
    superseded = await within(queue.add(command(3, collapse_key="volume"), 2))
    assert ids(superseded) == [command(1).id]


@pytest_twisted.ensureDeferred
async def test_recorded_commands_are_listed_with_queued_ones_oldest_first(started):
    queue = await started()
    await within(queue.add(command(1), 100))
    await within(
        queue.record([command(2, ttl=None, state=SENT), command(3, ttl=None, state=ACKED)])
    )
    await within(queue.record([command(2, ttl=None, state=ACKED)]))  # a second time: ignored
    recent = await within(queue.recent("dev_a", 10))
    assert ids(recent) == [command(n).id for n in (1, 2, 3)]
    assert [r.state for r in recent] == [QUEUED, SENT, ACKED]
    assert ids(await within(queue.recent("dev_a", 2))) == [command(n).id for n in (2, 3)]
    assert await within(queue.take(["dev_a"], NOW + 1, resend=True)) != {}
    assert await within(queue.recent("dev_b", 10)) == []


@pytest_twisted.ensureDeferred
async def test_only_the_newest_finished_commands_are_kept(started):
    queue = await started(history=3)
    await within(queue.add(command(0), 100))
    await within(queue.record([command(n, ttl=None, state=SENT) for n in range(1, 6)]))
    recent = await within(queue.recent("dev_a", 100))
    assert ids(recent) == [command(n).id for n in (0, 3, 4, 5)]  # pending ones always stay
    assert await within(queue.get("dev_a", command(1).id)) is None


@pytest_twisted.ensureDeferred
async def test_the_queue_survives_a_restart(make_queue, started):
    queue = await started()
    await within(queue.add(command(1), 100))
    await within(queue.take(["dev_a"], NOW + 1, resend=False))
    await within(queue.add(command(2), 100))
    again = await started()
    taken = await within(again.take(["dev_a"], NOW + 2, resend=True))
    assert ids(taken["dev_a"].send) == [command(1).id, command(2).id]


@pytest_twisted.ensureDeferred
async def test_steps_run_in_call_order_on_redis_that_does_not_know_the_scripts(
    redis_url, redis_server
):
    """Steps sent back to back (a record, then the ack of it) run in that order even when
    Redis answers the first ``NOSCRIPT`` (a new or restarted server) and knows the second."""
    store = RedisStore(redis_url, timeout=2.0)
    queue = RedisCommandQueue(store)
    await within(store.start())
    try:
        redis_server.command("SCRIPT", "FLUSH")
        await within(queue.finish("dev_a", "cmd_none", ACKED, None, NOW))  # Redis knows this one
        recording = queue.record([command(1, ttl=None, state=SENT)])
        acking = queue.finish("dev_a", command(1).id, ACKED, "ok", NOW + 1)
        await within(recording)
        record, changed = await within(acking)
        assert changed and record.state == ACKED
    finally:
        await within(store.stop())


@pytest_twisted.ensureDeferred
async def test_finish_many_takes_each_step_like_finish_in_one_call(started):
    queue = await started()
    for number in (1, 2):
        await within(queue.add(command(number), 100))
    await within(queue.finish("dev_a", command(2).id, ACKED, "first", NOW))
    results = await within(
        queue.finish_many(
            [
                ("dev_a", command(1).id, ACKED, {"ok": "一"}),
                ("dev_a", command(2).id, ACKED, "second"),
                ("dev_b", command(1).id, ACKED, None),
                ("dev_a", command(1).id, CANCELED, None),
            ],
            NOW + 1,
        )
    )
    assert [(r.state if r else None, r.result if r else None, c) for r, c in results] == [
        (ACKED, {"ok": "一"}, True),
        (ACKED, "first", False),
        (None, None, False),
        (ACKED, {"ok": "一"}, False),
    ]
    assert await within(queue.finish_many([], NOW)) == []
    assert await within(queue.take(["dev_a"], NOW + 2, resend=True)) == {}
