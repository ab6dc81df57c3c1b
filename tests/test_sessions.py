"""The session registry on a Clock: liveness sweep, takeover, ending sessions, event order."""

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from elevgw.core.sessions import (
    CLOSE_GOING_AWAY,
    CLOSE_REVOKED,
    CLOSE_TAKEN_OVER,
    CLOSE_TIMEOUT,
    LAST_SEEN_EVERY,
    SessionRegistry,
)
from elevgw.events import model as events
from elevgw.stores.interfaces import StoreUnavailable
from elevgw.testing import FakeConnection, RecordingSink


def make_registry(timeout=30.0):
    clock = Clock()
    clock.advance(1_700_000_000)
    sink = RecordingSink()
    seen = []
    registry = SessionRegistry(clock, sink, timeout, record_last_seen=seen.append)
    return clock, sink, registry, seen


def test_silent_device_is_closed_with_4000_after_timeout():
    clock, sink, registry, _ = make_registry(timeout=30)
    quiet, chatty = FakeConnection(), FakeConnection()
    registry.attach("dev_quiet", quiet)
    chatty_session = registry.attach("dev_chatty", chatty)
    for _ in range(3):
        clock.advance(10)
        chatty_session.last_active = clock.seconds()
        assert registry.sweep() == 0
    assert quiet.closed_with is None  # silent for exactly 30 s: not yet
    clock.advance(10)
    chatty_session.last_active = clock.seconds()
    assert registry.sweep() == 1
    assert quiet.closed_with[0] == CLOSE_TIMEOUT
    assert chatty.closed_with is None
    assert registry.get("dev_quiet") is None and registry.get("dev_chatty") is chatty_session
    assert ("dev_quiet", "offline", events.OFFLINE_TIMEOUT) in sink.statuses()


def test_a_device_exactly_at_the_timeout_is_not_closed():
    clock, _, registry, _ = make_registry(timeout=30)
    connection = FakeConnection()
    registry.attach("dev_a", connection)
    clock.advance(30)
    assert registry.sweep() == 0 and connection.closed_with is None


def test_sweep_records_last_seen_of_live_sessions_in_one_batch():
    clock, _, registry, seen = make_registry(timeout=1000)
    registry.attach("dev_a", FakeConnection())
    registry.attach("dev_b", FakeConnection())
    clock.advance(5)
    registry.sweep()
    assert seen == [{"dev_a": 1_700_000_000, "dev_b": 1_700_000_000}]
    clock.advance(10)
    registry.sweep()
    assert len(seen) == 1  # not again before LAST_SEEN_EVERY seconds
    clock.advance(LAST_SEEN_EVERY)
    registry.sweep()
    assert len(seen) == 2


def test_one_failing_session_does_not_stop_the_sweep():
    clock, sink, registry, _ = make_registry(timeout=30)
    registry.attach("dev_broken", FakeConnection(fail_on_close=True))
    healthy = FakeConnection()
    registry.attach("dev_fine", healthy)
    clock.advance(31)
    assert registry.sweep() == 2
    assert healthy.closed_with[0] == CLOSE_TIMEOUT
    assert len(registry) == 0
    offline = [s for s in sink.statuses() if s[1] == "offline"]
    assert sorted(offline) == [
        ("dev_broken", "offline", "timeout"),
        ("dev_fine", "offline", "timeout"),
    ]


def test_takeover_closes_the_old_socket_with_4001_and_emits_no_offline():
    clock, sink, registry, _ = make_registry()
    old, new = FakeConnection(), FakeConnection()
    old_session = registry.attach("dev_a", old)
    new_session = registry.attach("dev_a", new)
    assert old.closed_with[0] == CLOSE_TAKEN_OVER
    assert registry.get("dev_a") is new_session
    registry.detach(old_session)  # the old socket's close arrives later
    assert registry.get("dev_a") is new_session
    assert sink.statuses() == [
        ("dev_a", "online", events.ONLINE_CONNECTED),
        ("dev_a", "online", events.ONLINE_TAKEOVER),
    ]
    assert registry.takeovers == 1


