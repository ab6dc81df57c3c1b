"""The event log: every event the gateway sends the backend, kept in the store for replay.

``EventLog`` is the ``IEventSink`` the gateway emits to when the log is on; it stands in front
of the webhook sink. ``emit(event)``:

1. hands the event to the observers (the health tracker) at once;
2. queues a record of it for the store. Records queued in one reactor turn go to the store as
   one append (one transaction on SQLite, one script call on Redis); while one append is being
   written the next batch gathers, so a connect storm costs one store round trip per batch,
   never one per device;
3. forwards the event to the next sink as a ``LoggedEvent`` carrying its cursor, strictly in
   emit order, as soon as the append answers. If the append fails, or has not answered within
   ``forward_after`` seconds, the event goes on with ``cursor = None``: a slow or dead store
   delays webhooks by at most that long and never makes a device wait. (The entry may still
   land later; it is then in the log without its webhook having named it.)

The log also serves reads (``read``, for ``GET /api/v1/events``) and live subscriptions
(``subscribe``, for the Server-Sent Events stream), and trims itself by age and count every
``trim_interval`` seconds.
"""

from __future__ import annotations

import itertools
import re
import secrets
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from elevgw.events.model import DeviceStatus, IEventSink, LoggedEvent, SnapshotReady
from elevgw.stores.interfaces import (
    EventPage,
    EventRecord,
    IEventLog,
    StoreUnavailable,
)

#: The ``type`` of each event class in the log (and the ``type`` filter's values).
EVENT_TYPES: dict[type, str] = {DeviceStatus: "status", SnapshotReady: "snapshot"}

#: Most entries one read (``GET /api/v1/events``) returns.
MAX_READ = 1000

_OWN_FIELDS = ("device_id", "ts", "event_id")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


def event_type(event: Any) -> str:
    """The log ``type`` of an event: from ``EVENT_TYPES``, else the first word of its class
    name in lower case (``CommandEvent``, ``CommandFinished`` -> ``command``)."""
    known = EVENT_TYPES.get(type(event))
    if known is not None:
        return known
    match = _FIRST_WORD.match(type(event).__name__)
    return (match[0] if match else type(event).__name__).lower()


_FIRST_WORD = re.compile(r"[A-Z]?[a-z0-9]+")


def _body_fields(cls: type) -> tuple[tuple[str, bool], ...]:
    """``(name, optional)`` of the attributes of an attrs event class that make its log
    body, cached per class. An optional one (default ``None``, like a takeover's
    ``previous_node``) is left out while it is ``None``, as the webhook leaves it out."""
    fields = _BODY_FIELDS.get(cls)
    if fields is None:
        fields = _BODY_FIELDS[cls] = tuple(
            (field.name, field.default is None)
            for field in attrs.fields(cls)
            if field.name not in _OWN_FIELDS
        )
    return fields


_BODY_FIELDS: dict[type, tuple[tuple[str, bool], ...]] = {}


def event_record(event: Any, event_id: str) -> EventRecord:
    """The log record of an event: its attributes (the webhook body but ``seq``) as the body.

    Runs once per lifecycle event on the reactor thread (15,000 times in a reconnect storm),
    so an attrs event's body is read field by field from a cached list of names.
    """
    cls = type(event)
    if attrs.has(cls):
        body = {}
        for name, optional in _body_fields(cls):
            value = getattr(event, name)
            if value is not None or not optional:
                body[name] = value
    else:
        body = {k: v for k, v in vars(event).items() if k not in _OWN_FIELDS}
    return EventRecord(
        type=event_type(event),
        device_id=event.device_id,
        ts=int(event.ts),
        event_id=event_id,
        body=body,
    )


class EventIds:
    """Event ids: 32 hex digits, a random per-process prefix and a counter.

    As unique as ``uuid4`` for this purpose (64 random bits tell processes apart, the counter
    tells events apart) at a tenth of the cost: no system call per event.
    """

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._count = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count):016x}"


def record_json(record: EventRecord) -> dict:
    """An entry as the API shows it: ``cursor``, ``type``, ``device_id``, ``ts``, ``event_id``
    and the webhook body's own fields."""
    entry = dict(record.body)
    entry.update(
        cursor=record.cursor,
        type=record.type,
        device_id=record.device_id,
        ts=record.ts,
        event_id=record.event_id,
    )
    return entry


