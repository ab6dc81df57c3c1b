"""One table from internal failures to what an API client is told.

A route raises what went wrong (``StoreUnavailable``, ``DeviceOffline``, …) and never builds
an error answer itself; ``error_for`` finds the answer by the exception's class, as Klein's
``handle_errors`` does. A module that adds a failure a client may see registers it here with
``register`` next to where the exception is defined. Anything not in the table is a bug: it is
logged with its traceback and answered 500 ``internal_error`` without one.
"""

from __future__ import annotations

from collections.abc import Callable

from werkzeug.exceptions import HTTPException

from elevgw.core import wire
from elevgw.core.commands import (
    AnswerTimeout,
    DeviceNotReading,
    DeviceOffline,
    DeviceWentOffline,
)
from elevgw.snapshots.interfaces import SnapshotStoreError
from elevgw.stores.interfaces import StoreUnavailable


class ApiError(Exception):
    """An answer for the client: HTTP ``status``, a stable ``code``, a human ``detail``."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(status, code, detail)
        self.status = status
        self.code = code
        self.detail = detail


_TABLE: dict[type, Callable[[BaseException], ApiError]] = {}


def register(exception: type, to_error: Callable[[BaseException], ApiError]) -> None:
    """Answer ``exception`` (and its subclasses) with what ``to_error`` makes of it."""
    _TABLE[exception] = to_error


def error_for(value: BaseException) -> ApiError | None:
    """The answer for a failure, or ``None`` when it is unexpected (a bug)."""
    for cls in type(value).__mro__:
        to_error = _TABLE.get(cls)
        if to_error is not None:
            return to_error(value)
    return None


def _http_error(e: BaseException) -> ApiError:
    assert isinstance(e, HTTPException)
    status = e.code or 500
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "bad_request")
    return ApiError(status, code, e.description or e.name)


def _snapshot_store_error(e: BaseException) -> ApiError:
    status = 504 if getattr(e, "timed_out", False) else 502
    return ApiError(status, "snapshot_store_failed", "the snapshot could not be stored")


register(ApiError, lambda e: e)  # type: ignore[arg-type,return-value]
register(HTTPException, _http_error)
register(
    StoreUnavailable,
    lambda e: ApiError(503, "store_unavailable", "the device store is unavailable, retry later"),
)
register(DeviceOffline, lambda e: ApiError(404, "device_offline", f"device {e} is not connected"))
register(
    DeviceNotReading,
    lambda e: ApiError(
        503, "device_not_reading", f"device {e} does not read its socket; it was closed (1008)"
    ),
)
register(
    AnswerTimeout, lambda e: ApiError(504, "device_timeout", "the device did not answer in time")
)
register(
    DeviceWentOffline,
    lambda e: ApiError(504, "device_disconnected", "the device disconnected before answering"),
)
register(
    wire.FrameError,
    lambda e: ApiError(502, "bad_snapshot", "the device answered with " + e.detail),  # type: ignore[attr-defined]
)
register(SnapshotStoreError, _snapshot_store_error)
