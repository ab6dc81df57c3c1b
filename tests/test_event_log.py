"""The event log in front of the webhooks, on a Clock and an in-memory log store."""

from __future__ import annotations

import attrs
import pytest
from twisted.internet.task import Clock

from elevgw.events.log import EventLog, event_record, event_type, record_json
from elevgw.events.model import DeviceStatus, LoggedEvent, SnapshotReady
from event_fakes import MemoryEventLog, RecordingSink

T0 = 1_700_000_000.0


def online(device_id="dev_a", ts=1):
    return DeviceStatus(device_id, "online", "connected", ts)


def make(**options):
    clock = Clock()
    clock.advance(T0)
    store = MemoryEventLog()
    sink = RecordingSink()
    seen = []
    log = EventLog(store, clock, sink, observers=[seen.append], **options)
    return clock, store, sink, log, seen


def test_events_of_one_turn_are_appended_as_one_batch_and_forwarded_with_cursors():
    clock, store, sink, log, _ = make()
    events = [online("dev_a"), online("dev_b"), SnapshotReady("dev_a", "u", None, 2)]
    for event in events:
        log.emit(event)
    assert sink.events == [] and store.appends == []
    clock.advance(0)
    assert len(store.appends) == 1 and len(store.appends[0]) == 3
    assert [e.event for e in sink.events] == events
    assert [e.cursor for e in sink.events] == ["1", "2", "3"]
    assert [e.event_id for e in sink.events] == [r.event_id for r in store.records]
    assert log.metrics.appends["stored"]._value.get() == 3


def test_observers_see_each_event_at_once_even_while_the_store_is_slow():
    clock, store, sink, log, seen = make()
    store.hold = True
    log.emit(online())
    assert seen == [online()]
    clock.advance(0)
    assert sink.events == []


def test_events_emitted_during_an_append_wait_for_it_and_go_as_the_next_batch():
    clock, store, sink, log, _ = make()
    store.hold = True
    log.emit(online("dev_a"))
    clock.advance(0)
    for device in ("dev_b", "dev_c"):
        log.emit(online(device))
    clock.advance(0)
    assert len(store.appends) == 1
    store.hold = False
    store.release()
    assert len(store.appends) == 1  # the next batch waits for the next turn
    clock.advance(0)
    assert [len(batch) for batch in store.appends] == [1, 2]
    assert [(e.event.device_id, e.cursor) for e in sink.events] == [
        ("dev_a", "1"),
        ("dev_b", "2"),
        ("dev_c", "3"),
    ]


def test_a_store_that_does_not_answer_in_time_lets_the_webhooks_go_without_a_cursor():
    clock, store, sink, log, _ = make(forward_after=2.0)
    store.hold = True
    log.emit(online("dev_a"))
    clock.advance(0)
    clock.advance(1.9)
    assert sink.events == []
    clock.advance(0.1)
    assert [(e.event, e.cursor) for e in sink.events] == [(online("dev_a"), None)]
    assert log.metrics.appends["late"]._value.get() == 1
    store.release()  # the entry lands after all: logged, but not forwarded twice
    assert len(sink.events) == 1 and len(store.records) == 1


def test_a_failing_store_forwards_every_event_in_order_without_a_cursor():
    clock, store, sink, log, _ = make()
    store.down = True
    log.emit(online("dev_a"))
    log.emit(online("dev_b"))
    clock.advance(0)
    assert [(e.event.device_id, e.cursor) for e in sink.events] == [
        ("dev_a", None),
        ("dev_b", None),
    ]
    assert log.metrics.appends["failed"]._value.get() == 2
    store.down = False
    log.emit(online("dev_c"))
    clock.advance(0)
    assert sink.events[-1].cursor == "1"


def test_past_max_pending_events_are_forwarded_unlogged_but_still_in_order():
    clock, store, sink, log, _ = make(max_pending=2)
    store.hold = True
    log.emit(online("dev_a"))
    clock.advance(0)  # dev_a's append is in flight
    for device in ("dev_b", "dev_c", "dev_d"):
        log.emit(online(device))
    assert sink.events == []  # dev_d was not logged, but waits behind dev_a
    assert log.metrics.appends["dropped"]._value.get() == 1
    store.hold = False
    store.release()
    clock.advance(0)
    assert [(e.event.device_id, e.cursor) for e in sink.events] == [
        ("dev_a", "1"),
        ("dev_b", "2"),
        ("dev_c", "3"),
        ("dev_d", None),
    ]


