"""Routes of fleet history: the event log (replay and a live Server-Sent Events stream) and
the health of devices and of the fleet.

``GET /api/v1/events`` pages through the log, oldest first; ``GET /api/v1/events/stream``
sends the same entries as Server-Sent Events as they are appended, each with ``id:`` = its
cursor, resuming after ``Last-Event-ID``. ``GET /api/v1/devices/{id}/health`` and
``GET /api/v1/fleet/health`` report what ``elevgw.events.health`` keeps.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from elevgw.events.health import HealthTracker
from elevgw.events.log import MAX_READ, EventLog, Subscription, record_json
from elevgw.north.base import APIBase, app, float_arg, int_arg
from elevgw.north.errors import ApiError, register
from elevgw.stores.interfaces import BadCursor, EventRecord
from elevgw.util import dumps_json, to_ms

#: Seconds between keep-alive comments on an idle event stream (proxies cut idle streams).
KEEPALIVE_INTERVAL = 15.0

#: Entries a stream client may fall behind by before it is dropped.
STREAM_MAX_BUFFERED = 10_000

_MAX_FILTER = 200
_MAX_SILENT_AFTER = 365 * 86400.0

register(BadCursor, lambda e: ApiError(400, "bad_cursor", str(e)))


class EventLogOff(Exception):
    """The event log is switched off on this gateway."""


register(
    EventLogOff,
    lambda e: ApiError(404, "event_log_off", "the event log is off on this gateway (--event-log)"),
)


def _text_arg(request: Any, name: bytes) -> str | None:
    values = request.args.get(name)
    if not values or not values[0]:
        return None
    try:
        text = values[0].decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if not text or len(text) > _MAX_FILTER:
        label = name.decode()
        raise ApiError(
            400, "bad_" + label, f"{label} must be UTF-8 text of at most 200 characters"
        )
    return text


def sse_bytes(records: list[EventRecord]) -> bytes:
    """Entries as Server-Sent Events: ``id:`` the cursor, ``data:`` the entry as one JSON line."""
    return b"".join(
        b"id: %s\ndata: %s\n\n" % (record.cursor.encode("ascii"), dumps_json(record_json(record)))
        for record in records
        if record.cursor is not None
    )


@implementer(IPushProducer)
class _EventStream:
    """One SSE response: a log subscription writing to the request, paused while the
    client's socket is full, with a keep-alive comment when nothing else was written."""

    def __init__(
        self, request: Any, events: EventLog, keepalive: float, max_buffered: int
    ) -> None:
        self.request = request
        self.max_buffered = max_buffered
        self.events = events
        self.finished: Deferred = Deferred(lambda _: self.stop())
        self.subscription: Subscription | None = None
        self._wrote = False
        self._keepalive = task.LoopingCall(self._keep_alive)
        self._keepalive.clock = events.clock
        self._keepalive_interval = keepalive

    def start(self, after: str | None, device_id: str | None, type: str | None) -> None:
        self.subscription = self.events.subscribe(
            self._write,
            self._closed,
            after=after,
            device_id=device_id,
            type=type,
            max_buffered=self.max_buffered,
            start=False,
        )
        self.request.registerProducer(self, True)
        self._keepalive.start(self._keepalive_interval, now=False).addErrback(
            lambda f: self.events.log.failure("event stream keep-alive stopped", f)
        )
        self.subscription.start()

    def _write(self, records: list[EventRecord]) -> None:
        self._wrote = True
        self.request.write(sse_bytes(records))

    def _keep_alive(self) -> None:
        if not self._wrote:
            self.request.write(b": keep-alive\n\n")
        self._wrote = False

    def _closed(self, reason: str) -> None:
        """The subscription ended: a client that fell behind is cut off at once (its socket
        is full, so a graceful close would wait on it); otherwise the response ends."""
        self._stop_keepalive()
        if reason == "dropped":
            transport = getattr(self.request.channel, "transport", None)
            if transport is not None:
                transport.abortConnection()
        elif not self.finished.called:
            self.request.unregisterProducer()
            self.finished.callback(None)

    def _stop_keepalive(self) -> None:
        if self._keepalive.running:
            self._keepalive.stop()

    # IPushProducer: the client's socket buffer is full / drained / gone.

    def pauseProducing(self) -> None:
        if self.subscription is not None:
            self.subscription.pause()

    def resumeProducing(self) -> None:
        if self.subscription is not None:
            self.subscription.resume()

    def stopProducing(self) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop_keepalive()
        if self.subscription is not None:
            self.subscription.close("gone")


