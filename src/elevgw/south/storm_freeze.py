"""Keep the sessions of a connect storm out of the garbage collector's full passes.

15,000 sessions are about 400,000 GC-tracked objects, none of them garbage while the device
stays connected, yet every full collection walks them all: 208 ms with the reactor stopped.
Once a storm has settled (sessions grew by ``min_growth`` or more and stopped growing) the
``StormFreezer`` calls ``gc.freeze()``, which moves every tracked object to the permanent
generation that collections skip. It costs no pause.

Objects frozen stay out of the collector until they are thawed, including the ones that
become cyclic garbage when their device disconnects. So the freezer counts sessions that
end after a freeze; once a quarter of the frozen ones (at least ``min_growth``) have ended,
it thaws everything, collects once (one full pause, at most once per that much churn) and
freezes what is left. Memory held by frozen garbage is therefore bounded by a quarter of
the fleet's sessions.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall

from elevgw.observe.logs import Logger


class StormFreezer(Service):
    log = Logger()

    def __init__(
        self,
        sessions: Callable[[], int],
        on_session_ended: list,
        clock: Any,
        interval: float = 5.0,
        min_growth: int = 1000,
    ) -> None:
        """``sessions`` counts live sessions; ``on_session_ended`` is the session registry's
        hook list (called with ``(session, reason)``); every ``interval`` seconds on
        ``clock`` the freezer looks at the count."""
        self._sessions = sessions
        self._hooks = on_session_ended
        self._clock = clock
        self._interval = interval
        self._min_growth = min_growth
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock
        self._last_count = 0
        #: Sessions alive at the last freeze, and how many sessions ended since.
        self.frozen_sessions = 0
        self.ended_since_freeze = 0
        self.freezes = 0
        self.thaws = 0

    def startService(self) -> None:
        super().startService()
        self._hooks.append(self._session_ended)
        self._last_count = self._sessions()
        self._loop.start(self._interval, now=False).addErrback(
            lambda failure: self.log.failure("the storm freezer stopped", failure)
        )

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._session_ended in self._hooks:
            self._hooks.remove(self._session_ended)

    def _session_ended(self, session: Any, reason: str) -> None:
        self.ended_since_freeze += 1

    def check(self) -> None:
        """Freeze after a storm settles; thaw, collect and freeze again after churn."""
        try:
            count = self._sessions()
            growing = count - self._last_count > max(50, count // 100)
            self._last_count = count
            if self.freezes and self.ended_since_freeze >= max(
                self._min_growth, self.frozen_sessions // 4
            ):
                self._thaw_and_collect(count)
            elif not growing and count - self.frozen_sessions >= self._min_growth:
                self._freeze(count)
        except Exception:
            self.log.failure("storm freezer check failed")

    def _freeze(self, count: int) -> None:
        gc.freeze()
        self.freezes += 1
        self.frozen_sessions = count
        self.ended_since_freeze = 0
        self.log.info(
            "froze {objects} objects after a connect storm ({sessions} sessions)",
            objects=gc.get_freeze_count(),
            sessions=count,
            event="gc_freeze",
        )

    def _thaw_and_collect(self, count: int) -> None:
        ended = self.ended_since_freeze
        started = time.perf_counter()
        gc.unfreeze()
        collected = gc.collect()
        gc.freeze()
        self.thaws += 1
        self.frozen_sessions = count
        self.ended_since_freeze = 0
        self.log.info(
            "{ended} sessions ended since the last freeze: collected {collected} objects in"
            " {ms:.0f} ms and froze the rest ({sessions} sessions)",
            ended=ended,
            collected=collected,
            ms=(time.perf_counter() - started) * 1000,
            sessions=count,
            event="gc_thaw",
        )
