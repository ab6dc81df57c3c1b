"""``ICommandQueue`` on the embedded SQLite store: one ``commands`` table in the same file.

Every method is one ``runInteraction`` on the store's single connection: one transaction on
its thread pool, never on the reactor, and in the order the methods were called.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from elevgw.stores.command_rows import COLUMNS, from_row, json_text, to_row
from elevgw.stores.interfaces import (
    EXPIRED,
    QUEUED,
    SENT,
    SUPERSEDED,
    CommandRecord,
    Delivery,
    ICommandQueue,
    QueueFull,
)
from elevgw.stores.sqlite import SQLiteStore

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS commands (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        device_id TEXT NOT NULL,
        command TEXT NOT NULL,
        data TEXT NOT NULL,
        state TEXT NOT NULL,
        result TEXT NOT NULL,
        created INTEGER NOT NULL,
        updated INTEGER NOT NULL,
        expires INTEGER,
        collapse_key TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS commands_by_device ON commands (device_id, seq)",
    # Pending: given a ttl and not finished. The two partial indexes keep the queue of a
    # device and the expiry scan independent of how much history is kept.
    "CREATE INDEX IF NOT EXISTS commands_pending ON commands (device_id, seq)"
    " WHERE expires IS NOT NULL AND state IN ('queued', 'sent')",
    "CREATE INDEX IF NOT EXISTS commands_expiring ON commands (expires)"
    " WHERE expires IS NOT NULL AND state IN ('queued', 'sent')",
]

_PENDING = "expires IS NOT NULL AND state IN ('queued', 'sent')"
_COLUMNS = ", ".join(COLUMNS)
_CHUNK = 400  # devices per SELECT … IN (…), under SQLite's limit of 999 parameters


@implementer(ICommandQueue)
class SQLiteCommandQueue:
    """The command queue in the SQLite store's file, sharing its connection and thread."""

    def __init__(self, store: SQLiteStore, history: int = 100) -> None:
        if history < 1:
            raise ValueError(f"history must be at least 1, not {history}")
        self._store = store
        self.history = history

    def start(self) -> Deferred:
        def create(txn) -> None:
            for statement in SCHEMA:
                txn.execute(statement)

        return self._store._interaction(create)

    def stop(self) -> Deferred:
        """Nothing of its own to release: the store owns the connection."""
        return succeed(None)

    def _trim(self, txn, device_id: str) -> None:
        """Forget the device's oldest commands that are not pending, past ``history``."""
        txn.execute(
            f"DELETE FROM commands WHERE device_id = ? AND NOT ({_PENDING}) AND seq <= ("
            f"SELECT seq FROM commands WHERE device_id = ? AND NOT ({_PENDING})"
            " ORDER BY seq DESC LIMIT 1 OFFSET ?)",
            (device_id, device_id, self.history),
        )

    def add(self, record: CommandRecord, max_pending: int) -> Deferred:
        def add(txn) -> list[CommandRecord]:
            superseded: list[CommandRecord] = []
            if record.collapse_key is not None:
                txn.execute(
                    f"SELECT {_COLUMNS} FROM commands WHERE device_id = ? AND state = ?"
                    " AND collapse_key = ? ORDER BY seq",
                    (record.device_id, QUEUED, record.collapse_key),
                )
                superseded = [
                    attrs.evolve(from_row(row), state=SUPERSEDED, updated=record.created)
                    for row in txn.fetchall()
                ]
            if record.pending:
                txn.execute(
                    f"SELECT COUNT(*) FROM commands WHERE device_id = ? AND {_PENDING}",
                    (record.device_id,),
                )
                if txn.fetchone()[0] - len(superseded) >= max_pending:
                    raise QueueFull(record.device_id)
            for each in superseded:
                txn.execute(
                    "UPDATE commands SET state = ?, updated = ? WHERE id = ?",
                    (SUPERSEDED, each.updated, each.id),
                )
            txn.execute(
                f"INSERT INTO commands ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                to_row(record),
            )
            self._trim(txn, record.device_id)
            return superseded

        return self._store._interaction(add)

    def record(self, records: list[CommandRecord]) -> Deferred:
        if not records:
            return succeed(None)

        def insert(txn) -> None:
            txn.executemany(
                f"INSERT OR IGNORE INTO commands ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [to_row(record) for record in records],
            )
            for device_id in {record.device_id for record in records}:
                self._trim(txn, device_id)

        return self._store._interaction(insert)

    def take(self, device_ids: list[str], now: int, resend: bool) -> Deferred:
        ids = list(dict.fromkeys(device_ids))

        def take(txn) -> dict[str, Delivery]:
            rows: list = []
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                txn.execute(
                    f"SELECT seq, {_COLUMNS} FROM commands WHERE {_PENDING}"
                    f" AND device_id IN ({','.join('?' * len(chunk))}) ORDER BY seq",
                    chunk,
                )
                rows.extend(txn.fetchall())
            rows.sort(key=lambda row: row[0])
            deliveries: dict[str, Delivery] = {}
            expired, sent = [], []
            for row in rows:
                record = from_row(row[1:])
                delivery = deliveries.get(record.device_id)
                if delivery is None:
                    delivery = deliveries[record.device_id] = Delivery([], [])
                assert record.expires is not None
                if record.expires <= now:
                    record = _changed(record, EXPIRED, now)
                    expired.append(record.id)
                    delivery.expired.append(record)
                elif record.state == QUEUED:
                    record = _changed(record, SENT, now)
                    sent.append(record.id)
                    delivery.send.append(record)
                elif resend:
                    delivery.send.append(record)
            for state, changed in ((EXPIRED, expired), (SENT, sent)):
                txn.executemany(
                    "UPDATE commands SET state = ?, updated = ? WHERE id = ?",
                    [(state, now, command_id) for command_id in changed],
                )
            for device_id, delivery in deliveries.items():
                if delivery.expired:
                    self._trim(txn, device_id)
            return {
                device_id: delivery
                for device_id, delivery in deliveries.items()
                if delivery.send or delivery.expired
            }

        return self._store._interaction(take)

    def finish(
        self, device_id: str, command_id: str, state: str, result: Any, now: int
    ) -> Deferred:
        return self._store._interaction(_finish, device_id, command_id, state, result, now)

    def finish_many(self, steps: list[tuple[str, str, str, Any]], now: int) -> Deferred:
        if not steps:
            return succeed([])

        def finish_all(txn) -> list[tuple[CommandRecord | None, bool]]:
            return [_finish(txn, *step, now) for step in steps]

        return self._store._interaction(finish_all)

    def expire_due(self, now: int, limit: int) -> Deferred:
        def expire(txn) -> list[CommandRecord]:
            txn.execute(
                f"SELECT {_COLUMNS} FROM commands WHERE {_PENDING} AND expires <= ?"
                " ORDER BY expires LIMIT ?",
                (now, limit),
            )
            expired = [_changed(from_row(row), EXPIRED, now) for row in txn.fetchall()]
            txn.executemany(
                "UPDATE commands SET state = ?, updated = ? WHERE id = ?",
                [(EXPIRED, now, record.id) for record in expired],
            )
            for device_id in {record.device_id for record in expired}:
                self._trim(txn, device_id)
            return expired

        return self._store._interaction(expire)

    def get(self, device_id: str, command_id: str) -> Deferred:
        d = self._store._query(
            f"SELECT {_COLUMNS} FROM commands WHERE id = ? AND device_id = ?",
            command_id,
            device_id,
        )
        return d.addCallback(lambda rows: from_row(rows[0]) if rows else None)

    def recent(self, device_id: str, limit: int) -> Deferred:
        d = self._store._query(
            f"SELECT {_COLUMNS} FROM commands WHERE device_id = ? ORDER BY seq DESC LIMIT ?",
            device_id,
            limit,
        )
        return d.addCallback(lambda rows: [from_row(row) for row in reversed(rows)])

    def depth(self) -> Deferred:
        d = self._store._query(f"SELECT COUNT(*) FROM commands WHERE {_PENDING}")
        return d.addCallback(lambda rows: rows[0][0])


def _changed(record: CommandRecord, state: str, now: int, result: Any = None) -> CommandRecord:
    return attrs.evolve(record, state=state, updated=now, result=result)


def _finish(
    txn, device_id: str, command_id: str, state: str, result: Any, now: int
) -> tuple[CommandRecord | None, bool]:
    txn.execute(
        f"SELECT {_COLUMNS} FROM commands WHERE id = ? AND device_id = ?",
        (command_id, device_id),
    )
    row = txn.fetchone()
    if row is None:
        return None, False
    record = from_row(row)
    if record.finished:
        return record, False
    record = _changed(record, state, now, result)
    txn.execute(
        "UPDATE commands SET state = ?, result = ?, updated = ? WHERE id = ?",
        (state, json_text(result), now, command_id),
    )
    return record, True
