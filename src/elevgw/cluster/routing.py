"""Commands to a device on any node: the API's command router, cluster-wide.

``ClusterCommands`` answers the same calls as ``CommandRouter`` (``send``, ``request``).
A device held here is served by the local router at once; otherwise presence says which
node holds it and the call goes to that node's inbox (``elevgw.cluster.bus``), which runs
it on its own router and answers. A device held nowhere (no entry, or its node's lease is
gone) is ``DeviceOffline`` at once; so is a holder that is not listening on its inbox.

The holder side (``Handlers``) maps its outcomes to codes, and the caller raises the same
exceptions the local router would, so the API's error table answers the same either way.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from elevgw.cluster.bus import BUS_DOWN, Bus, CallTimeout, NodeUnreachable, RemoteError
from elevgw.core import wire
from elevgw.core.commands import (
    SNAPSHOT_COMMAND,
    AnswerTimeout,
    Command,
    CommandRouter,
    DeviceOffline,
    DeviceWentOffline,
)
from elevgw.core.sessions import CLOSE_TAKEN_OVER, SessionRegistry
from elevgw.presence.redis import RedisPresence
from elevgw.snapshots.interfaces import SnapshotStoreError, StoredSnapshot
from elevgw.stores.interfaces import StoreUnavailable

#: Seconds a routed call may take on top of the device's own wait (two hops through Redis).
ROUTING_SLACK = 2.0

#: Devices whose holder a node remembers (then it forgets them all and starts over).
HOLDERS_REMEMBERED = 200_000

#: Seconds ``send`` waits for the holder to write the frame.
SEND_TIMEOUT = 5.0

_CODES: list[tuple[type[BaseException], str]] = [
    (DeviceOffline, "device_offline"),
    (AnswerTimeout, "device_timeout"),
    (DeviceWentOffline, "device_disconnected"),
    (SnapshotStoreError, "snapshot_store_failed"),
    (wire.FrameError, "bad_snapshot"),
]


def error_code(error: BaseException) -> tuple[str, str]:
    """The bus code of a holder-side failure (``internal`` for the unexpected)."""
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code, str(error)
    return "internal", type(error).__name__


def _local_error(device_id: str, failure: Any) -> Any:
    """Turn a routed call's failure into the exception the local router would raise."""
    if failure.check(NodeUnreachable):
        raise DeviceOffline(device_id)
    if failure.check(CallTimeout):
        raise AnswerTimeout(str(failure.value))
    if failure.check(RemoteError):
        code, detail = failure.value.code, failure.value.detail
        if code == "device_offline":
            raise DeviceOffline(device_id)
        if code == "device_timeout":
            raise AnswerTimeout(detail)
        if code == "device_disconnected":
            raise DeviceWentOffline(device_id)
        if code == "snapshot_store_failed":
            raise SnapshotStoreError(detail)
        if code == "bad_snapshot":
            raise wire.FrameError(wire.NOT_AN_IMAGE, detail)
    return failure


