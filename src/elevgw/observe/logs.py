"""Log output for operators: JSON lines for log shippers.

Run ``twistd --logger elevgw.observe.logs.json_lines -n elevgw`` to get one JSON object per line on
standard output instead of twistd's text lines. Every event carries the structured fields the
gateway logs with (``device_id``, ``event``, ``reason``, …) plus ``node`` (``--node-id``),
``level``, ``namespace``, ``time`` (epoch milliseconds) and the formatted ``message``.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

import txaio
from twisted.application.service import Service
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent, globalLogPublisher
from zope.interface import implementer

from elevgw.untrusted import LOG_FIELD_CHARS, loggable, redacted
from elevgw.util import to_ms

#: Library lines dropped above debug level because the gateway says the same better: Twisted's
#: ``ClientService`` writes one per attempt to reach Redis again (every few seconds while it is
#: down), where ``store_lost`` / ``store_still_lost`` / ``store_recovered`` say it once.
REPEATED_FORMATS = frozenset(
    {"Scheduling retry {attempt} to connect {endpoint} in {delay} seconds."}
)


@implementer(ILogObserver)
class GatewayLogFilter:
    """Wraps one log observer: drops events below ``level``, stamps ``node`` on the rest and
    makes their text fields ``loggable``.

    It covers every event, Twisted's and Autobahn's included, because it sits in front of the
    observer ``twistd`` chose rather than inside our own loggers. ``node`` names the node in
    every line (several nodes, or several workers of one host, may share a log stream).
    Fields carry what devices and API clients sent (a ``device_id`` from a handshake, a
    location): a newline in one would forge a log line, and a 7 MiB one would be a 7 MiB line,
    so control characters are escaped and the length capped. Credentials in them (a token in
    a handshake query, a bearer key, a signed URL's signature) are ``redacted``.
    """

    def __init__(self, observer: Any, level: LogLevel, node_id: str) -> None:
        self.observer = observer
        self.level = level
        self.node_id = node_id

    def __call__(self, event: dict) -> None:
        level = event.get("log_level")
        if level is not None and level < self.level:
            return
        if self.level > LogLevel.debug and event.get("log_format") in REPEATED_FORMATS:
            return
        event.setdefault("node", self.node_id)
        for name, value in event.items():
            if name.startswith("log_"):
                continue
            if value.__class__ is bytes:  # Autobahn's debug lines carry raw HTTP requests
                value = event[name] = value.decode("latin-1")
            if value.__class__ is str:
                value = redacted(value)
                if len(value) > LOG_FIELD_CHARS or not value.isprintable():
                    value = loggable(value)
                event[name] = value
        self.observer(event)


class LogFilterService(Service):
    """Puts a ``GatewayLogFilter`` in front of each observer ``twistd`` started logging to.

    twistd chooses its observer (``--logfile``, ``--logger``, syslog) only after
    ``makeService`` has returned, so the filter goes in when the service starts, and comes out
    when it stops. ``publisher._observers`` is the one private name used; a test pins it.
    """

    def __init__(self, level: LogLevel, node_id: str, publisher: Any = None) -> None:
        self.level = level
        self.node_id = node_id
        self._publisher = publisher if publisher is not None else globalLogPublisher
        self._wrapped: list[tuple[Any, GatewayLogFilter]] = []

    def startService(self) -> None:
        super().startService()
        # Autobahn's own loggers drop their events at the source by txaio's level.
        txaio.set_global_log_level(  # type: ignore[attr-defined]
            "debug" if self.level <= LogLevel.debug else "info"
        )
        for observer in list(self._publisher._observers):
            wrapper = GatewayLogFilter(observer, self.level, self.node_id)
            self._publisher.removeObserver(observer)
            self._publisher.addObserver(wrapper)
            self._wrapped.append((observer, wrapper))

    def stopService(self) -> None:
        super().stopService()
        for observer, wrapper in self._wrapped:
            self._publisher.removeObserver(wrapper)
            self._publisher.addObserver(observer)
        self._wrapped = []


class LineBudget:
    """At most ``per_second`` lines a second for a chatty kind of event; the rest are
    counted and written as one summary line at the end of that second.

    A reconnect storm brings thousands of devices back within seconds. One "online" line
    cost a large share of a handshake's CPU (twistd's text observer formats a time zone
    and flushes per line) and 2,000 lines a second help nobody; below the budget every line
    is written as before, and the exact counts are on ``/metrics`` and in the webhooks.
    ``per_second`` 0 writes every line.
    """

    def __init__(self, clock: Any, per_second: int, log: Logger, what: str) -> None:
        self.per_second = per_second
        self._clock = clock
        self._log = log
        self._what = what
        self._spent = 0
        self._held: dict[str, int] = {}
        self._window: Any = None

    def take(self, kind: str) -> bool:
        """``True`` if a line of ``kind`` may be written now; else it is counted."""
        if not self.per_second:
            return True
        if self._window is None:
            self._window = self._clock.callLater(1.0, self._close_window)
        if self._spent < self.per_second:
            self._spent += 1
            return True
        self._held[kind] = self._held.get(kind, 0) + 1
        return False

    def _close_window(self) -> None:
        self._window = None
        self._spent = 0
        held, self._held = self._held, {}
        if held:
            self._log.info(
                "{count} more {what} lines not written in the last second (over {limit} a"
                " second): {counts}",
                count=sum(held.values()),
                what=self._what,
                limit=self.per_second,
                counts=", ".join(f"{n} {kind}" for kind, n in sorted(held.items())),
                event="log_lines_held",
            )

    def stop(self) -> None:
        """Write the held count now (at shutdown) instead of a second later."""
        if self._window is not None and self._window.active():
            self._window.cancel()
            self._close_window()


_FIELDS_KEPT = ("device_id", "event", "reason", "status", "code", "command_id", "count", "url")


@implementer(ILogObserver)
class JSONLinesObserver:
    def __init__(self, output: IO[str]) -> None:
        self._output = output

    def __call__(self, event: dict) -> None:
        level = event.get("log_level")
        line: dict[str, Any] = {
            "time": to_ms(event.get("log_time")),
            "level": level.name if level is not None else "info",
            "namespace": event.get("log_namespace"),
            "node": event.get("node", ""),
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
    """The observer factory named by ``twistd --logger elevgw.observe.logs.json_lines``."""
    return JSONLinesObserver(sys.stdout)
