"""Log output for operators: JSON lines for log shippers.

Run ``twistd --logger elevgw.logs.json_lines -n elevgw`` to get one JSON object per line on
standard output instead of twistd's text lines. Every event carries the structured fields the
gateway logs with (``device_id``, ``event``, ``reason``, …) plus ``node`` (``--node-id``),
``level``, ``namespace``, ``time`` (epoch seconds) and the formatted ``message``.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from twisted.logger import ILogObserver, LogLevel, formatEvent
from twisted.logger import Logger as _TwistedLogger
from zope.interface import implementer

#: Set by ``makeService`` from ``--node-id`` so every line says which node wrote it.
node_id = ""

#: Events below this level are dropped where they are made (``--log-level``): ``twistd``
#: writes every level it is given, and a per-command debug line at hundreds of commands a
#: second costs more than the command.
level = LogLevel.info


class Logger(_TwistedLogger):
    """``twisted.logger.Logger`` that drops events below ``elevgw.logs.level`` before any
    formatting or observer work."""

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        if level < globals()["level"]:
            return
        super().emit(level, format, **kwargs)


_FIELDS_KEPT = ("device_id", "event", "reason", "status", "code", "command_id", "count", "url")


@implementer(ILogObserver)
class JSONLinesObserver:
    def __init__(self, output: IO[str]) -> None:
        self._output = output

    def __call__(self, event: dict) -> None:
        level = event.get("log_level")
        line: dict[str, Any] = {
            "time": event.get("log_time"),
            "level": level.name if level is not None else "info",
            "namespace": event.get("log_namespace"),
            "node": node_id,
            "message": formatEvent(event),
        }
        for field in _FIELDS_KEPT:
            if field in event:
                line[field] = _plain(event[field])
        failure = event.get("log_failure")
        if failure is not None:
            line["error"] = failure.getErrorMessage()
            line["traceback"] = failure.getTraceback()
        self._output.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
        self._output.flush()


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def json_lines() -> JSONLinesObserver:
    """The observer factory named by ``twistd --logger elevgw.logs.json_lines``."""
    return JSONLinesObserver(sys.stdout)