def test_drain_waits_for_the_log_then_drains_the_next_sink():
    clock, store, sink, log, _ = make()
    store.hold = True
    log.emit(online())
    clock.advance(0)
    drained = log.drain(5)
    results = []
    drained.addCallback(results.append)
    assert results == [] and sink.drained == []
    clock.advance(1)
    store.release()
    assert results == [True] and sink.drained == [4.0]


def test_drain_gives_up_after_its_timeout():
    clock, store, sink, log, _ = make(forward_after=60)
    store.hold = True
    log.emit(online())
    clock.advance(0)
    results = []
    log.drain(5).addCallback(results.append)
    clock.advance(5)
    assert results == [False]


def test_an_event_that_cannot_be_recorded_is_forwarded_as_is():
    clock, store, sink, log, _ = make()

    class Odd:
        pass

    odd = Odd()
    log.emit(odd)
    assert sink.events == [odd]


def test_records_hold_the_webhook_body_without_seq():
    record = event_record(SnapshotReady("dev_a", "http://x/s.png", "cmd_1", 5), "evt_1")
    assert (record.type, record.device_id, record.ts, record.event_id) == (
        "snapshot",
        "dev_a",
        5,
        "evt_1",
    )
    assert record.body == {"url": "http://x/s.png", "request_id": "cmd_1"}
    assert record_json(attrs.evolve(record, cursor="7")) == {
        "cursor": "7",
        "type": "snapshot",
        "device_id": "dev_a",
        "ts": 5,
        "event_id": "evt_1",
        "url": "http://x/s.png",
        "request_id": "cmd_1",
    }


def test_an_unknown_event_class_is_typed_by_its_name():
    class CommandEvent:
        pass

    class CommandFinished:
        pass

    assert event_type(CommandEvent()) == "command"
    assert event_type(CommandFinished()) == "command"
    assert event_type(online()) == "status"


def test_an_event_that_brings_its_own_id_keeps_it():
    @attrs.frozen
    class NodeLost:
        device_id: str
        ts: int
        event_id: str

    clock, store, sink, log, _ = make()
    log.emit(NodeLost("dev_a", 1, "stable-id"))
    clock.advance(0)
    assert sink.events[0].event_id == "stable-id" == store.records[0].event_id
    assert store.records[0].type == "node"


def test_trimming_runs_every_interval_and_sets_the_size_gauge():
    clock, store, sink, log, _ = make(max_entries=2, trim_interval=60)
    for device in ("a", "b", "c"):
        log.emit(online(device))
    clock.advance(0)
    log.startService()
    assert len(store.records) == 2
    assert log.metrics.entries._value.get() == 2
    log.emit(online("d"))
    clock.advance(60)
    assert [r.device_id for r in store.records] == ["c", "d"]
    log.stopService()


def test_a_bad_limit_fails_the_read():
    _, _, _, log, _ = make()
    failures = []
    log.read(None, 0).addErrback(failures.append)
    assert failures[0].check(ValueError)


# Live subscriptions


def follow(log, after=None, **options):
    written, closed = [], []
    subscription = log.subscribe(
        lambda records: written.extend(r.cursor for r in records),
        lambda reason: closed.append(reason),
        after=after,
        **options,
    )
    return subscription, written, closed


def test_a_subscription_without_a_cursor_gets_only_new_entries():
    clock, store, sink, log, _ = make()
    log.emit(online("old"))
    clock.advance(0)
    _, written, _ = follow(log)
    log.emit(online("new"))
    clock.advance(0)
    assert written == ["2"]


def test_a_subscription_catches_up_from_its_cursor_then_follows_live():
    clock, store, sink, log, _ = make()
    for i in range(5):
        log.emit(online(f"dev_{i}"))
    clock.advance(0)
    subscription, written, _ = follow(log, after="2", page_size=2)
    assert written == ["3", "4", "5"]
    log.emit(online("dev_new"))
    clock.advance(0)
    assert written == ["3", "4", "5", "6"]


def test_subscriptions_share_one_read_of_the_tail_per_append():
    clock, store, sink, log, _ = make()
    followers = [follow(log) for _ in range(5)]
    reads = store.reads
    log.emit(online())
    clock.advance(0)
    assert store.reads == reads + 1
    assert all(written == ["1"] for _, written, _ in followers)


