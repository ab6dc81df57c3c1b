"""``ICommandQueue`` on the Redis store, sharing its connection: one Lua script per step.

Keys (under the store's prefix), described with the others in ``docs/redis.rst``:

- ``cmd:{command id}``: hash with ``id``, ``device_id``, ``command``, ``data`` and ``result``
  (JSON text), ``state``, ``created``, ``updated``, ``expires`` (epoch ms, empty without a
  ttl), ``collapse_key`` (empty without one) and ``seq``;
- ``cmdq:{device id}``: sorted set of the device's pending command ids, scored by ``seq``
  (the delivery order);
- ``cmdh:{device id}``: sorted set of its other retained command ids, scored by ``seq``;
- ``cmdexp``: sorted set of every pending command id, scored by ``expires``;
- ``cmdseq``: the counter that numbers commands in the order they were stored.

Scripts reach keys they build from the prefix, as the device listing does; standalone and
Sentinel Redis allow that (Redis Cluster would not).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from elevgw.stores.command_rows import COLUMNS, from_row, json_text, to_row
from elevgw.stores.interfaces import CommandRecord, Delivery, ICommandQueue, QueueFull
from elevgw.stores.redis import RedisStore, _Script

_LIBRARY = """
local FIELDS = {'id', 'device_id', 'command', 'data', 'state', 'result', 'created', 'updated',
                'expires', 'collapse_key'}
local function rec(key) return redis.call('HMGET', key, unpack(FIELDS)) end
local function trim(p, device, history)
    local hkey = p .. 'cmdh:' .. device
    local excess = redis.call('ZCARD', hkey) - history
    if excess > 0 then
        for _, id in ipairs(redis.call('ZRANGE', hkey, 0, excess - 1)) do
            redis.call('DEL', p .. 'cmd:' .. id)
        end
        redis.call('ZREMRANGEBYRANK', hkey, 0, excess - 1)
    end
end
-- Moves a command to a terminal state and out of the queue; returns it (history untrimmed).
local function finish(p, id, device, state, now, result)
    local key = p .. 'cmd:' .. id
    redis.call('HSET', key, 'state', state, 'updated', now)
    if result then redis.call('HSET', key, 'result', result) end
    redis.call('ZREM', p .. 'cmdq:' .. device, id)
    redis.call('ZREM', p .. 'cmdexp', id)
    redis.call('ZADD', p .. 'cmdh:' .. device, redis.call('HGET', key, 'seq'), id)
    return rec(key)
