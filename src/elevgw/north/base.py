"""What every route shares: the one Klein route table, the narrow dependencies, JSON in and out.

Routes live in mixin classes by topic (``devices``, ``commands``, …), each decorating its
methods with ``app.route`` from here; ``elevgw.north.api.DeviceAPI`` combines them. A route
sees only ``APIDeps``: the device store, presence, the command router, the snapshot store and
the metrics, never the gateway's insides, so the same routes serve one node or a cluster.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET

from elevgw.core.command_queue import CommandDispatcher
from elevgw.core.commands import CommandRouter
from elevgw.north.errors import ApiError, error_for
from elevgw.observe.metrics import Metrics
from elevgw.presence.interfaces import IPresence
from elevgw.snapshots.interfaces import ISnapshotStore
from elevgw.stores.interfaces import IDeviceStore
from elevgw.untrusted import MAX_JSON_DEPTH, has_lone_surrogate, nesting_exceeds
from elevgw.util import dumps_json

MAX_BODY = 64 * 1024

#: The largest whole number a query argument may be: what the stores hold (64-bit signed).
MAX_INT_ARG = 2**63 - 1

#: The route table every topic module adds to.
app = Klein()


@attrs.frozen
class APIDeps:
    """What the API may use. ``health`` fires with a dict whose ``status`` is ``"ok"`` or not."""

    store: IDeviceStore
    presence: IPresence
    commands: CommandRouter
    snapshots: ISnapshotStore
    metrics: Metrics
    node_id: str
    health: Callable[[], Awaitable[dict]]
    api_key: str | None = None
    max_body: int = MAX_BODY
    max_waiting_calls: int = 1000
    #: ``GET /api/v1/status``: fires with this node's status (``elevgw.observe.status``).
    status: Callable[[], Awaitable[dict]] | None = None
    command_queue: CommandDispatcher | None = None


class APIBase:
    app = app
    log = Logger()

    def __init__(self, deps: APIDeps) -> None:
        self.store = deps.store
        self.presence = deps.presence
        self.commands = deps.commands
        self.command_queue: CommandDispatcher = deps.command_queue  # type: ignore[assignment]
        self.snapshots = deps.snapshots
        self.metrics = deps.metrics
        self.node_id = deps.node_id
        self.health = deps.health
        self.status = deps.status
        self._api_key = deps.api_key.encode("utf-8") if deps.api_key else None
        self.max_body = deps.max_body
        self.max_waiting_calls = deps.max_waiting_calls
        self.draining = False

    def answer_now(self, handler: Callable, request: Any) -> Any:
        """Run a route handler outside Klein, with the same error handling.

        The handler answers synchronously (bytes) on its fast path; where it has to wait (a
        store lookup) it returns a Deferred, whose answer is written when it fires.
        """
        try:
            body = handler(self, request)
        except Exception:
            return self._handle_error(request, Failure())
        if not isinstance(body, Deferred):
            return body
        lost: list = []
        request.notifyFinish().addErrback(lost.append)

        def write(body: bytes) -> None:
            if lost:  # the client went away: nobody to answer
                return
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
            request.finish()

        body.addErrback(lambda failure: self._handle_error(request, failure))
        body.addCallback(write)
        body.addErrback(lambda failure: self.log.failure("answering failed", failure))
        return NOT_DONE_YET

    @app.handle_errors(Exception)
    def _handle_error(self, request: Any, failure: Failure) -> bytes:
        error = error_for(failure.value) if failure.value is not None else None
        allowed = getattr(failure.value, "valid_methods", None)
        if allowed:  # a 405 says what the path takes (RFC 9110)
            request.setHeader(b"Allow", ", ".join(sorted(allowed)).encode("ascii"))
        if error is None:
            self.log.failure(
                "API request {method} {path} failed",
                failure,
                method=request.method.decode("ascii", "replace"),
                path=request.path.decode("utf-8", "replace"),
            )
            error = ApiError(500, "internal_error", "internal error; the gateway log has details")
        return self._json(request, {"error": error.code, "detail": error.detail}, error.status)

    def _json(self, request: Any, body: Any, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return dumps_json(body)

    def _authorize(self, request: Any) -> None:
        if self._api_key is None:
            return
        header = request.getHeader(b"authorization") or b""
        scheme, _, key = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self._api_key):
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="elevgw"')
            raise ApiError(
                401, "unauthorized", "missing or wrong API key (Authorization: Bearer KEY)"
            )

    def _body(self, request: Any) -> dict:
        """The request body as a JSON object; 413 over ``max_body`` bytes, 400 ``bad_json`` for
        anything else than an object, nested deeper than ``MAX_JSON_DEPTH``, or holding a lone
        surrogate (``"\\ud800"``: no UTF-8 encoding, so no store could keep it)."""
        max_body = self.max_body
        length = request.getHeader(b"content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            raise ApiError(413, "body_too_large", f"request body over {max_body} bytes")
        raw = request.content.read(max_body + 1) if request.content is not None else b""
        if len(raw) > max_body:
            raise ApiError(413, "body_too_large", f"request body over {max_body} bytes")
        if not raw.strip():
            raise ApiError(400, "bad_json", "request body must be a JSON object")
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError(400, "bad_json", "request body is not valid JSON")
        except RecursionError:
            body = None
        if body is None or nesting_exceeds(raw):
            raise ApiError(
                400, "bad_json", f"request body nests deeper than {MAX_JSON_DEPTH} levels"
            )
        if not isinstance(body, dict):
            raise ApiError(400, "bad_json", "request body must be a JSON object")
        if b"\\u" in raw and has_lone_surrogate(body):
            raise ApiError(
                400, "bad_json", "request body holds a lone surrogate (\\ud800-\\udfff)"
            )
        return body


def int_arg(request: Any, name: bytes, default: Any, low: int, high: int | None) -> Any:
    """Query argument ``name`` as a whole number in ``[low, high]``; 400 ``bad_<name>`` if not."""
    values = request.args.get(name)
    if not values:
        return default
    text = name.decode()
    try:
        value = int(values[0])
    except ValueError:
        raise ApiError(400, "bad_" + text, f"{text} must be an integer")
    if high is None:
        high = MAX_INT_ARG
    if value < low or value > high:
        raise ApiError(
            400,
            "bad_" + text,
            "{} must be between {} and {}".format(text, low, high if high is not None else "any"),
        )
    return value


def float_arg(request: Any, name: bytes, default: float, high: float) -> float:
    """Query argument ``name`` as seconds in ``(0, high]``; 400 ``bad_<name>`` if not."""
    values = request.args.get(name)
    if not values:
        return default
    try:
        value = float(values[0])
    except ValueError:
        value = -1.0
    if not (0 < value <= high):
        text = name.decode()
        raise ApiError(400, "bad_" + text, f"{text} must be a number of seconds in (0, {high}]")
    return value
