"""Lifecycle events the gateway reports to the backend: device status, snapshot ready, and
commands finished.

The device path only ever calls ``IEventSink.emit``, which must return at once: delivery
(webhooks, with their queue, retries and backoff) happens behind it and never makes a device
or an API call wait.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import succeed
from zope.interface import Interface, implementer

# Reasons carried by DeviceStatus events.
ONLINE_CONNECTED = "connected"
ONLINE_TAKEOVER = "takeover"
OFFLINE_CLOSED = "closed"
OFFLINE_TIMEOUT = "timeout"
OFFLINE_REVOKED = "revoked"
OFFLINE_SHUTDOWN = "shutdown"
OFFLINE_NODE_LOST = "node_lost"


@attrs.frozen
class DeviceStatus:
    """A device came online or went offline. ``ts`` is epoch milliseconds.

    A takeover from another node names it (``previous_node``) and says how long the device
    may have been unreachable (``gap_ms``: from its last frame on the old node, or the old
    node's last lease renewal if it died, to the new connection). ``event_id`` is set when
    the id must be the same wherever and however often the event is produced (a dead node's
    devices, reported by whichever node reaps them); otherwise the sink makes one. ``node``
    is the ``--node-id`` of the node the device is on (online) or was on (offline).
    """

    device_id: str
    status: str  # "online" | "offline"
    reason: str
    ts: int
    previous_node: str | None = None
    gap_ms: int | None = None
    event_id: str | None = None
    #: The node the device is on (online) or was on (offline; for ``node_lost`` the dead one).
    node: str | None = None


@attrs.frozen
class SnapshotReady:
    """A snapshot was stored. ``request_id`` is the command id it answered, if any."""

    device_id: str
    url: str
    request_id: str | None
    ts: int


@attrs.frozen
class CommandFinished:
    """A command reached a terminal state (``elevgw.stores.interfaces.TERMINAL_STATES``);
    ``result`` is the device's answer for ``acked``/``failed``, else ``None``."""

    device_id: str
    id: str
    command: str
    state: str
    result: Any
    ts: int


class IEventSink(Interface):
    def emit(event):
        """Accept a ``DeviceStatus``, ``SnapshotReady`` or ``CommandFinished``; return at once,
        never raise."""

    def drain(timeout):
        """Fire with ``True`` once queued events are delivered, ``False`` after ``timeout`` s."""

    def stop():
        """Give up what is still queued, release connections. Fires when done."""


@implementer(IEventSink)
class NullSink:
    """The sink when webhooks are off (the gateway logs lifecycle events itself)."""

    def emit(self, event) -> None:
        pass

    def drain(self, timeout):
        return succeed(True)

    def stop(self):
        return succeed(None)


@attrs.frozen
class LoggedEvent:
    """An event as the event log hands it on: with its log ``cursor`` (``None`` when the
    append failed or took too long) and the ``event_id`` the log entry carries, which the
    webhook sends as ``X-Elevgw-Event-Id`` so the backend can match the two."""

    event: Any
    cursor: str | None
    event_id: str
