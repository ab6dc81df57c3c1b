"""The command path: from an API call to a frame on the device, and answers back.

Every command gets an id (``cmd_…``) that the device echoes in its ``ack`` or ``snapshot``
frame. Requests that wait for an answer (the snapshot request today; ``wait`` and queued
commands with a TTL later) are kept per device in send order, so an answer without an id
goes to the oldest one. When a cluster comes, ``send`` is the one place that learns to
route to another node.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.logger import Logger

from elevgw.core import ids, wire
from elevgw.core.sessions import SessionRegistry

SNAPSHOT_COMMAND = "snapshot"


class DeviceOffline(Exception):
    """The device has no session here, so the command was not sent."""


class DeviceWentOffline(Exception):
    """The device disconnected before answering."""


class DeviceNotReading(Exception):
    """Writing the command overflowed the device's outbound buffer: the device is not reading
    its socket, and was closed (1008). The command was not delivered."""


class AnswerTimeout(Exception):
    """The device did not answer in time."""


@attrs.frozen
class Command:
    id: str
    device_id: str
    name: str
    data: Any


def new_command_id() -> str:
    return ids.new_id(ids.COMMAND)


class CommandRouter:
    log = Logger()

    def __init__(self, registry: SessionRegistry, clock: Any, metrics: Any = None) -> None:
        self._metrics = metrics
        self._registry = registry
        self._clock = clock
        # device_id -> OrderedDict(command_id -> Deferred), oldest first
        self._waiting: dict[str, OrderedDict[str, Deferred]] = {}
        #: Called with each ``Command`` written by ``send`` (not snapshot requests), so it
        #: can be recorded without the caller waiting for a store.
        self.on_sent: Callable[[Command], object] | None = None
        registry.on_session_ended.append(self._session_ended)

    def send(self, device_id: str, name: str, data: Any = None, track: bool = True) -> Command:
        """Write a command frame to the device's session; raise ``DeviceOffline`` if it has none,
        ``DeviceNotReading`` if the write found the device's outbound buffer full.

        ``track``: hand the command to ``on_sent`` (a snapshot request passes ``False``: the
        image answers it, not an ack).
        """
        session = self._registry.get(device_id)
        if session is None:
            if self._metrics is not None:
                self._metrics.commands.labels("offline").inc()
            raise DeviceOffline(device_id)
        command = Command(new_command_id(), device_id, name, data)
        session.send_frame(wire.command_frame(command.id, name, data))
        if session.ended:  # the write overflowed the device's outbound buffer
            if self._metrics is not None:
                self._metrics.commands.labels("not_reading").inc()
            raise DeviceNotReading(device_id)
        if self._metrics is not None:
            self._metrics.commands.labels("sent").inc()
            self._metrics.frames_out["command"] += 1
        if track and self.on_sent is not None:
            self.on_sent(command)
        self.log.debug(
            "command {command_id} {name} sent to {device_id}",
            command_id=command.id,
            name=name,
            device_id=device_id,
            event="command_sent",
        )
        return command

    def request(self, device_id: str, name: str, data: Any, timeout: float) -> Deferred:
        """Send a command and wait for the device's answer (fires with what ``answered`` gets).

        Fails with ``DeviceOffline`` at once, ``AnswerTimeout`` after ``timeout`` seconds, or
        ``DeviceWentOffline`` if the device disconnects first.
        """
        command = self.send(device_id, name, data, track=False)
        waiting = self._waiting.setdefault(device_id, OrderedDict())

        def cancelled(_: Deferred) -> None:
            waiting.pop(command.id, None)

        answer: Deferred = Deferred(cancelled)
        answer.command = command  # type: ignore[attr-defined]
        waiting[command.id] = answer
        answer.addTimeout(timeout, self._clock, onTimeoutCancel=_as_answer_timeout)

        def forget(result):
            pending = self._waiting.get(device_id)
            if pending is not None:
                pending.pop(command.id, None)
                if not pending:
                    del self._waiting[device_id]
            return result

        answer.addBoth(forget)
        return answer

    def claim(self, device_id: str, command_id: str | None) -> Deferred | None:
        """The waiting request an answer is for: by ``command_id``, else the device's oldest.

        The caller settles the returned Deferred (``callback``/``errback``); ``None`` means no
        one is waiting (an unsolicited or late answer).
        """
        pending = self._waiting.get(device_id)
        if not pending:
            return None
        if command_id is not None and command_id in pending:
            answer = pending.pop(command_id)
        elif command_id is not None and command_id.startswith(ids.COMMAND):
            return None
        else:
            _, answer = pending.popitem(last=False)
        if not pending:
            del self._waiting[device_id]
        return answer

    def pending_count(self) -> int:
        return sum(len(pending) for pending in self._waiting.values())

    def _session_ended(self, session, reason: str) -> None:
        if reason == "takeover":
            return
        pending = self._waiting.pop(session.device_id, None)
        if not pending:
            return
        for answer in list(pending.values()):
            answer.errback(DeviceWentOffline(session.device_id))


def _as_answer_timeout(result, timeout):
    if isinstance(getattr(result, "value", None), (CancelledError, TimeoutError)):
        raise AnswerTimeout(f"no answer within {timeout} s")
    return result
