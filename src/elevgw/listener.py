"""A listening endpoint as a service that binds in ``privilegedStartService``.

Like ``strports.service`` with its synchronous-raise flag, but public: a port that cannot be
bound raises ``StartupError`` there (one line naming the option), so ``twistd`` refuses to
start instead of running deaf, and the bound port is available (``port``) for tests on
``tcp:0`` and for the default public URL.
"""

from __future__ import annotations

import errno
import socket
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
    def __init__(
        self,
        reactor: Any,
        description: str,
        factory: Any,
        option: str = "",
        reuse_port: bool = False,
    ) -> None:
        """``option`` names where ``description`` came from (``--ws-endpoint``) in errors;
        ``reuse_port`` shares a ``tcp:``/``ssl:`` port with other processes
        (``listen_reusing_port``)."""
        self._reactor = reactor
        self.reuse_port = reuse_port
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
        if self.reuse_port:
            try:
                self._bound(listen_reusing_port(self._reactor, self.description, self.factory))
            except CannotListenError as e:
                raise StartupError(self._why(e))
            self._listening = succeed(self.port)
            return
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


def listen_reusing_port(reactor: Any, description: str, factory: Any) -> Any:
    """Listen on a ``tcp:`` or ``ssl:`` endpoint with ``SO_REUSEPORT``: several processes
    bind the same port, each with its own accept queue, and the kernel spreads new
    connections over them (``--workers``).

    The socket is made here and handed to ``reactor.adoptStreamPort``, which every supported
    Twisted has, rather than through ``tcp.makeBinding(reusePort=True)``, which only recent
    ones have. The endpoint string is parsed by Twisted itself (``serverFromString``); its
    ``_port``, ``_interface``, ``_backlog`` and, for TLS, ``_sslContextFactory`` are read
    (``tests/test_workers.py`` pins them).
    """
    endpoint = endpoints.serverFromString(reactor, with_backlog(description))
    if not isinstance(endpoint, (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint)):
        raise CannotListenError(None, None, ValueError("only tcp: and ssl: ports can be shared"))
    port_number, interface, backlog = endpoint._port, endpoint._interface, endpoint._backlog
    context = getattr(endpoint, "_sslContextFactory", None)
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, port_number))
        sock.listen(backlog)
        sock.setblocking(False)
        if context is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            factory = TLSMemoryBIOFactory(context, False, factory)
        return reactor.adoptStreamPort(sock.fileno(), family, factory)
    except OSError as e:
        raise CannotListenError(interface, port_number, e)
    finally:
        sock.close()
