"""Small helpers every layer shares: time in the units users see, and JSON bytes."""

from __future__ import annotations

import json
from typing import Any


def to_ms(seconds: float | None) -> int | None:
    """Epoch seconds (a clock's float) as the epoch milliseconds every user-facing field uses."""
    return None if seconds is None else int(seconds * 1000)


def clock_ms(clock: Any) -> int:
    """The injected clock's time in epoch milliseconds."""
    return int(clock.seconds() * 1000)


def dumps_json(value: Any) -> bytes:
    """Compact UTF-8 JSON; a lone surrogate (which a device may send) is kept, escaped."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode("ascii")
