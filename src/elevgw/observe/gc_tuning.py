"""The cyclic garbage collector tuned for a gateway holding many sessions, and its pauses
made visible.

Every session keeps a few dozen GC-tracked objects alive (15,000 devices: about 600,000).
With CPython's default thresholds (700, 10, 10) a full collection then runs every few seconds
under load and stops the reactor for a long pause; with (50,000, 20, 100) it runs rarely. Objects
that exist once the service has started (imports, configuration) are never garbage, so they
are frozen out of every pass. The tuning is applied when the service starts and undone when
it stops, and every collection's pause is observed in ``elevgw_gc_pause_seconds``.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from twisted.application.service import Service

DEFAULT_THRESHOLDS = (50_000, 20, 100)


def parse_thresholds(value: str) -> tuple[int, ...] | None:
    """``--gc-thresholds``: ``python`` (CPython's own) or up to three whole numbers."""
    text = value.strip().lower()
    if text == "python":
        return None
    try:
        numbers = tuple(int(part) for part in text.split(","))
    except ValueError:
        numbers = ()
    if not 1 <= len(numbers) <= 3 or numbers[0] <= 0 or any(n < 0 for n in numbers):
        raise ValueError(
            f"must be 'python' or up to three whole numbers such as 50000,20,100, not {value!r}"
        )
    return numbers


class GCTuningService(Service):
    def __init__(self, thresholds: tuple[int, ...] | None, pauses: Any) -> None:
        """``thresholds`` ``None`` keeps CPython's; ``pauses`` is a Histogram with a
        ``generation`` label."""
        self._thresholds = thresholds
        self._pauses = pauses
        self._saved: tuple[int, ...] | None = None
        self._started_at = 0.0

    def startService(self) -> None:
        super().startService()
        if self._thresholds is not None:
            self._saved = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(*self._thresholds)
        gc.callbacks.append(self._observe)

    def stopService(self) -> None:
        super().stopService()
        if self._observe in gc.callbacks:
            gc.callbacks.remove(self._observe)
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            gc.unfreeze()
            self._saved = None

    def _observe(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started_at = time.perf_counter()
        else:
            self._pauses.labels(str(info.get("generation", ""))).observe(
                time.perf_counter() - self._started_at
            )
