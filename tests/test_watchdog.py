"""The reactor-lag watchdog: lag measured, stalls remembered and logged once, and a stall of
the gateway's own never sends devices offline (on a Clock, then on real sockets)."""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from elevgw.core.sessions import CLOSE_TIMEOUT, SessionRegistry
from elevgw.observe.watchdog import ReactorWatchdog
from elevgw.testing import FakeConnection, RecordingSink
from wsclient import connect_device

T0 = 1_700_000_000.0


def setup(timeout=30.0, stall_threshold=1.0):
    clock = Clock()
    clock.advance(T0)
    registry = CollectorRegistry()
    watchdog = ReactorWatchdog(
        clock, interval=0.25, stall_threshold=stall_threshold, registry=registry
    )
    sink = RecordingSink()
    sessions = SessionRegistry(clock, sink, timeout)
    sessions.stalled = watchdog.stalled_between
    watchdog.startService()
    return clock, watchdog, sessions, sink, registry


def run_for(clock, seconds, step=0.25):
    """Let ``seconds`` pass with the reactor running on time."""
    for _ in range(round(seconds / step)):
        clock.advance(step)


def test_lag_is_measured_into_the_histogram():
    clock, watchdog, _, _, registry = setup()
    run_for(clock, 1.0)
    clock.advance(0.25 + 0.3)  # the tick runs 0.3 s late
    assert watchdog.lag == pytest.approx(0.3)
    count = registry.get_sample_value("elevgw_reactor_lag_seconds_count")
    assert count == 5
    assert registry.get_sample_value("elevgw_reactor_lag_seconds_bucket", {"le": "0.25"}) == 4
    assert registry.get_sample_value("elevgw_reactor_stalls_total") == 0


def test_a_stall_is_logged_once_with_its_length_and_remembered():
    clock, watchdog, _, _, registry = setup(stall_threshold=1.0)
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        clock.advance(0.25 + 5.0)
        run_for(clock, 2.0)
    finally:
        globalLogPublisher.removeObserver(logged.append)
    stalls = [e for e in logged if e.get("event") == "reactor_stall"]
    assert len(stalls) == 1 and stalls[0]["seconds"] == pytest.approx(5.0)
    assert registry.get_sample_value("elevgw_reactor_stalls_total") == 1
    assert list(watchdog.stalls) == [(T0 + 0.25, T0 + 5.25)]
    assert watchdog.stalled_between(T0, T0 + 100) == pytest.approx(5.0)
    assert watchdog.stalled_between(T0 + 3, T0 + 4) == pytest.approx(1.0)
    assert watchdog.stalled_between(T0 + 6, T0 + 7) == 0.0


def test_stalls_are_forgotten_after_keep_seconds():
    clock = Clock()
    watchdog = ReactorWatchdog(clock, interval=0.25, stall_threshold=1.0, keep=10.0)
    watchdog.startService()
    clock.advance(3.25)
    assert len(watchdog.stalls) == 1
    run_for(clock, 11.0)
    assert len(watchdog.stalls) == 0
    watchdog.stopService()
    assert not clock.getDelayedCalls()


def test_a_stall_longer_than_the_heartbeat_timeout_sends_no_device_offline():
    clock, watchdog, sessions, sink, _ = setup(timeout=30.0)
    connections = {device: FakeConnection() for device in ("dev_a", "dev_b")}
    for device, connection in connections.items():
        sessions.attach(device, connection)
    run_for(clock, 5.0)
    for session in sessions.sessions():
        session.last_active = clock.seconds()
    clock.advance(45.0)  # the reactor stood still for 45 s
    assert sessions.sweep() == 0
    assert all(c.closed_with is None for c in connections.values())
    assert [s for s in sink.statuses() if s[1] == "offline"] == []


def test_a_sweep_that_runs_before_the_watchdog_notices_still_discounts_the_stall():
    clock, watchdog, sessions, sink, _ = setup(timeout=30.0)
    sessions.attach("dev_a", FakeConnection())
    expired = []
    # Due before the watchdog's next tick: after the stall it runs first, while the stall
    # is only visible as the watchdog's overdue tick.
    clock.callLater(0.1, lambda: expired.append(sessions.sweep()))
    clock.advance(45.0)
    assert expired == [0]
    assert sink.statuses() == [("dev_a", "online", "connected")]


def test_a_device_that_really_went_silent_still_goes_offline_after_a_stall():
    clock, watchdog, sessions, sink, _ = setup(timeout=30.0)
    quiet = FakeConnection()
    chatty = FakeConnection()
    sessions.attach("dev_quiet", quiet)
    chatty_session = sessions.attach("dev_chatty", chatty)
    run_for(clock, 10.0)  # dev_quiet silent for 10 s already
    clock.advance(45.0)  # then the gateway stalls
    assert sessions.sweep() == 0
    for _ in range(20):  # 20 more seconds: 30 s of real silence
        run_for(clock, 1.0)
        chatty_session.last_active = clock.seconds()
        sessions.sweep()
    assert quiet.closed_with is not None and quiet.closed_with[0] == CLOSE_TIMEOUT
    assert chatty.closed_with is None
    assert [s for s in sink.statuses() if s[1] == "offline"] == [
        ("dev_quiet", "offline", "timeout")
    ]


def test_without_a_watchdog_the_sweep_counts_every_second():
    clock = Clock()
    sink = RecordingSink()
    sessions = SessionRegistry(clock, sink, 30.0)
    sessions.attach("dev_a", FakeConnection())
    clock.advance(45.0)
    assert sessions.sweep() == 1


@pytest.mark.parametrize("name", ["interval", "stall_threshold", "keep"])
def test_non_positive_settings_are_refused(name):
    with pytest.raises(ValueError):
        ReactorWatchdog(Clock(), **{name: 0})


# Real sockets: the gateway itself blocked longer than the heartbeat timeout.


async def pause(seconds):
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d


@pytest_twisted.ensureDeferred
async def test_blocking_the_reactor_past_the_heartbeat_timeout_keeps_devices_online(
    gateway_factory,
):
    gateway = await gateway_factory(heartbeat_timeout=1.0, sweep_interval=0.1, stall_threshold=0.5)
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    await device.request({"type": "heartbeat"})
    await pause(0.3)  # the watchdog ticks on time once
    time.sleep(2.5)  # the whole process blocks: no frame is read, every timer is late
    for _ in range(8):  # the device goes on heartbeating after the stall
        await pause(0.1)
        await device.request({"type": "heartbeat"})
    assert not device.closed.called
    status, body = await gateway.call("GET", f"/api/v1/events?device_id={creds['device_id']}")
    assert [(e["status"], e["reason"]) for e in body["events"]] == [("online", "connected")]
    status, text = await gateway.call("GET", "/metrics")
    assert "elevgw_reactor_stalls_total 1.0" in text.decode()

    # Now the device really goes silent: it is closed with 4000 after the timeout.
    code, _ = await device.closed.addTimeout(5, reactor)
    assert code == CLOSE_TIMEOUT
    await pause(0.1)
    status, body = await gateway.call("GET", f"/api/v1/events?device_id={creds['device_id']}")
    assert [(e["status"], e["reason"]) for e in body["events"]] == [
        ("online", "connected"),
        ("offline", "timeout"),
    ]
