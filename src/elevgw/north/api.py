"""The northbound HTTP API (Klein): what the business backend calls.

JSON in and out. Every failure leaves as ``{"error": code, "detail": …}`` with a fitting
status, through ``ERRORS`` below (one table from internal failures to codes); anything not in
the table is logged with its traceback and answered 500 ``internal_error`` without it.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from klein import Klein
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from werkzeug.exceptions import HTTPException

from elevgw.core import wire
from elevgw.core.commands import SNAPSHOT_COMMAND, AnswerTimeout, DeviceOffline, DeviceWentOffline
from elevgw.core.gateway import Gateway
from elevgw.core.sessions import CLOSE_REVOKED
from elevgw.observe.logs import Logger
from elevgw.snapshots.files import FileSnapshotStore
from elevgw.snapshots.interfaces import SnapshotStoreError
from elevgw.stores.interfaces import Device, StoreUnavailable, hash_token, new_device_id, new_token

MAX_BODY = 64 * 1024
MAX_LOCATION = 200
MAX_SNAPSHOT_TIMEOUT = 120.0


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(status, code, detail)
        self.status = status
        self.code = code
        self.detail = detail


def _error_for(failure_value: BaseException) -> ApiError | None:
    """The API answer for an internal failure, or ``None`` for an unexpected one."""
    if isinstance(failure_value, ApiError):
        return failure_value
    if isinstance(failure_value, StoreUnavailable):
        return ApiError(503, "store_unavailable", "the device store is unavailable, retry later")
    if isinstance(failure_value, DeviceOffline):
        return ApiError(404, "device_offline", f"device {failure_value} is not connected")
    if isinstance(failure_value, AnswerTimeout):
        return ApiError(504, "device_timeout", "the device did not answer in time")
    if isinstance(failure_value, DeviceWentOffline):
        return ApiError(504, "device_disconnected", "the device disconnected before answering")
    if isinstance(failure_value, wire.FrameError):
        return ApiError(502, "bad_snapshot", "the device answered with " + failure_value.detail)
    if isinstance(failure_value, SnapshotStoreError):
        status = 504 if getattr(failure_value, "timed_out", False) else 502
        return ApiError(status, "snapshot_store_failed", "the snapshot could not be stored")
    return None


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1000)


_SNAPSHOT_OUTCOMES = {
    "device_offline": "offline",
    "device_timeout": "timeout",
    "device_disconnected": "disconnected",
}


class DeviceAPI:
    app = Klein()
    log = Logger()

    def __init__(self, gateway: Gateway, api_key: str | None = None) -> None:
        self.gateway = gateway
        self._api_key = api_key.encode("utf-8") if api_key else None
        self.draining = False

    def resource(self) -> Resource:
        return APIResource(self)

    def answer_now(self, handler, request) -> bytes:
        """Run a synchronous route handler outside Klein, with Klein's error handling."""
        try:
            return handler(self, request)
        except Exception:
            return self._handle_error(request, Failure())

    # -- plumbing

    @app.handle_errors(Exception)
    def _handle_error(self, request, failure):
        error: ApiError | None
        if failure.check(HTTPException):
            exc = failure.value
            error = ApiError(
                exc.code or 500,
                "not_found"
                if exc.code == 404
                else "method_not_allowed"
                if exc.code == 405
                else "bad_request",
                exc.description or exc.name,
            )
        else:
            error = _error_for(failure.value)
        if error is None:
            self.log.failure(
                "API request {method} {path} failed",
                failure,
                method=request.method.decode("ascii", "replace"),
                path=request.path.decode("utf-8", "replace"),
            )
            error = ApiError(500, "internal_error", "internal error; the gateway log has details")
        return self._json(request, {"error": error.code, "detail": error.detail}, error.status)

    def _json(self, request, body: Any, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        text = json.dumps(body, ensure_ascii=False)
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate a device sent in a log: keep it, escaped
            return json.dumps(body).encode("ascii")

    def _authorize(self, request) -> None:
        if self._api_key is None:
            return
        header = request.getHeader(b"authorization") or b""
        scheme, _, key = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self._api_key):
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="elevgw"')
            raise ApiError(
                401, "unauthorized", "missing or wrong API key (Authorization: Bearer KEY)"
            )

    def _body(self, request) -> dict:
        length = request.getHeader(b"content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            raise ApiError(413, "body_too_large", f"request body over {MAX_BODY} bytes")
        raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
        if len(raw) > MAX_BODY:
            raise ApiError(413, "body_too_large", f"request body over {MAX_BODY} bytes")
        if not raw.strip():
            raise ApiError(400, "bad_json", "request body must be a JSON object")
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError(400, "bad_json", "request body is not valid JSON")
        if not isinstance(body, dict):
            raise ApiError(400, "bad_json", "request body must be a JSON object")
        return body

    def _device_json(self, device: Device) -> dict:
        session = self.gateway.registry.get(device.device_id)
        last_seen = session.last_active if session is not None else device.last_seen
        return {
            "device_id": device.device_id,
            "location": device.location,
            "online": session is not None,
            "last_seen": _ms(last_seen),
            "connected_since": _ms(session.connected_at) if session is not None else None,
            "created": _ms(device.created),
        }

    async def _known_device(self, device_id: str) -> Device:
        device = await self.gateway.store.get_device(device_id)
        if device is None:
            raise ApiError(404, "unknown_device", f"no device {device_id}")
        return device

    # -- health

    @app.route("/healthz", methods=["GET"])
    async def healthz(self, request):
        try:
            await self.gateway.healthy()
        except Exception as e:
            return self._json(request, {"status": "unavailable", "store": str(e)}, 503)
        return self._json(
            request,
            {
                "status": "ok",
                "node_id": self.gateway.node_id,
                "sessions": len(self.gateway.registry),
            },
        )

    @app.route("/readyz", methods=["GET"])
    async def readyz(self, request):
        """Ready for new devices: the store answers and the node is not draining.

        Point a load balancer's health check here so SIGTERM takes a node out of rotation
        before its sockets close; keep ``/healthz`` for liveness.
        """
        if self.draining:
            return self._json(request, {"status": "draining"}, 503)
        return await self.healthz(request)

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request):
        self._authorize(request)
        body, content_type = self.gateway.metrics.render()
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return body

    # -- devices

    @app.route("/api/v1/devices/register", methods=["POST"])
    async def register(self, request):
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
        await self.gateway.store.add_device(device)
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
    async def list_devices(self, request):
        self._authorize(request)
        devices = await self.gateway.store.list_devices()
        return self._json(request, {"devices": [self._device_json(d) for d in devices]})

    @app.route("/api/v1/devices/<device_id>", methods=["GET"])
    async def get_device(self, request, device_id):
        self._authorize(request)
        return self._json(request, self._device_json(await self._known_device(device_id)))

    @app.route("/api/v1/devices/<device_id>", methods=["DELETE"])
    async def revoke_device(self, request, device_id):
        self._authorize(request)
        if not await self.gateway.store.delete_device(device_id):
            raise ApiError(404, "unknown_device", f"no device {device_id}")
        was_online = self.gateway.registry.end_device(device_id, "revoked", CLOSE_REVOKED)
        self.log.info("device {device_id} revoked", device_id=device_id, event="device_revoked")
        return self._json(
            request, {"device_id": device_id, "revoked": True, "was_online": was_online}
        )

    @app.route("/api/v1/devices/<device_id>/token", methods=["POST"])
    async def rotate_token(self, request, device_id):
        self._authorize(request)
        token = new_token()
        if not await self.gateway.store.set_token_hash(device_id, hash_token(token)):
            raise ApiError(404, "unknown_device", f"no device {device_id}")
        self.log.info("token of {device_id} rotated", device_id=device_id, event="token_rotated")
        return self._json(request, {"device_id": device_id, "token": token})

    @app.route("/api/v1/devices/<device_id>/logs", methods=["GET"])
    async def logs(self, request, device_id):
        self._authorize(request)
        limit = _int_arg(request, b"limit", 100, 1, 1000)
        before = _int_arg(request, b"before", None, 0, None)
        await self._known_device(device_id)
        entries = await self.gateway.store.get_logs(device_id, limit, before)
        return self._json(request, {"logs": [{"ts": e.ts, "payload": e.payload} for e in entries]})

    # -- commands

    @app.route("/api/send", methods=["POST"])
    def send(self, request):
        self._authorize(request)
        body = self._body(request)
        device_id = body.get("device_id")
        command = body.get("command")
        if not isinstance(device_id, str) or not device_id:
            raise ApiError(400, "bad_device_id", "device_id must be a non-empty string")
        if not isinstance(command, str) or not command:
            raise ApiError(400, "bad_command", "command must be a non-empty string")
        sent = self.gateway.commands.send(device_id, command, body.get("data"))
        return self._json(request, {"ok": True, "id": sent.id})

    @app.route("/api/v1/devices/remote/<device_id>/snapshot", methods=["GET"])
    async def snapshot(self, request, device_id):
        self._authorize(request)
        timeout = _float_arg(request, b"timeout", 10.0, MAX_SNAPSHOT_TIMEOUT)
        outcomes = self.gateway.metrics.snapshot_requests
        try:
            snapshot = await self.gateway.commands.request(
                device_id, SNAPSHOT_COMMAND, None, timeout
            )
        except Exception as e:
            error = _error_for(e)
            outcome = _SNAPSHOT_OUTCOMES.get(error.code, "failed") if error else "failed"
            outcomes.labels(outcome).inc()
            raise
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

    # -- snapshot files (file store only)

    @app.route("/snapshots/<path:key>", methods=["GET"])
    async def snapshot_file(self, request, key):
        self._authorize(request)
        store = self.gateway.snapshots
        found = await store.read(key) if isinstance(store, FileSnapshotStore) else None
        if found is None:
            raise ApiError(404, "not_found", f"no snapshot {key}")
        data, content_type = found
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        request.setHeader(b"Cache-Control", b"private, max-age=86400, immutable")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        return data


