"""The command state machine on a ``Clock``, fake connections and the in-memory queue (which
the contract suite holds to the SQLite and Redis behaviour)."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock

from elevgw.core import wire
from elevgw.core.command_queue import (
    WAIT_DISCONNECTED,
    WAIT_TIMEOUT,
    CommandAlreadyFinished,
    CommandDispatcher,
    UnknownCommand,
    WaitEnded,
)
from elevgw.core.commands import CommandRouter, DeviceOffline
from elevgw.core.sessions import SessionRegistry
from elevgw.events.model import CommandFinished
from elevgw.stores.interfaces import CommandRecord, QueueFull
from elevgw.testing import FakeConnection, MemoryCommandQueue, RecordingSink


class Node:
    """One node's command path on a Clock."""

    def __init__(self, max_pending: int = 100) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.sink = RecordingSink()
        self.registry = SessionRegistry(self.clock, self.sink, 30.0)
        self.router = CommandRouter(self.registry, self.clock)
        self.queue = MemoryCommandQueue()
        self.metrics = CollectorRegistry()
        self.dispatcher = CommandDispatcher(
            self.queue,
            self.registry,
            self.router,
            self.clock,
            self.sink,
            metrics_registry=self.metrics,
            max_pending=max_pending,
        )

    def connect(self, device_id: str) -> FakeConnection:
        connection = FakeConnection()
        session = self.registry.attach(device_id, connection)
        self.dispatcher.device_connected(session)
        return connection

    def finished(self) -> list[tuple[str, str]]:
        return [(e.id, e.state) for e in self.sink.events if isinstance(e, CommandFinished)]

    def metric(self, name: str, **labels) -> float | None:
        return self.metrics.get_sample_value(name, labels)


def commands(connection: FakeConnection) -> list[dict]:
    return [json.loads(frame) for frame in connection.sent]


def ack(node: Node, device_id: str, command_id: str, payload=None, error=None) -> None:
    node.dispatcher.ack_received(device_id, wire.Frame(wire.ACK, payload, command_id, error))


def result_of(d):
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def test_a_wait_fires_with_the_acked_command_and_the_backend_hears_of_it():
    node = Node()
    connection = node.connect("dev_a")
    record = result_of(node.dispatcher.submit("dev_a", "VOLUME", 3))
    assert record.state == "sent" and commands(connection)[0]["id"] == record.id
    waiting = node.dispatcher.wait(record, 10)
    ack(node, "dev_a", record.id, {"volume": 3})
    answered = result_of(waiting)
    assert (answered.state, answered.result) == ("acked", {"volume": 3})
    assert node.finished() == [(record.id, "acked")]
    assert node.metric("elevgw_command_states_total", state="acked") == 1
    assert node.dispatcher.pending_waits() == 0


def test_an_unanswered_wait_without_ttl_times_out_the_command():
    node = Node()
    node.connect("dev_a")
    record = result_of(node.dispatcher.submit("dev_a", "REBOOT", None))
    waiting = node.dispatcher.wait(record, 5)
    node.clock.advance(4.9)
    assert not waiting.called
    node.clock.advance(0.1)
    ended = result_of(waiting).value
    assert isinstance(ended, WaitEnded) and ended.reason == WAIT_TIMEOUT
    assert ended.record.state == "timed_out"
    ack(node, "dev_a", record.id, "late")
    node.clock.advance(0)
    assert node.finished() == [(record.id, "timed_out")]
    assert result_of(node.dispatcher.get("dev_a", record.id)).state == "timed_out"


def test_an_unanswered_wait_with_ttl_leaves_the_command_pending():
    node = Node()
    node.connect("dev_a")
    record = result_of(node.dispatcher.submit("dev_a", "REBOOT", None, ttl=60))
    waiting = node.dispatcher.wait(record, 5)
    node.clock.advance(5)
    ended = result_of(waiting).value
    assert ended.reason == WAIT_TIMEOUT and ended.record.state == "sent"
    assert node.finished() == []