class ClusterCommands:
    """The command router the API uses in a cluster (see the module docstring)."""

    def __init__(
        self,
        local: CommandRouter,
        registry: SessionRegistry,
        presence: RedisPresence,
        bus: Bus,
        instance: Any,
    ) -> None:
        self.local = local
        self._registry = registry
        self._presence = presence
        self._bus = bus
        self._instance = instance
        #: device id -> the instance last found holding it (a hint; presence decides)
        self._holders: dict[str, str] = {}

    def _route(self, device_id: str, kind: str, body: dict, timeout: float) -> Deferred:
        """Call the node holding the device.

        The node last seen holding it is called straight away, saving the presence lookup
        (one Redis round trip of the three a routed call costs); if it no longer holds the
        device (it says so, or is not listening), presence is asked and the call made once
        more. Only presence ever decides that a device is offline.
        """
        if self._bus.state == BUS_DOWN:
            # No answer could reach this node: say so now rather than after the timeout.
            return fail(StoreUnavailable("this node's cluster inbox is down; retry later"))
        cached = self._holders.get(device_id)
        if cached is None or cached == self._instance():
            d = self._locate_and_call(device_id, kind, body, timeout)
        else:
            d = self._bus.call(cached, kind, body, timeout)

            def moved(failure: Failure) -> Any:
                error: Any = failure.value
                if isinstance(error, NodeUnreachable) or (
                    isinstance(error, RemoteError) and error.code == "device_offline"
                ):
                    self._holders.pop(device_id, None)
                    return self._locate_and_call(device_id, kind, body, timeout)
                return failure

            d.addErrback(moved)
        return d.addErrback(lambda f: _local_error(device_id, f))

    def call_holder(self, device_id: str, kind: str, body: dict, timeout: float) -> Deferred:
        """Run the bus handler ``kind`` on the node holding the device (``DeviceOffline`` when
        it is held nowhere): how other parts (the command queue) reach a device's node."""
        return self._route(device_id, kind, body, timeout)

    def _locate_and_call(self, device_id: str, kind: str, body: dict, timeout: float) -> Deferred:
        def found(placements: dict) -> Any:
            placement = placements.get(device_id)
            if placement is None or placement.instance == self._instance():
                # Nowhere, or an entry of this node's without a session: it just left.
                self._holders.pop(device_id, None)
                raise DeviceOffline(device_id)
            if len(self._holders) >= HOLDERS_REMEMBERED:
                self._holders.clear()
            self._holders[device_id] = placement.instance
            return self._bus.call(placement.instance, kind, body, timeout)

        return self._presence.locate([device_id]).addCallback(found)

    def send(self, device_id: str, name: str, data: Any = None) -> Command | Deferred:
        """The ``Command`` at once for a device held here, else a Deferred of it."""
        if self._registry.get(device_id) is not None:
            return self.local.send(device_id, name, data)
        body = {"device": device_id, "name": name, "data": data}
        d = self._route(device_id, "send", body, SEND_TIMEOUT)
        return d.addCallback(lambda answer: Command(answer["id"], device_id, name, data))

    def request(self, device_id: str, name: str, data: Any, timeout: float) -> Deferred:
        if self._registry.get(device_id) is not None:
            try:
                return self.local.request(device_id, name, data, timeout)
            except Exception as e:
                return fail(e)
        body = {"device": device_id, "name": name, "data": data, "timeout": timeout}
        d = self._route(device_id, "request", body, timeout + ROUTING_SLACK)

        def answered(answer: dict) -> Any:
            if "snapshot" in answer:
                return StoredSnapshot(**answer["snapshot"])
            return answer.get("result")

        return d.addCallback(answered)

    def __getattr__(self, name: str) -> Any:
        # claim, pending_count and whatever else the gateway asks of its local router.
        return getattr(self.local, name)


class Handlers:
    """What this node does with calls from other nodes about the devices it holds."""

    def __init__(
        self, router: CommandRouter, registry: SessionRegistry, clock: Any, announcer: Any
    ) -> None:
        self._router = router
        self._registry = registry
        self._clock = clock
        self._announcer = announcer

    def install(self, bus: Bus) -> None:
        bus.handlers.update(
            send=self.send, request=self.request, disconnect=self.disconnect, kick=self.kick
        )

    def send(self, message: dict) -> dict:
        command = self._router.send(message["device"], message["name"], message.get("data"))
        return {"id": command.id}

    def request(self, message: dict) -> Deferred:
        timeout = float(message.get("timeout", 10.0))
        try:
            d = self._router.request(
                message["device"], message["name"], message.get("data"), timeout
            )
        except Exception as e:
            return fail(e)

        def answered(result: Any) -> dict:
            if message["name"] == SNAPSHOT_COMMAND and isinstance(result, StoredSnapshot):
                return {"snapshot": attrs.asdict(result)}
            return {"result": result}

        return d.addCallback(answered)

    def disconnect(self, message: dict) -> dict:
        had = self._registry.end_device(
            message["device"], message["reason"], int(message["close_code"])
        )
        return {"had": had}

    def kick(self, message: dict) -> dict:
        """Another node claimed the device: close the session it names (4001), silently."""
        session = self._registry.get(message["device"])
        if session is None or session.session_id != message.get("session"):
            return {"silent_ms": None}
        silent_ms = max(0, int((self._clock.seconds() - session.last_active) * 1000))
        self._announcer.forget(session)
        self._registry.end(
            session, "takeover", CLOSE_TAKEN_OVER, announce=False, why="taken over by another node"
        )
        return {"silent_ms": silent_ms}


def route_disconnect(bus: Bus) -> Any:
    """``RedisPresence``'s way to end a session another node holds (a revoke); fires with
    whether the holder had it (``False`` when the holder is not listening: it is gone)."""

    def disconnect(device_id: str, placement: Any, reason: str, close_code: int) -> Deferred:
        body = {"device": device_id, "reason": reason, "close_code": close_code}
        d = bus.call(placement.instance, "disconnect", body, SEND_TIMEOUT)

        def unreachable(failure: Any) -> Any:
            failure.trap(NodeUnreachable)
            return {"had": False}

        return d.addErrback(unreachable).addCallback(lambda answer: bool(answer.get("had")))

    return disconnect