def test_close_then_reconnect_gives_offline_before_online():
    clock, sink, registry, _ = make_registry()
    first = registry.attach("dev_a", FakeConnection())
    registry.detach(first)
    registry.attach("dev_a", FakeConnection())
    assert sink.statuses() == [
        ("dev_a", "online", "connected"),
        ("dev_a", "offline", "closed"),
        ("dev_a", "online", "connected"),
    ]


def test_ending_a_session_emits_one_offline_even_when_its_close_arrives_later():
    clock, sink, registry, _ = make_registry()
    connection = FakeConnection()
    session = registry.attach("dev_a", connection)
    assert registry.end_device("dev_a", events.OFFLINE_REVOKED, CLOSE_REVOKED)
    registry.detach(session)
    assert connection.closed_with[0] == CLOSE_REVOKED
    assert sink.statuses() == [("dev_a", "online", "connected"), ("dev_a", "offline", "revoked")]
    assert not registry.end_device("dev_a", events.OFFLINE_REVOKED, CLOSE_REVOKED)


def test_end_all_closes_every_session_with_1001():
    clock, sink, registry, _ = make_registry()
    connections = [FakeConnection() for _ in range(3)]
    for number, connection in enumerate(connections):
        registry.attach(f"dev_{number}", connection)
    assert registry.end_all(events.OFFLINE_SHUTDOWN, CLOSE_GOING_AWAY) == 3
    assert [c.closed_with[0] for c in connections] == [1001] * 3
    assert len(registry) == 0
    assert [s[2] for s in sink.statuses() if s[1] == "offline"] == ["shutdown"] * 3


def test_event_timestamps_are_epoch_milliseconds_of_the_clock():
    clock, sink, registry, _ = make_registry()
    clock.advance(0.25)
    registry.attach("dev_a", FakeConnection())
    assert sink.events[0].ts == 1_700_000_000_250


def test_handshakes_beyond_the_pending_limit_get_a_quick_503():
    from twisted.internet.defer import Deferred

    from elevgw.core.gateway import Gateway, HandshakeRefused
    from elevgw.stores.interfaces import Device, hash_token

    class SlowStore:
        """A store whose lookups answer only when the test says so."""

        def __init__(self):
            self.waiting = []

        def get_device(self, device_id):
            d = Deferred()
            self.waiting.append(d)
            return d

    store = SlowStore()
    clock = Clock()
    gateway = Gateway(store, None, RecordingSink(), clock, max_pending_handshakes=2)
    first = gateway.authenticate("dev_a", "t")
    second = gateway.authenticate("dev_b", "t")
    refused = gateway.authenticate("dev_c", "t")
    failure = []
    refused.addErrback(failure.append)
    assert failure and failure[0].check(HandshakeRefused) and failure[0].value.status == 503
    store.waiting[0].callback(Device("dev_a", "x", hash_token("t"), 0.0))
    admitted = []
    first.addCallback(admitted.append)
    assert admitted[0].device_id == "dev_a"
    third = gateway.authenticate("dev_d", "t")
    assert len(store.waiting) == 3  # a slot freed up, so this lookup went to the store
    for d in store.waiting[1:]:
        d.callback(None)
    for d in (second, third):
        d.addErrback(lambda f: f.trap(HandshakeRefused))


def test_sessions_ending_together_make_one_last_seen_write():
    from elevgw.core.gateway import Gateway

    class SeenStore:
        """Records the batches; the real stores' behaviour is the contract suite's job."""

        def __init__(self):
            self.batches = []

        def record_last_seen(self, seen):
            self.batches.append(dict(seen))
            return succeed(None)

    store, clock = SeenStore(), Clock()
    gateway = Gateway(store, None, RecordingSink(), clock)
    for number in range(100):
        gateway.connected("dev_{}".format(number), FakeConnection())
    clock.advance(3)
    assert gateway.registry.end_all(events.OFFLINE_SHUTDOWN, CLOSE_GOING_AWAY) == 100
    assert store.batches == []
    clock.advance(0)
    assert len(store.batches) == 1 and len(store.batches[0]) == 100


