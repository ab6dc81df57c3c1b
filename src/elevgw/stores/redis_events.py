"""The event log on Redis: one stream, ``{prefix}events``, shared by every node of a cluster.

Entry ids are the cursors: Redis generates them (``XADD … *``) from its own clock, so they grow
across the whole cluster whichever node appends. Each entry has the fields ``type``,
``device_id``, ``ts`` (epoch milliseconds of the event), ``event_id`` and ``body`` (the rest
of the webhook body as JSON text); the backend may read the stream directly. Every append
caps the stream with ``MAXLEN ~``; ``trim`` (run periodically) cuts it by age with ``MINID``
and to its exact length.

Reads with a ``device_id`` or ``type`` filter walk the stream and filter on this side, at most
``SCAN_LIMIT`` entries per call; the page's ``next`` cursor says how far the walk got.
"""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from elevgw.stores.interfaces import BadCursor, EventPage, EventRecord, IEventLog
from elevgw.stores.redis import RedisStore, _Script
from elevgw.util import dumps_json

#: Most entries one filtered ``read`` examines before it answers with what it found.
SCAN_LIMIT = 10_000
_SCAN_CHUNK = 500

_CURSOR = re.compile(r"\A(\d{1,19})-(\d{1,19})\Z")

# One round trip and one MAXLEN check per batch; the ids come back in append order.
_APPEND = _Script(
    """
    local ids = {}
    for i = 2, #ARGV, 5 do
        ids[#ids + 1] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
            'type', ARGV[i], 'device_id', ARGV[i + 1], 'ts', ARGV[i + 2],
            'event_id', ARGV[i + 3], 'body', ARGV[i + 4])
    end
    return ids
    """
)

_TRIM = _Script(
    """
    redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1])
    redis.call('XTRIM', KEYS[1], 'MAXLEN', ARGV[2])
    return redis.call('XLEN', KEYS[1])
    """
)


def _json_text(value: Any) -> str:
    return dumps_json(value).decode("utf-8")


def _record(entry: Any) -> EventRecord:
    cursor, flat = entry
    items = iter(flat)
    fields = dict(zip(items, items, strict=True))
    return EventRecord(
        cursor=cursor,
        type=fields["type"],
        device_id=fields["device_id"],
        ts=int(fields["ts"]),
        event_id=fields["event_id"],
        body=json.loads(fields["body"]),
    )


@implementer(IEventLog)
class RedisEventLog:
    """``IEventLog`` on the Redis store's connection. ``maxlen`` caps the stream on every
    append (approximately; ``trim`` makes it exact)."""

    start_cursor = "0-0"

    def __init__(self, store: RedisStore, maxlen: int = 1_000_000) -> None:
        if maxlen < 1:
            raise ValueError(f"maxlen must be at least 1, not {maxlen}")
        self._store = store
        self.maxlen = maxlen
        self.key = f"{store.prefix}events"

    def start(self) -> Deferred:
        return succeed(None)  # a stream needs no schema: the first XADD creates it

    def parse_cursor(self, cursor: str) -> tuple[int, int]:
        match = _CURSOR.match(cursor) if isinstance(cursor, str) else None
        if match is None:
            raise BadCursor(f"not an event-log cursor: {cursor!r}")
        return int(match[1]), int(match[2])

    def append(self, records: list[EventRecord]) -> Deferred:
        args: list[Any] = [self.maxlen]
        for r in records:
            args += [r.type, r.device_id, int(r.ts), r.event_id, _json_text(r.body)]
        return self._store._script(_APPEND, [self.key], args).addCallback(list)

    def read(
        self, after: str | None, limit: int, device_id: str | None = None, type: str | None = None
    ) -> Deferred:
        try:
            position = self.parse_cursor(after) if after is not None else (0, 0)
        except BadCursor as e:
            return fail(e)
        return Deferred.fromCoroutine(self._read(position, int(limit), device_id, type))

    async def _read(
        self, position: tuple[int, int], limit: int, device_id: str | None, type: str | None
    ) -> EventPage:
        filtered = device_id is not None or type is not None
        last = f"{position[0]}-{position[1]}"
        records: list[EventRecord] = []
        scanned = 0
        while len(records) < limit:
            chunk = _SCAN_CHUNK if filtered else limit - len(records)
            ms, seq = self.parse_cursor(last)
            entries = await self._store._command(
                "XRANGE", self.key, f"{ms}-{seq + 1}", "+", "COUNT", chunk
            )
            for entry in entries:
                scanned += 1
                last = entry[0]
                record = _record(entry)
                if (device_id is None or record.device_id == device_id) and (
                    type is None or record.type == type
                ):
                    records.append(record)
                    if len(records) >= limit:
                        break
            if len(entries) < chunk or scanned >= SCAN_LIMIT:
                break
        return EventPage(records, last)

    def last_cursor(self) -> Deferred:
        d = self._store._command("XREVRANGE", self.key, "+", "-", "COUNT", 1)
        return d.addCallback(lambda entries: entries[0][0] if entries else self.start_cursor)

    def trim(self, max_age: float, max_entries: int, now: float) -> Deferred:
        cutoff_ms = max(0, int((now - max_age) * 1000))
        return self._store._script(_TRIM, [self.key], [cutoff_ms, int(max_entries)]).addCallback(
            int
        )
