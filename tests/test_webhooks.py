"""WebhookSink against a real HTTP receiver on loopback.

HTTP is real (the sink's Agent runs on the real reactor, the receiver is a twisted.web site
on ``tcp:0:interface=127.0.0.1``); every timer of the sink (request timeouts, backoff,
``drain``, ``seq``) runs on a ``task.Clock`` the test moves, so nothing sleeps. Tests wait on
Deferreds only: what the receiver got, or the sink's ``on_delivery`` hook, each bounded by a
real-time guard so a broken sink fails a test instead of hanging it.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.web.server import Site

from elevgw.events.model import DeviceStatus, SnapshotReady
from elevgw.events.webhooks import (
    DELIVERED,
    FAILED,
    REJECTED,
    RETRIED,
    SNAPSHOT_PATH,
    STATUS_PATH,
    WebhookSink,
)
from waiting import within
from webhook_receiver import HANG, Receiver, TrackingSite, real_reactor

START = 1_700_000_000.0  # the test clock's "now", in epoch seconds
START_MS = int(START * 1000)


class Outcomes:
    """The sink's ``on_delivery`` hook: records outcomes and lets a test wait for them."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._waiters: list[tuple[str, int, Deferred[None]]] = []

    def __call__(self, outcome: str, seconds: float) -> None:
        self.seen.append(outcome)
        for waiter in list(self._waiters):
            wanted, count, d = waiter
            if self.seen.count(wanted) >= count:
                self._waiters.remove(waiter)
                d.callback(None)

    def wait(self, outcome: str, count: int = 1) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiters.append((outcome, count, d))
        if self.seen.count(outcome) >= count:
            self._waiters.remove((outcome, count, d))
            d.callback(None)
        return within(d)


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(START)
    return clock


@pytest_twisted.async_yield_fixture
async def serve():
    """``await serve(receiver, endpoint=...)`` listens; teardown stops listening and waits
    until every connection to the receivers is closed (a sink that leaks one fails here)."""
    served: list[tuple[Any, TrackingSite]] = []

    async def listen(receiver: Receiver, endpoint: str = "tcp:0:interface=127.0.0.1") -> str:
        site = TrackingSite(receiver)
        port = await serverFromString(real_reactor(), endpoint).listen(site)
        served.append((port, site))
        return f"http://127.0.0.1:{port.getHost().port}"

    yield listen

    for port, site in served:
        await port.stopListening()
        await within(gatherResults(list(site.open_connections)))


@pytest_twisted.async_yield_fixture
async def make_sink(serve, clock):
    """Builds sinks on the real reactor with ``clock`` for timers; stops them at teardown."""
    sinks: list[WebhookSink] = []

    def make(url: str, **kwargs: Any) -> WebhookSink:
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("random", lambda: 0.5)
        kwargs.setdefault("initial_backoff", 1.0)
        sink = WebhookSink(url, real_reactor(), **kwargs)
        sinks.append(sink)
        return sink

    yield make

    for sink in sinks:
        await within(sink.stop())


async def started(serve) -> tuple[Receiver, str]:
    receiver = Receiver()
    return receiver, await serve(receiver)


def status(device_id: str, state: str, ts: int, reason: str = "connected") -> DeviceStatus:
    return DeviceStatus(device_id, state, reason, ts)


def snapshot(device_id: str, ts: int, request_id: str | None = "cmd_1") -> SnapshotReady:
    return SnapshotReady(device_id, f"http://gw/snapshots/{device_id}/{ts}.png", request_id, ts)


def backoff_delays(clock: Clock) -> list[float]:
    return sorted(call.getTime() - clock.seconds() for call in clock.getDelayedCalls())


# Ordering and seq


@pytest_twisted.ensureDeferred
async def test_one_device_is_delivered_in_emit_order_with_growing_seq_while_another_interleaves(
    serve, make_sink, clock
):
    receiver, url = await started(serve)
    sink = make_sink(url, concurrency=4)

    for i in range(40):
        sink.emit(status("dev_a", "online" if i % 2 == 0 else "offline", ts=i))
        if i % 3 == 0:
            sink.emit(status("dev_b", "online" if i % 2 == 0 else "offline", ts=i))
        if i % 10 == 0:
            sink.emit(snapshot("dev_a", ts=1000 + i))
        if i % 7 == 0:
            clock.advance(0.0005)  # some events share a millisecond, some do not

    assert await within(sink.drain(60)) is True

    a = receiver.bodies("dev_a")
    expected = []
    for i in range(40):
        expected.append(i)
        if i % 10 == 0:
            expected.append(1000 + i)
    assert [body["ts"] for body in a] == expected
    assert [body["status"] for body in a if "status" in body] == [
        "online" if i % 2 == 0 else "offline" for i in range(40)
    ]
    b = receiver.bodies("dev_b")
    assert [body["ts"] for body in b] == [i for i in range(40) if i % 3 == 0]
    for bodies in (a, b):
        seqs = [body["seq"] for body in bodies]
        assert seqs == sorted(set(seqs)), "seq must strictly increase per device"
        assert seqs[0] >= START_MS
    assert receiver.max_open_per_device == {"dev_a": 1, "dev_b": 1}
    assert len({r.event_id for r in receiver.requests}) == len(receiver.requests)
    assert sink.stats["delivered"] == len(receiver.requests) == 40 + 14 + 4


