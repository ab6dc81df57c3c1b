"""Values that come from outside (devices, API clients): bounded before they are nested,
echoed or logged.

- ``nesting_exceeds``: JSON that nests deeper than the gateway will ever need. Python's
  decoder recurses per level, so a frame of a thousand ``[`` raised ``RecursionError`` out of
  the frame path; a stored value nested hundreds deep breaks whoever encodes it later.
- ``echo``: what an error message may repeat of a client's value (a 1 MiB ``type`` came back
  as a 1 MiB error frame, once per frame).
- ``loggable``: what a log line may hold of it: control characters escaped (a ``device_id``
  with a newline wrote a forged line into the log) and the length capped.
- ``redacted``: credentials a log line must never hold: a device token in a handshake's
  query, a bearer key, a signed URL's signature.

Pure functions on the reactor thread: each is linear in its input, with C-speed passes.
"""

from __future__ import annotations

import json
import re
from typing import Any

#: Containers nested deeper than this are refused (a frame object holding a payload holding
#: a few levels of its own is 3 or 4 deep).
MAX_JSON_DEPTH = 32

#: Characters of a client's string an error message repeats (at most four times as many once
#: control characters are escaped).
ECHO_CHARS = 40

#: Characters of one field a log line holds.
LOG_FIELD_CHARS = 512

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_ONE_KIND = bytes.maketrans(b"{}", b"[]")


def nesting_exceeds(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text ``data`` (already known to parse) nests arrays and objects
    deeper than ``limit``.

    Free for small documents (fewer brackets than ``limit`` cannot nest deeper); otherwise
    string contents are cut out, the rest reduced to brackets of one kind, and the innermost
    pairs removed ``limit`` times (``bytes.replace`` does not rescan, so each pass removes
    exactly one level). About 10 ms a megabyte at worst.
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    brackets = _JSON_STRING.sub(b"", data).translate(_ONE_KIND, _NOT_BRACKETS)
    for _ in range(limit):
        brackets = brackets.replace(b"[]", b"")
        if not brackets:
            return False
    return True


def has_lone_surrogate(value: Any) -> bool:
    """Whether a decoded JSON value holds a string (or key) with a lone surrogate, which
    JSON's ``\\ud800`` escapes allow and UTF-8 cannot encode."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_JSON_TYPES = {dict: "an object", list: "an array", bool: "a boolean", type(None): "null"}


def echo(value: Any, limit: int = ECHO_CHARS) -> str:
    """A short, printable description of a client's value for an error message: a string
    quoted and cut to ``limit`` characters, anything else by its JSON type."""
    if isinstance(value, str):
        shown = repr(value[:limit])  # repr escapes control characters
        return shown if len(value) <= limit else shown + "…"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return _JSON_TYPES.get(type(value), "a value")


# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: anything a log
# reader or terminal would take as the end of a line or a command.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROLS.update({0x2028: "\\u2028", 0x2029: "\\u2029"})
_ESCAPES = str.maketrans(_CONTROLS)  # type: ignore[arg-type]


def loggable(text: str, limit: int = LOG_FIELD_CHARS) -> str:
    """``text`` safe for one log line: control characters escaped, cut to ``limit``
    characters with the length said."""
    if len(text) > limit:
        text = f"{text[:limit]}…({len(text)} chars)"
    if text.isprintable():
        return text
    return text.translate(_ESCAPES).encode("utf-8", "backslashreplace").decode("utf-8")


_SECRETS = re.compile(
    r"(?i)((?:token|signature|x-oss-signature|x-oss-credential|accesskeyid|ossaccesskeyid"
    r"|api_key|apikey|secret|password)=)[^&\s\"']+"
    r"|(bearer\s+)[^\s\"',]+"
    r"|(://[^:/@\s]*:)[^@\s/]+(?=@)"
)


def redacted(text: str) -> str:
    """``text`` with credential values replaced by ``[redacted]``: query or form values
    named like a credential (``token=…``, ``Signature=…``), ``Bearer …`` keys and the
    password of a URL (``redis://:secret@host``)."""
    if "=" not in text and "earer" not in text and "@" not in text:
        return text
    return _SECRETS.sub(lambda m: (m.group(1) or m.group(2) or m.group(3)) + "[redacted]", text)
