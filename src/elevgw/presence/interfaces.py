"""Who holds which device: the question the API asks before it reaches a device.

A single node answers from its own sessions (``elevgw.presence.local``); a cluster answers from
Redis, where each node publishes the devices it holds. The API and the console depend on this
interface only, so they are the same code on one node and on many.
"""

from __future__ import annotations

import attrs
from zope.interface import Interface


@attrs.frozen
class Holder:
    """Where a device is connected. Times are epoch seconds; ``last_active`` may be unknown
    (``None``) when the holder is another node."""

    node_id: str
    session_id: str
    connected_at: float
    last_active: float | None = None


class IPresence(Interface):
    def holder(device_id):
        """Fire with the device's ``Holder``, or ``None`` when it is connected nowhere."""

    def holders(device_ids):
        """Fire with ``{device_id: Holder}`` for those of ``device_ids`` that are connected."""

    def disconnect(device_id, reason, close_code):
        """End the device's session wherever it is (revoke); fire with whether it had one."""

    def count():
        """Fire with the number of devices connected (to this node, or the whole cluster)."""
