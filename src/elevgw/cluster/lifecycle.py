"""Online and offline across nodes: Redis decides, then the event is emitted.

The session registry hands every new and ended session to ``ClusterAnnouncer``:

- online: one compare-and-set (``RedisPresence.claim``) makes the session the device's only
  one. If another node held the device, that node is told to close its socket with 4001
  without an offline event (``kick`` through its inbox; it answers with the old session's
  last frame time), and the one event emitted is ``online`` with reason ``takeover``,
  ``previous_node`` and ``gap_ms``. If the old holder is dead (lease gone), there is no one
  to tell: the claim took the device out of the dead node's set, so no reaper reports it.
- offline: a compare-and-delete on the session id (``RedisPresence.release``); the offline
  event is emitted only if the entry was still this session's. A socket that closes after
  its device moved on emits nothing. Releases of one reactor turn go in one script call
  (a drain ends thousands at once); while Redis is unreachable they are retried, and the
  event keeps the time the session ended.

Per session, the offline event is never emitted before its online event.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from elevgw.cluster.bus import Bus
from elevgw.core.sessions import CLOSE_TAKEN_OVER, DeviceSession, SessionRegistry
from elevgw.events import model as events
from elevgw.presence.redis import Claimed, RedisPresence
from elevgw.util import clock_ms

#: WebSocket close code for a session this node could not register (try again later).
CLOSE_TRY_AGAIN = 1013

#: Devices per release script call.
RELEASE_CHUNK = 1000

#: Seconds between attempts to release sessions while Redis is unreachable.
RELEASE_RETRY = 1.0


class ClusterAnnouncer:
    log = Logger()

    def __init__(
        self,
        presence: RedisPresence,
        bus: Bus,
        registry: SessionRegistry,
        event_sink: events.IEventSink,
        clock: Any,
        node_id: str,
        kick_timeout: float = 1.0,
        metrics: Any = None,
    ) -> None:
        self._presence = presence
        self._bus = bus
        self._registry = registry
        self._events = event_sink
        self._clock = clock
        self._node_id = node_id
        self.kick_timeout = kick_timeout
        self._metrics = metrics
        #: session id -> Deferred of its online announcement, while it runs
        self._announcing: dict[str, Deferred] = {}
        #: sessions whose claim failed: nothing to announce when they end
        self._unclaimed: set[str] = set()
        #: session id -> its claim, until the session is released
        self._claims: dict[str, Claimed] = {}
        #: (session, reason, ended at ms) waiting for the next release call
        self._releases: list[tuple[DeviceSession, str, int]] = []
        self._flush_timer: Any = None
        self._in_flight: set[Deferred] = set()

    # -- online

    def online(self, session: DeviceSession, reason: str, previous: DeviceSession | None) -> None:
        if previous is not None:
            self.forget(previous)
        d = self._presence.claim(session.device_id, session.session_id)
        d.addCallback(self._claimed, session, previous)
        d.addErrback(self._claim_failed, session)
        self._announcing[session.session_id] = d
        d.addBoth(self._announced, session)

    def _announced(self, _: Any, session: DeviceSession) -> None:
        self._announcing.pop(session.session_id, None)

    def _claimed(
        self, claimed: Claimed, session: DeviceSession, previous: DeviceSession | None
    ) -> Any:
        if not session.ended:
            self._claims[session.session_id] = claimed
        if claimed.previous_instance is None:
            self._emit_online(session, events.ONLINE_CONNECTED)
            return None
        if claimed.previous_instance == self._bus.instance():
            gap = None
            if previous is not None:
                gap = max(0, clock_ms(self._clock) - int(previous.last_active * 1000))
            self._emit_online(session, events.ONLINE_TAKEOVER, self._node_id, gap)
            return None
        if not claimed.previous_alive:
            gap = _gap(claimed.now_ms, claimed.previous_renewed_ms)
            self._emit_takeover(session, claimed, gap)
            return None
        body = {"device": session.device_id, "session": claimed.previous_session}
        d = self._bus.call(claimed.previous_instance, "kick", body, self.kick_timeout)

        def kicked(answer: dict) -> None:
            silent_ms = answer.get("silent_ms")
            if silent_ms is None:  # it had closed already: since its last renewal at most
                silent_ms = _gap(claimed.now_ms, claimed.previous_renewed_ms)
            self._emit_takeover(session, claimed, silent_ms)

        def not_kicked(failure: Failure) -> None:
            # The old node is going away (not listening) or slow: its socket closes with it,
            # or once it hears its inbox again (it then checks its sessions against
            # presence); the device is here now either way.
            self.log.info(
                "cluster: {node} did not confirm closing {device_id}: {error}",
                node=claimed.previous_node,
                device_id=session.device_id,
                error=failure.getErrorMessage(),
            )
            self._emit_takeover(
                session, claimed, _gap(claimed.now_ms, claimed.previous_renewed_ms)
            )

        return d.addCallbacks(kicked, not_kicked)

    def _emit_takeover(self, session: DeviceSession, claimed: Claimed, gap_ms: int | None) -> None:
        if self._metrics is not None:
            self._metrics.cross_node_takeovers.inc()
        self._emit_online(session, events.ONLINE_TAKEOVER, claimed.previous_node, gap_ms)

    def _emit_online(
        self,
        session: DeviceSession,
        reason: str,
        previous_node: str | None = None,
        gap_ms: int | None = None,
    ) -> None:
        self._events.emit(
            events.DeviceStatus(
                session.device_id,
                "online",
                reason,
                clock_ms(self._clock),
                previous_node=previous_node,
                gap_ms=gap_ms,
                node=self._node_id,
            )
        )

    def _claim_failed(self, failure: Failure, session: DeviceSession) -> None:
        self._unclaimed.add(session.session_id)
        self.log.warn(
            "cluster: device {device_id} not registered in presence ({error});"
            " closing it (1013) so it comes back later",
            device_id=session.device_id,
            error=failure.getErrorMessage(),
        )
        self._registry.end(
            session, "unregistered", CLOSE_TRY_AGAIN, announce=False, why="try again later"
        )
        # The claim may have run although its answer was lost: take it back, silently.
        self._queue_release(session, "", clock_ms(self._clock))

    def forget(self, session: DeviceSession) -> None:
        """``session`` ended without an offline event (it moved, or the node fenced)."""
        self._claims.pop(session.session_id, None)

    def forget_all(self) -> None:
        self._claims.clear()

    # -- offline

    def offline(self, session: DeviceSession, reason: str) -> None:
        if session.session_id in self._unclaimed:
            self._unclaimed.discard(session.session_id)
            return
        ended_ms = clock_ms(self._clock)
        announcing = self._announcing.get(session.session_id)
        if announcing is not None:
            announcing.addBoth(lambda result: self._queue_release(session, reason, ended_ms))
            return
        self._queue_release(session, reason, ended_ms)

    def _queue_release(self, session: DeviceSession, reason: str, ended_ms: int) -> None:
        self._releases.append((session, reason, ended_ms))
        if self._flush_timer is None:
            self._flush_timer = self._clock.callLater(0, self.flush)

    def flush(self) -> Deferred:
        """Release what is queued now; fires when those calls are done (never fails)."""
        self._flush_timer = None
        pending, self._releases = self._releases, []
        calls = []
        for start in range(0, len(pending), RELEASE_CHUNK):
            calls.append(self._release(pending[start : start + RELEASE_CHUNK]))
        if not calls:
            return succeed(None)
        return DeferredList(calls).addCallback(lambda _: None)

    def _release(self, chunk: list[tuple[DeviceSession, str, int]]) -> Deferred:
        pairs = [
            (session.device_id, session.session_id, self._claims.get(session.session_id))
            for session, _, _ in chunk
        ]
        d = self._presence.release(pairs)
        self._in_flight.add(d)

        def released(deleted: list[bool]) -> None:
            for session, _, _ in chunk:
                self._claims.pop(session.session_id, None)
            for (session, reason, ended_ms), was_current in zip(chunk, deleted, strict=True):
                if was_current and reason:
                    self._events.emit(
                        events.DeviceStatus(
                            session.device_id, "offline", reason, ended_ms, node=self._node_id
                        )
                    )

        def failed(failure: Failure) -> None:
            self.log.warn(
                "cluster: releasing {count} sessions failed ({error}); retrying",
                count=len(chunk),
                error=failure.getErrorMessage(),
            )
            self._releases.extend(chunk)
            if self._flush_timer is None:
                self._flush_timer = self._clock.callLater(RELEASE_RETRY, self.flush)

        d.addCallbacks(released, failed)
        d.addBoth(lambda _: self._in_flight.discard(d))
        return d

    def settled(self) -> Deferred:
        """Fires once the releases queued or under way have been tried (the drain waits for
        this before the lease goes back)."""
        if self._flush_timer is not None and self._flush_timer.active():
            self._flush_timer.cancel()
        under_way = list(self._in_flight)
        return DeferredList([self.flush(), *under_way]).addCallback(lambda _: None)

    async def reconcile(self) -> int:
        """Close (4001, silently) the sessions presence says have moved to another node.

        Run when the inbox is listened to again: a kick sent while this node was not
        listening is lost, and this finds its session. A session whose claim is still
        being announced is left alone; so is one with no entry (Redis lost its data: the
        lease keeper writes those back). Returns how many were closed.
        """
        sessions = [
            session
            for session in self._registry.sessions()
            if session.session_id not in self._announcing
        ]
        closed = 0
        for start in range(0, len(sessions), RELEASE_CHUNK):
            chunk = sessions[start : start + RELEASE_CHUNK]
            placements = await self._presence.locate([s.device_id for s in chunk])
            for session in chunk:
                placement = placements.get(session.device_id)
                if session.ended or placement is None:
                    continue
                if placement.session_id != session.session_id:
                    closed += 1
                    self.forget(session)
                    self._registry.end(
                        session,
                        events.ONLINE_TAKEOVER,
                        CLOSE_TAKEN_OVER,
                        announce=False,
                        why="taken over by another node",
                    )
        if closed:
            self.log.warn(
                "cluster: {closed} sessions had moved to other nodes while the inbox was"
                " not heard; closed (4001)",
                closed=closed,
            )
        return closed

    def pending_releases(self) -> int:
        return len(self._releases)

    def stop(self) -> None:
        if self._flush_timer is not None and self._flush_timer.active():
            self._flush_timer.cancel()
        self._flush_timer = None


def _gap(now_ms: int, since_ms: float | None) -> int | None:
    if since_ms is None:
        return None
    return max(0, int(now_ms - since_ms))
