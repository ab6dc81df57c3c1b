"""The device wire format: parsing frames from devices and building frames to them.

Pure functions, no I/O and no reactor, so this is the easiest part to read and to fuzz.
Every way a device frame can be wrong maps to one ``FrameError`` code; the gateway sends it
back as ``{"type": "error", "error": code, "detail": …}`` and keeps the socket open.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import attrs

from elevgw.untrusted import MAX_JSON_DEPTH, echo, nesting_exceeds
from elevgw.util import dumps_json

HEARTBEAT = "heartbeat"
LOG = "log"
SNAPSHOT = "snapshot"
ACK = "ack"
FRAME_TYPES = frozenset({HEARTBEAT, LOG, SNAPSHOT, ACK})

# Error codes sent to devices in error frames.
BAD_JSON = "bad_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_TYPE = "missing_type"
UNKNOWN_TYPE = "unknown_type"
DEVICE_MISMATCH = "device_mismatch"
BAD_ID = "bad_id"
BAD_IMAGE = "bad_image"
NOT_AN_IMAGE = "not_an_image"
STORE_UNAVAILABLE = "store_unavailable"
SNAPSHOT_FAILED = "snapshot_failed"
INTERNAL_ERROR = "internal_error"
RATE_LIMITED = "rate_limited"

_MAX_ID_LENGTH = 128


class FrameError(Exception):
    """A frame the gateway cannot act on; ``code`` goes to the device in an error frame."""

    def __init__(self, code: str, detail: str, frame_id: str | None = None) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail
        self.frame_id = frame_id


@attrs.frozen
class Frame:
    """One parsed device frame. ``payload`` is whatever JSON value the device sent."""

    type: str
    payload: Any = None
    id: str | None = None
    #: An ``ack``'s ``error``: the device could not carry the command out (``None``: it did).
    error: Any = None


_PLAIN_HEARTBEAT = Frame(type=HEARTBEAT)
_TOO_DEEP = f"frame nests arrays or objects deeper than {MAX_JSON_DEPTH} levels"
_decode_json = json.JSONDecoder().decode


def parse_frame(data: bytes, device_id: str) -> Frame:
    """Parse a text frame sent by the session of ``device_id``.

    Raises ``FrameError`` for anything that is not a JSON object with a known ``type``, an
    ``id`` that is not a short string, or a ``device_id`` naming another device (the field
    may be left out: the session already knows who it is).
    """
    try:
        value = _decode_json(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise FrameError(BAD_JSON, "frame is not valid UTF-8")
    except ValueError as e:
        raise FrameError(BAD_JSON, f"frame is not valid JSON: {e}")
    except RecursionError:
        raise FrameError(BAD_JSON, _TOO_DEEP)
    if not isinstance(value, dict):
        raise FrameError(NOT_AN_OBJECT, "frame must be a JSON object")
    frame_id = value.get("id")
    if frame_id is not None and (not isinstance(frame_id, str) or len(frame_id) > _MAX_ID_LENGTH):
        raise FrameError(BAD_ID, f"id must be a string of at most {_MAX_ID_LENGTH} characters")
    frame_type = value.get("type")
    if frame_type is None:
        raise FrameError(MISSING_TYPE, "frame has no type", frame_id)
    if frame_type.__class__ is not str or frame_type not in FRAME_TYPES:
        raise FrameError(
            UNKNOWN_TYPE,
            "unknown frame type {}; expected one of {}".format(
                echo(frame_type), ", ".join(sorted(FRAME_TYPES))
            ),
            frame_id,
        )
    claimed = value.get("device_id")
    if claimed is not None and claimed != device_id:
        raise FrameError(
            DEVICE_MISMATCH,
            f"device_id {echo(claimed)} is not this session's device",
            frame_id,
        )
    payload = value.get("payload")
    if frame_type == HEARTBEAT and payload is None and frame_id is None:
        return _PLAIN_HEARTBEAT  # the frame of almost every message: no allocation
    if payload.__class__ in (dict, list) and nesting_exceeds(data):
        raise FrameError(BAD_JSON, _TOO_DEEP, frame_id)
    error = value.get("error") if frame_type == ACK else None
    return Frame(type=frame_type, payload=payload, id=frame_id, error=error)


def decode_image(payload: Any, frame_id: str | None = None) -> bytes:
    """The image bytes of a ``snapshot`` frame's base64 payload (a ``data:`` URL prefix is allowed)."""
    if not isinstance(payload, str) or not payload:
        raise FrameError(BAD_IMAGE, "snapshot payload must be a base64 string", frame_id)
    if payload.startswith("data:"):
        _, _, payload = payload.partition(",")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise FrameError(BAD_IMAGE, "snapshot payload is not valid base64", frame_id)


_dump = dumps_json


def pong_frame(ts_ms: int) -> bytes:
    return b'{"type":"pong","ts":%d}' % ts_ms


def ack_frame(frame_id: str | None, **extra: Any) -> bytes:
    return _dump({"type": "ack", "id": frame_id, **extra})


def error_frame(code: str, detail: str, frame_id: str | None = None) -> bytes:
    frame: dict = {"type": "error", "error": code, "detail": detail}
    if frame_id is not None:
        frame["id"] = frame_id
    return _dump(frame)


def command_frame(command_id: str, name: str, data: Any) -> bytes:
    return _dump({"type": "command", "id": command_id, "payload": name, "data": data})
