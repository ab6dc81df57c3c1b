"""What the cluster needs of the node's shared Redis connection
(``elevgw.stores.redis_connection.RedisConnection``): scripts and plain commands.

Both fail with ``StoreUnavailable`` at once while Redis is unreachable and after the store
timeout when it does not answer, like the device store's calls (they share the connection).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from elevgw.stores.redis_connection import Script

__all__ = ["RedisCalls", "Script"]


class RedisCalls(Protocol):
    def script(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Deferred: ...

    def command(self, *args: Any) -> Deferred: ...
