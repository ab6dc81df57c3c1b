"""Presence for a cluster: which node holds which device, in Redis, true for every node.

One hash field per connected device (``{prefix}cluster:presence``, see
``elevgw.cluster.keys``) names the node, its instance, the session id and the device's
claim epoch. An entry counts only while the instance's lease lives, checked inside the
same script by Redis's clock, so a dead node's devices read as offline the moment its lease
runs out, before any reaper has run, and nothing per device is ever refreshed.

Writes are compare-and-set scripts:

- ``claim``: the device's entry becomes this session's, whatever was there; the previous
  holder is returned (the takeover's ``previous_node``) and the device leaves its held set,
  so no reaper reports a device that has moved.
- ``release``: the entry is deleted only if it still names this session (compare-and-
  delete), so a late close of a taken-over socket changes nothing; only a release that
  deleted something may emit an offline event.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from elevgw.cluster.keys import LUA_PRELUDE, ClusterKeys
from elevgw.cluster.redis_calls import RedisCalls, Script
from elevgw.presence.interfaces import Holder, IPresence

_CLAIM = Script(
    LUA_PRELUDE
    + """
    local now = now_ms()
    local mine = redis.call('ZSCORE', KEYS[3], ARGV[3])
    if not mine or tonumber(mine) <= now then return {'nolease'} end
    local old = redis.call('HGET', KEYS[1], ARGV[1])
    local previous = {'', '', '', '0', ''}
    if old then
        local f = fields(old)
        redis.call('SREM', ARGV[5] .. 'held:' .. f[2], ARGV[1])
        local expiry = redis.call('ZSCORE', KEYS[3], f[2])
        local alive = (expiry and tonumber(expiry) > now) and '1' or '0'
        local renewed = redis.call('HGET', ARGV[5] .. 'node:' .. f[2], 'renewed') or ''
        previous = {f[1], f[2], f[3], alive, renewed}
    end
    local epoch = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
    redis.call('HSET', KEYS[1], ARGV[1],
        table.concat({ARGV[2], ARGV[3], ARGV[4], ms(epoch), ms(now)}, '\\t'))
    redis.call('SADD', ARGV[5] .. 'held:' .. ARGV[3], ARGV[1])
    return {'ok', ms(epoch), ms(now), previous[1], previous[2], previous[3], previous[4],
            previous[5]}
    """
)

# Re-publishing after Redis lost its data: an entry is written only where none is, or where
# this instance's own is; a device another node claimed meanwhile is returned (kick it here).
_ASSERT = Script(
    LUA_PRELUDE
    + """
    local taken = {}
    local held = ARGV[3] .. 'held:' .. ARGV[2]
    for i = 4, #ARGV, 3 do
        local device = ARGV[i]
        local old = redis.call('HGET', KEYS[1], device)
        if old and fields(old)[2] ~= ARGV[2] then
            taken[#taken + 1] = device
        else
            local epoch = redis.call('HINCRBY', KEYS[2], device, 1)
            redis.call('HSET', KEYS[1], device,
                table.concat({ARGV[1], ARGV[2], ARGV[i + 1], ms(epoch), ARGV[i + 2]}, '\\t'))
            redis.call('SADD', held, device)
        end
    end
    return taken
    """
)

# An entry already gone, with the device's epoch still the one this session claimed and the
# claiming instance's lease alive, was deleted by this very release (a retry after a reply
# that was lost): nobody else claimed the device, and no reaper ran (its lease lives).
_RELEASE = Script(
    LUA_PRELUDE
    + """
    local now = now_ms()
    local out = {}
    for i = 2, #ARGV, 4 do
        local device, session, epoch, instance = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
        local old = redis.call('HGET', KEYS[1], device)
        local f = old and fields(old)
        if f and f[3] == session then
            redis.call('HDEL', KEYS[1], device)
            redis.call('SREM', ARGV[1] .. 'held:' .. f[2], device)
            out[#out + 1] = 1
        elseif not f and epoch ~= '' and redis.call('HGET', KEYS[2], device) == epoch then
            local expiry = redis.call('ZSCORE', KEYS[3], instance)
            out[#out + 1] = (expiry and tonumber(expiry) > now) and 1 or 0
        else
            out[#out + 1] = 0
        end
    end
    return out
    """
)

_LOCATE = Script(
    LUA_PRELUDE
    + """
    local now = now_ms()
    local alive = {}
    local out = {}
    local values = redis.call('HMGET', KEYS[1], unpack(ARGV))
    for i, value in ipairs(values) do
        if value then
            local instance = fields(value)[2]
            if alive[instance] == nil then
                local expiry = redis.call('ZSCORE', KEYS[2], instance)
                alive[instance] = expiry ~= false and tonumber(expiry) > now
            end
            out[i] = alive[instance] and value or ''
        else
            out[i] = ''
        end
    end
    return out
    """
)

_LOCATE_ALL = Script(
    LUA_PRELUDE
    + """
    local now = now_ms()
    local alive = {}
    for _, instance in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ms(now), '+inf')) do
        alive[instance] = true
    end
    local out = {}
    local all = redis.call('HGETALL', KEYS[1])
    for i = 1, #all, 2 do
        if alive[fields(all[i + 1])[2]] then
            out[#out + 1] = all[i]
            out[#out + 1] = all[i + 1]
        end
    end
    return out
    """
)


class LeaseLost(Exception):
    """This node holds no live lease, so it may not hold devices (it is fenced or starting)."""


@attrs.frozen
class Placement:
    """A presence entry: where a device is held. ``connected_ms`` is Redis's epoch ms."""

    node_id: str
    instance: str
    session_id: str
    epoch: int
    connected_ms: int

    @classmethod
    def parse(cls, value: str) -> Placement:
        node_id, instance, session_id, epoch, connected_ms = value.split("\t")
        return cls(node_id, instance, session_id, int(epoch), int(connected_ms))


@attrs.frozen
class Claimed:
    """The result of a claim: this session's epoch and instance, Redis's time, and who held
    the device before."""

    epoch: int
    instance: str
    now_ms: int
    previous_node: str | None
    previous_instance: str | None
    previous_session: str | None
    previous_alive: bool
    previous_renewed_ms: int | None


@implementer(IPresence)
class RedisPresence:
    """Presence read and written in Redis.

    ``registry`` is this node's session registry, used to fill in ``last_active`` for the
    devices this node holds; ``instance`` is a callable giving this node's current instance.
    ``route_disconnect(device_id, placement, reason, close_code)`` ends a session held by another node
    (through its inbox) and fires with whether it had one.
    """

    def __init__(
        self,
        redis: RedisCalls,
        keys: ClusterKeys,
        registry: Any,
        node_id: str,
        instance: Any,
        route_disconnect: Any = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._registry = registry
        self._node_id = node_id
        self._instance = instance
        self._route_disconnect = route_disconnect

    # -- writes

    def claim(self, device_id: str, session_id: str) -> Deferred:
        """Make ``session_id`` the device's one session; fires with ``Claimed``.

        Fails with ``LeaseLost`` when this node holds no live lease.
        """
        keys = self._keys
        instance = self._instance()
        d = self._redis.script(
            _CLAIM,
            [keys.presence, keys.epochs, keys.leases],
            [device_id, self._node_id, instance, session_id, keys.base],
        )

        def claimed(reply: list) -> Claimed:
            if reply[0] != "ok":
                raise LeaseLost(f"{instance} holds no live lease")
            _, epoch, now, node, old_instance, old_session, alive, renewed = reply
            return Claimed(
                epoch=int(epoch),
                instance=instance,
                now_ms=int(now),
                previous_node=node or None,
                previous_instance=old_instance or None,
                previous_session=old_session or None,
                previous_alive=alive == "1",
                previous_renewed_ms=int(renewed) if renewed else None,
            )

        return d.addCallback(claimed)

    def release(self, sessions: list[tuple[str, str, Claimed | None]]) -> Deferred:
        """Compare-and-delete ``(device_id, session_id, claimed)``; fires with one bool each:
        whether the entry was that session's (and is gone now).

        With the session's ``Claimed`` (its epoch and instance) a release is idempotent: one
        repeated because Redis ran it but its answer was lost says ``True`` again, so the
        offline event is not lost to a timeout.
        """
        if not sessions:
            return succeed([])
        args: list[Any] = [self._keys.base]
        for device_id, session_id, claimed in sessions:
            if claimed is None:
                args += [device_id, session_id, "", ""]
            else:
                args += [device_id, session_id, str(claimed.epoch), claimed.instance]
        keys = [self._keys.presence, self._keys.epochs, self._keys.leases]
        d = self._redis.script(_RELEASE, keys, args)
        return d.addCallback(lambda reply: [bool(x) for x in reply])

    def reassert(self, instance: str, sessions: Iterable[Any]) -> Deferred:
        """Write this node's sessions back (Redis lost them); fires with the device ids that
        another node holds now."""
        args: list[Any] = [self._node_id, instance, self._keys.base]
        for session in sessions:
            args += [session.device_id, session.session_id, int(session.connected_at * 1000)]
        if len(args) == 3:
            return succeed([])
        return self._redis.script(_ASSERT, [self._keys.presence, self._keys.epochs], args)

    # -- reads

    def locate(self, device_ids: list[str]) -> Deferred:
        """Fires with ``{device_id: Placement}`` for those held under a live lease."""
        if not device_ids:
            return succeed({})
        d = self._redis.script(_LOCATE, [self._keys.presence, self._keys.leases], device_ids)

        def found(values: list) -> dict[str, Placement]:
            return {
                device_id: Placement.parse(value)
                for device_id, value in zip(device_ids, values, strict=True)
                if value
            }

        return d.addCallback(found)

    def locate_all(self) -> Deferred:
        """Fires with ``{device_id: Placement}`` for every device held in the cluster."""
        d = self._redis.script(_LOCATE_ALL, [self._keys.presence, self._keys.leases], [])

        def found(flat: list) -> dict[str, Placement]:
            return {flat[i]: Placement.parse(flat[i + 1]) for i in range(0, len(flat), 2)}

        return d.addCallback(found)

    def _holder(self, device_id: str, placement: Placement) -> Holder:
        last_active = None
        session = self._registry.get(device_id)
        if session is not None and session.session_id == placement.session_id:
            last_active = session.last_active
        return Holder(
            placement.node_id, placement.session_id, placement.connected_ms / 1000, last_active
        )

    # IPresence

    def holder(self, device_id: str) -> Deferred:
        def found(placements: dict) -> Holder | None:
            placement = placements.get(device_id)
            return None if placement is None else self._holder(device_id, placement)

        return self.locate([device_id]).addCallback(found)

    def holders(self, device_ids: Iterable[str]) -> Deferred:
        ids = list(device_ids)
        # Listing the whole fleet: one HGETALL beats an HMGET of 15,000 names.
        d = self.locate_all() if len(ids) > 1000 else self.locate(ids)

        def found(placements: dict) -> dict[str, Holder]:
            wanted = set(ids)
            return {
                device_id: self._holder(device_id, placement)
                for device_id, placement in placements.items()
                if device_id in wanted
            }

        return d.addCallback(found)

    def count(self) -> Deferred:
        return self.locate_all().addCallback(len)

    def disconnect(self, device_id: str, reason: str, close_code: int) -> Deferred:
        if self._registry.end_device(device_id, reason, close_code):
            return succeed(True)

        def found(placements: dict) -> Any:
            placement = placements.get(device_id)
            if placement is None:
                return False
            if placement.instance == self._instance() or self._route_disconnect is None:
                return False
            return self._route_disconnect(device_id, placement, reason, close_code)

        return self.locate([device_id]).addCallback(found)