@pytest_twisted.ensureDeferred
async def test_status_and_snapshot_bodies_paths_and_headers(serve, make_sink):
    receiver, url = await started(serve)
    sink = make_sink(url + "/")  # a trailing slash on the backend URL is tolerated

    sink.emit(DeviceStatus("dev_1", "offline", "timeout", 1234))
    sink.emit(SnapshotReady("dev_1", "http://gw/snapshots/电梯/1.png", None, 1235))
    assert await within(sink.drain(60)) is True

    first, second = receiver.requests
    assert first.path == STATUS_PATH
    assert first.json == {
        "device_id": "dev_1",
        "status": "offline",
        "reason": "timeout",
        "ts": 1234,
        "seq": START_MS,
    }
    assert second.path == SNAPSHOT_PATH
    assert second.json == {
        "device_id": "dev_1",
        "url": "http://gw/snapshots/电梯/1.png",
        "request_id": None,
        "ts": 1235,
        "seq": START_MS + 1,
    }
    assert "电梯".encode() in second.body  # UTF-8, not \\u escapes
    for request in receiver.requests:
        assert request.headers["content-type"] == "application/json"
        assert len(request.event_id) == 32
        assert "x-elevgw-signature" not in request.headers


@pytest_twisted.ensureDeferred
async def test_seq_never_repeats_or_goes_down_across_a_restart(serve, make_sink, clock):
    receiver, url = await started(serve)

    first = make_sink(url)
    for i in range(5):  # a burst in one millisecond runs seq 4 ms ahead of the clock
        first.emit(status("dev_1", "online" if i % 2 == 0 else "offline", ts=i))
    assert await within(first.drain(60)) is True
    await within(first.stop())

    clock.advance(1.0)  # the restart takes longer than the burst ran ahead
    second = make_sink(url)
    for i in range(5, 8):
        second.emit(status("dev_1", "online" if i % 2 == 0 else "offline", ts=i))
    assert await within(second.drain(60)) is True

    seqs = [body["seq"] for body in receiver.bodies("dev_1")]
    assert [body["ts"] for body in receiver.bodies("dev_1")] == list(range(8))
    assert seqs[:5] == [START_MS + i for i in range(5)]
    assert seqs == sorted(set(seqs))
    assert seqs[5] == START_MS + 1000


# Retries


@pytest_twisted.ensureDeferred
async def test_a_500_is_retried_with_the_same_event_id_and_holds_back_the_next_event(
    serve, make_sink, clock
):
    receiver, url = await started(serve)
    receiver.plan.extend([500, 503])
    outcomes = Outcomes()
    sink = make_sink(url, on_delivery=outcomes)

    sink.emit(status("dev_1", "online", ts=1))
    sink.emit(status("dev_1", "offline", ts=2))

    await outcomes.wait(RETRIED)
    assert len(receiver.requests) == 1
    assert sink.in_flight == 0, "the second event must wait for the first"
    assert backoff_delays(clock) == [0.5]  # full jitter: 0.5 * initial backoff 1.0
    clock.advance(0.5)

    await outcomes.wait(RETRIED, 2)
    assert backoff_delays(clock) == [1.0]  # the ceiling doubled
    clock.advance(1.0)

    assert await within(sink.drain(60)) is True
    assert [r.json["ts"] for r in receiver.requests] == [1, 1, 1, 2]
    assert len({r.event_id for r in receiver.requests[:3]}) == 1
    assert {r.body for r in receiver.requests[:3]} == {receiver.requests[0].body}
    assert receiver.requests[3].event_id != receiver.requests[0].event_id
    assert sink.stats == {"delivered": 2, "retried": 2, "failed": 0, "rejected": 0, "dropped": 0}


