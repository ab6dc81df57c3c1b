"""A ``CommandRecord`` as the flat row both stores keep: the field order of ``COLUMNS``, JSON
text for ``data`` and ``result``, ``None`` for a missing ``expires``/``collapse_key``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from elevgw.stores.interfaces import CommandRecord
from elevgw.util import dumps_json

COLUMNS = (
    "id",
    "device_id",
    "command",
    "data",
    "state",
    "result",
    "created",
    "updated",
    "expires",
    "collapse_key",
)


def json_text(value: Any) -> str:
    return dumps_json(value).decode("utf-8")


def to_row(record: CommandRecord) -> tuple:
    return (
        record.id,
        record.device_id,
        record.command,
        json_text(record.data),
        record.state,
        json_text(record.result),
        record.created,
        record.updated,
        record.expires,
        record.collapse_key,
    )


def from_row(row: Sequence[Any]) -> CommandRecord:
    """The record of a row; numbers may come as text and missing values as ``""`` (Redis)."""
    expires, collapse_key = row[8], row[9]
    return CommandRecord(
        id=row[0],
        device_id=row[1],
        command=row[2],
        data=json.loads(row[3]),
        state=row[4],
        result=json.loads(row[5]),
        created=int(row[6]),
        updated=int(row[7]),
        expires=int(expires) if expires not in (None, "") else None,
        collapse_key=collapse_key or None,
    )
