"""Health per device, kept up to date event by event (never recomputed from the event log).

``HealthTracker`` observes the status events this node emits (it is an observer of the event
log, or of the sink when the log is off) and keeps, per device: connects, disconnects by
reason, takeovers, flaps (sessions shorter than ``flap_threshold``), the last disconnect, and
the time online per hour for the last 7 days, from which the online percentages over 24 hours
and 7 days are read.

What it knows is what this node saw since it started (``observed_since``): a restart starts
from zero, and in a cluster each node counts the sessions it held. Memory: a device that never
disconnected costs one small object; the hourly ring (169 two-byte counters) and the flap
times are only allocated once a device has disconnected or flapped.

Percentages are over whole hours: "24 h" is from the start of the hour 24 hours ago until now
(between 24 and 25 hours), so they are exact sums of the hourly counters.
"""

from __future__ import annotations

import heapq
from array import array
from collections import deque
from typing import Any

from elevgw.events.model import ONLINE_TAKEOVER, DeviceStatus
from elevgw.util import to_ms

HOUR = 3600
WEEK_HOURS = 7 * 24
#: Hours in the ring: a window of 168 hours back from now touches 169 calendar hours.
RING_HOURS = WEEK_HOURS + 1
#: Flap times kept per device (for the 24-hour count); a device flapping faster than this
#: many times a day shows as having flapped this many times.
FLAP_TIMES_KEPT = 1000


class DeviceHealth:
    """One device's counters. Times are clock seconds."""

    __slots__ = (
        "connects",
        "disconnects",
        "takeovers",
        "flaps",
        "flap_times",
        "online_since",
        "last_reason",
        "last_disconnect_at",
        "ring",
        "ring_hour",
    )

    def __init__(self) -> None:
        self.connects = 0
        self.disconnects: dict[str, int] = {}
        self.takeovers = 0
        self.flaps = 0
        self.flap_times: deque[float] | None = None
        self.online_since: float | None = None
        self.last_reason: str | None = None
        self.last_disconnect_at: float | None = None
        #: Seconds online in each of the last ``RING_HOURS`` hours; slot ``hour % RING_HOURS``.
        self.ring: array | None = None
        #: The newest hour (epoch seconds // 3600) the ring holds.
        self.ring_hour = 0

    def add_online(self, start: float, end: float) -> None:
        """Count ``[start, end)`` as online in the hourly ring."""
        if end <= start:
            return
        end_hour = int(end // HOUR)
        if self.ring is None:
            self.ring = array("H", bytes(2 * RING_HOURS))
            self.ring_hour = end_hour
        elif end_hour > self.ring_hour:
            for hour in range(self.ring_hour + 1, min(end_hour, self.ring_hour + RING_HOURS) + 1):
                self.ring[hour % RING_HOURS] = 0
            self.ring_hour = end_hour
        start = max(start, (end_hour - RING_HOURS + 1) * HOUR)
        while start < end:
            hour = int(start // HOUR)
            upto = min(end, (hour + 1) * HOUR)
            if hour > self.ring_hour - RING_HOURS:
                slot = hour % RING_HOURS
                self.ring[slot] = min(HOUR, self.ring[slot] + round(upto - start))
            start = upto

    def online_in(self, window_start_hour: int, now: float) -> float:
        """Seconds online from the start of ``window_start_hour`` until ``now``."""
        total = 0.0
        if self.ring is not None:
            first = max(window_start_hour, self.ring_hour - RING_HOURS + 1)
            for hour in range(first, self.ring_hour + 1):
                total += self.ring[hour % RING_HOURS]
        if self.online_since is not None:
            total += max(0.0, now - max(self.online_since, window_start_hour * HOUR))
        return total


class HealthTracker:
    """Health of every device this node has seen; call it with each emitted event.

    :param clock: ``IReactorTime`` whose ``seconds()`` is epoch seconds.
    :param flap_threshold: a session shorter than this many seconds is a flap.
    """

    def __init__(self, clock: Any, flap_threshold: float = 60.0) -> None:
        if flap_threshold <= 0:
            raise ValueError(f"flap_threshold must be positive, not {flap_threshold!r}")
        self.clock = clock
        self.flap_threshold = flap_threshold
        self.started = clock.seconds()
        self.devices: dict[str, DeviceHealth] = {}

    def __call__(self, event: Any) -> None:
        if isinstance(event, DeviceStatus):
            self.status(event.device_id, event.status, event.reason, event.ts / 1000)

    def status(self, device_id: str, status: str, reason: str, at: float) -> None:
        health = self.devices.get(device_id)
        if health is None:
            health = self.devices[device_id] = DeviceHealth()
        if status == "online":
            health.connects += 1
            if reason == ONLINE_TAKEOVER:
                health.takeovers += 1
            if health.online_since is None:
                health.online_since = at
            return
        health.disconnects[reason] = health.disconnects.get(reason, 0) + 1
        health.last_reason = reason
        health.last_disconnect_at = at
        since, health.online_since = health.online_since, None
        if since is None:
            return
        health.add_online(since, at)
        if at - since < self.flap_threshold:
            health.flaps += 1
            if health.flap_times is None:
                health.flap_times = deque(maxlen=FLAP_TIMES_KEPT)
            health.flap_times.append(at)

    def _percent(self, health: DeviceHealth | None, hours: int, now: float) -> float | None:
        """Online share of the last ``hours`` hours, measured from the start of the hour
        they begin in (the ring counts whole hours), or from when this node started if that
        is later; ``None`` before any time was observed."""
        window_start_hour = int((now - hours * HOUR) // HOUR)
        observed = now - max(window_start_hour * HOUR, self.started)
        if observed <= 0:
            return None
        online = health.online_in(window_start_hour, now) if health is not None else 0.0
        return round(min(100.0, 100.0 * online / observed), 2)

    def flaps_since(self, health: DeviceHealth, since: float) -> int:
        if not health.flap_times:
            return 0
        return sum(1 for at in health.flap_times if at >= since)

    def report(self, device_id: str) -> dict:
        """A device's health as the API shows it (times in epoch milliseconds)."""
        now = self.clock.seconds()
        health = self.devices.get(device_id)
        base = {
            "device_id": device_id,
            "observed_since": to_ms(self.started),
            "online_pct_24h": self._percent(health, 24, now),
            "online_pct_7d": self._percent(health, WEEK_HOURS, now),
        }
        if health is None:
            return {
                **base,
                "online": False,
                "connects": 0,
                "disconnects": {},
                "takeovers": 0,
                "flaps": 0,
                "flaps_24h": 0,
                "online_since": None,
                "last_disconnect": None,
            }
        return {
            **base,
            "online": health.online_since is not None,
            "connects": health.connects,
            "disconnects": dict(health.disconnects),
            "takeovers": health.takeovers,
            "flaps": health.flaps,
            "flaps_24h": self.flaps_since(health, now - 24 * HOUR),
            "online_since": to_ms(health.online_since),
            "last_disconnect": None
            if health.last_reason is None
            else {"reason": health.last_reason, "at": to_ms(health.last_disconnect_at)},
        }

    def top_flapping(self, limit: int) -> list[dict]:
        """The devices with the most flaps in the last 24 hours, most first."""
        since = self.clock.seconds() - 24 * HOUR
        counted = (
            (self.flaps_since(health, since), device_id)
            for device_id, health in self.devices.items()
            if health.flap_times
        )
        top = heapq.nlargest(limit, (c for c in counted if c[0] > 0))
        return [{"device_id": device_id, "flaps_24h": flaps} for flaps, device_id in top]