def test_a_disconnect_ends_waits_at_once_but_a_takeover_does_not():
    node = Node()
    node.connect("dev_a")
    record = result_of(node.dispatcher.submit("dev_a", "REBOOT", None, ttl=60))
    waiting = node.dispatcher.wait(record, 30)
    node.connect("dev_a")  # the same device again: takeover
    assert not waiting.called
    node.registry.end_device("dev_a", "closed", 1000)
    ended = result_of(waiting).value
    assert ended.reason == WAIT_DISCONNECTED and ended.record.state == "sent"


def test_commands_written_at_once_are_recorded_in_one_batch_behind_the_writes():
    node = Node()
    node.connect("dev_a")
    node.clock.advance(0)
    sent = [node.router.send("dev_a", "X", n) for n in range(3)]
    assert node.queue.calls.get("record", 0) == 0
    ack(node, "dev_a", sent[0].id, "early")  # before the batch is stored
    node.clock.advance(0)
    assert node.queue.calls["record"] == 1
    listed = result_of(node.dispatcher.recent("dev_a", 10))
    assert [(r.id, r.state) for r in listed] == [
        (sent[0].id, "acked"),
        (sent[1].id, "sent"),
        (sent[2].id, "sent"),
    ]
    assert node.finished() == [(sent[0].id, "acked")]


def test_snapshot_requests_are_not_recorded_as_commands():
    node = Node()
    node.connect("dev_a")
    node.router.request("dev_a", "snapshot", None, 10).addErrback(lambda _: None)
    node.clock.advance(0)
    assert result_of(node.dispatcher.recent("dev_a", 10)) == []


def test_devices_connecting_in_one_turn_share_one_store_call_and_get_their_queues_in_order():
    node = Node()
    queued = {
        device_id: [
            result_of(node.dispatcher.submit(device_id, "SET", n, ttl=60)).id for n in range(3)
        ]
        for device_id in ("dev_a", "dev_b")
    }
    connections = {device_id: node.connect(device_id) for device_id in ("dev_a", "dev_b", "dev_c")}
    node.clock.advance(0)
    assert node.queue.calls["take"] == 1
    for device_id, command_ids in queued.items():
        assert [c["id"] for c in commands(connections[device_id])] == command_ids
    assert connections["dev_c"].sent == []


def test_without_ttl_an_offline_device_is_refused_and_with_ttl_its_command_is_queued():
    node = Node()
    assert isinstance(result_of(node.dispatcher.submit("dev_a", "X", None)).value, DeviceOffline)
    record = result_of(node.dispatcher.submit("dev_a", "X", None, ttl=1))
    assert record.state == "queued" and record.expires == record.created + 1000


def test_a_full_queue_refuses_and_says_so():
    node = Node(max_pending=1)
    result_of(node.dispatcher.submit("dev_a", "X", None, ttl=60))
    assert isinstance(
        result_of(node.dispatcher.submit("dev_a", "X", None, ttl=60)).value, QueueFull
    )


def test_the_expiry_pass_expires_queued_commands_and_counts_the_queue():
    node = Node()
    short = result_of(node.dispatcher.submit("dev_a", "X", None, ttl=1))
    result_of(node.dispatcher.submit("dev_a", "Y", None, ttl=10))
    node.clock.advance(1)
    result_of(node.dispatcher.expire_due())
    assert node.finished() == [(short.id, "expired")]
    assert node.metric("elevgw_command_queue_depth") == 1


def test_a_store_outage_on_connect_is_counted_and_the_queue_waits_for_the_next_connect():
    node = Node()
    record = result_of(node.dispatcher.submit("dev_a", "X", None, ttl=60))
    node.queue.unavailable = True
    first = node.connect("dev_a")
    node.clock.advance(0)
    assert first.sent == []
    assert node.metric("elevgw_command_store_errors_total", step="take") == 1
    node.queue.unavailable = False
    second = node.connect("dev_a")
    node.clock.advance(0)
    assert [c["id"] for c in commands(second)] == [record.id]