@pytest_twisted.ensureDeferred
async def test_backoff_doubles_up_to_max_backoff(serve, make_sink, clock):
    receiver, url = await started(serve)
    receiver.default = 500
    outcomes = Outcomes()
    sink = make_sink(url, on_delivery=outcomes, initial_backoff=1.0, max_backoff=4.0)

    sink.emit(status("dev_1", "online", ts=1))
    delays = []
    for attempt in range(1, 6):
        await outcomes.wait(RETRIED, attempt)
        [delay] = backoff_delays(clock)
        delays.append(delay)
        clock.advance(delay)
    assert delays == [0.5, 1.0, 2.0, 2.0, 2.0]  # random() = 0.5 of 1, 2, 4, 4, 4


@pytest_twisted.ensureDeferred
async def test_429_waits_for_retry_after(serve, make_sink, clock):
    receiver, url = await started(serve)
    receiver.plan.append((429, {b"retry-after": b"7"}))
    outcomes = Outcomes()
    sink = make_sink(url, on_delivery=outcomes)

    sink.emit(status("dev_1", "online", ts=1))
    await outcomes.wait(RETRIED)
    assert backoff_delays(clock) == [7.0]
    clock.advance(7)
    await outcomes.wait(DELIVERED)
    assert len(receiver.requests) == 2


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_retried_until_the_backend_listens(serve, make_sink, clock):
    # Find a free port, then leave it closed.
    probe = Receiver()
    port = await serverFromString(real_reactor(), "tcp:0:interface=127.0.0.1").listen(Site(probe))
    number = port.getHost().port
    await port.stopListening()

    outcomes = Outcomes()
    sink = make_sink(f"http://127.0.0.1:{number}", on_delivery=outcomes)
    sink.emit(status("dev_1", "online", ts=1))
    await outcomes.wait(RETRIED)
    assert sink.stats["retried"] == 1

    receiver = Receiver()
    receiver.plan.append(500)
    await serve(receiver, f"tcp:{number}:interface=127.0.0.1")
    clock.advance(backoff_delays(clock)[0])
    await outcomes.wait(RETRIED, 2)
    clock.advance(backoff_delays(clock)[0])
    await outcomes.wait(DELIVERED)

    assert len(receiver.requests) == 2
    assert receiver.requests[0].event_id == receiver.requests[1].event_id
    assert sink.stats["retried"] == 2


@pytest_twisted.ensureDeferred
async def test_a_hung_request_times_out_and_is_retried_with_the_same_event_id(
    serve, make_sink, clock
):
    receiver, url = await started(serve)
    receiver.plan.append(HANG)
    outcomes = Outcomes()
    sink = make_sink(url, on_delivery=outcomes, request_timeout=5.0)

    sink.emit(status("dev_1", "online", ts=1))
    await receiver.wait_for_requests(1)
    clock.advance(5.0)
    await outcomes.wait(RETRIED)
    clock.advance(backoff_delays(clock)[0])
    await outcomes.wait(DELIVERED)

    assert [r.event_id for r in receiver.requests] == [receiver.requests[0].event_id] * 2


@pytest_twisted.ensureDeferred
async def test_transient_failures_are_given_up_after_retry_for(serve, make_sink, clock):
    receiver, url = await started(serve)
    receiver.default = 502
    outcomes = Outcomes()
    sink = make_sink(url, on_delivery=outcomes, retry_for=10.0, max_backoff=4.0)

    sink.emit(status("dev_1", "online", ts=1))
    sink.emit(status("dev_1", "offline", ts=2))
    first_attempt = clock.seconds()
    # Backoff 0.5, 1, 2, 2, 2, 2 (9.5 s); the next 2 s would pass 10 s: given up.
    for attempt in range(1, 7):
        await outcomes.wait(RETRIED, attempt)
        clock.advance(backoff_delays(clock)[0])
    await outcomes.wait(FAILED)
    receiver.default = 200
    assert clock.seconds() - first_attempt <= 10.0
    await outcomes.wait(DELIVERED)

    assert [r.json["ts"] for r in receiver.requests] == [1] * 7 + [2]
    assert len({r.event_id for r in receiver.requests[:7]}) == 1
    assert sink.stats == {"delivered": 1, "retried": 6, "failed": 1, "rejected": 0, "dropped": 0}
    assert await within(sink.drain(1)) is True


@pytest_twisted.ensureDeferred
async def test_a_4xx_is_rejected_and_not_retried(serve, make_sink, clock):
    receiver, url = await started(serve)
    receiver.plan.append(400)
    outcomes = Outcomes()
    sink = make_sink(url, on_delivery=outcomes)

    sink.emit(status("dev_1", "online", ts=1))
    sink.emit(status("dev_1", "offline", ts=2))
    await outcomes.wait(REJECTED)
    assert backoff_delays(clock) == [5.0]  # the next event's request timeout; no retry timer
    await outcomes.wait(DELIVERED)
    clock.advance(300)

    assert [r.json["ts"] for r in receiver.requests] == [1, 2]
    assert sink.stats == {"delivered": 1, "retried": 0, "failed": 0, "rejected": 1, "dropped": 0}
    assert sink.queued == 0