def _int_arg(request, name: bytes, default, low: int, high: int | None):
    values = request.args.get(name)
    if not values:
        return default
    try:
        value = int(values[0])
    except ValueError:
        raise ApiError(400, "bad_" + name.decode(), f"{name.decode()} must be an integer")
    if value < low or (high is not None and value > high):
        raise ApiError(
            400,
            "bad_" + name.decode(),
            "{} must be between {} and {}".format(
                name.decode(), low, high if high is not None else "any"
            ),
        )
    return value


def _float_arg(request, name: bytes, default: float, high: float) -> float:
    values = request.args.get(name)
    if not values:
        return default
    try:
        value = float(values[0])
    except ValueError:
        value = -1.0
    if not (0 < value <= high):
        raise ApiError(
            400,
            "bad_" + name.decode(),
            f"{name.decode()} must be a number of seconds in (0, {high}]",
        )
    return value


class APIResource(Resource):
    """The API's root: Klein's resource, except that ``POST /api/send`` runs its handler here.

    ``/api/send`` is the call a backend makes hundreds of times a second, and Klein's
    per-call machinery (a werkzeug URL adapter, a chain of Deferreds, chunked encoding)
    cost twice what the command itself does. Worse, werkzeug's matcher and Klein's
    ``render`` each build a self-referencing closure per call: about 40 objects of cyclic
    garbage per request, which at 500 calls a second made a 150 ms collector pause every
    1.5 s and stopped every device's heartbeat with it. Answered synchronously here, the
    same handler with the same error table sends one write with a ``Content-Length`` and
    leaves nothing for the cyclic collector. Every other route goes through Klein.
    """

    isLeaf = True

    def __init__(self, api: DeviceAPI) -> None:
        super().__init__()
        self._api = api
        self._klein = api.app.resource()
        self._direct = {(b"POST", b"/api/send"): DeviceAPI.send}

    def render(self, request):
        handler = self._direct.get((request.method, request.path))
        if handler is not None:
            return self._api.answer_now(handler, request)
        return self._klein.render(request)


