"""This node's status as JSON (``GET /api/v1/status``): what the console's fleet page draws.

``/metrics`` is for a Prometheus that keeps history; a gateway watched by an operator alone has
none. ``NodeStatus`` keeps a day of one-minute samples itself (devices online, connects and
disconnects in the minute, worst reactor lag), a few kilobytes, and measures reactor lag: a
timer due every ``tick`` seconds notes how late it ran, which is how long the reactor was busy
with something else (a slow callback, a collector pause) while devices waited.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from elevgw import __version__


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class NodeStatus(Service):
    """Samples one node on ``clock``; see the module docstring.

    ``sessions()`` counts the devices connected to this node; ``metrics`` is its ``Metrics``
    (admitted handshakes and offline events are read from there); ``event_sink`` reports the
    webhook backlog when it is a ``WebhookSink``. ``tick`` and ``sample_every`` are seconds;
    ``keep`` is how many samples are kept.
    """

    log = Logger()

    def __init__(
        self,
        store: Any,
        metrics: Any,
        event_sink: Any,
        node_id: str,
        clock: Any,
        sessions: Callable[[], int],
        tick: float = 1.0,
        sample_every: float = 60.0,
        keep: int = 1440,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._sink = event_sink
        self._node_id = node_id
        self._clock = clock
        self._sessions = sessions
        self.tick = tick
        self.sample_every = sample_every
        self.samples: collections.deque[dict] = collections.deque(maxlen=keep)
        self.lag = 0.0
        self._minute_lag = 0.0
        self._last_minute_lag = 0.0
        self._due = 0.0
        self._last_sample = 0.0
        self._started = 0.0
        self._counted = (0.0, 0.0)
        self._call: Any = None

    def startService(self) -> None:
        super().startService()
        now = self._clock.seconds()
        self._started = now
        self._last_sample = now
        self._counted = self._counters()
        self._schedule(now)

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self, now: float) -> None:
        self._due = now + self.tick
        self._call = self._clock.callLater(self.tick, self._tick)

    def _tick(self) -> None:
        now = self._clock.seconds()
        try:
            self.lag = max(0.0, now - self._due)
            self._minute_lag = max(self._minute_lag, self.lag)
            if now - self._last_sample >= self.sample_every:
                self._sample(now)
        except Exception:
            self.log.failure("node status: sampling failed")
        finally:
            self._schedule(now)

    def _counters(self) -> tuple[float, float]:
        """Devices admitted and offline events so far, from the node's own counters."""
        metrics = self._metrics
        connects = metrics.registry.get_sample_value(
            "elevgw_handshakes_total", {"outcome": "accepted"}
        )
        disconnects = sum(
            sample.value
            for family in metrics.offline.collect()
            for sample in family.samples
            if sample.name.endswith("_total")
        )
        return connects or 0.0, disconnects

    def _sample(self, now: float) -> None:
        connects, disconnects = self._counters()
        before_connects, before_disconnects = self._counted
        self._counted = (connects, disconnects)
        self.samples.append(
            {
                "ts": _ms(now),
                "online": self._sessions(),
                "connects": int(connects - before_connects),
                "disconnects": int(disconnects - before_disconnects),
                "max_lag_ms": round(self._minute_lag * 1000, 1),
            }
        )
        self._last_minute_lag, self._minute_lag = self._minute_lag, 0.0
        self._last_sample = now

    def _webhooks(self) -> dict | None:
        stats = getattr(self._sink, "stats", None)
        if stats is None:
            return None
        return {
            "queued": self._sink.queued,
            "in_flight": self._sink.in_flight,
            **{outcome: count for outcome, count in sorted(stats.items())},
        }

    async def report(self) -> dict:
        """The status document; pings the store (its answer time is part of it)."""
        clock = self._clock
        store = self._store
        began = clock.seconds()
        try:
            await store.ping()
        except Exception as e:
            store_status = {"name": store.name, "ok": False, "latency_ms": None, "error": str(e)}
        else:
            latency = round((clock.seconds() - began) * 1000, 2)
            store_status = {"name": store.name, "ok": True, "latency_ms": latency, "error": None}
        return {
            "node_id": self._node_id,
            "version": __version__,
            "started": _ms(self._started),
            "now": _ms(clock.seconds()),
            "sessions": self._sessions(),
            "store": store_status,
            "webhooks": self._webhooks(),
            "reactor": {
                "lag_ms": round(self.lag * 1000, 1),
                "max_lag_ms": round(max(self._minute_lag, self._last_minute_lag) * 1000, 1),
            },
            "history": list(self.samples),
        }
