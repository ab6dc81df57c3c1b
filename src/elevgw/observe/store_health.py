"""Telling the log when the device store goes away and when it comes back.

A Redis that is killed or frozen under a running gateway shows only as 503s and error frames
(handshakes, logs) and as ``elevgw_store_errors_total``; without this, the log said nothing.
``StoreHealth`` hears the outcome of every store call (``MeasuredStore`` reports them) and
writes one warning when calls start failing with ``StoreUnavailable``, a reminder at most every
``remind_every`` seconds while that lasts, and one info line with the outage's length once a
call succeeds again. ``StoreProbe`` pings the store every few seconds so an idle gateway (devices
heartbeating, nothing touching the store) notices a loss and a recovery too.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from elevgw.stores.interfaces import StoreUnavailable
from elevgw.timing import PeriodicService

#: Seconds between two pings of the store by ``StoreProbe``.
PROBE_INTERVAL = 5.0
#: Seconds between two "still unavailable" warnings during one outage.
REMIND_EVERY = 60.0


class StoreHealth:
    """Whether the store answers, as its calls find it; logs each change once.

    ``answered`` runs after every successful store call, so while the store is up it costs
    one attribute test.
    """

    log = Logger()

    def __init__(self, name: str, clock: Any, remind_every: float = REMIND_EVERY) -> None:
        self.name = name
        self._clock = clock
        self._remind_every = remind_every
        #: Clock time of the first failure of the current outage, ``None`` while it answers.
        self.lost_since: float | None = None
        self._failures = 0
        self._next_reminder = 0.0

    def answered(self) -> None:
        if self.lost_since is None:
            return
        down_for = self._clock.seconds() - self.lost_since
        self.log.info(
            "device store {store} answers again after {seconds:.1f} s"
            " ({failures} calls failed meanwhile)",
            store=self.name,
            seconds=down_for,
            failures=self._failures,
            event="store_recovered",
        )
        self.lost_since = None
        self._failures = 0

    def failed(self, failure: Any) -> None:
        """A store call failed; only ``StoreUnavailable`` means the store is gone (anything
        else is a fault of the call, logged where it is handled)."""
        if not failure.check(StoreUnavailable):
            return
        now = self._clock.seconds()
        self._failures += 1
        if self.lost_since is None:
            self.lost_since = now
            self._next_reminder = now + self._remind_every
            self.log.warn(
                "device store {store} unavailable: {error}; handshakes get 503 and logs are"
                " refused until it answers again (it reconnects by itself)",
                store=self.name,
                error=failure.getErrorMessage(),
                event="store_lost",
            )
        elif now >= self._next_reminder:
            self._next_reminder = now + self._remind_every
            self.log.warn(
                "device store {store} still unavailable after {seconds:.0f} s"
                " ({failures} calls failed): {error}",
                store=self.name,
                seconds=now - self.lost_since,
                failures=self._failures,
                error=failure.getErrorMessage(),
                event="store_still_lost",
            )


class StoreProbe(PeriodicService):
    """Pings the store every ``interval`` seconds, the first time one interval after start
    (a store may still be connecting then). The outcome reaches ``StoreHealth`` through the
    measured store, so a failed ping needs no handling here."""

    def __init__(self, store: Any, clock: Any, interval: float = PROBE_INTERVAL) -> None:
        super().__init__(interval, self._ping, clock)
        self._store = store

    def _ping(self) -> Any:
        # A failure here would stop the LoopingCall for good.
        return self._store.ping().addErrback(lambda _: None)