def test_the_tail_polls_for_entries_other_nodes_appended():
    clock, store, sink, log, _ = make(poll_interval=1.0)
    _, written, _ = follow(log)
    other = EventLog(store, clock, RecordingSink())
    other.emit(online("elsewhere"))
    clock.advance(0)
    assert written == []
    clock.advance(1.0)
    assert written == ["1"]


def test_a_subscription_filters_by_device_and_type():
    clock, store, sink, log, _ = make()
    _, written, _ = follow(log, device_id="dev_a", type="snapshot")
    log.emit(online("dev_a"))
    log.emit(SnapshotReady("dev_a", "u", None, 1))
    log.emit(SnapshotReady("dev_b", "u", None, 1))
    clock.advance(0)
    assert written == ["2"]


def test_a_paused_subscription_buffers_then_catches_up_on_resume():
    clock, store, sink, log, _ = make()
    subscription, written, _ = follow(log)
    subscription.pause()
    log.emit(online("a"))
    log.emit(online("b"))
    clock.advance(0)
    assert written == []
    subscription.resume()
    assert written == ["1", "2"]


def test_a_client_that_falls_too_far_behind_is_dropped():
    clock, store, sink, log, _ = make()
    subscription, written, closed = follow(log, max_buffered=3)
    subscription.pause()
    for i in range(4):
        log.emit(online(f"dev_{i}"))
    clock.advance(0)
    assert closed == ["dropped"] and subscription.closed
    assert log.metrics.stream_dropped._value.get() == 1
    assert log.metrics.stream_clients._value.get() == 0
    log.emit(online("later"))
    clock.advance(0)
    assert written == []


def test_a_paused_catch_up_reads_no_further_until_resumed():
    clock, store, sink, log, _ = make()
    for i in range(6):
        log.emit(online(f"dev_{i}"))
    clock.advance(0)
    written = []
    subscriptions = []

    def write(records):
        written.extend(r.cursor for r in records)
        subscriptions[0].pause()

    reads = store.reads
    subscriptions.append(
        log.subscribe(write, lambda reason: None, after="0", page_size=2, start=False)
    )
    subscriptions[0].start()
    assert written == ["1", "2"] and store.reads == reads + 1
    subscriptions[0].resume()
    assert written == ["1", "2", "3", "4"]
    subscriptions[0].resume()
    subscriptions[0].resume()
    assert written == ["1", "2", "3", "4", "5", "6"]
    assert subscriptions[0].live


def test_a_bad_cursor_is_refused_when_subscribing():
    from elevgw.stores.interfaces import BadCursor

    _, _, _, log, _ = make()
    with pytest.raises(BadCursor):
        follow(log, after="nope")


def test_stopping_the_service_closes_the_subscriptions():
    clock, store, sink, log, _ = make()
    log.startService()
    _, _, closed = follow(log)
    log.stopService()
    assert closed == ["stopped"]


def test_forwarded_events_are_logged_events():
    clock, store, sink, log, _ = make()
    log.emit(online())
    clock.advance(0)
    assert isinstance(sink.events[0], LoggedEvent)


def test_a_store_that_cannot_start_is_one_line_without_a_traceback():
    from twisted.internet.defer import fail
    from twisted.logger import capturedLogs

    from elevgw.stores.interfaces import StoreUnavailable

    clock, store, _, log, _ = make()
    store.start = lambda: fail(StoreUnavailable("sqlite: file is not a database"))
    with capturedLogs() as events:
        log.startService()
    [line] = [e for e in events if e.get("log_namespace", "").startswith("elevgw")]
    assert "log_failure" not in line and line["error"] == "sqlite: file is not a database"
    log.stopService()


def test_a_takeover_from_another_node_keeps_its_extras_and_others_leave_them_out():
    takeover = DeviceStatus("dev_a", "online", "takeover", 5, previous_node="n1", gap_ms=40)
    assert event_record(takeover, "e").body == {
        "status": "online",
        "reason": "takeover",
        "previous_node": "n1",
        "gap_ms": 40,
    }
    assert event_record(online(), "e").body == {"status": "online", "reason": "connected"}


def test_an_event_with_a_stable_id_is_logged_and_sent_under_it():
    clock, store, sink, log, _ = make()
    lost = DeviceStatus("dev_a", "offline", "node_lost", 5, event_id="stable")
    log.emit(lost)
    clock.advance(0)
    assert store.records[0].event_id == "stable" == sink.events[0].event_id
    assert "event_id" not in store.records[0].body
