"""Device sessions: who is connected to this node, since when, and when they last spoke.

``SessionRegistry`` is the one writer of a device's lifecycle on this node: it decides
online/offline, takeovers and timeouts, and emits the matching events in the order they
happen. It knows nothing about WebSockets: a session talks to its device through a
``connection`` with ``send_frame(bytes)`` and ``close(code, reason)``, which the Autobahn
protocol provides and unit tests fake.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.logger import Logger

from elevgw.core import ids
from elevgw.events import model as events
from elevgw.observe.logs import LineBudget
from elevgw.util import clock_ms

#: Seconds between batch writes of live sessions' ``last_seen`` (15,000 rows on a full node).
LAST_SEEN_EVERY = 60.0

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TIMEOUT = 4000
CLOSE_TAKEN_OVER = 4001
CLOSE_REVOKED = 4003


class Connection(Protocol):
    def send_frame(self, data: bytes) -> None: ...

    def close(self, code: int, reason: str) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class DeviceSession:
    """One device's live connection to this node. ``last_active`` is in clock seconds.

    ``limits`` (``elevgw.core.ratelimit.DeviceLimits``) is set by the gateway when it admits
    the device."""

    __slots__ = (
        "device_id",
        "session_id",
        "connection",
        "connected_at",
        "last_active",
        "ended",
        "limits",
    )

    def __init__(self, device_id: str, connection: Connection, now: float) -> None:
        self.device_id = device_id
        self.session_id = ids.new_id(ids.SESSION)
        self.connection = connection
        self.connected_at = now
        self.last_active = now
        self.ended = False
        self.limits: Any = None

    def send_frame(self, data: bytes) -> None:
        self.connection.send_frame(data)


class LocalAnnouncer:
    """Emits a session's online and offline events at once: on one node the registry is the
    whole truth. A cluster replaces it (``elevgw.cluster.lifecycle``) with one that first
    settles in Redis whether the device moved, and emits only what that says."""

    def __init__(
        self, event_sink: events.IEventSink, clock: Any, node_id: str | None = None
    ) -> None:
        self._events = event_sink
        self._clock = clock
        self.node_id = node_id

    def online(self, session: DeviceSession, reason: str, previous: DeviceSession | None) -> None:
        self._events.emit(
            events.DeviceStatus(
                session.device_id, "online", reason, clock_ms(self._clock), node=self.node_id
            )
        )

    def offline(self, session: DeviceSession, reason: str) -> None:
        self._events.emit(
            events.DeviceStatus(
                session.device_id, "offline", reason, clock_ms(self._clock), node=self.node_id
            )
        )


class SessionRegistry:
    """The sessions of this node, keyed by device id.

    ``on_session_ended`` callbacks get ``(session, reason)`` whenever a session stops being the
    device's current one (so pending snapshot requests can fail fast).
    """

    log = Logger()

    def __init__(
        self,
        clock: Any,
        event_sink: events.IEventSink,
        heartbeat_timeout: float,
        record_last_seen: Any = None,
        metrics: Any = None,
        lifecycle_lines_per_second: int = 100,
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self.lifecycle_lines = LineBudget(
            clock, lifecycle_lines_per_second, self.log, "device online/offline"
        )
        self.heartbeat_timeout = heartbeat_timeout
        self._record_last_seen = record_last_seen
        self._next_last_seen_write = 0.0
        self._sessions: dict[str, DeviceSession] = {}
        self.takeovers = 0
        self.on_session_ended: list[Any] = []
        #: ``stalled(start, end)``: seconds of that span the reactor stood still (set by the
        #: service from ``elevgw.observe.watchdog``); ``None``: every second counts.
        self.stalled: Callable[[float, float], float] | None = None
        #: Decides and emits online/offline events (``LocalAnnouncer`` on one node).
        self.announcer: Any = LocalAnnouncer(event_sink, clock)

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, device_id: str) -> DeviceSession | None:
        return self._sessions.get(device_id)

    def sessions(self) -> list[DeviceSession]:
        return list(self._sessions.values())

    def attach(self, device_id: str, connection: Connection) -> DeviceSession:
        """Make ``connection`` the device's session; an older one is closed with 4001.

        A takeover emits no offline event: the device never stopped being online.
        """
        now = self._clock.seconds()
        session = DeviceSession(device_id, connection, now)
        old = self._sessions.get(device_id)
        self._sessions[device_id] = session
        if old is None:
            reason = events.ONLINE_CONNECTED
        else:
            reason = events.ONLINE_TAKEOVER
            self.takeovers += 1
            if self._metrics is not None:
                self._metrics.takeovers.inc()
            old.ended = True
            self._ended(old, events.ONLINE_TAKEOVER)
            self.log.warn(
                "device {device_id} connected again: old session taken over (4001)",
                device_id=device_id,
                event="takeover",
            )
            _close_quietly(old, CLOSE_TAKEN_OVER, "taken over by a newer connection")
        if self.lifecycle_lines.take("online"):
            self.log.info(
                "device {device_id} online ({reason})",
                device_id=device_id,
                reason=reason,
                event="device_online",
            )
        self.announcer.online(session, reason, old)
        return session

    def detach(self, session: DeviceSession) -> None:
        """The session's connection is gone. Emits offline unless the session was already ended."""
        self.end(session, events.OFFLINE_CLOSED)

    def end(
        self,
        session: DeviceSession,
        reason: str,
        close_code: int | None = None,
        announce: bool = True,
        why: str | None = None,
    ) -> None:
        """End ``session`` now: unregister it, emit its offline event, close it with ``close_code``.

        ``announce=False`` emits nothing: the device moved to another node (a takeover), or
        this node was cut off and the other nodes report it (fencing). ``why`` is the close
        reason the device reads (default: ``reason``).
        """
        if session.ended:
            return
        session.ended = True
        if self._sessions.get(session.device_id) is session:
            del self._sessions[session.device_id]
        self._ended(session, reason)
        if self._record_last_seen is not None:
            self._record_last_seen({session.device_id: session.last_active})
        if announce:
            if self._metrics is not None:
                self._metrics.offline.labels(reason).inc()
            if self.lifecycle_lines.take("offline"):
                self.log.info(
                    "device {device_id} offline ({reason})",
                    device_id=session.device_id,
                    reason=reason,
                    event="device_offline",
                )
            self.announcer.offline(session, reason)
        if close_code is not None:
            _close_quietly(session, close_code, why or reason)

    def end_device(self, device_id: str, reason: str, close_code: int) -> bool:
        """End the device's session if it has one here; ``True`` if it had."""
        session = self._sessions.get(device_id)
        if session is None:
            return False
        self.end(session, reason, close_code)
        return True

    def end_all(self, reason: str, close_code: int, announce: bool = True) -> int:
        sessions = list(self._sessions.values())
        for session in sessions:
            self.end(session, reason, close_code, announce=announce)
        return len(sessions)

    def sweep(self) -> int:
        """Close every session silent for longer than the heartbeat timeout (4000).

        Runs once per sweep interval and costs one pass over the sessions. At most every
        ``LAST_SEEN_EVERY`` seconds it also hands the store every live session's
        ``last_seen`` in one batch, so a crash loses at most that much of it (a session that
        ends writes its own at once). One failing session never stops the sweep for the others.

        Time this gateway spent stalled (``stalled(start, end)``, the reactor watchdog's
        answer) is not counted as a device's silence: a pause of the gateway's own must not
        send the fleet offline.
        """
        now = self._clock.seconds()
        timeout = self.heartbeat_timeout
        deadline = now - timeout
        stalled = self.stalled
        expired = 0
        write_seen = now >= self._next_last_seen_write
        seen = {}
        for session in list(self._sessions.values()):
            try:
                last_active = session.last_active
                if last_active < deadline and (
                    stalled is None or now - last_active - stalled(last_active, now) > timeout
                ):
                    self.end(session, events.OFFLINE_TIMEOUT, CLOSE_TIMEOUT)
                    expired += 1
                elif write_seen:
                    seen[session.device_id] = session.last_active
            except Exception:
                self.log.failure(
                    "sweep failed for device {device_id}", device_id=session.device_id
                )
        if write_seen:
            self._next_last_seen_write = now + LAST_SEEN_EVERY
            if seen and self._record_last_seen is not None:
                self._record_last_seen(seen)
        return expired

    def _ended(self, session: DeviceSession, reason: str) -> None:
        for callback in self.on_session_ended:
            try:
                callback(session, reason)
            except Exception:
                self.log.failure(
                    "session-ended hook failed for {device_id}", device_id=session.device_id
                )


def _close_quietly(session: DeviceSession, code: int, reason: str) -> None:
    try:
        session.connection.close(code, reason)
    except Exception:
        Logger().failure("closing device {device_id} failed", device_id=session.device_id)
