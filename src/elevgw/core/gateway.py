"""What the gateway does with a device: admit it, and act on each frame it sends.

``Gateway`` ties the session registry, the command router and the stores together. The
Autobahn protocol (``elevgw.south.protocol``) only translates WebSocket events into calls here,
so everything below is tested with fake connections and a ``Clock``.

The hot path is a heartbeat: parse, refresh ``last_active``, answer ``pong``; no store round
trip, no log line, no allocation beyond the frame itself.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from elevgw.core import wire
from elevgw.core.command_queue import CommandDispatcher
from elevgw.core.commands import CommandRouter
from elevgw.core.ratelimit import DeviceLimits, Verdict
from elevgw.core.sessions import CLOSE_POLICY, DeviceSession, SessionRegistry
from elevgw.events import model as events
from elevgw.observe.logs import LineBudget
from elevgw.observe.metrics import Metrics
from elevgw.snapshots.interfaces import ISnapshotStore, SnapshotStoreError
from elevgw.stores.interfaces import IDeviceStore, LogEntry, StoreUnavailable, token_matches

#: Devices per store call when ``last_seen`` is written in bulk (see ``_write_last_seen``).
LAST_SEEN_CHUNK = 1000


class HandshakeRefused(Exception):
    """A device may not connect; ``status`` is the HTTP status of the refused handshake."""

    def __init__(self, status: int, reason: str, retry_after: int | None = None) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        #: Seconds the device should wait (``Retry-After``), when the refusal says.
        self.retry_after = retry_after


class Gateway:
    log = Logger()

    def __init__(
        self,
        store: IDeviceStore,
        snapshots: ISnapshotStore,
        event_sink: events.IEventSink,
        clock: Any,
        heartbeat_timeout: float = 30.0,
        node_id: str = "elevgw",
        metrics: Metrics | None = None,
        max_pending_handshakes: int = 2000,
        lifecycle_log_rate: int = 100,
        message_rate: float = 50.0,
        message_burst: int = 200,
        max_pending_writes: int = 16,
        max_sessions: int = 50_000,
        limit_cooldown: float = 30.0,
    ) -> None:
        self.max_pending_handshakes = max_pending_handshakes
        self.message_rate = message_rate
        self.message_burst = message_burst
        self.max_pending_writes = max_pending_writes
        self.max_sessions = max_sessions
        self.limit_cooldown = limit_cooldown
        #: device id -> clock time until which a device closed for a limit is refused.
        self._cooling_down: dict[str, float] = {}
        self._pending_seen: dict[str, float] = {}
        self._seen_writes: set[Deferred] = set()
        self._pending_handshakes = 0
        #: Whether this node may take devices now (a cluster node: while it holds its lease).
        self.admitting: Any = lambda: True
        self.metrics = metrics = metrics if metrics is not None else Metrics(node_id)
        self.store = store
        self.snapshots = snapshots
        self.events = event_sink
        self.clock = clock
        self.node_id = node_id
        self.registry = SessionRegistry(
            clock,
            event_sink,
            heartbeat_timeout,
            record_last_seen=self._record_last_seen,
            metrics=metrics,
            lifecycle_lines_per_second=lifecycle_log_rate,
        )
        self.registry.announcer.node_id = node_id
        self.commands = CommandRouter(self.registry, clock, metrics)
        #: Acks and connects go to it once set (the service sets it: it needs the store).
        self.dispatcher: CommandDispatcher | None = None
        self._frames_in = metrics.frames_in
        self._frames_out = metrics.frames_out
        metrics.watch_sessions(self.registry.__len__)
        self.frame_error_lines = LineBudget(clock, lifecycle_log_rate, self.log, "bad frame")

    # -- admission

    def authenticate(self, device_id: str, token: str) -> Deferred:
        """Fire with the ``Device`` if ``token`` is its current one; else fail with ``HandshakeRefused``.

        At most ``max_pending_handshakes`` store lookups are in flight: past that a reconnect
        storm gets a quick 503 (devices retry with backoff) instead of a queue that grows
        until every handshake times out.
        """
        if self._pending_handshakes >= self.max_pending_handshakes:
            return fail(HandshakeRefused(503, "gateway busy, retry later"))
        until = self._cooling_down.get(device_id)
        if until is not None:
            wait = until - self.clock.seconds()
            if wait > 0:
                self.metrics.limit_hit("cooldown")
                return fail(
                    HandshakeRefused(
                        429,
                        "closed for going past its limits; connect again later",
                        retry_after=math.ceil(wait),
                    )
                )
            del self._cooling_down[device_id]
        if (
            len(self.registry) + self._pending_handshakes >= self.max_sessions
            and self.registry.get(device_id) is None
        ):
            self.metrics.limit_hit("sessions")
            return fail(HandshakeRefused(503, "gateway full, retry later"))
        if not self.admitting():
            return fail(HandshakeRefused(503, "node not holding devices now, retry later"))
        self._pending_handshakes += 1
        d = self.store.get_device(device_id)

        def done(result):
            self._pending_handshakes -= 1
            return result

        d.addBoth(done)

        def check(device):
            if device is None or not token_matches(token, device.token_hash):
                self.log.info(
                    "handshake refused for {device_id}: {why}",
                    device_id=device_id,
                    why="unknown device" if device is None else "wrong token",
                    event="handshake_refused",
                )
                raise HandshakeRefused(401, "unknown device or invalid token")
            return device

        def unavailable(failure):
            if failure.check(HandshakeRefused):
                return failure
            self.log.warn(
                "handshake for {device_id} refused: store unavailable ({error})",
                device_id=device_id,
                error=failure.getErrorMessage(),
                event="handshake_unavailable",
            )
            raise HandshakeRefused(503, "device store unavailable, retry later")

        return d.addCallback(check).addErrback(unavailable)

    def connected(self, device_id: str, connection: Any) -> DeviceSession:
        session = self.registry.attach(device_id, connection)
        session.limits = DeviceLimits(self.message_rate, self.message_burst, self.clock)
        if self.dispatcher is not None:
            self.dispatcher.device_connected(session)
        return session

    def disconnected(self, session: DeviceSession) -> None:
        self.registry.detach(session)

    # -- frames

    def frame_allowed(self, session: DeviceSession, now: float) -> bool:
        """Whether to handle a frame of ``session`` now (text, binary or ping: every path
        that takes a frame from a device asks first).

        Past the device's message rate it gets one ``rate_limited`` error frame; if it goes
        on it is closed with 1008. Frames over the limit are dropped and do not count as
        signs of life.
        """
        limits = session.limits
        return self._act_on_verdict(session, limits.verdict(limits.bucket.take(now)))

    def _act_on_verdict(self, session: DeviceSession, verdict: Verdict) -> bool:
        if verdict is Verdict.ALLOW:
            return True
        limits = session.limits
        if verdict is not Verdict.CLOSE and limits.rate_resume is None:
            # Read nothing more until a token is due: the frames wait in the device's own
            # socket instead of being read, parsed and dropped as fast as it sends them.
            limits.rate_resume = self.clock.callLater(
                limits.next_token_in(), self._rate_resumed, session
            )
            session.connection.pause_reading()
        if verdict is Verdict.WARN:
            self.metrics.limit_hit("message_rate")
            self.log.info(
                "device {device_id} over its message rate ({rate}/s, burst {burst})",
                device_id=session.device_id,
                rate=self.message_rate,
                burst=self.message_burst,
                event="rate_limited",
            )
            self._send_error(
                session,
                wire.RATE_LIMITED,
                "over {} frames a second (burst {}): slow down or be closed (1008)".format(
                    self.message_rate, self.message_burst
                ),
                None,
            )
        elif verdict is Verdict.CLOSE:
            self.close_for_policy(session, "message_rate", "went on past its message rate")
        return False

    def _rate_resumed(self, session: DeviceSession) -> None:
        limits = session.limits
        limits.rate_resume = None
        if not session.ended and not limits.paused:
            session.connection.resume_reading()

    def close_for_policy(self, session: DeviceSession, limit: str, why: str) -> None:
        """End ``session`` at once for breaking ``limit`` and close its socket with 1008.

        The session is offline (``closed``) before this returns, so a command written to
        it afterwards fails as offline instead of being buffered for a closing socket. The
        device's handshakes are refused (429) for ``limit_cooldown`` seconds, and nothing
        more is read from this socket (the close handshake times out on a flooder).
        """
        if session.ended:
            return
        self._cooling_down[session.device_id] = self.clock.seconds() + self.limit_cooldown
        timer, session.limits.rate_resume = session.limits.rate_resume, None
        if timer is not None and timer.active():
            timer.cancel()
        self.metrics.limit_hit(limit + "_close")
        self.log.warn(
            "device {device_id} closed (1008): {why}",
            device_id=session.device_id,
            why=why,
            event="policy_close",
        )
        self.registry.end(session, events.OFFLINE_CLOSED)
        try:
            session.connection.close(CLOSE_POLICY, why)
            session.connection.pause_reading()
        except Exception:
            self.log.failure("closing device {device_id} failed", device_id=session.device_id)

    def text_received(self, session: DeviceSession, data: bytes) -> None:
        now = self.clock.seconds()
        limits = session.limits
        took = limits.bucket.take(now)
        # ``frame_allowed`` inlined for the frame of almost every message.
        if (not took or limits.warned) and not self._act_on_verdict(session, limits.verdict(took)):
            return
        try:
            frame = wire.parse_frame(data, session.device_id)
        except wire.FrameError as e:
            self._frames_in["invalid"] += 1
            self._frame_error(session, e)
            return
        session.last_active = now
        kind = frame.type
        self._frames_in[kind] += 1
        if kind == wire.HEARTBEAT:
            session.send_frame(wire.pong_frame(int(now * 1000)))
            self._frames_out["pong"] += 1
        elif kind == wire.LOG:
            self._log_received(session, frame, now)
        elif kind == wire.SNAPSHOT:
            try:
                image = wire.decode_image(frame.payload, frame.id)
            except wire.FrameError as e:
                self._frame_error(session, e)
                return
            self._snapshot_received(session, image, frame.id)
        else:
            self._ack_received(session, frame)

    def binary_received(self, session: DeviceSession, data: bytes) -> None:
        """A binary frame is a snapshot's raw image (the cheap path: no base64, no JSON)."""
        if not self.frame_allowed(session, self.clock.seconds()):
            return
        self._frames_in["binary"] += 1
        self._snapshot_received(session, data, None)

    def _frame_error(self, session: DeviceSession, error: wire.FrameError) -> None:
        if self.frame_error_lines.take("bad frame"):
            self.log.info(
                "bad frame from {device_id}: {code} ({detail})",
                device_id=session.device_id,
                code=error.code,
                detail=error.detail,
                event="frame_error",
            )
        self._send_error(session, error.code, error.detail, error.frame_id)

    def _send_error(self, session: DeviceSession, code: str, detail: str, frame_id: Any) -> None:
        session.send_frame(wire.error_frame(code, detail, frame_id))
        self._frames_out["error"] += 1
        self.metrics.frame_errors.labels(code).inc()

    def _log_received(self, session: DeviceSession, frame: wire.Frame, now: float) -> None:
        entry = LogEntry(ts=int(now * 1000), payload=frame.payload)
        d = self._store_work(session, self.store.append_log(session.device_id, entry))

        def stored(_):
            if frame.id is not None:
                session.send_frame(wire.ack_frame(frame.id))
                self._frames_out["ack"] += 1

        def failed(failure):
            if failure.check(StoreUnavailable):
                # The write may still land (a frozen Redis runs it once it thaws): logs are
                # at least once, never acked unless stored.
                detail = "log not confirmed stored: device store unavailable, send it again later"
                code = wire.STORE_UNAVAILABLE
            else:
                self.log.failure(
                    "storing a log of {device_id} failed", failure, device_id=session.device_id
                )
                detail, code = "log not stored", wire.INTERNAL_ERROR
            self._send_error(session, code, detail, frame.id)

        d.addCallbacks(stored, failed)

    def _snapshot_received(
        self, session: DeviceSession, image: bytes, frame_id: str | None
    ) -> None:
        device_id = session.device_id
        started = self.clock.seconds()
        waiter = self.commands.claim(device_id, frame_id)
        request_id = getattr(waiter, "command", None)
        request_id = request_id.id if request_id is not None else frame_id
        try:
            d = self.snapshots.put(device_id, image, int(started * 1000))
        except ValueError as e:
            error = wire.FrameError(wire.NOT_AN_IMAGE, str(e), frame_id)
            self._frame_error(session, error)
            _settle(waiter, error=error)
            return
        session.last_active = started
        self._store_work(session, d)

        def stored(snapshot):
            self.metrics.snapshot_store_seconds.labels("ok").observe(
                self.clock.seconds() - started
            )
            self.metrics.snapshot_bytes.observe(snapshot.size)
            self.log.debug(
                "snapshot from {device_id} stored: {size} bytes at {url}",
                device_id=device_id,
                size=snapshot.size,
                url=snapshot.url,
                event="snapshot_stored",
            )
            session.send_frame(wire.ack_frame(frame_id, url=snapshot.url))
            self._frames_out["ack"] += 1
            _settle(waiter, result=snapshot)
            self.events.emit(
                events.SnapshotReady(device_id, snapshot.url, request_id, snapshot.taken_at)
            )

        def failed(failure):
            self.metrics.snapshot_store_seconds.labels("failed").observe(
                self.clock.seconds() - started
            )
            if failure.check(SnapshotStoreError):
                # The snapshot store is a dependency that fails now and then (a timeout,
                # OSS down): one line with its cause, no traceback.
                self.log.warn(
                    "storing a snapshot of {device_id} failed: {error}",
                    device_id=device_id,
                    error=failure.getErrorMessage(),
                    event="snapshot_failed",
                )
            else:
                self.log.failure(
                    "storing a snapshot of {device_id} failed", failure, device_id=device_id
                )
            self._send_error(
                session, wire.SNAPSHOT_FAILED, "snapshot could not be stored", frame_id
            )
            error = (
                failure.value
                if failure.check(SnapshotStoreError)
                else SnapshotStoreError(failure.getErrorMessage())
            )
            _settle(waiter, error=error)

        d.addCallbacks(stored, failed)

    def _store_work(self, session: DeviceSession, d: Deferred) -> Deferred:
        """Count ``d`` as pending store work of ``session``; past ``max_pending_writes`` the
        device is not read from until half of it is done.

        So a device that sends faster than the store writes waits in its own socket (and
        its TCP window) instead of filling the gateway's memory and the store's queue,
        where every other device's handshake and logs would wait behind it.
        """
        limits = session.limits
        bound = self.max_pending_writes
        if limits.write_started(bound):
            self.metrics.limit_hit("pending_writes")
            session.connection.pause_reading()

        def finished(result: Any) -> Any:
            if limits.write_finished(bound) and not session.ended and limits.rate_resume is None:
                session.connection.resume_reading()
            return result

        return d.addBoth(finished)

    def _ack_received(self, session: DeviceSession, frame: wire.Frame) -> None:
        """An ack is a receipt: it never answers a waiting snapshot request (only the image
        does), however many firmwares ack the ``snapshot`` command as it arrives."""
        self.log.debug(
            "device {device_id} acked command {command_id}",
            device_id=session.device_id,
            command_id=frame.id,
            event="command_acked",
        )
        if self.dispatcher is not None:
            self.dispatcher.ack_received(session.device_id, frame)

    # -- housekeeping

    def sweep(self) -> int:
        started = self.clock.seconds()
        cooling = self._cooling_down
        if cooling:
            for device_id in [d for d, until in cooling.items() if until <= started]:
                del cooling[device_id]
        try:
            return self.registry.sweep()
        finally:
            self.metrics.sweep_seconds.observe(self.clock.seconds() - started)

    def _record_last_seen(self, seen: dict) -> None:
        """Queue ``last_seen`` writes and flush them together on the next reactor turn, so
        15,000 sessions ending at once (a network blip, a drain) make one batch."""
        if not self._pending_seen:
            self.clock.callLater(0, self._flush_last_seen)
        self._pending_seen.update(seen)

    def _flush_last_seen(self) -> None:
        if not self._pending_seen:
            return
        seen, self._pending_seen = self._pending_seen, {}
        writing = Deferred.fromCoroutine(self._write_last_seen(seen))
        self._seen_writes.add(writing)
        writing.addBoth(lambda _: self._seen_writes.discard(writing))

    def last_seen_written(self) -> Deferred:
        """Fires once every ``last_seen`` handed over so far is written or given up; a drain
        waits for it before the store stops, or the last chunks would find it closed."""
        self._flush_last_seen()
        return DeferredList(list(self._seen_writes))

    async def _write_last_seen(self, seen: dict) -> None:
        """Hand the store ``LAST_SEEN_CHUNK`` devices at a time, each after the last is done.

        The minute's batch is every live session. In one piece (15,000 devices) the SQLite
        store's pool thread held the GIL for the whole JSON encoding, so the reactor stood
        still that long, then ran one long statement on the same core; in chunks the GIL is
        held briefly and the reactor runs between chunks (figures: ``docs/benchmarks.rst``).
        """
        items = list(seen.items())
        for start in range(0, len(items), LAST_SEEN_CHUNK):
            try:
                await self.store.record_last_seen(dict(items[start : start + LAST_SEEN_CHUNK]))
            except Exception:
                self.log.warn(
                    "could not record last_seen of {count} devices: {error}",
                    count=len(items) - start,
                    error=Failure().getErrorMessage(),
                )
                return

    def healthy(self) -> Deferred:
        return self.store.ping()


def _settle(waiter: Deferred | None, result: Any = None, error: Exception | None = None) -> None:
    if waiter is None or waiter.called:
        return
    if error is not None:
        waiter.errback(error)
    else:
        waiter.callback(result)