def test_cancel_finishes_once_and_unknown_commands_are_unknown():
    node = Node()
    record = result_of(node.dispatcher.submit("dev_a", "X", None, ttl=60))
    waiting = node.dispatcher.wait(record, 30)
    assert result_of(node.dispatcher.cancel("dev_a", record.id)).state == "canceled"
    assert result_of(waiting).state == "canceled"
    again = result_of(node.dispatcher.cancel("dev_a", record.id)).value
    assert isinstance(again, CommandAlreadyFinished) and again.record.state == "canceled"
    assert isinstance(result_of(node.dispatcher.cancel("dev_b", record.id)).value, UnknownCommand)
    assert isinstance(result_of(node.dispatcher.get("dev_a", "cmd_x")).value, UnknownCommand)


@pytest.mark.parametrize("payload", [None, "ok", {"deep": [1, 2]}])
def test_an_ack_for_no_known_command_changes_nothing(payload):
    node = Node()
    node.connect("dev_a")
    ack(node, "dev_a", "cmd_unknown", payload)
    ack(node, "dev_a", None, payload)
    assert node.finished() == []


def test_a_drain_waits_for_the_commands_written_at_once_to_be_stored():
    node = Node()
    node.connect("dev_a")
    node.clock.advance(0)
    sent = node.router.send("dev_a", "X", 1)
    done = node.dispatcher.recorded()
    assert done.called
    assert [r.id for r in result_of(node.queue.recent("dev_a", 10))] == [sent.id]


def test_connects_skip_the_store_while_a_single_node_knows_no_command_is_pending():
    node = Node()
    result_of(node.dispatcher.expire_due())  # the store counted: nothing pending
    node.connect("dev_a")
    node.clock.advance(0)
    assert node.queue.calls.get("take", 0) == 0
    record = result_of(node.dispatcher.submit("dev_b", "X", None, ttl=60))
    connection = node.connect("dev_b")
    node.clock.advance(0)
    assert [c["id"] for c in commands(connection)] == [record.id]


def test_before_the_first_count_every_connect_asks_the_store():
    node = Node()  # a node just started: its store holds a command from before the restart
    now = int(node.clock.seconds() * 1000)
    stored = CommandRecord("cmd_old", "dev_a", "X", None, "queued", now, now, expires=now + 60_000)
    node.queue.add(stored, 100)
    connection = node.connect("dev_a")
    node.clock.advance(0)
    assert [c["id"] for c in commands(connection)] == ["cmd_old"]


def test_an_expiry_pass_takes_several_batches_when_many_expire_at_once(monkeypatch):
    monkeypatch.setattr("elevgw.core.command_queue.EXPIRE_BATCH", 2)
    node = Node()
    for n in range(5):
        result_of(node.dispatcher.submit("dev_a", "X", n, ttl=1))
    node.clock.advance(1)
    result_of(node.dispatcher.expire_due())
    assert len(node.finished()) == 5 and node.queue.calls["expire_due"] == 3


def test_acks_of_one_reactor_turn_share_one_store_call():
    node = Node()
    connection = node.connect("dev_a")
    records = [result_of(node.dispatcher.submit("dev_a", "X", n, ttl=60)) for n in range(3)]
    node.clock.advance(0)
    for frame in commands(connection):
        ack(node, "dev_a", frame["id"], "ok")
    ack(node, "dev_a", "cmd_unknown", "ok")
    assert node.finished() == []
    node.clock.advance(0)
    assert node.queue.calls["finish_many"] == 1
    assert node.finished() == [(r.id, "acked") for r in records]


def test_a_store_outage_on_acks_is_counted_and_the_commands_stay_pending():
    node = Node()
    connection = node.connect("dev_a")
    record = result_of(node.dispatcher.submit("dev_a", "X", None, ttl=60))
    node.queue.unavailable = True
    ack(node, "dev_a", commands(connection)[0]["id"])
    node.clock.advance(0)
    assert node.metric("elevgw_command_store_errors_total", step="ack") == 1
    node.queue.unavailable = False
    assert result_of(node.dispatcher.get("dev_a", record.id)).state == "sent"
