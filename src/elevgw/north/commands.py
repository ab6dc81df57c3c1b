"""Routes that reach a device: ``POST /api/send`` and the snapshot request."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from elevgw.core.commands import SNAPSHOT_COMMAND, DeviceOffline
from elevgw.north.base import APIBase, app, float_arg
from elevgw.north.errors import ApiError, error_for
from elevgw.stores.interfaces import StoreUnavailable

MAX_SNAPSHOT_TIMEOUT = 120.0

#: ``elevgw_snapshot_requests_total`` outcome for the error codes a snapshot request can end in.
_SNAPSHOT_OUTCOMES = {
    "device_offline": "offline",
    "unknown_device": "offline",
    "device_timeout": "timeout",
    "device_disconnected": "disconnected",
}


class CommandRoutes(APIBase):
    @app.route("/api/send", methods=["POST"])
    def send(self, request: Any) -> bytes | Deferred:
        """The hot route: ``elevgw.north.api.APIResource`` runs it without Klein."""
        self._authorize(request)
        body = self._body(request)
        device_id = body.get("device_id")
        command = body.get("command")
        if not isinstance(device_id, str) or not device_id:
            raise ApiError(400, "bad_device_id", "device_id must be a non-empty string")
        if not isinstance(command, str) or not command:
            raise ApiError(400, "bad_command", "command must be a non-empty string")
        try:
            sent = self.commands.send(device_id, command, body.get("data"))
        except DeviceOffline:
            return self._offline_or_unknown(request, device_id)
        if isinstance(sent, Deferred):  # held by another node of the cluster

            def offline(failure: Failure) -> Deferred:
                failure.trap(DeviceOffline)
                return self._offline_or_unknown(request, device_id)

            return sent.addCallbacks(
                lambda sent: self._json(request, {"ok": True, "id": sent.id}), offline
            )
        return self._json(request, {"ok": True, "id": sent.id})

    def _offline_or_unknown(self, request: Any, device_id: str) -> Deferred:
        """Fail with 404 ``unknown_device`` for an id that was never registered (or was
        revoked), else 404 ``device_offline``.

        Only a device that is not connected here costs this store lookup: the connected
        case, the one a backend makes hundreds of times a second, answers without it. A store
        that does not answer cannot change the outcome (the command was not sent), so the
        answer is then ``device_offline``.
        """

        def answer(device: Any) -> None:
            if device is None:
                raise ApiError(404, "unknown_device", f"no device {device_id}")
            raise DeviceOffline(device_id)

        def store_failed(failure: Failure) -> None:
            failure.trap(StoreUnavailable)
            raise DeviceOffline(device_id)

        return self.store.get_device(device_id).addCallbacks(answer, store_failed)

    @app.route("/api/v1/devices/remote/<device_id>/snapshot", methods=["GET"])
    async def snapshot(self, request: Any, device_id: str) -> bytes:
        self._authorize(request)
        timeout = float_arg(request, b"timeout", 10.0, MAX_SNAPSHOT_TIMEOUT)
        outcomes = self.metrics.snapshot_requests
        try:
            snapshot = await self.commands.request(device_id, SNAPSHOT_COMMAND, None, timeout)
        except Exception as e:
            failed: Exception = e
            if isinstance(e, DeviceOffline):
                try:
                    await self._offline_or_unknown(request, device_id)
                except Exception as known:  # unknown_device, or device_offline as before
                    failed = known
            error = error_for(failed)
            outcome = _SNAPSHOT_OUTCOMES.get(error.code, "failed") if error else "failed"
            outcomes.labels(outcome).inc()
            raise failed
        outcomes.labels("ok").inc()
        return self._json(
            request,
            {
                "device_id": device_id,
                "url": snapshot.url,
                "content_type": snapshot.content_type,
                "size": snapshot.size,
                "taken_at": snapshot.taken_at,
            },
        )