@pytest_twisted.ensureDeferred
async def test_failures_are_logged_with_device_event_attempt_and_status(serve, make_sink, clock):
    receiver, url = await started(serve)
    receiver.plan.extend([500, 404])
    outcomes = Outcomes()
    sink = make_sink(url, on_delivery=outcomes)

    with capturedLogs() as events:
        sink.emit(status("dev_1", "online", ts=1))
        await outcomes.wait(RETRIED)
        clock.advance(backoff_delays(clock)[0])
        await outcomes.wait(REJECTED)

    [retried] = [e for e in events if e.get("attempt") == 1]
    [rejected] = [e for e in events if e.get("attempt") == 2]
    event_id = receiver.requests[0].event_id
    assert (retried["device_id"], retried["event_id"], retried["status"]) == (
        "dev_1",
        event_id,
        500,
    )
    assert retried["log_level"] == LogLevel.info
    assert (rejected["event_id"], rejected["status"]) == (event_id, 404)
    assert rejected["log_level"] == LogLevel.error


# Signatures


@pytest_twisted.ensureDeferred
async def test_signature_is_hmac_sha256_of_the_exact_body(serve, make_sink):
    receiver, url = await started(serve)
    secret = b"s3cret-\xe5\x85\xb1"
    sink = make_sink(url, secret=secret)

    sink.emit(snapshot("dev_签名", ts=5))
    sink.emit(status("dev_签名", "online", ts=6, reason="connected"))
    assert await within(sink.drain(60)) is True

    assert len(receiver.requests) == 2
    for request in receiver.requests:
        expected = hmac.new(secret, request.body, hashlib.sha256).hexdigest()
        assert request.headers["x-elevgw-signature"] == "sha256=" + expected
        wrong = hmac.new(b"other", request.body, hashlib.sha256).hexdigest()
        assert request.headers["x-elevgw-signature"] != "sha256=" + wrong


# A slow backend


@pytest_twisted.ensureDeferred
async def test_a_hung_device_holds_up_only_its_own_queue(serve, make_sink, clock):
    receiver, url = await started(serve)
    receiver.hang_devices.add("dev_hung")
    outcomes = Outcomes()
    sink = make_sink(url, on_delivery=outcomes, concurrency=2, request_timeout=30.0)

    sink.emit(status("dev_hung", "online", ts=1))
    sink.emit(status("dev_hung", "offline", ts=2))
    for i in range(3):
        sink.emit(status("dev_a", "online", ts=10 + i))
        sink.emit(status("dev_b", "online", ts=20 + i))
    assert sink.queued == 8  # emit queued everything and returned without waiting

    await outcomes.wait(DELIVERED, 6)
    assert [b["ts"] for b in receiver.bodies("dev_a")] == [10, 11, 12]
    assert [b["ts"] for b in receiver.bodies("dev_b")] == [20, 21, 22]
    assert [b["ts"] for b in receiver.bodies("dev_hung")] == [1]

    drained = sink.drain(10)
    clock.advance(9.9)
    assert not drained.called
    clock.advance(0.1)
    assert drained.called and drained.result is False
    assert sink.queued == 2

    # The request timeout ends the hung attempt; the retry goes through.
    receiver.hang_devices.clear()
    clock.advance(20.0)
    await outcomes.wait(RETRIED)
    clock.advance(backoff_delays(clock)[0])
    assert await within(sink.drain(60)) is True
    hung = receiver.bodies("dev_hung")
    assert [b["ts"] for b in hung] == [1, 1, 2]
    assert receiver.max_open_per_device["dev_hung"] == 1


# Draining and stopping


@pytest_twisted.ensureDeferred
async def test_drain_fires_true_once_everything_is_delivered(serve, make_sink):
    receiver, url = await started(serve)
    sink = make_sink(url)

    assert (await sink.drain(1)) is True  # nothing queued
    for i in range(25):
        sink.emit(status(f"dev_{i % 5}", "online", ts=i))
    drained = sink.drain(60)
    assert not drained.called
    assert await within(drained) is True
    assert len(receiver.requests) == 25
    assert sink.queued == 0


