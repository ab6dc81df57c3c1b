"""Routes about devices themselves: register, look up, revoke, rotate a token, read logs;
plus the node's health, readiness and metrics."""

from __future__ import annotations

import time
from typing import Any

from elevgw.core.sessions import CLOSE_REVOKED
from elevgw.events.model import OFFLINE_REVOKED
from elevgw.north import device_pages
from elevgw.north.base import APIBase, app, int_arg
from elevgw.north.errors import ApiError
from elevgw.presence.interfaces import Holder
from elevgw.snapshots.interfaces import ISnapshotFiles
from elevgw.stores.interfaces import Device, hash_token, new_device_id, new_token
from elevgw.util import to_ms

MAX_LOCATION = 200


def device_json(device: Device, holder: Holder | None) -> dict:
    """A device as the API shows it; ``holder`` is where it is connected, if anywhere."""
    last_seen = device.last_seen
    if holder is not None and holder.last_active is not None:
        last_seen = holder.last_active
    return {
        "device_id": device.device_id,
        "location": device.location,
        "online": holder is not None,
        "node": holder.node_id if holder is not None else None,
        "last_seen": to_ms(last_seen),
        "connected_since": to_ms(holder.connected_at) if holder is not None else None,
        "created": to_ms(device.created),
    }


class DeviceRoutes(APIBase):
    async def _known_device(self, device_id: str) -> Device:
        device = await self.store.get_device(device_id)
        if device is None:
            raise ApiError(404, "unknown_device", f"no device {device_id}")
        return device

    # -- health

    @app.route("/healthz", methods=["GET"])
    async def healthz(self, request: Any) -> bytes:
        report = await self.health()
        return self._json(request, report, 200 if report.get("status") == "ok" else 503)

    @app.route("/readyz", methods=["GET"])
    async def readyz(self, request: Any) -> bytes:
        """Ready for new devices: the store answers and the node is not draining.

        Point a load balancer's health check here so SIGTERM takes a node out of rotation
        before its sockets close; keep ``/healthz`` for liveness.
        """
        if self.draining:
            return self._json(request, {"status": "draining"}, 503)
        return await self.healthz(request)

    @app.route("/metrics", methods=["GET"])
    def metrics_text(self, request: Any) -> bytes:
        self._authorize(request)
        body, content_type = self.metrics.render()
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return body

    # -- devices

    @app.route("/api/v1/devices/register", methods=["POST"])
    async def register(self, request: Any) -> bytes:
        self._authorize(request)
        body = self._body(request)
        location = body.get("location")
        if not isinstance(location, str) or not location.strip():
            raise ApiError(400, "bad_location", "location must be a non-empty string")
        if len(location) > MAX_LOCATION:
            raise ApiError(400, "bad_location", f"location over {MAX_LOCATION} characters")
        token = new_token()
        device = Device(
            device_id=new_device_id(),
            location=location.strip(),
            token_hash=hash_token(token),
            created=time.time(),
        )
        await self.store.add_device(device)
        self.log.info(
            "device {device_id} registered at {location}",
            device_id=device.device_id,
            location=device.location,
            event="device_registered",
        )
        return self._json(
            request,
            {"device_id": device.device_id, "token": token, "location": device.location},
            201,
        )

    @app.route("/api/v1/devices", methods=["GET"])
    async def list_devices(self, request: Any) -> bytes:
        """Every device, or with ``limit``, ``after``, ``q`` or ``online`` one page of them
        and the ``next`` cursor (``elevgw.north.device_pages``)."""
        self._authorize(request)
        if not any(request.args.get(name, [b""])[0] for name in device_pages.ARGUMENTS):
            devices = await self.store.list_devices()
            holders = await self.presence.holders([d.device_id for d in devices])
            return self._json(
                request, {"devices": [device_json(d, holders.get(d.device_id)) for d in devices]}
            )
        devices, holders, cursor = await device_pages.page_of_devices(
            self.store, self.presence, *device_pages.page_arguments(request)
        )
        return self._json(
            request,
            {
                "devices": [device_json(d, holders.get(d.device_id)) for d in devices],
                "next": cursor,
            },
        )

    @app.route("/api/v1/devices/<device_id>", methods=["GET"])
    async def get_device(self, request: Any, device_id: str) -> bytes:
        self._authorize(request)
        device = await self._known_device(device_id)
        return self._json(request, device_json(device, await self.presence.holder(device_id)))

    @app.route("/api/v1/devices/<device_id>", methods=["DELETE"])
    async def revoke_device(self, request: Any, device_id: str) -> bytes:
        self._authorize(request)
        if not await self.store.delete_device(device_id):
            raise ApiError(404, "unknown_device", f"no device {device_id}")
        was_online = await self.presence.disconnect(device_id, OFFLINE_REVOKED, CLOSE_REVOKED)
        self.log.info("device {device_id} revoked", device_id=device_id, event="device_revoked")
        return self._json(
            request, {"device_id": device_id, "revoked": True, "was_online": was_online}
        )

    @app.route("/api/v1/devices/<device_id>/token", methods=["POST"])
    async def rotate_token(self, request: Any, device_id: str) -> bytes:
        self._authorize(request)
        token = new_token()
        if not await self.store.set_token_hash(device_id, hash_token(token)):
            raise ApiError(404, "unknown_device", f"no device {device_id}")
        self.log.info("token of {device_id} rotated", device_id=device_id, event="token_rotated")
        return self._json(request, {"device_id": device_id, "token": token})

    @app.route("/api/v1/devices/<device_id>/logs", methods=["GET"])
    async def logs(self, request: Any, device_id: str) -> bytes:
        self._authorize(request)
        limit = int_arg(request, b"limit", 100, 1, 1000)
        before = int_arg(request, b"before", None, 0, None)
        await self._known_device(device_id)
        entries = await self.store.get_logs(device_id, limit, before)
        return self._json(request, {"logs": [{"ts": e.ts, "payload": e.payload} for e in entries]})

    # -- snapshot files (stores that the API serves itself)

    @app.route("/snapshots/<path:key>", methods=["GET"])
    async def snapshot_file(self, request: Any, key: str) -> bytes:
        self._authorize(request)
        store = self.snapshots
        found = await store.read(key) if ISnapshotFiles.providedBy(store) else None
        if found is None:
            raise ApiError(404, "not_found", f"no snapshot {key}")
        data, content_type = found
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        request.setHeader(b"Cache-Control", b"private, max-age=86400, immutable")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        return data