end
"""


def _script(body: str) -> _Script:
    return _Script(_LIBRARY + body)


_ADD = _script(
    """
    local p, max_pending, history = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
    local id, device, state, now = ARGV[4], ARGV[5], ARGV[8], ARGV[11]
    local expires, collapse_key = ARGV[12], ARGV[13]
    local qkey = p .. 'cmdq:' .. device
    if redis.call('EXISTS', p .. 'cmd:' .. id) == 1 then
        return redis.error_reply('command ' .. id .. ' exists')
    end
    local superseded = {}
    if collapse_key ~= '' then
        for _, other in ipairs(redis.call('ZRANGE', qkey, 0, -1)) do
            local f = redis.call('HMGET', p .. 'cmd:' .. other, 'state', 'collapse_key')
            if f[1] == 'queued' and f[2] == collapse_key then
                superseded[#superseded + 1] = other
            end
        end
    end
    local pending = expires ~= '' and (state == 'queued' or state == 'sent')
    if pending and redis.call('ZCARD', qkey) - #superseded >= max_pending then
        return {0}
    end
    local out = {1}
    for _, other in ipairs(superseded) do
        out[#out + 1] = finish(p, other, device, 'superseded', now, false)
    end
    local seq = redis.call('INCR', p .. 'cmdseq')
    redis.call('HSET', p .. 'cmd:' .. id, 'id', id, 'device_id', device, 'command', ARGV[6],
               'data', ARGV[7], 'state', state, 'result', ARGV[9], 'created', ARGV[10],
               'updated', now, 'expires', expires, 'collapse_key', collapse_key, 'seq', seq)
    if pending then
        redis.call('ZADD', qkey, seq, id)
        redis.call('ZADD', p .. 'cmdexp', expires, id)
    else
        redis.call('ZADD', p .. 'cmdh:' .. device, seq, id)
    end
    trim(p, device, history)
    return out
    """
)

_RECORD = _script(
    """
    local p, history = ARGV[1], tonumber(ARGV[2])
    local devices = {}
    for i = 3, #ARGV, 10 do
        local id, device = ARGV[i], ARGV[i + 1]
        local key = p .. 'cmd:' .. id
        if redis.call('EXISTS', key) == 0 then
            local seq = redis.call('INCR', p .. 'cmdseq')
            redis.call('HSET', key, 'id', id, 'device_id', device, 'command', ARGV[i + 2],
                       'data', ARGV[i + 3], 'state', ARGV[i + 4], 'result', ARGV[i + 5],
                       'created', ARGV[i + 6], 'updated', ARGV[i + 7], 'expires', '',
                       'collapse_key', ARGV[i + 9], 'seq', seq)
            redis.call('ZADD', p .. 'cmdh:' .. device, seq, id)
            devices[device] = true
        end
    end
    for device in pairs(devices) do trim(p, device, history) end
    return 0
    """
)

_TAKE = _script(
    """
    local p, now, resend, history = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1', tonumber(ARGV[4])
    local out = {}
    for i = 5, #ARGV do
        local device = ARGV[i]
        local qkey = p .. 'cmdq:' .. device
        local ids = redis.call('ZRANGE', qkey, 0, -1)
        if #ids > 0 then
            local send, expired = {}, {}
            for _, id in ipairs(ids) do
                local key = p .. 'cmd:' .. id
                local f = redis.call('HMGET', key, 'state', 'expires')
                if not f[1] then
                    redis.call('ZREM', qkey, id)
                    redis.call('ZREM', p .. 'cmdexp', id)
                elseif tonumber(f[2]) <= now then
                    expired[#expired + 1] = finish(p, id, device, 'expired', ARGV[2], false)
                elseif f[1] == 'queued' then
                    redis.call('HSET', key, 'state', 'sent', 'updated', ARGV[2])
                    send[#send + 1] = rec(key)
                elseif resend then
                    send[#send + 1] = rec(key)
                end
            end
            if #expired > 0 then trim(p, device, history) end
            if #send > 0 or #expired > 0 then
                out[#out + 1] = device
                out[#out + 1] = send
                out[#out + 1] = expired
            end
        end
    end
    return out
    """
)

_FINISH = _script(
    """
    local p, device, id, state, result, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
    local key = p .. 'cmd:' .. id
    local f = redis.call('HMGET', key, 'device_id', 'state')
    if f[1] ~= device then return {} end
    if f[2] ~= 'queued' and f[2] ~= 'sent' then return {0, rec(key)} end
    return {1, finish(p, id, device, state, now, result)}
    """
)

_FINISH_MANY = _script(
    """
    local p, now = ARGV[1], ARGV[2]
    local out = {}
    for i = 3, #ARGV, 4 do
        local device, id, state, result = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
        local key = p .. 'cmd:' .. id
        local f = redis.call('HMGET', key, 'device_id', 'state')
        if f[1] ~= device then
            out[#out + 1] = {}
        elseif f[2] ~= 'queued' and f[2] ~= 'sent' then
            out[#out + 1] = {0, rec(key)}
        else
            out[#out + 1] = {1, finish(p, id, device, state, now, result)}
        end
    end
    return out
    """
)

_EXPIRE_DUE = _script(
    """
    local p, now, limit, history = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
    local out, devices = {}, {}
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. 'cmdexp', '-inf', now,
                                   'LIMIT', 0, limit)) do
        local f = redis.call('HMGET', p .. 'cmd:' .. id, 'device_id', 'state')
        if f[2] == 'queued' or f[2] == 'sent' then
            out[#out + 1] = finish(p, id, f[1], 'expired', now, false)
            devices[f[1]] = true
        else
            redis.call('ZREM', p .. 'cmdexp', id)
        end
    end
    for device in pairs(devices) do trim(p, device, history) end
    return out
    """
)

_RECENT = _script(
    """
    local p, device, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
    local all = {}
    for _, name in ipairs({'cmdq:', 'cmdh:'}) do
        local entries = redis.call('ZRANGE', p .. name .. device, -limit, -1, 'WITHSCORES')
        for i = 1, #entries, 2 do all[#all + 1] = {tonumber(entries[i + 1]), entries[i]} end
    end
    table.sort(all, function(a, b) return a[1] < b[1] end)
    local out = {}
    for i = math.max(1, #all - limit + 1), #all do
        out[#out + 1] = rec(p .. 'cmd:' .. all[i][2])
    end
    return out
    """
)


def _fields(record: CommandRecord) -> list[Any]:
    return ["" if value is None else value for value in to_row(record)]


@implementer(ICommandQueue)
class RedisCommandQueue:
    """The command queue in the Redis store's database, on its connection."""

    def __init__(self, store: RedisStore, history: int = 100) -> None:
        if history < 1:
            raise ValueError(f"history must be at least 1, not {history}")
        self._store = store
        self.history = history

    @property
    def _prefix(self) -> str:
        return self._store.prefix

    def _run(self, script: _Script, args: Sequence[Any]) -> Deferred:
        """Always ``EVAL``, never ``EVALSHA`` first: a script Redis does not know yet (a new
        server, a restart) would answer ``NOSCRIPT`` and go again behind the calls sent
        meanwhile, so an ack's step could run before the step that stored its command. Redis
        caches the compiled script by its digest either way; the cost is the source's bytes."""
        return self._store._command("EVAL", script.source, 0, self._prefix, *args)

    def start(self) -> Deferred:
        return succeed(None)

    def stop(self) -> Deferred:
        """Nothing of its own to release: the store owns the connection."""
        return succeed(None)

    def add(self, record: CommandRecord, max_pending: int) -> Deferred:
        def added(reply) -> list[CommandRecord]:
            if int(reply[0]) == 0:
                raise QueueFull(record.device_id)
            return [from_row(fields) for fields in reply[1:]]

        fields = _fields(record)
        return self._run(_ADD, [max_pending, self.history, *fields]).addCallback(added)

    def record(self, records: list[CommandRecord]) -> Deferred:
        if not records:
            return succeed(None)
        args: list[Any] = [self.history]
        for record in records:
            args.extend(_fields(record))
        return self._run(_RECORD, args).addCallback(lambda _: None)

    def take(self, device_ids: list[str], now: int, resend: bool) -> Deferred:
        ids = list(dict.fromkeys(device_ids))
        if not ids:
            return succeed({})

        def taken(reply) -> dict[str, Delivery]:
            return {
                reply[i]: Delivery(
                    send=[from_row(fields) for fields in reply[i + 1]],
                    expired=[from_row(fields) for fields in reply[i + 2]],
                )
                for i in range(0, len(reply), 3)
            }

        args = [now, "1" if resend else "0", self.history, *ids]
        return self._run(_TAKE, args).addCallback(taken)

    def finish(
        self, device_id: str, command_id: str, state: str, result: Any, now: int
    ) -> Deferred:
        def finished(reply) -> tuple[CommandRecord | None, bool]:
            if not reply:
                return None, False
            return from_row(reply[1]), bool(int(reply[0]))

        args = [device_id, command_id, state, json_text(result), now]
        return self._run(_FINISH, args).addCallback(finished)

    def finish_many(self, steps: list[tuple[str, str, str, Any]], now: int) -> Deferred:
        if not steps:
            return succeed([])
        args: list[Any] = [now]
        for device_id, command_id, state, result in steps:
            args.extend((device_id, command_id, state, json_text(result)))

        def finished(reply) -> list[tuple[CommandRecord | None, bool]]:
            return [
                (from_row(item[1]), bool(int(item[0]))) if item else (None, False)
                for item in reply
            ]

        return self._run(_FINISH_MANY, args).addCallback(finished)

    def expire_due(self, now: int, limit: int) -> Deferred:
        d = self._run(_EXPIRE_DUE, [now, limit, self.history])
        return d.addCallback(lambda reply: [from_row(fields) for fields in reply])

    def get(self, device_id: str, command_id: str) -> Deferred:
        def found(fields) -> CommandRecord | None:
            if not fields[0] or fields[1] != device_id:
                return None
            return from_row(fields)

        d = self._store._command("HMGET", f"{self._prefix}cmd:{command_id}", *COLUMNS)
        return d.addCallback(found)

    def recent(self, device_id: str, limit: int) -> Deferred:
        d = self._run(_RECENT, [device_id, limit])
        return d.addCallback(lambda reply: [from_row(fields) for fields in reply])

    def depth(self) -> Deferred:
        return self._store._command("ZCARD", f"{self._prefix}cmdexp").addCallback(int)
