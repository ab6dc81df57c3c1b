"""Lifecycle events the gateway reports to the backend: device status and snapshot ready.

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


@attrs.frozen
class DeviceStatus:
    """A device came online or went offline. ``ts`` is epoch milliseconds."""

    device_id: str
    status: str  # "online" | "offline"
    reason: str
    ts: int


@attrs.frozen
class SnapshotReady:
    """A snapshot was stored. ``request_id`` is the command id it answered, if any."""

    device_id: str
    url: str
    request_id: str | None
    ts: int


class IEventSink(Interface):
    def emit(event):
        """Accept a ``DeviceStatus`` or ``SnapshotReady``; return at once, never raise."""

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
