"""One device never costs the others: the gateway's per-device guards, on a Clock with fakes.

Each test here reproduces a way a broken or hostile device hurt the gateway (a log flood, a
flood over the rate limit, invalid frames that kept a session alive, a frame nested a thousand
deep, a megabyte echoed back) and shows the guard that stops it.
"""

import json

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from elevgw.core import wire
from elevgw.core.gateway import Gateway, HandshakeRefused
from elevgw.core.sessions import CLOSE_POLICY
from elevgw.events import model as events
from elevgw.observe.metrics import Metrics
from elevgw.testing import FakeConnection

DEVICE = "dev_0011223344556677"


class SlowStore:
    """A device store whose log writes finish only when the test says so."""

    def __init__(self):
        self.writes: list[Deferred] = []

    def append_log(self, device_id, entry):
        d = Deferred()
        self.writes.append(d)
        return d

    def get_device(self, device_id):
        return succeed(None)

    def finish(self, count):
        done, self.writes = self.writes[:count], self.writes[count:]
        for d in done:
            d.callback(None)


def frames(connection) -> list[dict]:
    return [json.loads(data) for data in connection.sent]


def errors(connection) -> list[dict]:
    return [frame for frame in frames(connection) if frame["type"] == "error"]


def make_gateway(**options):
    clock = Clock()
    clock.advance(1_700_000_000)
    store = SlowStore()
    metrics = Metrics("test")
    gateway = Gateway(store, None, events.NullSink(), clock, metrics=metrics, **options)
    connection = FakeConnection()
    session = gateway.connected(DEVICE, connection)
    return clock, store, gateway, connection, session


def frame(value) -> bytes:
    return json.dumps(value).encode()


def limit_hits(gateway, limit):
    return gateway.metrics.registry.get_sample_value("elevgw_limit_hits_total", {"limit": limit})


def test_a_device_whose_log_writes_back_up_is_not_read_until_they_drain():
    clock, store, gateway, connection, session = make_gateway(
        max_pending_writes=4, message_rate=1000, message_burst=1000
    )
    for n in range(4):
        gateway.text_received(session, frame({"type": "log", "payload": n, "id": f"l{n}"}))
    assert connection.reading
    gateway.text_received(session, frame({"type": "log", "payload": 4, "id": "l4"}))
    assert not connection.reading and connection.pauses == 1
    assert limit_hits(gateway, "pending_writes") == 1
    store.finish(2)
    assert not connection.reading  # three still pending: above half the bound
    store.finish(1)
    assert connection.reading
    store.finish(2)
    assert [f["id"] for f in frames(connection)] == ["l0", "l1", "l2", "l3", "l4"]


def test_a_device_over_its_message_rate_gets_one_error_then_is_closed_with_1008():
    clock, store, gateway, connection, session = make_gateway(message_rate=10, message_burst=5)
    heartbeat = frame({"type": "heartbeat"})
    for _ in range(5):
        gateway.text_received(session, heartbeat)
    assert [f["type"] for f in frames(connection)] == ["pong"] * 5
    gateway.text_received(session, heartbeat)
    assert errors(connection) == [
        {
            "type": "error",
            "error": "rate_limited",
            "detail": "over 10 frames a second (burst 5): slow down or be closed (1008)",
        }
    ]
    for _ in range(5):
        gateway.text_received(session, heartbeat)
    assert connection.closed_with is None and len(connection.sent) == 6
    gateway.text_received(session, heartbeat)
    assert connection.closed_with[0] == CLOSE_POLICY
    assert session.ended and gateway.registry.get(DEVICE) is None
    assert limit_hits(gateway, "message_rate") == 1
    assert limit_hits(gateway, "message_rate_close") == 1


def test_a_device_within_its_rate_is_never_limited():
    clock, store, gateway, connection, session = make_gateway(message_rate=10, message_burst=5)
    for _ in range(1000):
        gateway.text_received(session, frame({"type": "heartbeat"}))
        clock.advance(0.1)
    assert errors(connection) == [] and connection.closed_with is None


def test_frames_dropped_over_the_rate_are_not_signs_of_life():
    clock, store, gateway, connection, session = make_gateway(message_rate=1, message_burst=1)
    gateway.text_received(session, frame({"type": "heartbeat"}))
    alive = session.last_active
    clock.advance(0.1)
    gateway.text_received(session, frame({"type": "heartbeat"}))
    assert session.last_active == alive


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[1]", b'{"payload": 1}', b'{"type": "selfie"}', b"\xff"],
)
def test_invalid_frames_do_not_keep_a_device_online(raw):
    clock, store, gateway, connection, session = make_gateway()
    connected = session.last_active
    for _ in range(40):
        clock.advance(1)
        gateway.text_received(session, raw)
    assert session.last_active == connected
    assert gateway.sweep() == 1
    assert session.ended


