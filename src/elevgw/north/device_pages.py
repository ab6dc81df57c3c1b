"""``GET /api/v1/devices`` a page at a time: cursors, search, and the online filter.

The store pages and searches (``IDeviceStore.page_devices``); whether a device is online is
known only to presence (``IPresence``), so the ``online`` filter drops devices here and asks
the store for more until the page is full, within ``MAX_STORE_CALLS`` calls and
``MAX_SECONDS``: a filter that matches few devices of a large fleet answers a short page with
a ``next`` rather than scanning the whole fleet in one request.

A cursor is opaque to clients; it is the ``(created, device_id)`` position of the last device
of the page as text, so paging goes on correctly after that device is deleted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from elevgw.north.base import int_arg
from elevgw.north.errors import ApiError
from elevgw.presence.interfaces import Holder
from elevgw.stores.interfaces import Device, DevicePosition, position_of

#: Store calls one filtered page may make (each examines up to ``STORE_CHUNK`` devices), and
#: the seconds it may spend: reading a device costs the reactor its share of parsing the
#: store's answer, so one request stops after about a fifth of a second of it (a Redis answer
#: of 200 devices takes a few milliseconds to parse) and answers what it found with a ``next``.
MAX_STORE_CALLS = 100
STORE_CHUNK = 200
MAX_SECONDS = 0.2
MAX_QUERY = 200
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000

#: Query arguments that ask for a page; without any, the listing is whole, as it always was.
ARGUMENTS = (b"limit", b"after", b"q", b"online")


class BadCursor(ValueError):
    """An ``after`` that no page of this API ever handed out."""


def encode_cursor(position: DevicePosition) -> str:
    created, device_id = position
    return f"{created!r}~{device_id}"


def decode_cursor(text: str) -> DevicePosition:
    created, separator, device_id = text.partition("~")
    try:
        value = float(created)
    except ValueError:
        value = float("nan")
    if not separator or not device_id or value != value or value in (float("inf"), -float("inf")):
        raise BadCursor(text)
    return (value, device_id)


def page_arguments(
    request: Any,
) -> tuple[DevicePosition | None, int, str | None, bool | None]:
    """``(after, limit, query, online)`` from the query string; 400 ``bad_<name>`` if not."""
    after = _text(request, b"after", 300)
    try:
        position = None if after is None else decode_cursor(after)
    except BadCursor:
        raise ApiError(400, "bad_after", "after must be the next cursor of an earlier page")
    limit = int_arg(request, b"limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    online = (_text(request, b"online", 10) or "any").lower()
    if online not in ("any", "true", "false", "1", "0"):
        raise ApiError(400, "bad_online", "online must be true or false")
    wanted = None if online == "any" else online in ("true", "1")
    return position, limit, _text(request, b"q", MAX_QUERY), wanted


def _text(request: Any, name: bytes, longest: int) -> str | None:
    values = request.args.get(name)
    text = name.decode()
    try:
        value = values[0].decode("utf-8").strip() if values else ""
    except UnicodeDecodeError:
        raise ApiError(400, "bad_" + text, f"{text} is not UTF-8")
    if len(value) > longest:
        raise ApiError(400, "bad_" + text, f"{text} over {longest} characters")
    return value or None


async def page_of_devices(
    store: Any,
    presence: Any,
    after: DevicePosition | None,
    limit: int,
    query: str | None,
    online: bool | None,
    now: Callable[[], float] = time.monotonic,
) -> tuple[list[Device], dict[str, Holder], str | None]:
    """Fire with up to ``limit`` devices, the holders of those online, and the cursor of the
    next page (``None``: there is none). ``now`` reads the clock for ``MAX_SECONDS``."""
    if online is None:
        devices, position = await store.page_devices(after, limit, query)
        holders = await presence.holders([d.device_id for d in devices])
        return devices, holders, None if position is None else encode_cursor(position)
    kept: list[Device] = []
    kept_holders: dict[str, Holder] = {}
    deadline = now() + MAX_SECONDS
    for _ in range(MAX_STORE_CALLS):
        devices, position = await store.page_devices(after, STORE_CHUNK, query)
        holders = await presence.holders([d.device_id for d in devices])
        for each in devices:
            holder = holders.get(each.device_id)
            if (holder is not None) is not online:
                continue
            kept.append(each)
            if holder is not None:
                kept_holders[each.device_id] = holder
            if len(kept) == limit:
                # The rest of this chunk may still hold matches: go on after this one.
                last = devices[-1] is each and position is None
                return kept, kept_holders, None if last else encode_cursor(position_of(each))
        if position is None:
            return kept, kept_holders, None
        after = position
        if now() > deadline:
            break
    return kept, kept_holders, None if after is None else encode_cursor(after)
