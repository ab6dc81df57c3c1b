"""What the cluster needs of the shared Redis connection: scripts and plain commands.

Both fail with ``StoreUnavailable`` at once while Redis is unreachable and after the store
timeout when it does not answer, like the device store's calls (they share the connection).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from elevgw.stores.redis import _Script as Script

__all__ = ["RedisCalls", "Script", "StoreCalls"]


class RedisCalls(Protocol):
    def script(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Deferred: ...

    def command(self, *args: Any) -> Deferred: ...


class StoreCalls:
    """``RedisCalls`` over the Redis device store's connection."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def script(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Deferred:
        return self._store._script(script, keys, args)

    def command(self, *args: Any) -> Deferred:
        return self._store._command(*args)