class EventLogMetrics:
    """What the event log exports in ``/metrics`` (on the gateway's registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        appends = Counter(
            "elevgw_event_log_appends",
            "Events by what happened to their log entry: stored, failed (store error), late "
            "(webhook sent without a cursor after --event-log-wait), dropped (too many pending).",
            ["outcome"],
            registry=registry,
        )
        self.appends = {o: appends.labels(o) for o in ("stored", "failed", "late", "dropped")}
        self.append_seconds = Histogram(
            "elevgw_event_log_append_seconds",
            "Time to append one batch of events to the log.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "elevgw_event_log_batch_size",
            "Events per append to the log (one batch per reactor turn).",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.entries = Gauge(
            "elevgw_event_log_entries",
            "Entries in the event log after the last trim.",
            registry=registry,
        )
        reads = Counter(
            "elevgw_event_log_reads",
            "Event log reads: replay (GET /api/v1/events) and stream (SSE catch-up pages).",
            ["kind"],
            registry=registry,
        )
        self.reads = {k: reads.labels(k) for k in ("replay", "stream")}
        self.stream_clients = Gauge(
            "elevgw_event_stream_clients",
            "Clients connected to /api/v1/events/stream.",
            registry=registry,
        )
        self.stream_dropped = Counter(
            "elevgw_event_stream_dropped",
            "Stream clients dropped because they did not read fast enough.",
            registry=registry,
        )


@attrs.define(eq=False)
class _Pending:
    """An emitted event on its way: appended (or not) to the log, then forwarded."""

    event: Any
    record: EventRecord
    done: bool = False
    cursor: str | None = None


@implementer(IEventSink)
class EventLog(Service):
    """The event log service and the sink in front of ``forward``.

    :param log: the store's ``IEventLog``.
    :param clock: ``IReactorTime``; its ``seconds()`` is epoch seconds (trimming by age).
    :param forward: the sink events go on to (webhooks), as ``LoggedEvent``.
    :param observers: callables that get every event at once, before it is logged.
    :param max_age: seconds an entry is kept; ``max_entries``: entries kept at most.
    :param forward_after: seconds a webhook waits for its entry's cursor at most.
    :param max_pending: events waiting for the store at most; more are forwarded at once
        without an entry (counted as dropped).
    :param poll_interval: seconds between reads of entries other nodes appended, while
        someone follows the live stream.
    """

    log = Logger()

    def __init__(
        self,
        log: IEventLog,
        clock: Any,
        forward: IEventSink,
        *,
        observers: Iterable[Callable[[Any], object]] = (),
        max_age: float = 7 * 86400.0,
        max_entries: int = 1_000_000,
        trim_interval: float = 60.0,
        forward_after: float = 2.0,
        max_pending: int = 100_000,
        poll_interval: float = 1.0,
        metrics: EventLogMetrics | None = None,
    ) -> None:
        for name, value in [
            ("max_age", max_age),
            ("max_entries", max_entries),
            ("trim_interval", trim_interval),
            ("forward_after", forward_after),
            ("max_pending", max_pending),
            ("poll_interval", poll_interval),
        ]:
            if value <= 0:
                raise ValueError(f"{name} must be positive, not {value!r}")
        self.store = log
        self.clock = clock
        self.forward = forward
        self.observers = list(observers)
        self.max_age = max_age
        self.max_entries = max_entries
        self.forward_after = forward_after
        self.max_pending = max_pending
        self.poll_interval = poll_interval
        self.metrics = metrics if metrics is not None else EventLogMetrics()

        self._new_id = EventIds()
        self._order: deque[_Pending] = deque()  # emitted, not yet forwarded, in emit order
        self._batch: list[_Pending] = []  # waiting for the next append
        self._flush_call: Any = None
        self._writing: Deferred | None = None
        self._failing = 0  # appends failed in a row (logged when it starts and ends)
        self._drain_waiters: list[Deferred] = []

        self._trimmer = task.LoopingCall(self._trim)
        self._trimmer.clock = clock
        self.trim_interval = trim_interval

        # Live stream: one reader of the store (the tail) feeds every subscription.
        self._live: set[Subscription] = set()
        self._tail: str | None = None
        self._pulling: Deferred | None = None
        self._pull_again = False
        self._poller = task.LoopingCall(self._pull)
        self._poller.clock = clock

    # Service

    def startService(self) -> None:
        super().startService()
        started = self.store.start()

        def trim_from_now_on(_: Any) -> None:
            if self.running:
                self._trimmer.start(self.trim_interval, now=True).addErrback(
                    lambda f: self.log.failure("event log trimming stopped", f)
                )

        def start_failed(failure: Failure) -> None:
            if failure.check(StoreUnavailable):  # expected trouble: one line, no traceback
                self.log.error(
                    "the event log could not start: {error}", error=failure.getErrorMessage()
                )
            else:
                self.log.failure("starting the event log failed", failure)

        started.addCallbacks(trim_from_now_on, start_failed)

    def stopService(self) -> Deferred:
        super().stopService()
        if self._trimmer.running:
            self._trimmer.stop()
        for subscription in list(self._live):
            subscription.close("stopped")
        if self._poller.running:
            self._poller.stop()
        return succeed(None)

    # IEventSink

    def emit(self, event: Any) -> None:
        """Log and forward ``event``; returns at once and never raises."""
        for observer in self.observers:
            try:
                observer(event)
            except Exception:
                self.log.failure("event observer failed on {event!r}", event=event)
        try:
            event_id = getattr(event, "event_id", None) or self._new_id()
            pending = _Pending(event, event_record(event, event_id))
        except Exception:
            self.log.failure("event {event!r} cannot be logged; forwarded as is", event=event)
            self.forward.emit(event)
            return
        self._order.append(pending)
        if len(self._batch) >= self.max_pending:
            self.metrics.appends["dropped"].inc()
            pending.done = True
            self._forward_ready()
            return
        self._batch.append(pending)
        if self._flush_call is None and self._writing is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def drain(self, timeout: float) -> Deferred:
        """Fire with ``True`` once every emitted event is logged and the next sink drained
        too, or ``False`` after ``timeout`` seconds."""
        deadline = self.clock.seconds() + timeout
        waited: Deferred = Deferred()
        if self._order:
            self._drain_waiters.append(waited)
            waited.addTimeout(timeout, self.clock, onTimeoutCancel=lambda result, timeout: False)
        else:
            waited.callback(True)

        def forward_drained(logged: bool) -> Deferred:
            remaining = max(0.0, deadline - self.clock.seconds())
            d = self.forward.drain(remaining)
            return d.addCallback(lambda delivered: bool(logged and delivered))

        return waited.addCallback(forward_drained)

    def stop(self) -> Deferred:
        return self.forward.stop()

    # Appending

    def _flush(self) -> None:
        self._flush_call = None
        if not self._batch or self._writing is not None:
            return
        batch, self._batch = self._batch, []
        started = self.clock.seconds()
        self.metrics.batch_size.observe(len(batch))
        give_up = self.clock.callLater(self.forward_after, self._late, batch)
        writing = self.store.append([pending.record for pending in batch])
        self._writing = writing

        def appended(cursors: list[str]) -> None:
            self.metrics.append_seconds.observe(self.clock.seconds() - started)
            self.metrics.appends["stored"].inc(len(batch))
            if self._failing:
                self.log.info(
                    "event log: appending works again after {count} failed batches",
                    count=self._failing,
                )
                self._failing = 0
            for pending, cursor in zip(batch, cursors, strict=True):
                if not pending.done:
                    pending.done = True
                    pending.cursor = cursor
            self._wake_tail()

        def failed(failure: Failure) -> None:
            self.metrics.appends["failed"].inc(len(batch))
            if not self._failing:
                self.log.warn(
                    "event log: {count} events not logged ({error}); their webhooks go "
                    "without a cursor until the store answers again",
                    count=len(batch),
                    error=failure.getErrorMessage(),
                )
            self._failing += 1
            for pending in batch:
                pending.done = True

        def finished(_: Any) -> None:
            if give_up.active():
                give_up.cancel()
            self._writing = None
            self._forward_ready()
            if self._batch and self._flush_call is None:
                self._flush_call = self.clock.callLater(0, self._flush)

        writing.addCallbacks(appended, failed).addBoth(finished).addErrback(
            lambda f: self.log.failure("event log bookkeeping failed", f)
        )

    def _late(self, batch: list[_Pending]) -> None:
        """The store has not answered in ``forward_after`` seconds: let the webhooks go."""
        late = [pending for pending in batch if not pending.done]
        for pending in late:
            pending.done = True
        if late:
            self.metrics.appends["late"].inc(len(late))
            self.log.warn(
                "event log: the store has not stored {count} events after {seconds} s; "
                "their webhooks go without a cursor",
                count=len(late),
                seconds=self.forward_after,
            )
            self._forward_ready()

    def _forward_ready(self) -> None:
        order = self._order
        while order and order[0].done:
            pending = order.popleft()
            self.forward.emit(LoggedEvent(pending.event, pending.cursor, pending.record.event_id))
        if not order and self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(True)

    # Reading

    def read(
        self,
        after: str | None,
        limit: int,
        device_id: str | None = None,
        type: str | None = None,
        kind: str = "replay",
    ) -> Deferred:
        """An ``EventPage`` of up to ``min(limit, MAX_READ)`` entries after ``after``.

        Fails with ``BadCursor`` for a cursor this log cannot have made and with
        ``ValueError`` for a limit below 1.
        """
        if limit < 1:
            return fail(ValueError(f"limit must be at least 1, not {limit}"))
        self.metrics.reads[kind].inc()
        return self.store.read(after, min(limit, MAX_READ), device_id, type)

    def _trim(self) -> Deferred:
        d = self.store.trim(self.max_age, self.max_entries, self.clock.seconds())
        d.addCallback(self.metrics.entries.set)
        d.addErrback(
            lambda f: self.log.warn(
                "event log: trimming failed: {error}", error=f.getErrorMessage()
            )
        )
        return d

    # Live subscriptions

    def subscribe(
        self,
        write: Callable[[list[EventRecord]], object],
        close: Callable[[str], object],
        after: str | None = None,
        device_id: str | None = None,
        type: str | None = None,
        max_buffered: int = 10_000,
        page_size: int = 500,
        start: bool = True,
    ) -> Subscription:
        """Follow the log: ``write(records)`` gets every entry after ``after`` (``None``: from
        now on), oldest first, then every new one as it is appended on any node.

        ``write`` is not called while the subscription is paused (the client's socket is
        full); a subscription with more than ``max_buffered`` entries waiting is closed
        (``close("dropped")`` is called) instead of buffering without bound. Catching up reads
        ``page_size`` entries at a time, the next page only once the last was written. With
        ``start=False`` the caller calls ``start()`` once it can take writes. Raises
        ``BadCursor`` for a bad ``after``.
        """
        if after is not None:
            self.store.parse_cursor(after)
        subscription = Subscription(
            self, write, close, after, device_id, type, max_buffered, page_size
        )
        if start:
            subscription.start()
        return subscription

    def _join(self, subscription: Subscription) -> bool:
        """Add a caught-up subscription to the live set, if nothing it has not seen was
        already handed out (else it must read on first)."""
        position = subscription.position
        assert position is not None
        if self._tail is None:
            self._tail = position
        elif self.store.parse_cursor(position) < self.store.parse_cursor(self._tail):
            return False
        self._live.add(subscription)
        self.metrics.stream_clients.set(len(self._live))
        if not self._poller.running:
            self._poller.start(self.poll_interval, now=False).addErrback(
                lambda f: self.log.failure("event stream polling stopped", f)
            )
        return True

    def _leave(self, subscription: Subscription) -> None:
        self._live.discard(subscription)
        self.metrics.stream_clients.set(len(self._live))
        if not self._live:
            self._tail = None
            if self._poller.running:
                self._poller.stop()

    def _wake_tail(self) -> None:
        if self._live:
            self._pull()

    def _pull(self) -> None:
        """Read what was appended after the tail (here or on another node) and hand it to
        every live subscription; one read however many subscriptions there are."""
        if self._pulling is not None:
            self._pull_again = True
            return
        if not self._live or self._tail is None:
            return
        self._pull_again = False
        reading = self.store.read(self._tail, MAX_READ)
        self._pulling = reading

        def got(page: EventPage) -> None:
            if self._tail is None:
                return  # everyone left meanwhile
            self._tail = page.next
            for subscription in list(self._live):
                subscription.offer(page.records)
            if len(page.records) >= MAX_READ:
                self._pull_again = True

        def failed(failure: Failure) -> None:
            self.log.debug(
                "event stream: reading the log failed: {error}", error=failure.getErrorMessage()
            )

        def done(_: Any) -> None:
            self._pulling = None
            if self._pull_again:
                self._pull()

        reading.addCallbacks(got, failed).addBoth(done).addErrback(
            lambda f: self.log.failure("event stream bookkeeping failed", f)
        )


class Subscription:
    """One follower of the live log (an SSE client): catches up from its cursor with reads
    of its own, then joins the shared tail. See ``EventLog.subscribe``."""

    def __init__(
        self,
        events: EventLog,
        write: Callable[[list[EventRecord]], object],
        close: Callable[[str], object],
        after: str | None,
        device_id: str | None,
        type: str | None,
        max_buffered: int,
        page_size: int = 500,
    ) -> None:
        self._events = events
        self.page_size = page_size
        self._write = write
        self._close = close
        self.position = after  # the last entry examined
        self.device_id = device_id
        self.type = type
        self.max_buffered = max_buffered
        self.paused = False
        self.closed = False
        self.live = False
        self._buffer: deque[EventRecord] = deque()
        self._catching_up = False

    def start(self) -> None:
        if self.position is None:
            d = self._events.store.last_cursor()

            def here(cursor: str) -> None:
                self.position = cursor
                self._catch_up()

            d.addCallbacks(here, self._failed)
        else:
            self._catch_up()

    def _catch_up(self) -> None:
        if self.closed or self.live:
            return
        if self.paused:
            self._catching_up = True  # resumed by resume()
            return
        self._catching_up = False
        assert self.position is not None
        d = self._events.read(
            self.position, self.page_size, self.device_id, self.type, kind="stream"
        )

        def got(page: EventPage) -> None:
            if self.closed:
                return
            self.position = page.next
            self._deliver(page.records)
            if len(page.records) < self.page_size and self._events._join(self):
                self.live = True
            else:
                self._catch_up()

        d.addCallbacks(got, self._failed)

    def _failed(self, failure: Failure) -> None:
        self._events.log.warn(
            "event stream: reading the log failed ({error}); closing the stream",
            error=failure.getErrorMessage(),
        )
        self.close("failed")

    def offer(self, records: list[EventRecord]) -> None:
        """New entries from the tail; those already seen or not matching are skipped."""
        if self.closed:
            return
        parse = self._events.store.parse_cursor
        assert self.position is not None
        seen = parse(self.position)
        fresh = []
        for record in records:
            assert record.cursor is not None
            if parse(record.cursor) <= seen:
                continue
            self.position = record.cursor
            if (self.device_id is None or record.device_id == self.device_id) and (
                self.type is None or record.type == self.type
            ):
                fresh.append(record)
        self._deliver(fresh)

    def _deliver(self, records: list[EventRecord]) -> None:
        if not records:
            return
        if self.paused or self._buffer:
            self._buffer.extend(records)
            if len(self._buffer) > self.max_buffered:
                self._events.metrics.stream_dropped.inc()
                self._events.log.warn(
                    "event stream: a client fell {count} entries behind; dropped",
                    count=len(self._buffer),
                )
                self.close("dropped")
            return
        self._send(records)

    def _send(self, records: list[EventRecord]) -> None:
        try:
            self._write(records)
        except Exception:
            self._events.log.failure("event stream: writing to a client failed")
            self.close("failed")

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        if self._buffer:
            records = list(self._buffer)
            self._buffer.clear()
            self._send(records)
        if self._catching_up:
            self._catch_up()

    def close(self, reason: str = "closed") -> None:
        """End the subscription (idempotent); calls ``close(reason)`` once. ``reason`` is
        ``dropped`` (fell behind), ``failed`` (the log or the writer failed), ``stopped``
        (the gateway stops) or what the caller says."""
        if self.closed:
            return
        self.closed = True
        self._buffer.clear()
        self._events._leave(self)
        try:
            self._close(reason)
        except Exception:
            self._events.log.failure("event stream: closing a client failed")


@implementer(IEventSink)
class ObservingSink:
    """The sink when the event log is off: observers see each event, then ``forward`` does."""

    log = Logger()

    def __init__(self, forward: IEventSink, observers: Iterable[Callable[[Any], object]]) -> None:
        self.forward = forward
        self.observers = list(observers)

    def emit(self, event: Any) -> None:
        for observer in self.observers:
            try:
                observer(event)
            except Exception:
                self.log.failure("event observer failed on {event!r}", event=event)
        self.forward.emit(event)

    def drain(self, timeout: float) -> Deferred:
        return self.forward.drain(timeout)

    def stop(self) -> Deferred:
        return self.forward.stop()
