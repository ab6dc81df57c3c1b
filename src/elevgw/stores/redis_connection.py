"""One Redis connection shared by every part of a node that talks to Redis.

The device store, the event log and the cluster (leases, presence, routing, reaping) send
their commands and scripts over this one connection, so Redis runs them in the order the node
issued them, and a node costs Redis one command connection (the cluster's inbox adds one
subscriber connection, which pub/sub needs for itself).

Failures: every call fails with ``StoreUnavailable`` at once while there is no connection (a
call made while ``start()`` still waits for the first one waits with it), and
after ``timeout`` seconds when Redis does not answer (the connection is then dropped, since
nothing more is expected on it). A connection that keeps answering is not "not answering":
a call behind a long queue of replies (a node reading them late in a connect storm) waits
up to ``BACKLOG_STRETCH`` times ``timeout`` while replies keep coming. txredisapi reconnects
in the background with a capped backoff.

Importing this module imports txredisapi, which installs the global reactor: import it only once
the reactor is chosen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import txredisapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from elevgw.stores.interfaces import StoreUnavailable
from elevgw.stores.redis_url import parse_redis_url

log = Logger()


@attrs.frozen
class Script:
    """A Lua script, run by its SHA-1 (``EVALSHA``) and loaded on first use."""

    source: str
    sha1: str = attrs.field(init=False)

    @sha1.default
    def _sha1(self) -> str:
        return hashlib.sha1(self.source.encode("utf-8")).hexdigest()


def _unavailable(failure: Failure) -> Any:
    if failure.check(txredisapi.RedisError):
        raise StoreUnavailable(f"redis: {failure.getErrorMessage()}")
    return failure


#: How many times ``timeout`` a call may wait while the connection keeps answering others.
BACKLOG_STRETCH = 4


class _Protocol(txredisapi.RedisProtocol):
    #: When the last reply arrived (the factory's clock), ``None`` before the first.
    last_reply: float | None = None

    def connectionMade(self) -> Any:
        # Small commands leave at once; Nagle would hold one back while an earlier one is
        # unacknowledged (several API calls in flight).
        self.transport.setTcpNoDelay(True)
        return super().connectionMade()

    def replyReceived(self, reply: Any) -> None:
        self.last_reply = self.factory.clock.seconds()  # type: ignore[attr-defined]
        super().replyReceived(reply)


class RedisConnection:
    """The connection to ``url`` (``redis://[[user]:password@]host[:port][/db]``; a bad one
    raises ``ValueError`` here), with ``timeout`` seconds bounding connecting and every call.

    ``start()`` fires once connected, or after ``timeout`` with a logged warning if Redis cannot
    be reached (calls fail until it is). It fails only when Redis refuses the configuration
    (wrong password, bad database number), which no retry fixes.
    """

    name = "redis"

    #: Longest wait, in seconds, between reconnection attempts while Redis is down; the first
    #: retry comes after one second and the delay grows by a factor of e up to this.
    reconnect_max_delay = 5.0

    def __init__(self, url: str, reactor: Any = None, timeout: float = 2.0) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.address = parse_redis_url(url)
        self.timeout = timeout
        self._reactor = reactor
        self._factory: txredisapi.RedisFactory | None = None
        self._start_wait: tuple[Any, Deferred] | None = None
        #: Calls made while ``start()`` still waits for the first connection.
        self._first_connection: list[Deferred] = []

    def start(self) -> Deferred:
        factory = txredisapi.RedisFactory(
            uuid=f"{self.address.host}:{self.address.port}",
            dbid=self.address.db,
            poolsize=1,
            isLazy=True,
            username=self.address.username,
            password=self.address.password,
            convertNumbers=False,
        )
        factory.protocol = _Protocol
        factory.clock = self._reactor  # type: ignore[attr-defined]
        factory.maxDelay = self.reconnect_max_delay
        self._factory = factory
        started: Deferred = Deferred()

        def give_up_waiting() -> None:
            log.warn(
                "redis: {address} not reachable within {timeout} s;"
                " answering 'store unavailable' until it is",
                address=self.address,
                timeout=self.timeout,
            )
            self._start_wait = None
            self._release_first_callers()
            started.callback(None)

        self._start_wait = (self._reactor.callLater(self.timeout, give_up_waiting), started)

        def connected(_) -> None:
            if self._end_start_wait() is not None:
                started.callback(None)
            else:
                log.info("redis: connected to {address}", address=self.address)

        def refused(failure: Failure) -> None:
            if self._factory is not factory:
                return  # closed by stop() during the handshake
            # txredisapi stops reconnecting for good when AUTH or SELECT fails.
            log.error(
                "redis: {address} refused the connection: {reason};"
                " Redis stays unavailable until the gateway is restarted",
                address=self.address,
                reason=failure.getErrorMessage(),
            )
            if self._end_start_wait() is not None:
                reason = StoreUnavailable(f"{self.address}: {failure.getErrorMessage()}")
                self.stop().addBoth(lambda _: started.errback(reason))

        factory.deferred.addCallbacks(connected, refused)
        endpoint = HostnameEndpoint(
            self._reactor, self.address.host, self.address.port, timeout=self.timeout
        )
        factory.startConnecting(endpoint)
        return started

    def _end_start_wait(self) -> Deferred | None:
        """Cancel ``start()``'s timer; return its unfired Deferred, if it was still waiting."""
        wait, self._start_wait = self._start_wait, None
        if wait is None:
            return None
        timer, started = wait
        timer.cancel()
        self._release_first_callers()
        return started

    def _release_first_callers(self) -> None:
        waiting, self._first_connection = self._first_connection, []
        for caller in waiting:
            caller.callback(None)

    def stop(self) -> Deferred:
        """Stop reconnecting and close the connection; calls in flight fail. Fires when closed.

        A ``start()`` still waiting for its first connection fires now, as if Redis had been
        unreachable.
        """
        started = self._end_start_wait()
        if started is not None:
            started.callback(None)
        factory, self._factory = self._factory, None
        if factory is None:
            return succeed(None)
        return factory.disconnect().addCallback(lambda _: None)

    def request(self, send: Callable[[Any], Deferred]) -> Deferred:
        """Run ``send(connection)`` under the deadline, mapping driver errors to ours."""
        factory = self._factory
        if factory is None:
            return fail(StoreUnavailable("redis connection is not started"))
        # Failing at once, instead of through txredisapi's handler, which queues the call until
        # a connection comes back, however long that takes.
        connection = next((c for c in factory.pool if c.connected), None)
        if connection is None:
            if self._start_wait is not None:
                # Still connecting for the first time: wait as ``start()`` does (at most
                # ``timeout``), so the parts that start with the connection (store, event log,
                # cluster lease) do not report a failure that is only the connection not being
                # up yet.
                first: Deferred = Deferred()
                self._first_connection.append(first)
                return first.addCallback(lambda _: self.request(send))
            return fail(StoreUnavailable(f"redis: not connected to {self.address}"))
        try:
            d = send(connection)
        except Exception:
            return fail().addErrback(_unavailable)

        clock = self._reactor
        sent = clock.seconds()
        timed_out = False
        timer: Any = None

        def check() -> None:
            nonlocal timer, timed_out
            now = clock.seconds()
            last = getattr(connection, "last_reply", None)
            if (
                last is not None
                and now - last < self.timeout
                and now - sent < self.timeout * BACKLOG_STRETCH
            ):
                # Redis answers, only not this call yet: the replies ahead of it are still
                # being read (a reactor busy with a connect storm reads them late). Not a
                # frozen Redis: look again once the connection has been silent long enough.
                timer = clock.callLater(self.timeout - (now - last), check)
                return
            # Nothing will ever answer the calls queued behind this one: drop the connection
            # (they fail now) and let txredisapi open a fresh one.
            timed_out = True
            if connection.connected:
                connection.transport.abortConnection()
            d.cancel()

        timer = clock.callLater(self.timeout, check)

        def settled(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if timed_out and isinstance(result, Failure):
                raise StoreUnavailable(
                    f"redis: {self.address} did not answer within {self.timeout} s"
                )
            return result

        return d.addBoth(settled).addErrback(_unavailable)

    def command(self, *args) -> Deferred:
        return self.request(lambda connection: connection.execute_command(*args))

    def script(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Deferred:
        def send(connection) -> Deferred:
            def load_script(failure: Failure):
                failure.trap(txredisapi.ResponseError)
                if not failure.getErrorMessage().startswith("NOSCRIPT"):
                    return failure
                return connection.execute_command("EVAL", script.source, len(keys), *keys, *args)

            d = connection.execute_command("EVALSHA", script.sha1, len(keys), *keys, *args)
            return d.addErrback(load_script)

        return self.request(send)