@pytest_twisted.ensureDeferred
async def test_stop_abandons_the_queue_and_later_emits(serve, make_sink):
    receiver, url = await started(serve)
    receiver.default = HANG
    sink = make_sink(url)

    sink.emit(status("dev_1", "online", ts=1))
    sink.emit(status("dev_1", "offline", ts=2))
    sink.emit(status("dev_2", "online", ts=3))
    await receiver.wait_for_requests(2)
    drained = sink.drain(60)

    await within(sink.stop())
    assert drained.called and drained.result is False
    assert sink.queued == 0 and sink.in_flight == 0
    assert sink.stats["dropped"] == 3

    sink.emit(status("dev_1", "online", ts=4))
    assert sink.stats["dropped"] == 4
    assert (await sink.drain(1)) is True


def test_emit_never_raises():
    sink = WebhookSink("http://127.0.0.1:9", real_reactor(), clock=Clock())
    sink.emit(object())  # type: ignore[arg-type]
    assert sink.stats["dropped"] == 1
    assert sink.queued == 0
    assert sink.stop().called  # no connection was ever made


def test_bad_configuration_is_refused_at_construction():
    with pytest.raises(ValueError):
        WebhookSink("ftp://backend", real_reactor())
    with pytest.raises(ValueError):
        WebhookSink("http://backend", real_reactor(), secret=b"")
    with pytest.raises(ValueError):
        WebhookSink("http://backend", real_reactor(), concurrency=0)


# The queue bound


@pytest_twisted.ensureDeferred
async def test_a_full_queue_drops_the_oldest_event_of_the_longest_queue(serve, make_sink, clock):
    receiver, url = await started(serve)
    receiver.plan.append(500)
    outcomes = Outcomes()
    sink = make_sink(url, max_queued=5, concurrency=1, on_delivery=outcomes)

    sink.emit(status("dev_a", "online", ts=1))
    await outcomes.wait(RETRIED)  # ts=1 is backing off: the head of a queue is never dropped
    sink.emit(status("dev_a", "offline", ts=2))
    sink.emit(status("dev_a", "online", ts=3))
    sink.emit(status("dev_b", "online", ts=100))
    sink.emit(status("dev_a", "offline", ts=4))
    assert sink.stats["dropped"] == 0
    sink.emit(status("dev_a", "online", ts=5))  # one over: dev_a's oldest queued, ts=2, goes
    assert sink.stats["dropped"] == 1
    assert sink.queued == 5

    clock.advance(0.5)  # the backoff of ts=1; dev_b's request timeout is further off
    assert await within(sink.drain(60)) is True
    assert [b["ts"] for b in receiver.bodies("dev_a")] == [1, 1, 3, 4, 5]
    assert [b["ts"] for b in receiver.bodies("dev_b")] == [100]


@pytest_twisted.ensureDeferred
async def test_a_full_queue_keeps_a_devices_newest_status_over_snapshots(serve, make_sink):
    receiver, url = await started(serve)
    sink = make_sink(url, max_queued=4, concurrency=1)

    sink.emit(status("dev_a", "online", ts=1))  # in flight
    sink.emit(status("dev_a", "offline", ts=2))  # the newest status: kept
    sink.emit(snapshot("dev_a", ts=3))
    sink.emit(snapshot("dev_a", ts=4))
    sink.emit(snapshot("dev_a", ts=5))  # one over: the snapshot ts=3 goes
    assert sink.stats["dropped"] == 1

    assert await within(sink.drain(60)) is True
    assert [b["ts"] for b in receiver.bodies("dev_a")] == [1, 2, 4, 5]


@pytest_twisted.ensureDeferred
async def test_a_full_queue_of_single_events_drops_the_new_event(serve, make_sink):
    receiver, url = await started(serve)
    sink = make_sink(url, max_queued=2, concurrency=1)

    sink.emit(status("dev_a", "online", ts=1))
    sink.emit(status("dev_b", "online", ts=2))
    sink.emit(status("dev_c", "online", ts=3))
    assert sink.stats["dropped"] == 1
    assert sink.queued == 2

    assert await within(sink.drain(60)) is True
    assert sorted(r.json["ts"] for r in receiver.requests) == [1, 2]


@pytest_twisted.ensureDeferred
async def test_deliveries_write_no_factory_lines(serve, make_sink):
    """Twisted's HTTP client factory logs "Starting factory"/"Stopping factory" per connection."""
    receiver, url = await started(serve)
    sink = make_sink(url)
    with capturedLogs() as events:
        sink.emit(status("dev_1", "online", ts=1))
        assert await within(sink.drain(60)) is True
        await within(sink.stop())
    messages = [e.get("log_format") or str(e.get("log_io", "")) for e in events]
    assert not [m for m in messages if "factory" in str(m).lower()], messages
    assert sink.stats["delivered"] == 1
