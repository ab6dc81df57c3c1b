"""The embedded device store: one SQLite file through ``twisted.enterprise.adbapi``.

One connection on adbapi's thread pool serialises writes (SQLite has one writer anyway) and
keeps every ``sqlite3`` call off the reactor thread. WAL mode lets the file be copied for
backups while the gateway runs.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from elevgw.stores.interfaces import (
    Device,
    DevicePosition,
    IDeviceStore,
    LogEntry,
    StoreUnavailable,
    fold_query,
    position_of,
)
from elevgw.util import dumps_json

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS devices (
        device_id TEXT PRIMARY KEY,
        location TEXT NOT NULL,
        token_hash TEXT NOT NULL,
        created REAL NOT NULL,
        last_seen REAL
    )""",
    """CREATE TABLE IF NOT EXISTS logs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT NOT NULL,
        ts INTEGER NOT NULL,
        payload TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS logs_by_device ON logs (device_id, ts DESC, id DESC)",
    "CREATE INDEX IF NOT EXISTS devices_in_order ON devices (created, device_id)",
]

_DEVICE_COLUMNS = "device_id, location, token_hash, created, last_seen"
_LOOKUP_BATCH = 500  # ids per SELECT … IN (…), under SQLite's limit of 999 parameters


def _open_connection(connection) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA busy_timeout=5000")


def _create_schema(transaction) -> None:
    for statement in SCHEMA:
        transaction.execute(statement)


def _unavailable(failure):
    if failure.check(sqlite3.Error):
        raise StoreUnavailable(f"sqlite: {failure.value}")
    return failure


def _device(row) -> Device:
    return Device(
        device_id=row[0], location=row[1], token_hash=row[2], created=row[3], last_seen=row[4]
    )


@implementer(IDeviceStore)
class SQLiteStore:
    name = "sqlite"

    def __init__(self, path: str, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self._path = path
        self._reactor = reactor
        self._pool: adbapi.ConnectionPool | None = None
        self._lookups: dict[str, list[Deferred]] = {}
        self._lookup_call: Any = None

    @property
    def path(self) -> str:
        return self._path

    def start(self) -> Deferred:
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            self._path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=_open_connection,
        )
        return self._interaction(_create_schema)

    def stop(self) -> Deferred:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        return succeed(None)

    def _query(self, sql: str, *args) -> Deferred:
        if self._pool is None:
            return fail(StoreUnavailable("sqlite store is not started"))
        return self._pool.runQuery(sql, args).addErrback(_unavailable)

    def _interaction(self, function, *args) -> Deferred:
        if self._pool is None:
            return fail(StoreUnavailable("sqlite store is not started"))
        return self._pool.runInteraction(function, *args).addErrback(_unavailable)

    def interaction(self, function, *args) -> Deferred:
        """Run ``function(transaction, *args)`` on the store's connection thread, for parts
        kept in the same file (the event log); driver errors become ``StoreUnavailable``."""
        return self._interaction(function, *args)

    def ping(self) -> Deferred:
        return self._query("SELECT 1").addCallback(lambda _: None)

    def add_device(self, device: Device) -> Deferred:
        return self._interaction(
            lambda txn: txn.execute(
                "INSERT INTO devices (" + _DEVICE_COLUMNS + ") VALUES (?, ?, ?, ?, ?)",
                (
                    device.device_id,
                    device.location,
                    device.token_hash,
                    device.created,
                    device.last_seen,
                ),
            )
        ).addCallback(lambda _: None)

    def get_device(self, device_id: str) -> Deferred:
        """Lookups asked for in one reactor turn share one query and one trip to the SQLite
        thread, so a reconnect storm pays the thread hand-off per batch, not per device."""
        if self._pool is None:
            return fail(StoreUnavailable("sqlite store is not started"))
        d: Deferred = Deferred()
        self._lookups.setdefault(device_id, []).append(d)
        if self._lookup_call is None:
            self._lookup_call = self._reactor.callLater(0, self._look_up_batch)
        return d

    def _look_up_batch(self) -> None:
        self._lookup_call = None
        batch, self._lookups = self._lookups, {}
        ids = list(batch)

        def select(txn) -> dict:
            rows = {}
            for i in range(0, len(ids), _LOOKUP_BATCH):
                chunk = ids[i : i + _LOOKUP_BATCH]
                placeholders = ",".join("?" * len(chunk))
                txn.execute(
                    f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id IN ({placeholders})",
                    chunk,
                )
                for row in txn.fetchall():
                    rows[row[0]] = row
            return rows

        def deliver(rows: dict) -> None:
            for device_id, waiting in batch.items():
                row = rows.get(device_id)
                device = _device(row) if row is not None else None
                for d in waiting:
                    d.callback(device)

        def failed(failure) -> None:
            for waiting in batch.values():
                for d in waiting:
                    d.errback(failure)

        self._interaction(select).addCallbacks(deliver, failed)

    def list_devices(self) -> Deferred:
        d = self._query("SELECT " + _DEVICE_COLUMNS + " FROM devices ORDER BY created, device_id")
        return d.addCallback(lambda rows: [_device(row) for row in rows])

    def page_devices(
        self, after: DevicePosition | None, limit: int, query: str | None = None
    ) -> Deferred:
        """One indexed range query; SQLite scans as far as it needs, so a page is always full
        unless the devices run out."""
        where, args = [], []
        if after is not None:
            where.append("(created, device_id) > (?, ?)")
            args += [after[0], after[1]]
        if query:
            where.append("(instr(lower(device_id), ?) > 0 OR instr(lower(location), ?) > 0)")
            args += [fold_query(query)] * 2
        sql = "SELECT " + _DEVICE_COLUMNS + " FROM devices"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created, device_id LIMIT ?"

        def page(rows) -> tuple[list[Device], DevicePosition | None]:
            devices = [_device(row) for row in rows[:limit]]
            return devices, position_of(devices[-1]) if len(rows) > limit else None

        return self._query(sql, *args, limit + 1).addCallback(page)

    def delete_device(self, device_id: str) -> Deferred:
        def delete(txn) -> bool:
            txn.execute("DELETE FROM devices WHERE device_id = ?", (device_id,))
            return txn.rowcount > 0

        return self._interaction(delete)

    def set_token_hash(self, device_id: str, token_hash: str) -> Deferred:
        def update(txn) -> bool:
            txn.execute(
                "UPDATE devices SET token_hash = ? WHERE device_id = ?", (token_hash, device_id)
            )
            return txn.rowcount > 0

        return self._interaction(update)

    def record_last_seen(self, seen: dict) -> Deferred:
        """One statement for the whole batch, however large.

        A batch is every live session (15,000 on a full node). ``executemany`` would step
        SQLite once per row, taking the GIL back from the reactor thread each time (the
        convoy effect: pongs stalled for seconds); one ``UPDATE … FROM json_each(?)`` lets
        SQLite run the whole batch without the GIL.
        """
        if not seen:
            return succeed(None)

        def update(txn) -> None:
            txn.execute(
                "UPDATE devices SET last_seen = MAX(COALESCE(devices.last_seen, 0), seen.value)"
                " FROM json_each(?) AS seen WHERE devices.device_id = seen.key",
                (json.dumps(seen),),
            )

        return self._interaction(update)

    def append_log(self, device_id: str, entry: LogEntry) -> Deferred:
        payload = dumps_json(entry.payload).decode("utf-8")
        return self._interaction(
            lambda txn: txn.execute(
                "INSERT INTO logs (device_id, ts, payload) VALUES (?, ?, ?)",
                (device_id, entry.ts, payload),
            )
        ).addCallback(lambda _: None)

    def get_logs(self, device_id: str, limit: int, before: int | None = None) -> Deferred:
        if before is None:
            d = self._query(
                "SELECT ts, payload FROM logs WHERE device_id = ?"
                " ORDER BY ts DESC, id DESC LIMIT ?",
                device_id,
                limit,
            )
        else:
            d = self._query(
                "SELECT ts, payload FROM logs WHERE device_id = ? AND ts < ?"
                " ORDER BY ts DESC, id DESC LIMIT ?",
                device_id,
                before,
                limit,
            )
        return d.addCallback(
            lambda rows: [LogEntry(ts=r[0], payload=json.loads(r[1])) for r in rows]
        )
