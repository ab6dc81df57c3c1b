"""Webhooks: delivering lifecycle events (``elevgw.events.model``) to the backend over HTTP.

``WebhookSink`` is the ``IEventSink`` used when ``--backend-url`` is set. ``emit`` only builds
the request body and queues it; delivery happens behind it, so a slow or dead backend never
slows a device. The guarantees (docs/webhooks.rst has the long form):

- Per device, events are delivered strictly one after another in emit order: a later event is
  sent only once the earlier one was delivered, rejected or given up. Different devices are
  delivered in parallel, at most ``concurrency`` requests at a time.
- Every body carries ``seq``, which only grows per device, across restarts too, without a
  store round trip: ``seq = max(last seq of the device + 1, now in epoch ms)``. A restart cannot
  reuse a number as long as the wall clock does not step back by more than the time between
  the restarts (and, with several nodes, their clocks are NTP-synchronised).
- Every event has one ``X-Elevgw-Event-Id``, the same on every retry; with a secret, every
  request carries ``X-Elevgw-Signature: sha256=<hex HMAC-SHA256 of the body bytes>``.
- Connection errors, timeouts, 5xx, 408 and 429 are retried with exponential backoff and full
  jitter for at most ``retry_for`` seconds from the event's first attempt; other statuses
  outside 2xx are rejections and are not retried.
- The queue is bounded (``max_queued`` events, in flight included). When it is full, the sink
  drops the oldest event of the device with the longest queue, never the event being sent and
  never the newest status of that device while a snapshot or command event can go instead.

Outcomes are logged with ``twisted.logger`` and counted in ``WebhookSink.stats``; nothing
raises to the caller.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections import deque
from collections.abc import Callable
from random import random as uniform_random
from typing import Any

import attrs
from hyperlink import URL
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from zope.interface import implementer

from elevgw import __version__
from elevgw.events.model import (
    CommandFinished,
    DeviceStatus,
    IEventSink,
    LoggedEvent,
    SnapshotReady,
)
from elevgw.util import clock_ms, dumps_json

STATUS_PATH = "/api/device/status"
SNAPSHOT_PATH = "/api/v1/devices/remote/snapshot/callback"
COMMAND_PATH = "/api/device/command"

EVENT_ID_HEADER = "X-Elevgw-Event-Id"
SIGNATURE_HEADER = "X-Elevgw-Signature"

# Outcomes passed to ``on_delivery`` and logged; the keys of ``WebhookSink.stats`` besides
# "dropped".
DELIVERED = "delivered"  # 2xx
RETRIED = "retried"  # a transient failure; another attempt is scheduled
FAILED = "failed"  # a transient failure, and the retry time is used up: given up
REJECTED = "rejected"  # the backend answered with a status that is not retried (4xx)
DROPPED = "dropped"  # never sent: queue full, sink stopped, or not an event

# 4xx statuses that say "try again later" rather than "this request is wrong".
RETRIED_CLIENT_ERRORS = frozenset({408, 429})

# Response bodies are read (so the connection can be reused) but not kept; a body longer than
# this closes the connection instead.
MAX_RESPONSE_BODY = 64 * 1024

_STATUS = "status"
_SNAPSHOT = "snapshot"
_COMMAND = "command"


def sign(secret: bytes, body: bytes) -> str:
    """The ``X-Elevgw-Signature`` value of ``body``: ``sha256=`` + hex HMAC-SHA256."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


@attrs.define(eq=False)
class _Event:
    """One event as it will go on the wire, with its delivery bookkeeping."""

    device_id: str
    kind: str  # _STATUS | _SNAPSHOT | _COMMAND
    url: str
    body: bytes
    event_id: str
    seq: int
    attempts: int = 0
    first_attempt_at: float | None = None


@attrs.define(eq=False)
class _DeviceQueue:
    """The events of one device not yet finished; ``events[0]`` is the one being delivered."""

    device_id: str
    events: deque[_Event] = attrs.Factory(deque)
    statuses: int = 0  # how many of ``events`` are status events
    timer: Any = None  # IDelayedCall of the backoff
    request: Deferred[Any] | None = None


