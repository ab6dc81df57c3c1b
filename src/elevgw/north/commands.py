"""Routes that reach a device: ``POST /api/send``, the snapshot request, and the command
queue (``/api/v1/devices/{id}/commands``: send, wait, queue, read, cancel)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from elevgw.core.command_queue import (
    WAIT_DISCONNECTED,
    CommandAlreadyFinished,
    UnknownCommand,
    WaitEnded,
)
from elevgw.core.commands import SNAPSHOT_COMMAND, DeviceOffline
from elevgw.north.base import APIBase, app, float_arg, int_arg
from elevgw.north.errors import ApiError, error_for, register
from elevgw.stores.interfaces import (
    ACKED,
    CANCELED,
    FAILED,
    SUPERSEDED,
    CommandRecord,
    QueueFull,
    StoreUnavailable,
)

MAX_SNAPSHOT_TIMEOUT = 120.0
#: Longest ``wait`` of a command call, in seconds.
MAX_WAIT = 120.0
#: Longest ``ttl`` of a queued command, in seconds (a week).
MAX_TTL = 7 * 24 * 3600.0
MAX_COLLAPSE_KEY = 128

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

    # -- the command queue

    @app.route("/api/v1/devices/<device_id>/commands", methods=["POST"])
    async def submit_command(self, request: Any, device_id: str) -> bytes:
        """Send now (``wait``: until the ack), or queue for an offline device (``ttl``)."""
        self._authorize(request)
        body = self._body(request)
        command = body.get("command")
        if not isinstance(command, str) or not command:
            raise ApiError(400, "bad_command", "command must be a non-empty string")
        wait = _seconds(body, "wait", MAX_WAIT)
        ttl = _seconds(body, "ttl", MAX_TTL)
        collapse_key = body.get("collapse_key")
        if collapse_key is not None and (
            not isinstance(collapse_key, str)
            or not collapse_key
            or len(collapse_key) > MAX_COLLAPSE_KEY
        ):
            raise ApiError(
                400,
                "bad_collapse_key",
                f"collapse_key must be a non-empty string of at most {MAX_COLLAPSE_KEY} characters",
            )
        if collapse_key is not None and ttl is None:
            raise ApiError(
                400, "bad_collapse_key", "collapse_key applies to queued commands: give a ttl"
            )
        if ttl is not None and await self.store.get_device(device_id) is None:
            raise ApiError(404, "unknown_device", f"no device {device_id}")
        try:
            record = await self.command_queue.execute(
                device_id, command, body.get("data"), ttl, collapse_key, wait
            )
        except DeviceOffline:
            return await self._offline_or_unknown(request, device_id)
        except WaitEnded as ended:
            return self._wait_ended(request, ended)
        if wait is None:
            return self._json(request, {"id": record.id, "state": record.state}, 202)
        return self._finished_answer(request, record)

    def _finished_answer(self, request: Any, record: CommandRecord) -> bytes:
        """The answer to a wait that saw its command finish: 200 when the device answered
        (``acked`` or ``failed``), else the state that ended it."""
        body = {"id": record.id, "state": record.state, "result": record.result}
        if record.state in (ACKED, FAILED):
            return self._json(request, body, 200)
        status = 409 if record.state in (CANCELED, SUPERSEDED) else 504
        body.update(
            error="command_" + record.state,
            detail=f"the command was {record.state.replace('_', ' ')} before an answer",
        )
        return self._json(request, body, status)

    def _wait_ended(self, request: Any, ended: WaitEnded) -> bytes:
        if ended.reason == WAIT_DISCONNECTED:
            code, detail = "device_disconnected", "the device disconnected before answering"
        else:
            code, detail = "device_timeout", "the device did not answer in time"
        if ended.record.pending:
            detail += f"; the command stays {ended.record.state} until acked or expired"
        return self._json(
            request,
            {"error": code, "detail": detail, "id": ended.record.id, "state": ended.record.state},
            504,
        )

    @app.route("/api/v1/devices/<device_id>/commands", methods=["GET"])
    async def list_commands(self, request: Any, device_id: str) -> bytes:
        self._authorize(request)
        limit = int_arg(request, b"limit", 100, 1, 1000)
        if await self.store.get_device(device_id) is None:
            raise ApiError(404, "unknown_device", f"no device {device_id}")
        records = await self.command_queue.recent(device_id, limit)
        return self._json(request, {"commands": [command_json(r) for r in records]})

    @app.route("/api/v1/devices/<device_id>/commands/<command_id>", methods=["GET"])
    async def get_command(self, request: Any, device_id: str, command_id: str) -> bytes:
        self._authorize(request)
        record = await self.command_queue.get(device_id, command_id)
        return self._json(request, command_json(record))

    @app.route("/api/v1/devices/<device_id>/commands/<command_id>", methods=["DELETE"])
    async def cancel_command(self, request: Any, device_id: str, command_id: str) -> bytes:
        self._authorize(request)
        record = await self.command_queue.cancel(device_id, command_id)
        return self._json(request, command_json(record))


def command_json(record: CommandRecord) -> dict:
    """A command as the API shows it; times in epoch milliseconds."""
    return {
        "id": record.id,
        "command": record.command,
        "data": record.data,
        "state": record.state,
        "result": record.result,
        "created": record.created,
        "updated": record.updated,
        "expires": record.expires,
        "collapse_key": record.collapse_key,
    }


def _seconds(body: dict, name: str, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= high:
        raise ApiError(400, "bad_" + name, f"{name} must be a number of seconds in (0, {high:g}]")
    return float(value)


register(
    UnknownCommand,
    lambda e: ApiError(404, "unknown_command", f"no command {e} for this device"),
)
register(
    CommandAlreadyFinished,
    lambda e: ApiError(
        409,
        "command_finished",
        "the command is {} already".format(e.record.state),  # type: ignore[attr-defined]
    ),
)
register(
    QueueFull,
    lambda e: ApiError(
        429, "queue_full", f"device {e} has as many queued commands as it may; retry later"
    ),
)
