"""What the gateway does with each frame, on fakes and a Clock: no socket, no thread."""

import base64
import json

from twisted.internet.task import Clock

from elevgw.core.commands import SNAPSHOT_COMMAND
from elevgw.core.gateway import Gateway
from elevgw.events.model import SnapshotReady
from elevgw.testing import FakeConnection, MemoryDeviceStore, MemorySnapshotStore, RecordingSink
from images import tiny_png


def make_gateway():
    clock = Clock()
    clock.advance(1_700_000_000)
    store, snapshots, sink = MemoryDeviceStore(), MemorySnapshotStore(), RecordingSink()
    gateway = Gateway(store, snapshots, sink, clock=clock, node_id="unit")
    connection = FakeConnection()
    session = gateway.connected("dev_1", connection)
    return gateway, session, connection, clock, store, snapshots, sink


def frames(connection):
    return [json.loads(data) for data in connection.sent]


def test_a_heartbeat_is_answered_with_a_pong_in_epoch_ms_and_refreshes_liveness():
    gateway, session, connection, clock, *_ = make_gateway()
    clock.advance(12.5)
    gateway.text_received(session, b'{"type":"heartbeat"}')
    assert frames(connection) == [{"type": "pong", "ts": 1_700_000_012_500}]
    assert session.last_active == clock.seconds()
    assert gateway.metrics.frames_in["heartbeat"] == 1


def test_a_log_with_an_id_is_stored_then_acked():
    gateway, session, connection, clock, store, *_ = make_gateway()
    gateway.text_received(session, b'{"type":"log","id":"l1","payload":{"msg":"hi"}}')
    assert [(e.ts, e.payload) for e in store.logs["dev_1"]] == [(1_700_000_000_000, {"msg": "hi"})]
    assert frames(connection) == [{"type": "ack", "id": "l1"}]


def test_a_log_the_store_cannot_take_gets_store_unavailable_and_no_ack():
    gateway, session, connection, _, store, *_ = make_gateway()
    store.available = False
    gateway.text_received(session, b'{"type":"log","id":"l1","payload":"x"}')
    [frame] = frames(connection)
    assert frame["type"] == "error" and frame["error"] == "store_unavailable"
    assert frame["id"] == "l1"


def test_a_bad_frame_gets_an_error_frame_and_the_session_stays():
    gateway, session, connection, *_ = make_gateway()
    gateway.text_received(session, b"not json")
    [frame] = frames(connection)
    assert frame["type"] == "error" and frame["error"] == "bad_json"
    assert connection.closed_with is None and gateway.registry.get("dev_1") is session


def test_a_snapshot_frame_is_stored_acked_with_its_url_and_raises_an_event():
    gateway, session, connection, _, _, snapshots, sink = make_gateway()
    image = base64.b64encode(tiny_png()).decode()
    gateway.text_received(
        session, json.dumps({"type": "snapshot", "id": "s1", "payload": image}).encode()
    )
    [key] = snapshots.images
    [frame] = frames(connection)
    assert frame == {"type": "ack", "id": "s1", "url": "http://snapshots.test/" + key}
    [event] = [e for e in sink.events if isinstance(e, SnapshotReady)]
    assert event.device_id == "dev_1" and event.url == frame["url"]


def test_a_binary_frame_is_a_snapshot_that_answers_the_waiting_request():
    gateway, session, connection, *_ = make_gateway()
    answer = gateway.commands.request("dev_1", SNAPSHOT_COMMAND, None, timeout=10)
    [command] = frames(connection)
    assert command["type"] == "command" and command["payload"] == "snapshot"
    results = []
    answer.addCallback(results.append)
    gateway.binary_received(session, tiny_png())
    [snapshot] = results
    assert snapshot.device_id == "dev_1" and snapshot.content_type == "image/png"


def test_an_ack_is_a_receipt_and_does_not_answer_a_snapshot_request():
    gateway, session, connection, clock, *_ = make_gateway()
    answer = gateway.commands.request("dev_1", SNAPSHOT_COMMAND, None, timeout=10)
    command_id = frames(connection)[0]["id"]
    gateway.text_received(session, json.dumps({"type": "ack", "id": command_id}).encode())
    assert not answer.called
    gateway.binary_received(session, tiny_png())
    assert answer.called


def test_claim_finds_the_request_by_id_else_the_oldest():
    gateway, session, connection, *_ = make_gateway()
    commands = gateway.commands
    first = commands.request("dev_1", "snapshot", None, timeout=10)
    second = commands.request("dev_1", "snapshot", None, timeout=10)
    second_id = frames(connection)[1]["id"]
    assert commands.claim("dev_1", second_id) is second
    assert commands.claim("dev_1", "cmd_unknown") is None  # a late answer to a finished one
    assert commands.claim("dev_1", None) is first
    assert commands.claim("dev_1", None) is None
    assert commands.pending_count() == 0
    for d in (first, second):
        d.addErrback(lambda _: None).cancel()


def test_a_waiting_request_times_out_on_the_clock():
    gateway, _, _, clock, *_ = make_gateway()
    answer = gateway.commands.request("dev_1", "snapshot", None, timeout=5)
    failures = []
    answer.addErrback(failures.append)
    clock.advance(4.9)
    assert not failures
    clock.advance(0.2)
    [failure] = failures
    assert type(failure.value).__name__ == "AnswerTimeout"
    assert gateway.commands.pending_count() == 0
