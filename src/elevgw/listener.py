"""A listening endpoint as a service that binds in ``privilegedStartService``.

Like ``strports.service`` with its synchronous-raise flag, but public: a port that cannot be
bound raises ``StartupError`` there (one line naming the option), so ``twistd`` refuses to
start instead of running deaf, and the bound port is available (``port``) for tests on
``tcp:0`` and for the default public URL.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import CannotListenError

from elevgw.startup import StartupError

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
    def __init__(self, reactor: Any, description: str, factory: Any, option: str = "") -> None:
        """``option`` names where ``description`` came from (``--ws-endpoint``) in errors."""
        self._reactor = reactor
        self.description = description
        self.option = option
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
            raise StartupError(self._why(failures[0].value))

    def _why(self, error: BaseException) -> str:
        where = f"{self.option} {self.description}" if self.option else self.description
        socket_error = getattr(error, "socketError", None)
        if isinstance(error, CannotListenError) and isinstance(socket_error, OSError):
            if socket_error.errno == errno.EADDRINUSE:
                return (
                    f"cannot listen on {where}: Address already in use; stop the process "
                    f"that holds the port (another elevgw?) or choose another port"
                )
            if socket_error.errno == errno.EACCES:
                return (
                    f"cannot listen on {where}: permission denied; ports below 1024 need "
                    f"root or CAP_NET_BIND_SERVICE, or choose a port above 1023"
                )
            if socket_error.errno == errno.EADDRNOTAVAIL:
                return (
                    f"cannot listen on {where}: no such address on this host; choose an "
                    f"interface= this host has"
                )
            return f"cannot listen on {where}: {socket_error.strerror or socket_error}"
        return f"cannot listen on {where}: {error}"

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
