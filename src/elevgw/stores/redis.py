"""The production device store: Redis through txredisapi, shared by every node of a cluster.

The key layout is a public interface (the backend may read the log streams directly); it is
described in ``docs/redis.rst`` and must not change without a migration note:

- ``{prefix}device:{id}``: hash with ``location``, ``token_hash``, ``created`` and, once the
  device has been seen, ``last_seen`` (epoch milliseconds as whole-number text; epoch seconds
  with a decimal point in data written before 0.1.0, still read);
- ``{prefix}devices``: sorted set of device ids scored by ``created`` (the same unit);
- ``{prefix}log:{id}``: stream of the device's logs, fields ``ts`` (epoch milliseconds) and
  ``payload`` (JSON text), entry ids ``<ts>-<n>``, capped with ``MAXLEN ~ log_maxlen``.

Failures: every call fails with ``StoreUnavailable`` at once while there is no connection (a
call made while ``start()`` still waits for the first one waits with it), and
after ``timeout`` seconds when Redis does not answer (the connection is then dropped, since
nothing more is expected on it). txredisapi reconnects in the background with a capped backoff,
so the same store works again once Redis is back. One connection carries every command, so
Redis runs them in the order the store's methods were called.

Importing this module imports txredisapi, which installs the global reactor: import it only once
the reactor is chosen (the service maker does so lazily, when the store is ``redis://``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from elevgw.stores.interfaces import (
    Device,
    DevicePosition,
    IDeviceStore,
    LogEntry,
    fold_query,
)
from elevgw.stores.redis_connection import RedisConnection, Script
from elevgw.util import dumps_json

log = Logger()


_Script = Script


_ADD_DEVICE = _Script(
    """
    if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
    redis.call('HSET', KEYS[1], 'location', ARGV[2], 'token_hash', ARGV[3], 'created', ARGV[4])
    if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'last_seen', ARGV[5]) end
    redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
    return 1
    """
)

# Reading every hash in the script keeps the listing one consistent round trip; it touches
# keys not passed in KEYS, which standalone and Sentinel Redis allow (Redis Cluster would not).
_LIST_DEVICES = _Script(
    """
    local out = {}
    for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
        local f = redis.call('HMGET', ARGV[1] .. id, 'location', 'token_hash', 'created',
                             'last_seen')
        if f[1] then
            out[#out + 1] = id
            for i = 1, 4 do out[#out + 1] = f[i] end
        end
    end
    return out
    """
)

# A page of the listing in ``(created, device_id)`` order, which is the sorted set's own order
# (equal scores sort by member). It examines at most ARGV[6] members, so a search that matches
# little never holds Redis for long; it then answers a short page and where it stopped.
# ARGV: key prefix, after score ('' for the start), after id, limit, folded query, budget.
# The after device's own score wins while it exists (the set may hold seconds written by an
# older version); the score given is for a device deleted since.
# Answer: next score, next id ('' when nothing is left), then five fields per device.
_PAGE_DEVICES = _Script(
    """
    local prefix, after_score, after_id = ARGV[1], ARGV[2], ARGV[3]
    local limit, query, budget = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
    if after_score ~= '' then
        after_score = redis.call('ZSCORE', KEYS[1], after_id) or after_score
    end
    local min, after = '-inf', nil
    if after_score ~= '' then min, after = after_score, tonumber(after_score) end
    local out, found, scanned, offset = {'', ''}, 0, 0, 0
    local last_id, last_score, found_id, found_score = nil, nil, nil, nil
    while true do
        local batch = redis.call('ZRANGEBYSCORE', KEYS[1], min, '+inf', 'WITHSCORES',
                                 'LIMIT', offset, 100)
        if #batch == 0 then return out end
        offset = offset + #batch / 2
        for i = 1, #batch, 2 do
            local id, score = batch[i], batch[i + 1]
            if after == nil or tonumber(score) > after or id > after_id then
                if scanned == budget then
                    out[1], out[2] = last_score, last_id
                    return out
                end
                scanned = scanned + 1
                last_id, last_score = id, score
                local f = redis.call('HMGET', prefix .. id, 'location', 'token_hash', 'created',
                                     'last_seen')
                if f[1] and (query == '' or string.find(string.lower(id), query, 1, true)
                             or string.find(string.lower(f[1]), query, 1, true)) then
                    if found == limit then
                        out[1], out[2] = found_score, found_id
                        return out
                    end
                    found, found_id, found_score = found + 1, id, score
                    out[#out + 1] = id
                    for j = 1, 4 do out[#out + 1] = f[j] end
                end
            end
        end
    end
    """
)

_DELETE_DEVICE = _Script(
    """
    redis.call('ZREM', KEYS[2], ARGV[1])
    return redis.call('DEL', KEYS[1])
    """
)

_SET_TOKEN_HASH = _Script(
    """
    if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
    redis.call('HSET', KEYS[1], 'token_hash', ARGV[1])
    return 1
    """
)

# The time is written as the caller's text, not through Lua's tostring, which keeps only 14
# significant digits. A ``last_seen`` still in seconds (written before 0.1.0) is always below a
# time in milliseconds, so the first record after an upgrade replaces it.
_RECORD_LAST_SEEN = _Script(
    """
    for i, key in ipairs(KEYS) do
        if redis.call('EXISTS', key) == 1 then
            local current = redis.call('HGET', key, 'last_seen')
            if not current or tonumber(ARGV[i]) > tonumber(current) then
                redis.call('HSET', key, 'last_seen', ARGV[i])
            end
        end
    end
    return 0
    """
)

# Entry ids are "<ts>-<n>" so a reader can XRANGE by time. Redis < 7 cannot generate "<ts>-*"
# and no version accepts an id below the stream's last one, so the script picks the id itself:
# a ts at or below the last id's time (a clock step back, another node's skew) is raised to it,
# and the stored ts always equals the id's time, keeping the stream ordered by ts.
_APPEND_LOG = _Script(
    """
    local ms, seq, last = ARGV[1], 0, '0-0'
    if redis.call('EXISTS', KEYS[1]) == 1 then
        local info = redis.call('XINFO', 'STREAM', KEYS[1])
        for i = 1, #info, 2 do
            if info[i] == 'last-generated-id' then last = info[i + 1] end
        end
    end
    local dash = string.find(last, '-', 1, true)
    local last_ms = string.sub(last, 1, dash - 1)
    if tonumber(ms) <= tonumber(last_ms) then
        ms = last_ms
        seq = tonumber(string.sub(last, dash + 1)) + 1
    end
    local id = ms .. '-' .. string.format('%d', seq)
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], id, 'ts', ms, 'payload', ARGV[2])
    return id
    """
)


def _ms_text(seconds: float) -> str:
    """A time as Redis holds it: epoch milliseconds, whole-number text, as every time a
    user sees is (``ts`` of the log streams, the API's fields)."""
    return str(round(seconds * 1000))


def _seconds(text: str) -> float:
    """A stored time as the epoch seconds of ``Device``.

    Earlier versions wrote epoch seconds as ``repr(float)``, which always has a ``.`` or an
    exponent; milliseconds are whole numbers. So both read back right, and a device's
    ``last_seen`` turns into milliseconds the next time the gateway records it.
    """
    if "." in text or "e" in text or "E" in text:
        return float(text)
    return int(text) / 1000


def _pairs(flat: Sequence[Any]) -> dict:
    items = iter(flat)
    return dict(zip(items, items, strict=True))


def _device(device_id: str, location, token_hash, created, last_seen) -> Device:
    return Device(
        device_id=device_id,
        location=location,
        token_hash=token_hash,
        created=_seconds(created),
        last_seen=_seconds(last_seen) if last_seen else None,
    )


def _log_entry(entry: Sequence[Any]) -> LogEntry:
    fields = _pairs(entry[1])
    return LogEntry(ts=int(fields["ts"]), payload=json.loads(fields["payload"]))


@implementer(IDeviceStore)
class RedisStore:
    """``IDeviceStore`` on Redis.

    ``url`` is ``redis://[[user]:password@]host[:port][/db]`` (a bad one raises ``ValueError``
    here, before anything connects); ``prefix`` starts every key, so several gateways can share
    one database; ``log_maxlen`` caps each device's log stream (approximately: Redis trims whole
    stream nodes); ``timeout`` (seconds) bounds connecting and every call.

    ``start()`` fires once connected, or after ``timeout`` with a logged warning if Redis cannot
    be reached: the gateway then runs and answers 503 until Redis is back. It fails only when
    Redis refuses the configuration (wrong password, bad database number), which no retry fixes.

    ``connection``: a ``RedisConnection`` shared with other parts (the cluster, the event log),
    started and stopped by its owner; without one the store makes and owns its own.
    """

    name = "redis"

    reconnect_max_delay = RedisConnection.reconnect_max_delay

    #: Most devices one ``page_devices`` call examines, bounding how long a search holds Redis.
    page_scan_budget = 2000

    def __init__(
        self,
        url: str,
        prefix: str = "elevgw:",
        log_maxlen: int = 10000,
        reactor: Any = None,
        timeout: float = 2.0,
        connection: RedisConnection | None = None,
    ) -> None:
        if log_maxlen < 1:
            raise ValueError(f"log_maxlen must be at least 1, not {log_maxlen}")
        #: Whether ``start``/``stop`` start and stop the connection (else its owner does).
        self.owns_connection = connection is None
        if connection is None:
            connection = RedisConnection(url, reactor, timeout)
        self.connection = connection
        self.address = connection.address
        self.prefix = prefix
        self.log_maxlen = log_maxlen
        self.timeout = connection.timeout

    def device_key(self, device_id: str) -> str:
        return f"{self.prefix}device:{device_id}"

    def devices_key(self) -> str:
        return f"{self.prefix}devices"

    def log_key(self, device_id: str) -> str:
        return f"{self.prefix}log:{device_id}"

    def start(self) -> Deferred:
        """Start the store's own connection (a shared one is started by its owner)."""
        if not self.owns_connection:
            return succeed(None)
        return self.connection.start()

    def stop(self) -> Deferred:
        if not self.owns_connection:
            return succeed(None)
        return self.connection.stop()

    def _request(self, send: Callable[[Any], Deferred]) -> Deferred:
        return self.connection.request(send)

    def _command(self, *args) -> Deferred:
        return self.connection.command(*args)

    def _script(self, script: _Script, keys: Sequence[str], args: Sequence[Any]) -> Deferred:
        return self.connection.script(script, keys, args)

    def ping(self) -> Deferred:
        return self._command("PING").addCallback(lambda _: None)

    def add_device(self, device: Device) -> Deferred:
        """Fails with ``ValueError`` if the id exists: a device is never overwritten."""

        def added(created: int) -> None:
            if not created:
                raise ValueError(f"device {device.device_id} already exists")

        d = self._script(
            _ADD_DEVICE,
            [self.device_key(device.device_id), self.devices_key()],
            [
                device.device_id,
                device.location,
                device.token_hash,
                _ms_text(device.created),
                "" if device.last_seen is None else _ms_text(device.last_seen),
            ],
        )
        return d.addCallback(added)

    def get_device(self, device_id: str) -> Deferred:
        def found(reply) -> Device | None:
            fields = _pairs(reply)
            if not fields:
                return None
            return _device(
                device_id,
                fields["location"],
                fields["token_hash"],
                fields["created"],
                fields.get("last_seen"),
            )

        return self._command("HGETALL", self.device_key(device_id)).addCallback(found)

    def list_devices(self) -> Deferred:
        def devices(reply) -> list[Device]:
            return [_device(*reply[i : i + 5]) for i in range(0, len(reply), 5)]

        d = self._script(_LIST_DEVICES, [self.devices_key()], [self.prefix + "device:"])
        return d.addCallback(devices)

    def page_devices(
        self, after: DevicePosition | None, limit: int, query: str | None = None
    ) -> Deferred:
        """Examines at most ``page_scan_budget`` devices per call (see ``IDeviceStore``)."""

        def page(reply) -> tuple[list[Device], DevicePosition | None]:
            next_score, next_id = reply[0], reply[1]
            devices = [_device(*reply[i : i + 5]) for i in range(2, len(reply), 5)]
            return devices, (_seconds(next_score), next_id) if next_id else None

        args = [
            self.prefix + "device:",
            "" if after is None else _ms_text(after[0]),
            "" if after is None else after[1],
            int(limit),
            fold_query(query or ""),
            self.page_scan_budget,
        ]
        return self._script(_PAGE_DEVICES, [self.devices_key()], args).addCallback(page)

    def delete_device(self, device_id: str) -> Deferred:
        d = self._script(
            _DELETE_DEVICE, [self.device_key(device_id), self.devices_key()], [device_id]
        )
        return d.addCallback(bool)

    def set_token_hash(self, device_id: str, token_hash: str) -> Deferred:
        d = self._script(_SET_TOKEN_HASH, [self.device_key(device_id)], [token_hash])
        return d.addCallback(bool)

    def record_last_seen(self, seen: dict) -> Deferred:
        if not seen:
            return succeed(None)
        keys = [self.device_key(device_id) for device_id in seen]
        times = [_ms_text(when) for when in seen.values()]
        return self._script(_RECORD_LAST_SEEN, keys, times).addCallback(lambda _: None)

    def append_log(self, device_id: str, entry: LogEntry) -> Deferred:
        """Fires once Redis has the entry; durability beyond that is Redis's persistence."""
        if entry.ts < 0:
            return fail(ValueError(f"log time must not be negative, not {entry.ts}"))
        payload = dumps_json(entry.payload).decode("utf-8")
        d = self._script(
            _APPEND_LOG, [self.log_key(device_id)], [int(entry.ts), payload, self.log_maxlen]
        )
        return d.addCallback(lambda _: None)

    def get_logs(self, device_id: str, limit: int, before: int | None = None) -> Deferred:
        if limit < 1 or (before is not None and before <= 0):
            return succeed([])
        # An id given as bare milliseconds ends the range at the last entry of that millisecond.
        end = "+" if before is None else str(int(before) - 1)
        d = self._command("XREVRANGE", self.log_key(device_id), end, "-", "COUNT", int(limit))
        return d.addCallback(lambda entries: [_log_entry(entry) for entry in entries])