class EventRoutes(APIBase):
    #: The event log, or ``None`` when it is off; set by the service.
    event_log: EventLog | None = None
    #: Health per device; set by the service.
    device_health: HealthTracker | None = None
    #: Default of ``GET /api/v1/fleet/health?silent_after=`` (``--silent-after``), seconds.
    silent_after = 86400.0
    keepalive_interval = KEEPALIVE_INTERVAL
    stream_max_buffered = STREAM_MAX_BUFFERED

    def _events(self) -> EventLog:
        if self.event_log is None:
            raise EventLogOff()
        return self.event_log

    @app.route("/api/v1/events", methods=["GET"])
    async def events(self, request: Any) -> bytes:
        self._authorize(request)
        events = self._events()
        after = _text_arg(request, b"after")
        limit = int_arg(request, b"limit", 100, 1, MAX_READ)
        page = await events.read(
            after, limit, _text_arg(request, b"device_id"), _text_arg(request, b"type")
        )
        return self._json(
            request, {"events": [record_json(r) for r in page.records], "next": page.next}
        )

    @app.route("/api/v1/events/stream", methods=["GET"])
    def event_stream(self, request: Any) -> Deferred | bytes:
        """Held open until the client leaves or the gateway stops. Without ``Last-Event-ID``
        (or ``?after=``) the stream starts with the next entry appended."""
        self._authorize(request)
        events = self._events()
        header = (request.getHeader(b"last-event-id") or b"").decode("latin-1").strip()
        after = header or _text_arg(request, b"after")
        if after is not None:
            events.store.parse_cursor(after)
        device_id = _text_arg(request, b"device_id")
        type = _text_arg(request, b"type")
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.write(b"retry: 3000\n\n")
        stream = _EventStream(request, events, self.keepalive_interval, self.stream_max_buffered)
        stream.start(after, device_id, type)
        return stream.finished

    def _tracker(self) -> HealthTracker:
        if self.device_health is None:
            raise ApiError(404, "not_found", "device health is not kept on this gateway")
        return self.device_health

    @app.route("/api/v1/devices/<device_id>/health", methods=["GET"])
    async def device_health_report(self, request: Any, device_id: str) -> bytes:
        """What this node saw of the device, with its presence now (from any node)."""
        self._authorize(request)
        tracker = self._tracker()
        device = await self.store.get_device(device_id)
        if device is None:
            raise ApiError(404, "unknown_device", f"no device {device_id}")
        holder = await self.presence.holder(device_id)
        report = tracker.report(device_id)
        report["online"] = holder is not None
        report["node"] = holder.node_id if holder is not None else None
        last_seen = device.last_seen
        if holder is not None and holder.last_active is not None:
            last_seen = holder.last_active
        report["last_seen"] = to_ms(last_seen)
        return self._json(request, report)

    @app.route("/api/v1/fleet/health", methods=["GET"])
    async def fleet_health(self, request: Any) -> bytes:
        """Counts by state, the devices flapping most in the last 24 hours, and the offline
        devices silent for longer than ``silent_after`` seconds (oldest first)."""
        self._authorize(request)
        tracker = self._tracker()
        limit = int_arg(request, b"limit", 20, 1, 1000)
        silent_after = float_arg(request, b"silent_after", self.silent_after, _MAX_SILENT_AFTER)
        devices = await self.store.list_devices()
        holders = await self.presence.holders([d.device_id for d in devices])
        now = tracker.clock.seconds()
        silent_before = now - silent_after
        never = 0
        silent = []
        for device in devices:
            if device.device_id in holders:
                continue
            if device.last_seen is None:
                never += 1
            elif device.last_seen < silent_before:
                silent.append(device)
        silent.sort(key=lambda d: (d.last_seen, d.device_id))
        flapping = tracker.top_flapping(len(devices) or 1)
        return self._json(
            request,
            {
                "counts": {
                    "devices": len(devices),
                    "online": len(holders),
                    "offline": len(devices) - len(holders),
                    "never_connected": never,
                    "silent": len(silent),
                    "flapping": len(flapping),
                },
                "top_flapping": flapping[:limit],
                "silent": [
                    {
                        "device_id": d.device_id,
                        "location": d.location,
                        "last_seen": to_ms(d.last_seen),
                    }
                    for d in silent[:limit]
                ],
                "silent_after": silent_after,
                "flap_threshold": tracker.flap_threshold,
                "observed_since": to_ms(tracker.started),
            },
        )
