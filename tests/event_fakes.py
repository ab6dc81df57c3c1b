"""An in-memory ``IEventLog`` whose appends a test can hold back or fail, and a sink that
records what reaches it."""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from elevgw.events.model import IEventSink
from elevgw.stores.interfaces import BadCursor, EventPage, IEventLog, StoreUnavailable


@implementer(IEventLog)
class MemoryEventLog:
    """Cursors are decimal ids. ``hold = True`` makes appends wait until ``release()``;
    ``down = True`` makes every call fail with ``StoreUnavailable``."""

    start_cursor = "0"

    def __init__(self) -> None:
        self.records: list = []
        self.appends: list[list] = []  # each append's records, in call order
        self.held: list[tuple[Deferred, list]] = []
        self.hold = False
        self.down = False
        self.reads = 0
        self._next = 0

    def start(self):
        return succeed(None)

    def parse_cursor(self, cursor):
        if not isinstance(cursor, str) or not cursor.isdigit():
            raise BadCursor(cursor)
        return int(cursor)

    def append(self, records):
        self.appends.append(list(records))
        if self.down:
            return fail(StoreUnavailable("down"))
        if self.hold:
            d: Deferred = Deferred()
            self.held.append((d, records))
            return d
        return succeed(self._store(records))

    def _store(self, records):
        cursors = []
        for record in records:
            self._next += 1
            self.records.append(attrs.evolve(record, cursor=str(self._next)))
            cursors.append(str(self._next))
        return cursors

    def release(self):
        held, self.held = self.held, []
        for d, records in held:
            d.callback(self._store(records))

    def read(self, after, limit, device_id=None, type=None):
        self.reads += 1
        if self.down:
            return fail(StoreUnavailable("down"))
        start = self.parse_cursor(after) if after is not None else 0
        out, last = [], start
        for record in self.records:
            key = int(record.cursor)
            if key <= start:
                continue
            last = key
            if (device_id is None or record.device_id == device_id) and (
                type is None or record.type == type
            ):
                out.append(record)
                if len(out) >= limit:
                    break
        return succeed(EventPage(out, str(last)))

    def last_cursor(self):
        return succeed(self.records[-1].cursor if self.records else "0")

    def trim(self, max_age, max_entries, now):
        if self.down:
            return fail(StoreUnavailable("down"))
        self.records = self.records[-max_entries:]
        return succeed(len(self.records))


@implementer(IEventSink)
class RecordingSink:
    def __init__(self) -> None:
        self.events: list = []
        self.drained: list = []

    def emit(self, event):
        self.events.append(event)

    def drain(self, timeout):
        self.drained.append(timeout)
        return succeed(True)

    def stop(self):
        return succeed(None)
