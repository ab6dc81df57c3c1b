"""The log says when the device store goes away and when it comes back, once per change."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from elevgw.observe.metrics import MeasuredStore, Metrics
from elevgw.observe.store_health import PROBE_INTERVAL, REMIND_EVERY, StoreHealth, StoreProbe
from elevgw.testing import MemoryDeviceStore
from waiting import eventually, within


def watched_store(clock: Clock) -> tuple[MemoryDeviceStore, MeasuredStore, StoreHealth]:
    memory = MemoryDeviceStore()
    health = StoreHealth("memory", clock)
    return memory, MeasuredStore(memory, Metrics("test"), clock, health), health


def store_lines(events: list) -> list[tuple[str, str]]:
    return [
        (event["event"], event["log_level"].name)
        for event in events
        if str(event.get("event", "")).startswith("store_")
    ]


def test_a_lost_store_is_one_warning_then_a_reminder_a_minute_then_one_line_on_recovery():
    clock = Clock()
    memory, store, health = watched_store(clock)
    with capturedLogs() as events:
        store.get_device("dev_1").addErrback(pytest.fail)
        assert store_lines(events) == []

        memory.available = False
        for _ in range(50):
            store.get_device("dev_1").addErrback(lambda _: None)
            clock.advance(1)
        assert store_lines(events) == [("store_lost", "warn")]
        assert "memory store switched off" in events[-1]["error"]

        clock.advance(REMIND_EVERY)
        store.ping().addErrback(lambda _: None)
        store.ping().addErrback(lambda _: None)
        assert store_lines(events) == [("store_lost", "warn"), ("store_still_lost", "warn")]

        memory.available = True
        store.ping()
        store.ping()
        lines = store_lines(events)
        assert lines[-1] == ("store_recovered", "info") and len(lines) == 3
    recovered = events[-1]
    assert recovered["seconds"] == pytest.approx(50 + REMIND_EVERY)
    assert recovered["failures"] == 52
    assert health.lost_since is None


def test_a_failure_that_is_not_the_store_being_away_is_not_a_lost_store():
    clock = Clock()
    memory, store, _ = watched_store(clock)
    memory.get_device = lambda device_id: fail(ValueError("a bug"))
    with capturedLogs() as events:
        store.get_device("dev_1").addErrback(lambda _: None)
    assert store_lines(events) == []


def test_the_probe_finds_an_idle_gateways_store_gone_and_back():
    clock = Clock()
    memory, store, _ = watched_store(clock)
    probe = StoreProbe(store, clock)
    with capturedLogs() as events:
        probe.startService()
        memory.available = False
        clock.advance(PROBE_INTERVAL - 0.1)
        assert store_lines(events) == []  # the first ping is one interval after start
        clock.advance(0.1)
        assert store_lines(events) == [("store_lost", "warn")]
        memory.available = True
        clock.advance(PROBE_INTERVAL)
        assert store_lines(events)[-1] == ("store_recovered", "info")
        probe.stopService()
    assert not clock.getDelayedCalls()


# A real redis-server taken away under a running gateway.


def collected(events: list, name: str) -> list[dict]:
    return [event for event in events if event.get("event") == name]


async def healthy(gateway) -> bool:
    status, _ = await gateway.call("GET", "/healthz")
    return status == 200


@pytest.mark.parametrize("how", ["killed", "frozen"])
@pytest_twisted.ensureDeferred
async def test_redis_lost_mid_run_is_logged_once_and_its_recovery_with_the_outage(
    gateway_factory, redis_url, redis_server, how
):
    gateway = await gateway_factory(store=redis_url, store_timeout=0.5)
    with capturedLogs() as events:
        assert await healthy(gateway)
        if how == "killed":
            redis_server.stop()
        else:
            redis_server.pause()
        try:
            for _ in range(3):
                assert not await within(healthy(gateway), 5)
            assert len(collected(events, "store_lost")) == 1
        finally:
            if how == "killed":
                redis_server.start()
            else:
                redis_server.resume()
        await eventually(lambda: healthy(gateway), 15)
        [recovered] = collected(events, "store_recovered")
    [lost] = collected(events, "store_lost")
    assert lost["log_level"] == LogLevel.warn and lost["store"] == "redis"
    assert recovered["log_level"] == LogLevel.info and recovered["seconds"] > 0
    assert recovered["failures"] >= 3
    assert not collected(events, "store_still_lost")


@pytest.mark.parametrize("level, kept", [(LogLevel.info, False), (LogLevel.debug, True)])
def test_reconnect_attempts_of_clientservice_are_left_to_the_store_lines(level, kept):
    """txredisapi reconnects through Twisted's ``ClientService``, which writes a line per
    attempt; above debug the filter drops them (the store lines say it once)."""
    from twisted.application.internet import ClientService
    from twisted.internet.protocol import Factory
    from twisted.logger import globalLogPublisher

    from elevgw.observe.logs import GatewayLogFilter

    class Unreachable:
        def connect(self, factory):
            return fail(ConnectionRefusedError("nobody there"))

    seen: list = []
    observer = GatewayLogFilter(seen.append, level, "node-1")
    clock = Clock()
    service = ClientService(Unreachable(), Factory(), clock=clock)
    globalLogPublisher.addObserver(observer)
    try:
        service.startService()
        clock.advance(1)
    finally:
        globalLogPublisher.removeObserver(observer)
        service.stopService()
    retries = [e for e in seen if "Scheduling retry" in str(e.get("log_format", ""))]
    assert bool(retries) is kept