def test_a_valid_frame_refreshes_liveness():
    clock, store, gateway, connection, session = make_gateway()
    clock.advance(20)
    gateway.text_received(session, frame({"type": "heartbeat"}))
    assert session.last_active == clock.seconds()


def test_a_frame_nested_a_thousand_deep_gets_an_error_frame_not_an_exception():
    clock, store, gateway, connection, session = make_gateway()
    deep = b'{"type": "log", "payload": ' + b"[" * 990 + b"]" * 990 + b"}"
    gateway.text_received(session, deep)
    deeper = b"[" * 100_000 + b"]" * 100_000
    gateway.text_received(session, deeper)
    assert [f["error"] for f in errors(connection)] == ["bad_json", "bad_json"]
    assert store.writes == []
    gateway.text_received(session, frame({"type": "heartbeat"}))
    assert frames(connection)[-1]["type"] == "pong"


def test_an_echoed_megabyte_comes_back_as_a_short_error():
    clock, store, gateway, connection, session = make_gateway(message_burst=100)
    for field in ("type", "device_id"):
        value = {"type": "log", field: "x" * (1024 * 1024)}
        gateway.text_received(session, json.dumps(value).encode())
    assert len(errors(connection)) == 2
    assert all(len(json.dumps(error)) < 300 for error in errors(connection))


def test_a_full_gateway_refuses_new_devices_with_503_but_lets_one_back_in():
    clock, store, gateway, connection, session = make_gateway(max_sessions=1)
    refused = []
    gateway.authenticate("dev_other", "token").addErrback(refused.append)
    assert refused[0].value.status == 503 and isinstance(refused[0].value, HandshakeRefused)
    assert limit_hits(gateway, "sessions") == 1
    again = []
    gateway.authenticate(DEVICE, "token").addErrback(again.append)
    assert again[0].value.status == 401  # looked up (and unknown), not refused as full


def test_a_snapshot_frame_that_is_not_an_image_is_no_sign_of_life():
    clock, store, gateway, connection, session = make_gateway()

    class Snapshots:
        def put(self, device_id, data, taken_at):
            raise ValueError("not a PNG, JPEG or WebP image")

    gateway.snapshots = Snapshots()
    connected = session.last_active
    clock.advance(5)
    gateway.binary_received(session, b"garbage")
    assert session.last_active == connected
    assert errors(connection)[0]["error"] == wire.NOT_AN_IMAGE


def test_a_device_over_its_rate_is_not_read_until_its_next_token_is_due():
    clock, store, gateway, connection, session = make_gateway(message_rate=10, message_burst=5)
    for _ in range(6):
        gateway.text_received(session, frame({"type": "heartbeat"}))
    assert not connection.reading and connection.pauses == 1
    gateway.text_received(session, frame({"type": "heartbeat"}))  # the rest of that read
    assert connection.pauses == 1
    clock.advance(0.05)
    assert not connection.reading
    clock.advance(0.06)  # one token is due after 0.1 s
    assert connection.reading
    gateway.text_received(session, frame({"type": "heartbeat"}))
    assert frames(connection)[-1]["type"] == "pong"


def test_a_device_closed_for_its_rate_is_refused_with_429_until_the_cooldown_ends():
    clock, store, gateway, connection, session = make_gateway(
        message_rate=10, message_burst=5, limit_cooldown=30
    )
    for _ in range(12):
        gateway.text_received(session, frame({"type": "heartbeat"}))
    assert connection.closed_with[0] == CLOSE_POLICY and not connection.reading
    assert clock.getDelayedCalls() == [] or all(
        not call.func.__name__.startswith("_rate") for call in clock.getDelayedCalls()
    )
    refused = []
    gateway.authenticate(DEVICE, "token").addErrback(refused.append)
    error = refused[0].value
    assert (error.status, error.retry_after) == (429, 30)
    assert limit_hits(gateway, "cooldown") == 1
    clock.advance(20)
    gateway.authenticate(DEVICE, "token").addErrback(refused.append)
    assert (refused[1].value.status, refused[1].value.retry_after) == (429, 10)
    clock.advance(10)
    gateway.sweep()
    gateway.authenticate(DEVICE, "token").addErrback(refused.append)
    assert refused[2].value.status == 401  # looked up in the store again (and unknown there)
