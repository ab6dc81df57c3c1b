"""Waiting with a bound, on an injected clock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure


def within(d: Deferred, seconds: float, clock: Any) -> Deferred:
    """``d``'s result, or ``None`` after ``seconds`` at the latest; never fails.

    For steps of a drain, which must end on time whatever a part does: a failure counts as
    "no result" (``None``), and ``d`` itself is left to finish or not.
    """
    done: Deferred = Deferred()

    def expire() -> None:
        if not done.called:
            done.callback(None)

    timer = clock.callLater(seconds, expire)

    def finished(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if not done.called:
            done.callback(None if isinstance(result, Failure) else result)

    d.addBoth(finished)
    return done


class PeriodicService(Service):
    """Calls ``function`` every ``interval`` seconds on ``clock`` while running, the first time
    one interval after start (``TimerService`` runs it at once). ``function`` must not raise:
    a ``LoopingCall`` whose function raises stops for good."""

    def __init__(self, interval: float, function: Callable[[], Any], clock: Any) -> None:
        self.interval = interval
        self._loop = LoopingCall(function)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
