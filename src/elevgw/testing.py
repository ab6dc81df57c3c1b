"""Fakes for unit tests, ours and those of anyone who builds on elevgw.

Each fake provides the same interface as the real part, keeps what it was given where a test
can look, and answers at once (plain Deferreds that have already fired), so a test runs on a
``twisted.internet.task.Clock`` with no reactor, thread or socket.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from elevgw.events.model import DeviceStatus, IEventSink
from elevgw.snapshots.interfaces import (
    IMAGE_TYPES,
    ISnapshotStore,
    StoredSnapshot,
    snapshot_key,
    sniff_image_type,
)
from elevgw.stores.interfaces import (
    EXPIRED,
    QUEUED,
    SENT,
    SUPERSEDED,
    CommandRecord,
    Delivery,
    Device,
    ICommandQueue,
    IDeviceStore,
    LogEntry,
    QueueFull,
    StoreUnavailable,
    fold_query,
    position_of,
)


@implementer(IEventSink)
class RecordingSink:
    """An event sink that keeps every event it is given, in order."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def emit(self, event: Any) -> None:
        self.events.append(event)

    def drain(self, timeout: float) -> Deferred:
        return succeed(True)

    def stop(self) -> Deferred:
        return succeed(None)

    def statuses(self) -> list[tuple[str, str, str]]:
        """``(device_id, status, reason)`` of every status event so far."""
        return [
            (e.device_id, e.status, e.reason) for e in self.events if isinstance(e, DeviceStatus)
        ]


class FakeConnection:
    """What a session talks to: records the frames sent, how it was closed, and whether the
    gateway paused reading it (``reading``; ``pauses`` counts the pauses)."""

    def __init__(self, fail_on_close: bool = False) -> None:
        self.sent: list[bytes] = []
        self.closed_with: tuple[int, str] | None = None
        self.fail_on_close = fail_on_close
        self.reading = True
        self.pauses = 0

    def pause_reading(self) -> None:
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        self.reading = True

    def send_frame(self, data: bytes) -> None:
        self.sent.append(data)

    def close(self, code: int, reason: str) -> None:
        if self.fail_on_close:
            raise RuntimeError("transport already gone")
        self.closed_with = (code, reason)


@implementer(IDeviceStore)
class MemoryDeviceStore:
    """A device store in a dict. Set ``available = False`` to make every call fail with
    ``StoreUnavailable``, as a store whose backend is down does."""

    name = "memory"

    def __init__(self) -> None:
        self.devices: dict[str, Device] = {}
        self.logs: dict[str, list[LogEntry]] = {}
        self.available = True

    def _answer(self, value: Any = None) -> Deferred:
        if not self.available:
            return fail(StoreUnavailable("memory store switched off"))
        return succeed(value)

    def start(self) -> Deferred:
        return self._answer()

    def stop(self) -> Deferred:
        return succeed(None)

    def ping(self) -> Deferred:
        return self._answer()

    def add_device(self, device: Device) -> Deferred:
        if self.available:
            self.devices[device.device_id] = device
        return self._answer()

    def get_device(self, device_id: str) -> Deferred:
        return self._answer(self.devices.get(device_id))

    def list_devices(self) -> Deferred:
        devices = sorted(self.devices.values(), key=lambda d: (d.created, d.device_id))
        return self._answer(devices)

    def page_devices(self, after: Any, limit: int, query: str | None = None) -> Deferred:
        folded = fold_query(query or "")
        matches = [
            d
            for d in sorted(self.devices.values(), key=position_of)
            if (after is None or position_of(d) > tuple(after))
            and (folded in fold_query(d.device_id) or folded in fold_query(d.location))
        ]
        page = matches[:limit]
        return self._answer((page, position_of(page[-1]) if len(matches) > limit else None))

    def delete_device(self, device_id: str) -> Deferred:
        if not self.available:
            return self._answer()
        return self._answer(self.devices.pop(device_id, None) is not None)

    def set_token_hash(self, device_id: str, token_hash: str) -> Deferred:
        device = self.devices.get(device_id)
        if device is None or not self.available:
            return self._answer(False)
        self.devices[device_id] = Device(
            device.device_id, device.location, token_hash, device.created, device.last_seen
        )
        return self._answer(True)

    def record_last_seen(self, seen: dict) -> Deferred:
        if self.available:
            for device_id, when in seen.items():
                device = self.devices.get(device_id)
                if device is not None:
                    self.devices[device_id] = Device(
                        device.device_id, device.location, device.token_hash, device.created, when
                    )
        return self._answer()

    def append_log(self, device_id: str, entry: LogEntry) -> Deferred:
        if self.available:
            self.logs.setdefault(device_id, []).append(entry)
        return self._answer()

    def get_logs(self, device_id: str, limit: int, before: int | None = None) -> Deferred:
        entries = [e for e in self.logs.get(device_id, []) if before is None or e.ts < before]
        return self._answer(sorted(entries, key=lambda e: -e.ts)[:limit])


