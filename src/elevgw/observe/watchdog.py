"""The reactor-lag watchdog: how late the reactor runs its timers, and when it stalled.

A timer due every ``interval`` seconds notes how late it ran: the time the reactor spent on
something else (a slow callback, a collector pause, a blocking call, a paused VM) while
devices waited. Every lateness goes into the ``elevgw_reactor_lag_seconds`` histogram; one of
``stall_threshold`` seconds or more is a **stall**, logged once with its length and
remembered for ``keep`` seconds.

Why remember: while the gateway stands still it reads no frame, so every device looks silent
for the length of the stall. The liveness sweep asks ``stalled_between(last_active, now)``
and does not count that time as the device's silence; otherwise one long pause would close
every session with 4000 and send the backend an offline event for each. A stall still under
way when the sweep runs (the sweep's own timer may fire before the watchdog's) counts too:
the watchdog's overdue tick is the evidence.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from twisted.application.service import Service
from twisted.logger import Logger

LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ReactorWatchdog(Service):
    """Measures reactor lag on ``clock``; see the module docstring.

    :param interval: seconds between ticks (the resolution of the lag measurement).
    :param stall_threshold: lateness, in seconds, that counts as a stall.
    :param keep: seconds a stall is remembered (longer than the heartbeat timeout).
    :param registry: the Prometheus registry the histogram and counter go to.
    """

    log = Logger()

    def __init__(
        self,
        clock: Any,
        interval: float = 0.25,
        stall_threshold: float = 1.0,
        keep: float = 3600.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        for name, value in [
            ("interval", interval),
            ("stall_threshold", stall_threshold),
            ("keep", keep),
        ]:
            if value <= 0:
                raise ValueError(f"{name} must be positive, not {value!r}")
        self.clock = clock
        self.interval = interval
        self.stall_threshold = stall_threshold
        self.keep = keep
        registry = registry if registry is not None else CollectorRegistry()
        self.lag_seconds = Histogram(
            "elevgw_reactor_lag_seconds",
            "How late the reactor ran a timer due every 0.25 s (time spent on other work).",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.stall_count = Counter(
            "elevgw_reactor_stalls",
            "Reactor stalls at least --stall-threshold long (liveness deadlines extended).",
            registry=registry,
        )
        #: The last lateness measured, in seconds.
        self.lag = 0.0
        #: Recent stalls as ``(start, end)`` clock seconds, oldest first.
        self.stalls: deque[tuple[float, float]] = deque()
        self._due: float | None = None
        self._call: Any = None

    def startService(self) -> None:
        super().startService()
        self._schedule(self.clock.seconds())

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._due = None

    def _schedule(self, now: float) -> None:
        self._due = now + self.interval
        self._call = self.clock.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        now = self.clock.seconds()
        due = self._due if self._due is not None else now
        try:
            self.lag = lag = max(0.0, now - due)
            self.lag_seconds.observe(lag)
            if lag >= self.stall_threshold:
                self.stalls.append((due, now))
                self.stall_count.inc()
                self.log.warn(
                    "the reactor stalled for {seconds:.2f} s (nothing ran: a blocking call, "
                    "a collector pause or a paused machine); device liveness deadlines are "
                    "extended by the stall",
                    seconds=lag,
                    event="reactor_stall",
                )
            while self.stalls and self.stalls[0][1] < now - self.keep:
                self.stalls.popleft()
        except Exception:
            self.log.failure("reactor watchdog tick failed")
        finally:
            if self.running:
                self._schedule(now)

    def stalled_between(self, start: float, end: float) -> float:
        """Seconds of ``[start, end]`` the reactor spent stalled, a stall still under way
        included."""
        total = 0.0
        for stall_start, stall_end in self.stalls:
            total += max(0.0, min(end, stall_end) - max(start, stall_start))
        due = self._due
        now = self.clock.seconds()
        if due is not None and now - due >= self.stall_threshold:
            total += max(0.0, min(end, now) - max(start, due))
        return total
