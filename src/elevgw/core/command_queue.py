"""Commands with a state: acknowledged, awaited, queued while the device is offline, never lost.

``CommandDispatcher`` moves every command through its states (``elevgw.stores.interfaces``:
``queued`` → ``sent`` → ``acked`` | ``failed`` | ``expired`` | ``timed_out`` | ``canceled`` |
``superseded``). Each move is one atomic step of the ``ICommandQueue`` in the shared store, so
a device reconnecting to any node drains its queue there. What lives only in memory:

- the API calls waiting for an answer (``wait``), released by the answer, their deadline, or
  the device disconnecting, whichever comes first;
- commands written at once (``POST /api/send``, or without ``ttl``) and not yet recorded: they
  are recorded in batches behind the write, so the fast path never waits for the store.

Delivery is in order and at least once: a pending command (one given a ``ttl``) that was
written but not acked is written again, with the same id, each time the device connects,
until it is acked or expires. A command without ``ttl`` is written at once or refused, and
never written again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
from prometheus_client import Counter, Gauge
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from elevgw.core import ids, wire
from elevgw.core.commands import Command, CommandRouter, DeviceOffline
from elevgw.core.sessions import DeviceSession, SessionRegistry
from elevgw.events import model as events
from elevgw.stores.interfaces import (
    ACKED,
    CANCELED,
    COMMAND_STATES,
    FAILED,
    QUEUED,
    SENT,
    TIMED_OUT,
    CommandRecord,
    Delivery,
    ICommandQueue,
    QueueFull,
)
from elevgw.util import clock_ms

#: Commands expired per store call by the expiry pass, and store calls per pass at most (the
#: rest wait for the next pass; delivery never sends an expired command meanwhile).
EXPIRE_BATCH = 1000
EXPIRE_BATCHES = 10

#: Why a wait ended without the command finishing.
WAIT_TIMEOUT = "timeout"
WAIT_DISCONNECTED = "disconnected"


#: Bus calls between nodes: run a command call on the device's node; look at its queue.
REMOTE_EXECUTE = "command"
REMOTE_PUMP = "command_pump"

#: Seconds a routed command call may take on top of its ``wait``.
ROUTE_SLACK = 5.0


def _from_answer(answer: dict) -> CommandRecord:
    """The record a remote ``execute`` answered with; its failures raised again here."""
    if answer.get("error") == "queue_full":
        raise QueueFull("the device's queue is full")
    record = CommandRecord(**answer["record"])
    if answer.get("ended"):
        raise WaitEnded(answer["ended"], record)
    return record


class UnknownCommand(Exception):
    """No command with that id for that device (never sent, or forgotten)."""


class CommandAlreadyFinished(Exception):
    """The command reached a terminal state before this request; ``record`` says which."""

    def __init__(self, record: CommandRecord) -> None:
        super().__init__(record.id, record.state)
        self.record = record


class WaitEnded(Exception):
    """A ``wait`` ended before the command finished: ``reason`` is ``WAIT_TIMEOUT`` or
    ``WAIT_DISCONNECTED``; ``record`` is the command as it then was."""

    def __init__(self, reason: str, record: CommandRecord) -> None:
        super().__init__(reason, record.id, record.state)
        self.reason = reason
        self.record = record


@attrs.define(eq=False)
class _Wait:
    record: CommandRecord
    answer: Deferred
    timer: Any


class CommandDispatcher:
    """The command state machine of one node.

    :param queue: the store's ``ICommandQueue``.
    :param registry: this node's sessions; ``deliver_local`` writes to them.
    :param router: the immediate path (``/api/send``); its writes are recorded here.
    :param clock: ``IReactorTime`` for every deadline and timestamp.
    :param event_sink: gets a ``CommandFinished`` for every terminal state.
    :param metrics_registry: the Prometheus registry the command metrics join.
    :param max_pending: pending commands a device may have (more: ``QueueFull``).
    """

    log = Logger()

    def __init__(
        self,
        queue: ICommandQueue,
        registry: SessionRegistry,
        router: CommandRouter,
        clock: Any,
        event_sink: events.IEventSink,
        metrics_registry: Any = None,
        max_pending: int = 100,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, not {max_pending}")
        self.queue = queue
        self.max_pending = max_pending
        self._registry = registry
        self._router = router
        self._clock = clock
        self._events = event_sink
        self._waits: dict[str, _Wait] = {}
        self._waits_by_device: dict[str, set[str]] = {}
        self._unrecorded: dict[str, CommandRecord] = {}
        self._recording: Deferred | None = None
        self._record_call: Any = None
        self._connected: dict[str, DeviceSession] = {}
        self._finishing: list[tuple[tuple[str, str, str, Any], Deferred]] = []
        self._finish_call: Any = None
        self._take_call: Any = None
        self.queue_depth = 0
        #: The store's last count found no pending command, and none was queued here since
        #: that count began (false until a count: the store may hold commands from before a
        #: restart).
        self._known_empty = False
        self._queued_since_count = False
        #: ``call_holder(device_id, kind, body, timeout)`` in a cluster (``install_remote``).
        self.remote: Any = None
        registry.on_session_ended.append(self._session_ended)
        router.on_sent = self._written_at_once
        self._states = Counter(
            "elevgw_command_states",
            "Commands that entered each state (queued, sent, acked, failed, expired, "
            "timed_out, canceled, superseded).",
            ["state"],
            registry=metrics_registry,
        )
        self._state = {state: self._states.labels(state) for state in COMMAND_STATES}
        self._store_errors = Counter(
            "elevgw_command_store_errors",
            "Command steps the store could not take (commands recorded, queues taken, acks).",
            ["step"],
            registry=metrics_registry,
        )
        Gauge(
            "elevgw_command_queue_depth",
            "Pending commands (queued, or sent and not acked) of every device, as last counted.",
            registry=metrics_registry,
        ).set_function(lambda: self.queue_depth)
        Gauge(
            "elevgw_command_waits",
            "API calls waiting for a command's answer.",
            registry=metrics_registry,
        ).set_function(lambda: len(self._waits))

    # -- submitting

    def execute(
        self,
        device_id: str,
        name: str,
        data: Any,
        ttl: float | None = None,
        collapse_key: str | None = None,
        wait: float | None = None,
        local_only: bool = False,
    ) -> Deferred:
        """``submit`` and, with ``wait`` (seconds), ``wait``: the whole API call.

        In a cluster (``remote`` set) a device held by another node is served there, so its
        ack and its disconnect reach the wait at once; a device held nowhere gets its command
        queued here (with ``ttl``), in the store every node shares.
        """
        return Deferred.fromCoroutine(
            self._execute(device_id, name, data, ttl, collapse_key, wait, local_only)
        )

    async def _execute(
        self,
        device_id: str,
        name: str,
        data: Any,
        ttl: float | None,
        collapse_key: str | None,
        wait: float | None,
        local_only: bool,
    ) -> CommandRecord:
        remote = None if local_only else self.remote
        if remote is not None and self._registry.get(device_id) is None:
            body = dict(
                device=device_id,
                name=name,
                data=data,
                ttl=ttl,
                collapse_key=collapse_key,
                wait=wait,
            )
            try:
                answer = await remote(device_id, REMOTE_EXECUTE, body, (wait or 0) + ROUTE_SLACK)
            except DeviceOffline:
                if ttl is None:
                    raise
            else:
                return _from_answer(answer)
            record = await self.submit(device_id, name, data, ttl, collapse_key)
            # It may have connected to another node while this was stored: that node looks.
            remote(device_id, REMOTE_PUMP, {"device": device_id}, ROUTE_SLACK).addErrback(
                lambda _: None
            )
        else:
            record = await self.submit(device_id, name, data, ttl, collapse_key)
        if wait is None:
            return record
        return await self.wait(record, wait)

    def install_remote(self, bus: Any, call_holder: Any) -> None:
        """Join a cluster: serve other nodes' command calls on ``bus``, reach the devices
        other nodes hold through ``call_holder(device_id, kind, body, timeout)``."""
        self.remote = call_holder
        bus.handlers.update({REMOTE_EXECUTE: self._remote_execute, REMOTE_PUMP: self._pump})

    def _remote_execute(self, message: dict) -> Deferred:
        d = self.execute(
            message["device"],
            message["name"],
            message.get("data"),
            message.get("ttl"),
            message.get("collapse_key"),
            message.get("wait"),
            local_only=True,
        )

        def ended(failure: Failure) -> dict:
            error = failure.value
            if isinstance(error, WaitEnded):
                return {"record": attrs.asdict(error.record), "ended": error.reason}
            if failure.check(QueueFull):
                return {"error": "queue_full"}
            return failure  # type: ignore[return-value]

        return d.addCallbacks(lambda record: {"record": attrs.asdict(record)}, ended)

    def _pump(self, message: dict) -> Deferred:
        device_id = message["device"]
        if self._registry.get(device_id) is None:
            return succeed({})
        d = self.queue.take([device_id], clock_ms(self._clock), resend=False)
        return d.addCallback(self._deliver).addCallback(lambda _: {})

    def submit(
        self,
        device_id: str,
        name: str,
        data: Any,
        ttl: float | None = None,
        collapse_key: str | None = None,
    ) -> Deferred:
        """Send or queue a command; fire with its ``CommandRecord``.

        Without ``ttl`` the command is written now (``sent``) or fails with ``DeviceOffline``.
        With ``ttl`` (seconds) it is stored ``queued`` first (``QueueFull`` past the cap),
        superseding queued ones with the same ``collapse_key``, and written at once if the
        device is connected here.
        """
        if ttl is None:
            try:
                command = self._router.send(device_id, name, data)
            except DeviceOffline:
                return fail()
            return succeed(self._unrecorded[command.id])
        return Deferred.fromCoroutine(self._enqueue(device_id, name, data, ttl, collapse_key))

    async def _enqueue(
        self, device_id: str, name: str, data: Any, ttl: float, collapse_key: str | None
    ) -> CommandRecord:
        now = clock_ms(self._clock)
        record = CommandRecord(
            id=ids.new_id(ids.COMMAND),
            device_id=device_id,
            command=name,
            data=data,
            state=QUEUED,
            created=now,
            updated=now,
            expires=now + max(1, int(ttl * 1000)),
            collapse_key=collapse_key,
        )
        superseded = await self.queue.add(record, self.max_pending)
        self._state[QUEUED].inc()
        self._queued_since_count = True
        self._known_empty = False
        for each in superseded:
            self._finished(each)
        if self._registry.get(device_id) is not None:
            taken = await self.queue.take([device_id], clock_ms(self._clock), resend=False)
            sent = self._deliver(taken)
            record = sent.get(record.id, record)
        return record

    def _written_at_once(self, command: Command) -> None:
        """``CommandRouter.send`` wrote ``command``: record it ``sent``, in the next batch."""
        now = clock_ms(self._clock)
        self._unrecorded[command.id] = CommandRecord(
            command.id, command.device_id, command.name, command.data, SENT, now, now
        )
        self._state[SENT].inc()
        if self._recording is None and self._record_call is None:
            self._record_call = self._clock.callLater(0, self._record_batch)

    def _record_batch(self) -> None:
        """Store what was written at once, one batch in flight at a time: at 500 commands a
        second that is a store call per reactor turn at most, and none on the API's path."""
        self._record_call = None
        if not self._unrecorded:
            return
        batch = list(self._unrecorded.values())
        self._unrecorded = {}
        self._recording = self.queue.record(batch)

        def failed(failure: Failure) -> None:
            self._store_errors.labels("record").inc()
            self.log.warn(
                "{count} commands written to devices could not be recorded: {error}",
                count=len(batch),
                error=failure.getErrorMessage(),
            )

        def done(_: Any) -> None:
            self._recording = None
            if self._unrecorded:
                self._record_call = self._clock.callLater(0, self._record_batch)

        self._recording.addErrback(failed).addBoth(done)

    def recorded(self) -> Deferred:
        """Fires once every command written at once so far is stored (or given up): a drain
        waits for it before the store stops, or the last batch would find it closed."""
        return Deferred.fromCoroutine(self._all_recorded())

    async def _all_recorded(self) -> None:
        while self._recording is not None or self._unrecorded:
            if self._recording is None:
                if self._record_call is not None and self._record_call.active():
                    self._record_call.cancel()
                self._record_batch()
                continue
            finished: Deferred = Deferred()

            def passed(result: Any, finished: Deferred = finished) -> Any:
                finished.callback(None)
                return result

            self._recording.addBoth(passed)
            await finished

    # -- delivering

    def device_connected(self, session: DeviceSession) -> None:
        """A device connected here: its pending commands are written to it, in order.

        Devices connecting in one reactor turn (a reconnect storm) share one store call. A
        single node whose store held no pending command at the last count (once a second), and
        that queued none since, skips it: a connect storm then costs no store call here. (In a
        cluster another node may have queued one meanwhile, so there it always asks.)
        """
        if self._known_empty and self.remote is None:
            return
        self._connected[session.device_id] = session
        if self._take_call is None:
            self._take_call = self._clock.callLater(0, self._take_connected)

    def _take_connected(self) -> None:
        self._take_call = None
        connected, self._connected = self._connected, {}
        d = self.queue.take(list(connected), clock_ms(self._clock), resend=True)

        def failed(failure: Failure) -> None:
            # The commands stay queued: they go out on the next connect, or the next one
            # submitted while the device is here.
            self._store_errors.labels("take").inc()
            self.log.warn(
                "the command queues of {count} devices could not be read: {error}",
                count=len(connected),
                error=failure.getErrorMessage(),
            )

        d.addCallbacks(self._deliver, failed)

    def _deliver(self, taken: dict[str, Delivery]) -> dict[str, CommandRecord]:
        """Report what expired and write what is due; fire-and-forget per device."""
        sent: dict[str, CommandRecord] = {}
        for device_id, delivery in taken.items():
            for record in delivery.expired:
                self._finished(record)
            if delivery.send and self.deliver_local(device_id, delivery.send):
                sent.update((record.id, record) for record in delivery.send)
        return sent

    def deliver_local(self, device_id: str, records: Iterable[CommandRecord]) -> bool:
        """Write ``records`` (already ``sent`` in the store) to the device's session on this
        node, in order; ``False`` if it has none here (they go out again on its next connect).

        This is the one step that needs the device's own node: a cluster calls it there.
        """
        session = self._registry.get(device_id)
        if session is None:
            return False
        for record in records:
            session.send_frame(wire.command_frame(record.id, record.command, record.data))
            self._state[SENT].inc()
        return True

    # -- answers

    def ack_received(self, device_id: str, frame: wire.Frame) -> None:
        """The device acked ``frame.id``: ``acked`` with its payload, or ``failed`` when the
        ack carries an ``error`` (the result is then ``{"error", "payload"}``)."""
        if frame.id is None:
            return
        if frame.error is None:
            state, result = ACKED, frame.payload
        else:
            state, result = FAILED, {"error": frame.error, "payload": frame.payload}
        d = self._finish(device_id, frame.id, state, result, batched=True)

        def done(outcome: tuple[CommandRecord | None, bool]) -> None:
            record, changed = outcome
            if changed:
                assert record is not None
                self._finished(record)
            else:
                self.log.debug(
                    "ack of {device_id} for {command_id} changes nothing ({state})",
                    device_id=device_id,
                    command_id=frame.id,
                    state=None if record is None else record.state,
                )

        def failed(failure: Failure) -> None:
            # The command stays unacked and is sent again on the next connect.
            self._store_errors.labels("ack").inc()
            self.log.warn(
                "ack of {device_id} for {command_id} not stored: {error}",
                device_id=device_id,
                command_id=frame.id,
                error=failure.getErrorMessage(),
            )

        d.addCallbacks(done, failed)

    def _finish(
        self, device_id: str, command_id: str, state: str, result: Any, batched: bool = False
    ) -> Deferred:
        """``ICommandQueue.finish``, also for a command written at once and not yet stored.

        ``batched``: join the other steps asked for in this reactor turn in one store call
        (``finish_many``); acks come by the thousand when a fleet drains its queues.
        """
        now = clock_ms(self._clock)
        record = self._unrecorded.get(command_id)
        if record is not None and record.device_id == device_id:
            if record.finished:
                return succeed((record, False))
            record = attrs.evolve(record, state=state, result=result, updated=now)
            self._unrecorded[command_id] = record
            return succeed((record, True))
        if not batched:
            return self.queue.finish(device_id, command_id, state, result, now)
        outcome: Deferred = Deferred()
        self._finishing.append(((device_id, command_id, state, result), outcome))
        if self._finish_call is None:
            self._finish_call = self._clock.callLater(0, self._finish_batch)
        return outcome

    def _finish_batch(self) -> None:
        self._finish_call = None
        batch, self._finishing = self._finishing, []
        d = self.queue.finish_many([step for step, _ in batch], clock_ms(self._clock))

        def answered(outcomes: list) -> None:
            for (_, outcome), result in zip(batch, outcomes, strict=True):
                outcome.callback(result)

        def failed(failure: Failure) -> None:
            for _, outcome in batch:
                outcome.errback(failure)

        d.addCallbacks(answered, failed)

    def _finished(self, record: CommandRecord) -> None:
        """``record`` just reached a terminal state, once in the whole cluster: count it,
        tell the backend, answer the call waiting for it."""
        self._state[record.state].inc()
        self.log.debug(
            "command {command_id} of {device_id}: {state}",
            command_id=record.id,
            device_id=record.device_id,
            state=record.state,
        )
        self._events.emit(
            events.CommandFinished(
                record.device_id,
                record.id,
                record.command,
                record.state,
                record.result,
                record.updated,
            )
        )
        wait = self._forget_wait(record.id)
        if wait is not None:
            wait.answer.callback(record)

    # -- waiting, reading, canceling

    def wait(self, record: CommandRecord, timeout: float) -> Deferred:
        """Fire with ``record`` once it is terminal, or fail with ``WaitEnded`` after
        ``timeout`` seconds or as soon as the device disconnects from this node.

        When the wait ends, a command without ``ttl`` becomes ``timed_out`` (it will never be
        sent again); one with a ``ttl`` stays pending.
        """

        def cancel(_: Deferred) -> None:
            self._forget_wait(record.id)

        answer: Deferred = Deferred(cancel)
        timer = self._clock.callLater(timeout, self._end_wait, record.id, WAIT_TIMEOUT)
        self._waits[record.id] = _Wait(record, answer, timer)
        self._waits_by_device.setdefault(record.device_id, set()).add(record.id)
        return answer

    def _forget_wait(self, command_id: str) -> _Wait | None:
        wait = self._waits.pop(command_id, None)
        if wait is None:
            return None
        if wait.timer.active():
            wait.timer.cancel()
        waiting = self._waits_by_device.get(wait.record.device_id)
        if waiting is not None:
            waiting.discard(command_id)
            if not waiting:
                del self._waits_by_device[wait.record.device_id]
        return wait

    def _end_wait(self, command_id: str, reason: str) -> None:
        wait = self._forget_wait(command_id)
        if wait is None:
            return
        record = wait.record
        if record.expires is None:
            d = self._finish(record.device_id, record.id, TIMED_OUT, None)
        else:
            d = self.queue.get(record.device_id, record.id).addCallback(lambda now: (now, False))

        def answer(outcome: tuple[CommandRecord | None, bool]) -> None:
            current, changed = outcome
            if changed:
                assert current is not None
                self._finished(current)
            if current is not None and current.finished and not changed:
                wait.answer.callback(current)  # it finished meanwhile (another node, say)
            else:
                wait.answer.errback(WaitEnded(reason, current or record))

        d.addCallbacks(answer, wait.answer.errback)

    def _session_ended(self, session: DeviceSession, reason: str) -> None:
        if reason == events.ONLINE_TAKEOVER:
            return
        for command_id in list(self._waits_by_device.get(session.device_id, ())):
            self._end_wait(command_id, WAIT_DISCONNECTED)

    def get(self, device_id: str, command_id: str) -> Deferred:
        """Fire with the command's ``CommandRecord``; fail with ``UnknownCommand``."""
        record = self._unrecorded.get(command_id)
        if record is not None and record.device_id == device_id:
            return succeed(record)

        def found(record: CommandRecord | None) -> CommandRecord:
            if record is None:
                raise UnknownCommand(command_id)
            return record

        return self.queue.get(device_id, command_id).addCallback(found)

    def recent(self, device_id: str, limit: int) -> Deferred:
        """Fire with the device's newest ``limit`` commands, oldest first."""

        def merged(stored: list[CommandRecord]) -> list[CommandRecord]:
            fresh = [r for r in self._unrecorded.values() if r.device_id == device_id]
            return (stored + fresh)[-limit:]

        return self.queue.recent(device_id, limit).addCallback(merged)

    def cancel(self, device_id: str, command_id: str) -> Deferred:
        """Cancel an unfinished command; fire with it ``canceled``. Fails with
        ``UnknownCommand``, or ``CommandAlreadyFinished`` if it is terminal already."""

        def done(outcome: tuple[CommandRecord | None, bool]) -> CommandRecord:
            record, changed = outcome
            if record is None:
                raise UnknownCommand(command_id)
            if not changed:
                raise CommandAlreadyFinished(record)
            self._finished(record)
            return record

        return self._finish(device_id, command_id, CANCELED, None).addCallback(done)

    # -- expiry

    def expire_due(self) -> Deferred:
        """Expire pending commands past their ttl, on every device (connected or not), and
        refresh the queue depth gauge. Never fails: a store error is logged and counted."""
        now = clock_ms(self._clock)

        async def expire() -> None:
            for _ in range(EXPIRE_BATCHES):
                expired = await self.queue.expire_due(now, EXPIRE_BATCH)
                for record in expired:
                    self._finished(record)
                if len(expired) < EXPIRE_BATCH:
                    break
            self._queued_since_count = False
            depth = await self.queue.depth()
            self.queue_depth = depth
            self._known_empty = depth == 0 and not self._queued_since_count

        def failed(failure: Failure) -> None:
            self._known_empty = False  # no count: ask the store on every connect
            self._store_errors.labels("expire").inc()
            self.log.warn("expiring commands failed: {error}", error=failure.getErrorMessage())

        return Deferred.fromCoroutine(expire()).addErrback(failed)

    def pending_waits(self) -> int:
        return len(self._waits)


__all__ = [
    "CommandAlreadyFinished",
    "CommandDispatcher",
    "DeviceOffline",
    "UnknownCommand",
    "WaitEnded",
]
