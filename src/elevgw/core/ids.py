"""Ids the gateway hands out. The prefix says what an id names, so a log line or a support
ticket that quotes one is never ambiguous."""

from __future__ import annotations

import secrets

DEVICE = "dev_"
COMMAND = "cmd_"
SESSION = "ses_"


def new_id(prefix: str, nbytes: int = 8) -> str:
    return prefix + secrets.token_hex(nbytes)
