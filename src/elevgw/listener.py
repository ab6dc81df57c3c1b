"""A listening endpoint as a service that binds in ``privilegedStartService``.

Like ``strports.service`` with its synchronous-raise flag, but public: a port that cannot be
bound raises there, so ``twistd`` refuses to start instead of running deaf, and the bound
port is available (``port``) for tests on ``tcp:0`` and for the default public URL.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, maybeDeferred, succeed

#: Twisted listens with a backlog of 50: in a reconnect storm the kernel then drops the
#: handshakes' ACKs and devices wait for SYN-ACK retransmits (1, 3, 7, 15 s). The kernel
#: caps this at net.core.somaxconn.
DEFAULT_BACKLOG = 1024


def with_backlog(description: str, backlog: int = DEFAULT_BACKLOG) -> str:
    """``description`` with ``:backlog=N`` added for tcp, ssl and unix endpoints that set none."""
    kind = description.split(":", 1)[0].lower()
    if kind in ("tcp", "ssl", "unix") and "backlog=" not in description:
        return f"{description}:backlog={backlog}"
    return description


class Listener(Service):
    def __init__(self, reactor: Any, description: str, factory: Any) -> None:
        self._reactor = reactor
        self.description = description
        self.factory = factory
        self.port: Any = None
        self._listening: Deferred | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self._listening is None:
            self._listen()

    def _listen(self) -> None:
        endpoint = endpoints.serverFromString(self._reactor, with_backlog(self.description))
        failures: list = []
        self._listening = endpoint.listen(self.factory)
        self._listening.addCallbacks(self._bound, failures.append)
        if failures:
            self._listening = None
            failures[0].raiseException()

    def _bound(self, port: Any) -> Any:
        self.port = port
        return port

    def stopService(self) -> Deferred:
        super().stopService()
        port, self.port = self.port, None
        self._listening = None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening)

    def address(self) -> Any:
        """The bound address (``IAddress``), or ``None`` before binding."""
        return None if self.port is None else self.port.getHost()
