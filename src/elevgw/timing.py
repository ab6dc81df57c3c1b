"""Waiting with a bound, on an injected clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
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
