"""The event log on SQLite: one table in the device store's file, on its connection.

Cursors are the table's ``AUTOINCREMENT`` ids as decimal text: they only grow, and a trimmed
id is never handed out again. Every statement runs on the store's one pool thread, so appends,
reads and trims are serialised with the device store's own work and never touch the reactor
thread.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from elevgw.stores.interfaces import BadCursor, EventPage, EventRecord, IEventLog
from elevgw.stores.sqlite import SQLiteStore
from elevgw.util import dumps_json

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS events (
        cursor INTEGER PRIMARY KEY AUTOINCREMENT,
        type TEXT NOT NULL,
        device_id TEXT NOT NULL,
        ts INTEGER NOT NULL,
        event_id TEXT NOT NULL,
        body TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS events_by_device ON events (device_id, cursor)",
    "CREATE INDEX IF NOT EXISTS events_by_type ON events (type, cursor)",
]

_COLUMNS = "cursor, type, device_id, ts, event_id, body"


def _json_text(value: Any) -> str:
    return dumps_json(value).decode("utf-8")


def _record(row: Any) -> EventRecord:
    return EventRecord(
        cursor=str(row[0]),
        type=row[1],
        device_id=row[2],
        ts=row[3],
        event_id=row[4],
        body=json.loads(row[5]),
    )


@implementer(IEventLog)
class SQLiteEventLog:
    start_cursor = "0"

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store

    def start(self) -> Deferred:
        def create(txn: Any) -> None:
            for statement in SCHEMA:
                txn.execute(statement)

        return self._store.interaction(create)

    def parse_cursor(self, cursor: str) -> int:
        if not isinstance(cursor, str) or not cursor.isdigit() or len(cursor) > 19:
            raise BadCursor(f"not an event-log cursor: {cursor!r}")
        return int(cursor)

    def append(self, records: list[EventRecord]) -> Deferred:
        """One statement for the whole batch: SQLite walks the JSON array without holding
        the GIL (as ``record_last_seen`` does), and the ids of one ``INSERT`` on the only
        writer are consecutive."""
        if not records:
            return succeed([])
        rows = _json_text(
            [[r.type, r.device_id, r.ts, r.event_id, _json_text(r.body)] for r in records]
        )

        def insert(txn: Any) -> list[str]:
            txn.execute(
                "INSERT INTO events (type, device_id, ts, event_id, body)"
                " SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'),"
                " json_extract(value, '$[2]'), json_extract(value, '$[3]'),"
                " json_extract(value, '$[4]') FROM json_each(?) ORDER BY key",
                (rows,),
            )
            last = txn.lastrowid
            return [str(cursor) for cursor in range(last - len(records) + 1, last + 1)]

        return self._store.interaction(insert)

    def read(
        self, after: str | None, limit: int, device_id: str | None = None, type: str | None = None
    ) -> Deferred:
        try:
            start = self.parse_cursor(after) if after is not None else 0
        except BadCursor as e:
            return fail(e)
        where = ["cursor > ?"]
        args: list[Any] = [start]
        if device_id is not None:
            where.append("device_id = ?")
            args.append(device_id)
        if type is not None:
            where.append("type = ?")
            args.append(type)
        sql = f"SELECT {_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY cursor LIMIT ?"

        def select(txn: Any) -> EventPage:
            txn.execute(sql, (*args, max(0, int(limit))))
            records = [_record(row) for row in txn.fetchall()]
            if len(records) >= limit and records:
                return EventPage(records, str(records[-1].cursor))
            # The page is short: every entry up to the newest was examined.
            txn.execute("SELECT max(cursor) FROM events")
            newest = txn.fetchone()[0] or 0
            return EventPage(records, str(max(newest, start)))

        return self._store.interaction(select)

    def last_cursor(self) -> Deferred:
        def select(txn: Any) -> str:
            txn.execute("SELECT max(cursor) FROM events")
            return str(txn.fetchone()[0] or 0)

        return self._store.interaction(select)

    def trim(self, max_age: float, max_entries: int, now: float) -> Deferred:
        """Deletes a prefix of the log (by id), so the entries left stay contiguous and
        their count is the difference of two ids, not a table scan.

        Entries are appended in time order, so the age limit is found by walking from the
        oldest entry to the first young one: the walk costs what is deleted anyway.
        """
        cutoff_ms = int((now - max_age) * 1000)

        def delete(txn: Any) -> int:
            txn.execute("SELECT max(cursor) FROM events")
            newest = txn.fetchone()[0] or 0
            txn.execute(
                "SELECT cursor FROM events WHERE ts >= ? ORDER BY cursor LIMIT 1", (cutoff_ms,)
            )
            young = txn.fetchone()
            too_old = young[0] - 1 if young is not None else newest
            below = max(too_old, newest - max_entries)
            if below > 0:
                txn.execute("DELETE FROM events WHERE cursor <= ?", (below,))
            txn.execute("SELECT min(cursor), max(cursor) FROM events")
            low, high = txn.fetchone()
            return 0 if low is None else high - low + 1

        return self._store.interaction(delete)