class APIRequest(Request):
    """A request that remembers when it arrived, for the latency metric."""

    started = 0.0

    def process(self) -> None:
        self.started = self.channel.site.clock.seconds()  # type: ignore[attr-defined]
        super().process()


class APISite(Site):
    """The API's ``Site``: counts requests and latency instead of writing an access log line
    per request (at hundreds of commands a second that log would cost more than the call)."""

    requestFactory = APIRequest
    displayTracebacks = False
    noisy = False

    def __init__(self, api: DeviceAPI, clock: Any) -> None:
        # The API takes JSON only: no form decoding, which parses the Content-Type of every
        # POST with the email package (about 150 us a request).
        super().__init__(api.resource(), parsePOSTFormSubmission=False)
        self.clock = clock
        metrics = api.gateway.metrics
        self._requests = metrics.api_requests
        self._seconds = metrics.api_seconds
        self._counters: dict[tuple[bytes, int], Any] = {}

    def log(self, request: Any) -> None:
        self._seconds.observe(self.clock.seconds() - request.started)
        # Any token is a valid HTTP method, so unknown ones share one label value (a client
        # must not grow the metric without bound); the labelled child is looked up once.
        method = request.method if request.method in _METHODS else b"other"
        key = (method, request.code)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self._requests.labels(method.decode(), str(key[1]))
        counter.inc()


_METHODS = frozenset((b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"))
