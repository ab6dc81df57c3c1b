"""Per-device health on a Clock: counts, flaps, online percentages, the fleet's top flappers."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from elevgw.events.health import HealthTracker
from elevgw.events.model import DeviceStatus

HOUR = 3600.0
START = 1_700_000_000.0 - 1_700_000_000.0 % HOUR  # on the hour, so windows are easy to read


def tracker(flap_threshold=60.0, start=START):
    clock = Clock()
    clock.advance(start)
    return clock, HealthTracker(clock, flap_threshold=flap_threshold)


def emit(clock, health, device_id, status, reason):
    health(DeviceStatus(device_id, status, reason, int(clock.seconds() * 1000)))


def test_connects_disconnects_by_reason_and_the_last_disconnect():
    clock, health = tracker()
    emit(clock, health, "dev_a", "online", "connected")
    clock.advance(600)
    emit(clock, health, "dev_a", "offline", "timeout")
    clock.advance(10)
    emit(clock, health, "dev_a", "online", "connected")
    clock.advance(600)
    emit(clock, health, "dev_a", "offline", "closed")
    clock.advance(5)
    emit(clock, health, "dev_a", "online", "connected")
    report = health.report("dev_a")
    assert report["connects"] == 3
    assert report["disconnects"] == {"timeout": 1, "closed": 1}
    assert report["last_disconnect"] == {"reason": "closed", "at": int((START + 1210) * 1000)}
    assert report["online"] is True
    assert report["online_since"] == int((START + 1215) * 1000)
    assert report["flaps"] == 0


def test_sessions_shorter_than_the_threshold_are_flaps():
    clock, health = tracker(flap_threshold=60)
    for length in (5, 59, 60, 300):
        emit(clock, health, "dev_a", "online", "connected")
        clock.advance(length)
        emit(clock, health, "dev_a", "offline", "closed")
        clock.advance(1)
    report = health.report("dev_a")
    assert (report["flaps"], report["flaps_24h"]) == (2, 2)
    clock.advance(24 * HOUR)
    assert health.report("dev_a")["flaps_24h"] == 0
    assert health.report("dev_a")["flaps"] == 2


def test_a_takeover_counts_a_connect_but_the_device_stays_online():
    clock, health = tracker()
    emit(clock, health, "dev_a", "online", "connected")
    clock.advance(100)
    emit(clock, health, "dev_a", "online", "takeover")
    clock.advance(100)
    report = health.report("dev_a")
    assert (report["connects"], report["takeovers"], report["online"]) == (2, 1, True)
    assert report["online_since"] == int(START * 1000)
    assert report["disconnects"] == {}


def test_online_percentages_cover_what_this_node_observed():
    clock, health = tracker()
    emit(clock, health, "dev_a", "online", "connected")
    clock.advance(3 * HOUR)
    emit(clock, health, "dev_a", "offline", "timeout")
    clock.advance(HOUR)
    report = health.report("dev_a")
    assert report["online_pct_24h"] == 75.0 and report["online_pct_7d"] == 75.0
    clock.advance(20 * HOUR)  # 24 h observed: online 3 of them
    assert health.report("dev_a")["online_pct_24h"] == 12.5
    emit(clock, health, "dev_a", "online", "connected")
    clock.advance(24 * HOUR)  # the last 24 h all online; the 7 d window sees 27 of 48 h
    report = health.report("dev_a")
    assert report["online_pct_24h"] == 100.0
    assert report["online_pct_7d"] == pytest.approx(100 * 27 / 48, abs=0.01)


def test_online_time_older_than_seven_days_falls_out_of_the_window():
    clock, health = tracker()
    emit(clock, health, "dev_a", "online", "connected")
    clock.advance(10 * HOUR)
    emit(clock, health, "dev_a", "offline", "closed")
    clock.advance(8 * 24 * HOUR)
    report = health.report("dev_a")
    assert report["online_pct_7d"] == 0.0 and report["online_pct_24h"] == 0.0
    emit(clock, health, "dev_a", "online", "connected")
    clock.advance(2 * HOUR)
    emit(clock, health, "dev_a", "offline", "closed")
    assert health.report("dev_a")["online_pct_24h"] == pytest.approx(100 * 2 / 24, abs=0.01)


def test_a_session_spanning_hours_is_split_across_them():
    clock, health = tracker()
    clock.advance(HOUR / 2)
    emit(clock, health, "dev_a", "online", "connected")
    clock.advance(2 * HOUR)  # 30 min, 60 min, 30 min
    emit(clock, health, "dev_a", "offline", "closed")
    device = health.devices["dev_a"]
    hour = int(START // HOUR)
    assert [device.ring[(hour + i) % 169] for i in range(3)] == [1800, 3600, 1800]


def test_a_device_never_seen_reports_zeroes():
    clock, health = tracker()
    clock.advance(HOUR)
    report = health.report("dev_nobody")
    assert report["connects"] == 0 and report["online"] is False
    assert report["online_pct_24h"] == 0.0
    assert report["last_disconnect"] is None


def test_top_flapping_lists_the_most_flaps_first():
    clock, health = tracker(flap_threshold=60)
    for device_id, flaps in (("dev_a", 1), ("dev_b", 3), ("dev_c", 2), ("dev_d", 0)):
        for _ in range(flaps):
            emit(clock, health, device_id, "online", "connected")
            clock.advance(1)
            emit(clock, health, device_id, "offline", "closed")
    emit(clock, health, "dev_d", "online", "connected")
    assert health.top_flapping(2) == [
        {"device_id": "dev_b", "flaps_24h": 3},
        {"device_id": "dev_c", "flaps_24h": 2},
    ]
    clock.advance(25 * HOUR)
    assert health.top_flapping(2) == []


def test_other_events_are_ignored():
    clock, health = tracker()
    health(object())
    assert health.devices == {}


def test_a_non_positive_flap_threshold_is_refused():
    with pytest.raises(ValueError):
        HealthTracker(Clock(), flap_threshold=0)