class _LengthIndex:
    """Which device has the longest queue, kept up to date in O(1) per change.

    Queue lengths change one at a time, so the longest length only ever moves by small
    steps; a full scan of the devices would cost O(devices) on every emit while the queue is
    full, which is exactly when the gateway can least afford it.
    """

    def __init__(self) -> None:
        self._by_length: dict[int, dict[str, None]] = {}
        self._longest = 0

    def update(self, device_id: str, old_length: int, new_length: int) -> None:
        if old_length:
            bucket = self._by_length[old_length]
            del bucket[device_id]
            if not bucket:
                del self._by_length[old_length]
        if new_length:
            self._by_length.setdefault(new_length, {})[device_id] = None
            self._longest = max(self._longest, new_length)
        while self._longest and self._longest not in self._by_length:
            self._longest -= 1

    def longest(self) -> tuple[str, int] | None:
        """The device with the longest queue (the one that got there first) and its length."""
        if not self._longest:
            return None
        return next(iter(self._by_length[self._longest])), self._longest

    def clear(self) -> None:
        self._by_length.clear()
        self._longest = 0


class _DiscardBody(Protocol):
    """Reads a response body to its end and keeps none of it.

    Reading to the end is what returns a persistent connection to the pool. Unlike
    ``treq.content`` it neither buffers the body nor leaves a stalled connection behind:
    cancelling ``finished`` (a timeout) or a body over ``limit`` bytes closes the connection.
    """

    def __init__(self, limit: int) -> None:
        self.received = 0
        self.limit = limit
        self.finished: Deferred[None] = Deferred(lambda _: self._abort())

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self.limit:
            self._abort()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(None)
        else:
            self.finished.errback(reason)

    def _abort(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.loseConnection()


def _retry_after_seconds(values: list[bytes] | None) -> float | None:
    """A ``Retry-After`` header in delta-seconds form; HTTP dates are ignored."""
    if not values:
        return None
    try:
        seconds = float(values[0].strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


class QuietConnectionPool(HTTPConnectionPool):
    """A connection pool whose connections do not log "Starting factory" / "Stopping factory".

    Twisted's HTTP client factory is ``noisy``: two lines per backend connection, which is
    most of what a gateway with webhooks writes in its first minute, and says nothing.
    ``_factory``, the factory class the pool connects with, is a private name;
    ``test_deliveries_write_no_factory_lines`` fails if Twisted renames it.
    """

    _factory = type(  # type: ignore[assignment]
        "QuietHTTP11ClientFactory", (HTTPConnectionPool._factory,), {"noisy": False}
    )


@implementer(IEventSink)
class WebhookSink:
    """Delivers ``DeviceStatus`` and ``SnapshotReady`` events to the backend's webhooks.

    :param backend_url: the backend's base URL (``http://host:port`` or with a path prefix);
        the webhook paths are appended to it.
    :param reactor: ``IReactorTCP`` + ``IReactorTime`` (plus ``IReactorSSL`` for https) on
        which the HTTP connections are made.
    :param clock: ``IReactorTime`` for every timer (request timeouts, backoff, ``drain``) and
        for ``seq``; defaults to ``reactor``. Tests pass a ``task.Clock`` here and a real
        reactor above.
    :param secret: the webhook secret; requests are signed when it is given.
    :param request_timeout: seconds to wait for the response headers, and again for the
        (discarded) response body, before the attempt counts as failed and is retried.
    :param retry_for: seconds after an event's first attempt after which it is given up.
        Time spent waiting behind earlier events of the same device does not count.
    :param initial_backoff: the backoff ceiling after the first failed attempt, in seconds;
        it doubles with every failure up to ``max_backoff``. The delay is drawn uniformly
        between 0 and the ceiling ("full jitter"), or is the ``Retry-After`` of a 429/503
        answer if that is longer (at most ``max_backoff``).
    :param max_queued: how many events may wait or be in flight at once before events are
        dropped (see the module docstring).
    :param concurrency: how many requests may be in flight at once; also the connection
        pool's ``maxPersistentPerHost``.
    :param random: returns a float in [0, 1); the jitter source.
    :param on_delivery: called after every attempt as ``on_delivery(outcome, seconds)``, with
        an outcome of ``DELIVERED``, ``RETRIED``, ``FAILED`` or ``REJECTED`` and the attempt's
        duration by ``clock``. It is called once the sink has acted on the outcome (a retry is
        already scheduled); what it raises is logged and ignored.
    """

    log = Logger()

    def __init__(
        self,
        backend_url: str,
        reactor: Any,
        *,
        clock: Any = None,
        secret: bytes | str | None = None,
        request_timeout: float = 5.0,
        retry_for: float = 300.0,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_queued: int = 100_000,
        concurrency: int = 16,
        random: Callable[[], float] = uniform_random,
        on_delivery: Callable[[str, float], object] | None = None,
    ) -> None:
        base = URL.from_text(backend_url)
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(
                f"backend URL must be http(s)://host[:port][/prefix]: {backend_url!r}"
            )
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        if secret is not None and not secret:
            raise ValueError("the webhook secret is empty (pass None to send unsigned webhooks)")
        for name, value in [
            ("request_timeout", request_timeout),
            ("retry_for", retry_for),
            ("initial_backoff", initial_backoff),
            ("max_backoff", max_backoff),
            ("max_queued", max_queued),
            ("concurrency", concurrency),
        ]:
            if value <= 0:
                raise ValueError(f"{name} must be positive, not {value!r}")

        base_text = backend_url.rstrip("/")
        self._urls = {
            _STATUS: base_text + STATUS_PATH,
            _SNAPSHOT: base_text + SNAPSHOT_PATH,
            _COMMAND: base_text + COMMAND_PATH,
        }
        self._clock: Any = clock if clock is not None else reactor
        self._secret = secret
        self._request_timeout = request_timeout
        self._retry_for = retry_for
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._max_queued = max_queued
        self._concurrency = concurrency
        self._random = random
        self._on_delivery = on_delivery

        self._pool = QuietConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = concurrency
        agent: Any = Agent(reactor, pool=self._pool)
        self._http = HTTPClient(agent)

        self._queues: dict[str, _DeviceQueue] = {}
        # Queues whose head waits for a delivery slot, in turn order. A queue is either here,
        # sending (``request`` set) or backing off (``timer`` set).
        self._ready: deque[_DeviceQueue] = deque()
        self._lengths = _LengthIndex()
        self._last_seq: dict[str, int] = {}
        self._queued = 0
        self._in_flight = 0
        self._drain_waiters: list[Deferred[bool]] = []
        self._stopped = False

        self.stats: dict[str, int] = {
            DELIVERED: 0,
            RETRIED: 0,
            FAILED: 0,
            REJECTED: 0,
            DROPPED: 0,
        }

    @property
    def queued(self) -> int:
        """Events waiting or in flight (for a queue-size gauge)."""
        return self._queued

    @property
    def in_flight(self) -> int:
        """Requests in flight."""
        return self._in_flight

    # IEventSink

    def emit(self, event: DeviceStatus | SnapshotReady | CommandFinished | LoggedEvent) -> None:
        """Queue ``event`` for delivery; returns at once and never raises.

        A ``LoggedEvent`` (from the event log) is sent with its ``cursor`` in the body and its
        ``event_id`` as the event id."""
        try:
            self._enqueue(event)
        except Exception:
            self.stats[DROPPED] += 1
            self.log.failure("webhook event {event!r} could not be queued", event=event)

    def drain(self, timeout: float) -> Deferred[bool]:
        """Fire with ``True`` once every queued event has been delivered, rejected or given
        up, or with ``False`` after ``timeout`` seconds (by ``clock``) or when the sink stops.

        Draining changes nothing about delivery: events in backoff keep their schedule.
        """
        if not self._queued:
            return succeed(True)

        def forget(waiter: Deferred[bool]) -> None:
            if waiter in self._drain_waiters:
                self._drain_waiters.remove(waiter)

        waiter: Deferred[bool] = Deferred(forget)
        self._drain_waiters.append(waiter)
        waiter.addTimeout(timeout, self._clock, onTimeoutCancel=lambda result, timeout: False)
        return waiter

    def stop(self) -> Deferred[None]:
        """Stop delivering and close the connection pool.

        Events still queued are abandoned (counted as dropped), requests in flight are
        cancelled, backoff timers are cancelled, pending ``drain`` calls fire with ``False``,
        and later ``emit`` calls are dropped. Call ``drain`` first to give the queue a grace
        period. Fires once the pool's idle connections are closed.
        """
        if not self._stopped:
            self._stopped = True
            abandoned = self._queued
            for queue in list(self._queues.values()):
                if queue.timer is not None and queue.timer.active():
                    queue.timer.cancel()
                if queue.request is not None:
                    queue.request.cancel()
            self._queues.clear()
            self._ready.clear()
            self._lengths.clear()
            self._queued = 0
            if abandoned:
                self.stats[DROPPED] += abandoned
                self.log.warn(
                    "webhooks stopped with {abandoned} events undelivered",
                    abandoned=abandoned,
                )
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(False)
        return self._pool.closeCachedConnections()

    # Queueing

    def _enqueue(self, event: Any) -> None:
        logged = event if isinstance(event, LoggedEvent) else None
        if isinstance(event, LoggedEvent):
            event = event.event
        if self._stopped:
            self._drop_counted(event.device_id, "sink stopped")
            return
        device_id = event.device_id
        seq = self._next_seq(device_id)
        body: dict[str, Any]
        if isinstance(event, DeviceStatus):
            kind = _STATUS
            body = {
                "device_id": device_id,
                "status": event.status,
                "reason": event.reason,
                "ts": event.ts,
                "seq": seq,
            }
            if event.node is not None:
                body["node"] = event.node
            if event.previous_node is not None:
                body["previous_node"] = event.previous_node
                body["gap_ms"] = event.gap_ms
        elif isinstance(event, SnapshotReady):
            kind = _SNAPSHOT
            body = {
                "device_id": device_id,
                "url": event.url,
                "request_id": event.request_id,
                "ts": event.ts,
                "seq": seq,
            }
        elif isinstance(event, CommandFinished):
            kind = _COMMAND
            body = {
                "device_id": device_id,
                "id": event.id,
                "command": event.command,
                "state": event.state,
                "result": event.result,
                "ts": event.ts,
                "seq": seq,
            }
        else:
            raise TypeError(f"not a webhook event: {event!r}")
        if logged is not None:
            body["cursor"] = logged.cursor
        item = _Event(
            device_id=device_id,
            kind=kind,
            url=self._urls[kind],
            body=dumps_json(body),
            event_id=logged.event_id
            if logged is not None
            else getattr(event, "event_id", None) or uuid.uuid4().hex,
            seq=seq,
        )

        queue = self._queues.get(device_id)
        is_new_queue = queue is None
        if queue is None:
            queue = self._queues[device_id] = _DeviceQueue(device_id)
        queue.events.append(item)
        if kind == _STATUS:
            queue.statuses += 1
        self._lengths.update(device_id, len(queue.events) - 1, len(queue.events))
        self._queued += 1

        if self._queued > self._max_queued:
            self._evict(queue)
        if is_new_queue and queue.events:
            self._ready.append(queue)
            self._pump()

    def _next_seq(self, device_id: str) -> int:
        now_ms = clock_ms(self._clock)
        seq = max(self._last_seq.get(device_id, 0) + 1, now_ms)
        self._last_seq[device_id] = seq
        return seq

    def _evict(self, newest: _DeviceQueue) -> None:
        """Drop one event to get back under ``max_queued``; ``newest`` just got an event.

        The victim is in the longest queue: a device with many pending events is flapping
        or chatty, and its oldest pending events are the ones later ones supersede. The head
        of a queue (possibly in flight) is never dropped, and neither is the newest status
        of the device while a snapshot or command event can go instead. When every queue holds only
        its head, the new event itself is dropped.
        """
        longest = self._lengths.longest()
        if longest is None or longest[1] < 2:
            # Only possible when ``newest`` is a new queue holding just the new event.
            self._remove(newest, 0, "queue full")
            return
        queue = self._queues[longest[0]]
        events = queue.events
        later_statuses = queue.statuses - (events[0].kind == _STATUS)
        if events[1].kind != _STATUS or later_statuses > 1 or len(events) == 2:
            self._remove(queue, 1, "queue full")
        else:
            # events[1] is the device's newest status; all after it are snapshots.
            self._remove(queue, 2, "queue full")

    def _remove(self, queue: _DeviceQueue, index: int, why: str) -> None:
        event = queue.events[index]
        del queue.events[index]
        if event.kind == _STATUS:
            queue.statuses -= 1
        self._lengths.update(queue.device_id, len(queue.events) + 1, len(queue.events))
        self._queued -= 1
        if not queue.events:
            del self._queues[queue.device_id]
        self._drop_counted(queue.device_id, why, event)
        self._check_drained()

    def _drop_counted(self, device_id: str, why: str, event: _Event | None = None) -> None:
        self.stats[DROPPED] += 1
        dropped = self.stats[DROPPED]
        # A full queue drops on every emit; log the first drop and every thousandth.
        if dropped % 1000 == 1:
            self.log.warn(
                "webhook {kind} event {event_id} of device {device_id} dropped ({why}); "
                "{dropped} dropped so far",
                kind=event.kind if event else "new",
                event_id=event.event_id if event else None,
                device_id=device_id,
                why=why,
                dropped=dropped,
            )

    # Delivery

    def _pump(self) -> None:
        while self._in_flight < self._concurrency and self._ready:
            self._send(self._ready.popleft())

    def _send(self, queue: _DeviceQueue) -> None:
        event = queue.events[0]
        event.attempts += 1
        started = self._clock.seconds()
        if event.first_attempt_at is None:
            event.first_attempt_at = started
        self._in_flight += 1

        headers: dict[bytes | str, bytes | str] = {
            "Content-Type": "application/json",
            "User-Agent": f"elevgw/{__version__}",
            EVENT_ID_HEADER: event.event_id,
        }
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, event.body)
        request = maybeDeferred(
            self._http.post,
            event.url,
            data=event.body,
            headers=headers,
            allow_redirects=False,
            unbuffered=True,
            timeout=self._request_timeout,
            reactor=self._clock,
        )
        queue.request = request
        request.addCallback(self._read_response, event)
        request.addBoth(self._attempt_done, queue, event, started)
        request.addErrback(
            lambda failure: self.log.failure(
                "webhook bookkeeping failed for device {device_id}",
                failure,
                device_id=event.device_id,
            )
        )

    def _read_response(self, response: Any, event: _Event) -> Deferred[tuple[int, float | None]]:
        """Fire with the status code and any ``Retry-After`` seconds once the body has been
        read and thrown away.

        The status decides the outcome: a body that fails or stalls after a 2xx still means
        the backend accepted the event.
        """
        code = response.code
        retry_after = _retry_after_seconds(response.headers.getRawHeaders(b"retry-after"))
        reader = _DiscardBody(MAX_RESPONSE_BODY)
        response.deliverBody(reader)
        reader.finished.addTimeout(self._request_timeout, self._clock)

        def body_failed(failure: Failure) -> None:
            self.log.debug(
                "webhook response body of event {event_id} not read: {error}",
                event_id=event.event_id,
                error=failure.getErrorMessage(),
            )

        reader.finished.addErrback(body_failed)
        return reader.finished.addCallback(lambda _: (code, retry_after))

    def _attempt_done(
        self,
        result: tuple[int, float | None] | Failure,
        queue: _DeviceQueue,
        event: _Event,
        started: float,
    ) -> None:
        self._in_flight -= 1
        queue.request = None
        if self._stopped:
            return  # cancelled by stop(); everything is already accounted for
        now = self._clock.seconds()

        if isinstance(result, Failure):
            status: int | None = None
            retry_after = None
            error = f"{type(result.value).__name__}: {result.getErrorMessage()}"
            transient = True
        else:
            status, retry_after = result
            error = None
            transient = status >= 500 or status in RETRIED_CLIENT_ERRORS
        fields = dict(
            device_id=event.device_id,
            event_id=event.event_id,
            seq=event.seq,
            attempt=event.attempts,
            status=status,
            error=error,
        )

        if not transient and status is not None and 200 <= status < 300:
            outcome = DELIVERED
            self.log.debug("webhook {event_id} of device {device_id} delivered", **fields)
        elif not transient:
            outcome = REJECTED
            self.log.error(
                "webhook {event_id} of device {device_id} rejected with HTTP {status}; "
                "not retried",
                **fields,
            )
        else:
            delay = self._backoff(event.attempts, retry_after)
            assert event.first_attempt_at is not None
            if now + delay - event.first_attempt_at > self._retry_for:
                outcome = FAILED
                self.log.error(
                    "webhook {event_id} of device {device_id} given up after {attempt} "
                    "attempts (last: {status} {error})",
                    **fields,
                )
            else:
                outcome = RETRIED
                queue.timer = self._clock.callLater(delay, self._backoff_over, queue)
                self.log.info(
                    "webhook {event_id} of device {device_id} attempt {attempt} failed "
                    "({status} {error}); retrying in {delay:.1f} s",
                    delay=delay,
                    **fields,
                )

        self.stats[outcome] += 1
        if outcome != RETRIED:
            self._finish_head(queue)
        self._pump()
        self._check_drained()
        if self._on_delivery is not None:
            try:
                self._on_delivery(outcome, now - started)
            except Exception:
                self.log.failure("webhook on_delivery hook failed")

    def _backoff(self, attempts: int, retry_after: float | None) -> float:
        ceiling = min(self._max_backoff, self._initial_backoff * 2 ** min(attempts - 1, 32))
        delay = self._random() * ceiling
        if retry_after is not None:
            delay = max(delay, min(retry_after, self._max_backoff))
        return delay

    def _backoff_over(self, queue: _DeviceQueue) -> None:
        queue.timer = None
        self._ready.append(queue)
        self._pump()

    def _finish_head(self, queue: _DeviceQueue) -> None:
        event = queue.events.popleft()
        if event.kind == _STATUS:
            queue.statuses -= 1
        self._lengths.update(queue.device_id, len(queue.events) + 1, len(queue.events))
        self._queued -= 1
        if queue.events:
            # Back of the line: one device with a long queue must not starve the others.
            self._ready.append(queue)
        else:
            del self._queues[queue.device_id]

    def _check_drained(self) -> None:
        if self._queued or not self._drain_waiters:
            return
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            waiter.callback(True)