@implementer(ISnapshotStore)
class MemorySnapshotStore:
    """Snapshots kept in a dict under ``http://snapshots.test/<key>`` URLs."""

    name = "memory"

    def __init__(self) -> None:
        self.images: dict[str, bytes] = {}

    def start(self) -> Deferred:
        return succeed(None)

    def stop(self) -> Deferred:
        return succeed(None)

    def put(self, device_id: str, data: bytes, taken_at_ms: int) -> Deferred:
        extension = sniff_image_type(data)
        if extension is None:
            raise ValueError("not a PNG, JPEG or WebP image")
        key = snapshot_key(device_id, taken_at_ms, extension)
        self.images[key] = data
        return succeed(
            StoredSnapshot(
                device_id=device_id,
                key=key,
                url="http://snapshots.test/" + key,
                content_type=IMAGE_TYPES[extension],
                size=len(data),
                taken_at=taken_at_ms,
            )
        )


@implementer(ICommandQueue)
class MemoryCommandQueue:
    """``ICommandQueue`` in a dict; every Deferred has fired when a method returns.

    Set ``unavailable`` to make every call fail with ``StoreUnavailable``; ``calls`` counts
    calls by method name.
    """

    def __init__(self, history: int = 100) -> None:
        self.history = history
        self.unavailable = False
        self.calls: dict[str, int] = {}
        self._records: dict[str, CommandRecord] = {}  # in the order they were stored

    def _call(self, name: str, result: Any) -> Deferred:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.unavailable:
            return fail(StoreUnavailable("memory queue set unavailable"))
        return succeed(result)

    def _of(self, device_id: str) -> list[CommandRecord]:
        return [r for r in self._records.values() if r.device_id == device_id]

    def _set(self, record: CommandRecord) -> CommandRecord:
        self._records[record.id] = record
        return record

    def _trim(self, device_id: str) -> None:
        kept = [r for r in self._of(device_id) if not r.pending]
        for record in kept[: max(0, len(kept) - self.history)]:
            del self._records[record.id]

    def start(self) -> Deferred:
        return succeed(None)

    def stop(self) -> Deferred:
        return succeed(None)

    def add(self, record: CommandRecord, max_pending: int) -> Deferred:
        if self.unavailable:
            return self._call("add", None)
        superseded = [
            r
            for r in self._of(record.device_id)
            if record.collapse_key is not None
            and r.state == QUEUED
            and r.collapse_key == record.collapse_key
        ]
        pending = sum(r.pending for r in self._of(record.device_id))
        if record.pending and pending - len(superseded) >= max_pending:
            self.calls["add"] = self.calls.get("add", 0) + 1
            return fail(QueueFull(record.device_id))
        superseded = [
            self._set(attrs.evolve(r, state=SUPERSEDED, updated=record.created))
            for r in superseded
        ]
        self._set(record)
        self._trim(record.device_id)
        return self._call("add", superseded)

    def record(self, records: list[CommandRecord]) -> Deferred:
        if not self.unavailable:
            for record in records:
                if record.id not in self._records:
                    self._set(record)
            for device_id in {r.device_id for r in records}:
                self._trim(device_id)
        return self._call("record", None)

    def take(self, device_ids: list[str], now: int, resend: bool) -> Deferred:
        taken: dict[str, Delivery] = {}
        if not self.unavailable:
            for device_id in dict.fromkeys(device_ids):
                delivery = Delivery([], [])
                for record in [r for r in self._of(device_id) if r.pending]:
                    assert record.expires is not None
                    if record.expires <= now:
                        delivery.expired.append(
                            self._set(attrs.evolve(record, state=EXPIRED, updated=now))
                        )
                    elif record.state == QUEUED:
                        delivery.send.append(
                            self._set(attrs.evolve(record, state=SENT, updated=now))
                        )
                    elif resend:
                        delivery.send.append(record)
                if delivery.expired:
                    self._trim(device_id)
                if delivery.send or delivery.expired:
                    taken[device_id] = delivery
        return self._call("take", taken)

    def _finish_now(
        self, device_id: str, command_id: str, state: str, result: Any, now: int
    ) -> tuple[CommandRecord | None, bool]:
        record = self._records.get(command_id)
        if record is None or record.device_id != device_id:
            return None, False
        if record.finished or self.unavailable:
            return record, False
        record = self._set(attrs.evolve(record, state=state, result=result, updated=now))
        return record, True

    def finish(
        self, device_id: str, command_id: str, state: str, result: Any, now: int
    ) -> Deferred:
        return self._call("finish", self._finish_now(device_id, command_id, state, result, now))

    def finish_many(self, steps: list[tuple[str, str, str, Any]], now: int) -> Deferred:
        return self._call("finish_many", [self._finish_now(*step, now) for step in steps])

    def expire_due(self, now: int, limit: int) -> Deferred:
        expired: list[CommandRecord] = []
        if not self.unavailable:
            due = sorted(
                (r for r in self._records.values() if r.pending and r.expires <= now),  # type: ignore[operator]
                key=lambda r: r.expires,  # type: ignore[arg-type,return-value]
            )[:limit]
            expired = [self._set(attrs.evolve(r, state=EXPIRED, updated=now)) for r in due]
            for device_id in {r.device_id for r in expired}:
                self._trim(device_id)
        return self._call("expire_due", expired)

    def get(self, device_id: str, command_id: str) -> Deferred:
        record = self._records.get(command_id)
        return self._call("get", record if record and record.device_id == device_id else None)

    def recent(self, device_id: str, limit: int) -> Deferred:
        return self._call("recent", self._of(device_id)[-limit:])

    def depth(self) -> Deferred:
        return self._call("depth", sum(r.pending for r in self._records.values()))
