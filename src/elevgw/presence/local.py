"""Presence on a single node: the session registry is the whole truth."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from elevgw.core.sessions import DeviceSession, SessionRegistry
from elevgw.presence.interfaces import Holder, IPresence


@implementer(IPresence)
class LocalPresence:
    def __init__(self, registry: SessionRegistry, node_id: str) -> None:
        self._registry = registry
        self._node_id = node_id

    def _holder(self, session: DeviceSession) -> Holder:
        return Holder(self._node_id, session.session_id, session.connected_at, session.last_active)

    def holder(self, device_id: str) -> Deferred:
        session = self._registry.get(device_id)
        return succeed(None if session is None else self._holder(session))

    def holders(self, device_ids) -> Deferred:
        found = {}
        get = self._registry.get
        for device_id in device_ids:
            session = get(device_id)
            if session is not None:
                found[device_id] = self._holder(session)
        return succeed(found)

    def disconnect(self, device_id: str, reason: str, close_code: int) -> Deferred:
        return succeed(self._registry.end_device(device_id, reason, close_code))

    def count(self) -> Deferred:
        return succeed(len(self._registry))