class ChunkStore:
    """Holds every ``last_seen`` batch until the test fires it."""

    def __init__(self):
        self.batches = []

    def record_last_seen(self, seen):
        d = Deferred()
        self.batches.append((dict(seen), d))
        return d


def end_many_sessions(count):
    from elevgw.core.gateway import Gateway

    store, clock = ChunkStore(), Clock()
    gateway = Gateway(store, None, RecordingSink(), clock)
    for number in range(count):
        gateway.connected("dev_{}".format(number), FakeConnection())
    gateway.registry.end_all(events.OFFLINE_SHUTDOWN, CLOSE_GOING_AWAY)
    clock.advance(0)
    return store


def test_a_big_last_seen_batch_goes_to_the_store_in_chunks_one_after_the_other():
    store = end_many_sessions(2500)
    written = {}
    for expected in (1000, 1000, 500):
        assert len(store.batches) == 1, "the next chunk waits for the previous one"
        seen, d = store.batches.pop()
        assert len(seen) == expected
        written.update(seen)
        d.callback(None)
    assert store.batches == []
    assert len(written) == 2500


def test_a_failing_last_seen_chunk_is_logged_and_ends_the_batch():
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        store = end_many_sessions(1500)
        store.batches.pop()[1].errback(StoreUnavailable("store timed out"))
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert store.batches == []
    warnings = [e for e in logged if "could not record last_seen" in e.get("log_format", "")]
    assert [(e["count"], e["error"]) for e in warnings] == [(1500, "store timed out")]


def test_a_storm_of_lifecycle_lines_is_summed_up_once_a_second():
    clock = Clock()
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        registry = SessionRegistry(clock, RecordingSink(), 30.0, lifecycle_lines_per_second=3)
        sessions = [registry.attach(f"dev_{i}", FakeConnection()) for i in range(5)]
        registry.detach(sessions[0])
        lines = [e["device_id"] for e in logged if e.get("event") == "device_online"]
        assert lines == ["dev_0", "dev_1", "dev_2"]
        assert not [e for e in logged if e.get("event") == "log_lines_held"]
        clock.advance(1.0)
        held = [e for e in logged if e.get("event") == "log_lines_held"]
        assert len(held) == 1
        assert (held[0]["count"], held[0]["counts"]) == (3, "1 offline, 2 online")
        # a new second has a new budget, and a quiet second writes no summary
        registry.detach(sessions[1])
        clock.advance(5.0)
        offline = [e["device_id"] for e in logged if e.get("event") == "device_offline"]
        assert offline == ["dev_1"]
        assert len([e for e in logged if e.get("event") == "log_lines_held"]) == 1
    finally:
        globalLogPublisher.removeObserver(logged.append)


def test_lifecycle_budget_zero_writes_every_line_and_stop_flushes():
    clock = Clock()
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        every = SessionRegistry(clock, RecordingSink(), 30.0, lifecycle_lines_per_second=0)
        for i in range(50):
            every.attach(f"dev_{i}", FakeConnection())
        assert len([e for e in logged if e.get("event") == "device_online"]) == 50
        assert not clock.getDelayedCalls()
        limited = SessionRegistry(clock, RecordingSink(), 30.0, lifecycle_lines_per_second=1)
        limited.attach("dev_a", FakeConnection())
        limited.attach("dev_b", FakeConnection())
        limited.lifecycle_lines.stop()
        held = [e for e in logged if e.get("event") == "log_lines_held"]
        assert [(e["count"], e["counts"]) for e in held] == [(1, "1 online")]
        assert not clock.getDelayedCalls()
    finally:
        globalLogPublisher.removeObserver(logged.append)
