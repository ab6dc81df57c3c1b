"""A leaner dispatch of socket events in Twisted's epoll reactor.

For every ready socket ``EPollReactor.doPoll`` calls ``log.callWithLogger``: it asks the
socket's protocol for its log prefix, copies the legacy logging context into a new dict and
pushes it with ``context.call`` around ``_doReadOrWrite``, so that a legacy log line written
during the read carries the connection's prefix. On a gateway answering 3,000 heartbeats a
second that wrapping is 5–8 % of the core. ``lean_do_poll`` is the same loop calling
``_doReadOrWrite`` directly; an exception that escapes it is logged as
``callWithLogger`` logs it (``log.err`` with the connection's prefix as ``system``).

What changes: a legacy log line written *inside* a read no longer carries the connection's
prefix as its ``system``. elevgw's own lines are structured and name the device.

The replacement is only installed on an ``EPollReactor`` whose ``doPoll`` is the one it was
written against (the source's SHA-256 is checked); anything else keeps Twisted's, and
``tests/test_lean_reactor.py`` fails when Twisted's changes, so it gets looked at.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
from typing import Any

from twisted.application.service import Service
from twisted.internet.epollreactor import EPollReactor
from twisted.python import log

from elevgw.observe.logs import Logger

#: SHA-256 of the source of ``EPollReactor.doPoll`` that ``lean_do_poll`` mirrors.
KNOWN_DO_POLL = "09b62ae68ef01b4bc5eaa170827e2baf0a2a5098e7e7ce7b5e1c80cda187c827"

_log = Logger()


def lean_do_poll(self: Any, timeout: float | None) -> None:
    """``EPollReactor.doPoll`` without ``callWithLogger`` around each event."""
    if timeout is None:
        timeout = -1  # wait indefinitely
    try:
        events = self._poller.poll(timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    do_read_or_write = self._doReadOrWrite
    selectables = self._selectables
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        try:
            do_read_or_write(selectable, fd, event)
        except KeyboardInterrupt:
            raise
        except BaseException:
            log.err(system=_prefix(selectable))


def _prefix(selectable: Any) -> str:
    try:
        return selectable.logPrefix()
    except Exception:
        return "(buggy logPrefix method)"


def known_do_poll() -> bool:
    """Whether Twisted's ``EPollReactor.doPoll`` is still the one ``lean_do_poll`` mirrors."""
    source = inspect.getsource(EPollReactor.doPoll)
    return hashlib.sha256(source.encode()).hexdigest() == KNOWN_DO_POLL


class LeanReactorService(Service):
    """Installs ``lean_do_poll`` on ``reactor`` while running; puts Twisted's back on stop.

    Several services may share one reactor (tests run several gateways): the last to stop
    restores it."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.installed = False

    def startService(self) -> None:
        super().startService()
        self.installed = install(self._reactor)

    def stopService(self) -> None:
        super().stopService()
        if self.installed:
            uninstall(self._reactor)
            self.installed = False


def install(reactor: Any) -> bool:
    """Give ``reactor`` the lean ``doPoll``; ``False`` (and no change) if it is not an epoll
    reactor with the ``doPoll`` this mirrors."""
    cls = type(reactor)
    if not (
        isinstance(reactor, EPollReactor)
        and cls.doPoll is EPollReactor.doPoll
        and cls.doIteration is EPollReactor.doPoll
    ):
        return False
    if not known_do_poll():
        _log.warn(
            "Twisted's EPollReactor.doPoll is not the one elevgw's lean dispatch mirrors:"
            " keeping Twisted's (--lean-reactor has no effect)"
        )
        return False
    attributes = vars(reactor)
    users = attributes.get("_elevgw_lean_poll_users", 0)
    if not users:
        # The main loop calls doIteration, which EPollReactor binds to doPoll.
        attributes["doIteration"] = attributes["doPoll"] = lean_do_poll.__get__(reactor)
    attributes["_elevgw_lean_poll_users"] = users + 1
    return True


def uninstall(reactor: Any) -> None:
    users = vars(reactor).get("_elevgw_lean_poll_users", 0) - 1
    if users > 0:
        reactor._elevgw_lean_poll_users = users
        return
    vars(reactor).pop("_elevgw_lean_poll_users", None)
    vars(reactor).pop("doPoll", None)
    vars(reactor).pop("doIteration", None)
