"""Reaping a dead node: its devices go offline (``node_lost``) exactly once, whoever reaps.

Every node runs a reaper. Each round:

1. ``_REAP`` (one script, so atomic) takes an instance whose lease has expired by Redis's
   clock and moves up to ``batch`` of its devices from presence into the outbox stream,
   one entry per device still held by that instance, each with an event id derived from
   (instance, device, session): the same id whoever reaps and however often. A device
   that reconnected elsewhere meanwhile was taken out of the dead instance's set by that
   claim, so it gets nothing. When the set is empty the lease is deleted and the instance
   remembered as reaped. Several survivors may run this at once: each device lands in the
   outbox once, because the move is one script.
2. The outbox is read through the consumer group ``reapers``: each entry goes to one node,
   which emits the ``offline`` event and then acknowledges and deletes the entry. Entries a
   node read but never acknowledged (it died mid-way) are claimed by another node after
   ``claim_idle`` seconds (``XAUTOCLAIM``) and emitted with the same event id.

On a single Redis with AOF ``appendfsync always``, every reaped device yields one outbox
entry and is emitted once unless the emitting node dies between emitting and acknowledging
(then again, with the same event id). Under a Redis failover an acknowledged write can be
lost and redone: at-least-once, same event id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from elevgw.cluster.keys import LUA_PRELUDE, ClusterKeys
from elevgw.cluster.leases import REAPED_MEMORY_MS
from elevgw.cluster.redis_calls import RedisCalls, Script
from elevgw.events import model as events

GROUP = "reapers"

_REAP = Script(
    LUA_PRELUDE
    + """
    local now = now_ms()
    local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ms(now), 'LIMIT', 0, 1)
    if #dead == 0 then return {} end
    local instance = dead[1]
    local held = ARGV[1] .. 'held:' .. instance
    local node_key = ARGV[1] .. 'node:' .. instance
    local node_id = redis.call('HGET', node_key, 'node_id') or instance
    local moved = 0
    for _, device in ipairs(redis.call('SPOP', held, tonumber(ARGV[2]))) do
        local value = redis.call('HGET', KEYS[2], device)
        if value then
            local f = fields(value)
            if f[2] == instance then
                redis.call('HDEL', KEYS[2], device)
                local id = 'evt_' .. string.sub(
                    redis.sha1hex(instance .. '\\n' .. device .. '\\n' .. f[3]), 1, 32)
                redis.call('XADD', KEYS[3], '*', 'event_id', id, 'device_id', device,
                    'node', f[1], 'session_id', f[3], 'ts', ms(now))
                moved = moved + 1
            end
        end
    end
    local left = redis.call('SCARD', held)
    if left == 0 then
        redis.call('ZREM', KEYS[1], instance)
        redis.call('DEL', node_key)
        redis.call('ZADD', KEYS[4], ms(now), instance)
        redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ms(now - tonumber(ARGV[3])))
    end
    return {instance, node_id, moved, left}
    """
)


# Every run of a node is a consumer of its own in the group: forget those that are gone (no
# live lease) once nothing is pending for them, so the group does not grow with restarts.
_FORGET_CONSUMERS = Script(
    LUA_PRELUDE
    + """
    local now = now_ms()
    local forgotten = 0
    if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
    for _, info in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
        local name, pending
        for i = 1, #info, 2 do
            if info[i] == 'name' then name = info[i + 1] end
            if info[i] == 'pending' then pending = info[i + 1] end
        end
        local expiry = redis.call('ZSCORE', KEYS[2], name)
        if pending == 0 and not (expiry and tonumber(expiry) > now) then
            redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
            forgotten = forgotten + 1
        end
    end
    return forgotten
    """
)

#: Rounds between two passes over the consumer group's members.
FORGET_EVERY = 100


def _entry_fields(flat: list) -> dict:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class Reaper(Service):
    """Reaps dead instances and emits their devices' offline events (module docstring).

    ``consumer`` gives this node's current instance (its name in the consumer group);
    ``on_reaped(instance)`` is told when this node has fully reaped an instance;
    ``after_round()`` (may return a Deferred) runs at the end of every round.
    """

    log = Logger()

    def __init__(
        self,
        redis: RedisCalls,
        keys: ClusterKeys,
        event_sink: events.IEventSink,
        clock: Any,
        consumer: Callable[[], str],
        every: float = 2.0,
        batch: int = 500,
        claim_idle: float = 30.0,
        on_reaped: Callable[[str], None] = lambda instance: None,
        after_round: Callable[[], Any] = lambda: None,
        metrics: Any = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.events = event_sink
        self.clock = clock
        self.consumer = consumer
        self.every = every
        self.batch = batch
        self.claim_idle = claim_idle
        self.on_reaped = on_reaped
        self._after_round = after_round
        self.metrics = metrics
        self.emitted = 0
        self._rounds = 0
        self._group_ready = False
        self._running: Deferred | None = None
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.every, now=False).addErrback(
            lambda f: self.log.failure("cluster: the reaper loop stopped", f)
        )

    def stopService(self) -> Deferred | None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return self._running

    def tick(self) -> Deferred | None:
        """One round (reap, then empty the outbox); skipped while the last one runs."""
        if self._running is not None:
            return None
        d = Deferred.fromCoroutine(self.round())

        def failed(failure: Any) -> None:
            self.log.warn("cluster: reaper round failed: {error}", error=failure.getErrorMessage())

        def done(_: Any) -> None:
            self._running = None

        d.addErrback(failed).addBoth(done)
        self._running = d
        return d

    async def round(self) -> None:
        while await self.reap_once():
            pass
        await self.drain_outbox()
        await self.after_round()
        self._rounds += 1
        if self._rounds % FORGET_EVERY == 0:
            await self.forget_consumers()

    async def forget_consumers(self) -> int:
        """Remove the group's consumers of node runs that are gone and owe nothing."""
        return int(
            await self.redis.script(
                _FORGET_CONSUMERS, [self.keys.outbox, self.keys.leases], [GROUP]
            )
        )

    async def after_round(self) -> None:
        result = self._after_round()
        if isinstance(result, Deferred):
            await result

    async def reap_once(self) -> bool:
        """Move one batch of a dead instance's devices to the outbox; ``False`` if none."""
        keys = self.keys
        reply = await self.redis.script(
            _REAP,
            [keys.leases, keys.presence, keys.outbox, keys.reaped],
            [keys.base, self.batch, REAPED_MEMORY_MS],
        )
        if not reply:
            return False
        instance, node_id, moved, left = reply[0], reply[1], int(reply[2]), int(reply[3])
        if self.metrics is not None and moved:
            self.metrics.reaped.inc(moved)
        if moved:
            self.log.warn(
                "cluster: node {node} ({instance}) lost: {moved} of its devices reaped",
                node=node_id,
                instance=instance,
                moved=moved,
            )
        if not left:
            self.log.info("cluster: {instance} fully reaped", instance=instance)
            self.on_reaped(instance)
        return True

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self.redis.command("XGROUP", "CREATE", self.keys.outbox, GROUP, "0", "MKSTREAM")
        except Exception as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    async def drain_outbox(self) -> None:
        """Emit and acknowledge the outbox entries for this node, and abandoned ones."""
        await self._ensure_group()
        while True:
            try:
                entries = await self._read_outbox()
            except Exception as e:
                if "NOGROUP" in str(e):  # Redis lost its data: make the group again
                    self._group_ready = False
                raise
            if not entries:
                return
            ids = []
            for entry_id, flat in entries:
                if flat:  # a claimed entry deleted meanwhile comes back empty
                    self._emit(_entry_fields(flat))
                ids.append(entry_id)
            await self.redis.command("XACK", self.keys.outbox, GROUP, *ids)
            await self.redis.command("XDEL", self.keys.outbox, *ids)

    async def _read_outbox(self) -> list:
        consumer = self.consumer()
        claimed = await self.redis.command(
            "XAUTOCLAIM",
            self.keys.outbox,
            GROUP,
            consumer,
            int(self.claim_idle * 1000),
            "0-0",
            "COUNT",
            self.batch,
        )
        entries = list(claimed[1]) if claimed and len(claimed) > 1 else []
        if entries:
            return entries
        reply = await self.redis.command(
            "XREADGROUP",
            "GROUP",
            GROUP,
            consumer,
            "COUNT",
            self.batch,
            "STREAMS",
            self.keys.outbox,
            ">",
        )
        if not reply:
            return []
        return list(reply[0][1])

    def _emit(self, entry: dict) -> None:
        self.emitted += 1
        self.events.emit(
            events.DeviceStatus(
                entry["device_id"],
                "offline",
                events.OFFLINE_NODE_LOST,
                int(entry["ts"]),
                event_id=entry["event_id"],
                node=entry["node"],
            )
        )
