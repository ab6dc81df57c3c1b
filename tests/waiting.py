"""Waiting in integration tests: real time, always bounded, so a hang fails instead of stalling."""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater

#: What a test gives one call before it counts as hung.
GUARD = 10.0


def within(awaitable: Any, seconds: float = GUARD) -> Deferred:
    """``awaitable`` as a Deferred that fails with ``TimeoutError`` (and is cancelled) after
    ``seconds`` of real time."""
    return ensureDeferred(awaitable).addTimeout(seconds, reactor)


async def eventually(check: Any, timeout: float, interval: float = 0.05) -> None:
    """Await ``check()`` until it returns true; fail if it has not after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await within(check(), timeout):
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout} s")
        await deferLater(reactor, interval, lambda: None)
