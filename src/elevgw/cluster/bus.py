"""The cluster bus: one Redis pub/sub inbox per node instance, calls and their answers.

A call is a JSON message ``{"k": kind, "id": call id, "r": caller's instance, ...}``
published to the callee's inbox; the callee's handler for ``kind`` answers with a message
``{"k": "reply", "id": ..., "ok": true, "body": ...}`` (or ``"ok": false, "error": code,
"detail": ...``) published to the caller's inbox. ``PUBLISH`` says how many subscribers got a
message: none means the callee is not listening (dead or cut off), and the call fails at
once with ``NodeUnreachable`` instead of waiting for a timeout.

Bus health: every ``probe_every`` seconds the node publishes a probe to its own inbox. A
subscription that missed ``probe_misses`` probes in a row is dropped and made again (a
subscriber connection can stay open and silent, e.g. behind a NAT that forgot it).

Pub/sub needs its own connection (a subscribed connection takes no other commands); calls
and probes are published over the shared command connection.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from elevgw.cluster.keys import ClusterKeys
from elevgw.cluster.redis_calls import RedisCalls
from elevgw.stores.redis_url import RedisAddress

#: Bus states shown in /healthz and as the ``elevgw_cluster_bus_up`` gauge.
BUS_OK = "ok"
BUS_DEGRADED = "degraded"  # subscribed, but the last probe did not come back
BUS_DOWN = "down"  # not subscribed


class NodeUnreachable(Exception):
    """The node holding the device is not listening on its inbox (dead or cut off)."""


class CallTimeout(Exception):
    """The other node did not answer in time."""


class RemoteError(Exception):
    """The other node answered a call with an error ``code``."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


class _Subscriber(txredisapi.SubscriberProtocol):
    def connectionMade(self) -> Any:
        self.transport.setTcpNoDelay(True)
        d = super().connectionMade()
        bus = self.factory.bus  # type: ignore[attr-defined]
        if isinstance(d, Deferred):
            d.addCallback(lambda _: bus._subscriber_ready(self))
            d.addErrback(lambda f: bus.log.failure("cluster bus: subscribing failed", f))
        return d

    def connectionLost(self, why: Any) -> None:
        super().connectionLost(why)
        self.factory.bus._subscriber_lost(self)  # type: ignore[attr-defined]

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.bus._received(channel, message)  # type: ignore[attr-defined]


class Bus(Service):
    """Calls between nodes over Redis pub/sub.

    ``handlers`` maps a call kind to ``handler(message) -> body`` (or a Deferred of it);
    what it raises is answered as an error, its exception class name mapped through
    ``error_codes``.
    """

    log = Logger()

    def __init__(
        self,
        redis: RedisCalls,
        address: RedisAddress,
        keys: ClusterKeys,
        instance: Callable[[], str],
        clock: Any,
        reactor: Any,
        probe_every: float = 2.0,
        probe_misses: int = 2,
        metrics: Any = None,
        error_codes: Callable[[BaseException], tuple[str, str]] | None = None,
    ) -> None:
        self.redis = redis
        self.address = address
        self.keys = keys
        self.instance = instance
        self.clock = clock
        self.reactor = reactor
        self.probe_every = probe_every
        self.probe_misses = probe_misses
        self.metrics = metrics
        self.error_codes = error_codes or (lambda e: ("internal", type(e).__name__))
        self.handlers: dict[str, Callable[[dict], Any]] = {}
        #: Called each time the inbox is listened to again (calls may have been missed).
        self.on_subscribed: list[Callable[[], None]] = []
        self._pending: dict[str, tuple[Deferred, str]] = {}
        self._factory: Any = None
        self._protocol: Any = None
        self._channel: str | None = None
        self._probe_sent: int | None = None
        self._probe_seq = 0
        self.missed_probes = 0
        self.resubscribes = 0
        self.last_probe_ms: float | None = None
        self._probe_loop = task.LoopingCall(self._probe)
        self._probe_loop.clock = clock

    # -- service

    def startService(self) -> None:
        super().startService()
        factory = txredisapi.RedisFactory(
            uuid=f"{self.address.host}:{self.address.port}",
            dbid=None,
            poolsize=1,
            isLazy=True,
            username=self.address.username,
            password=self.address.password,
            convertNumbers=False,
        )
        factory.protocol = _Subscriber
        factory.maxDelay = 2.0
        factory.initialDelay = 0.2
        factory.bus = self  # type: ignore[attr-defined]
        self._factory = factory
        factory.deferred.addErrback(
            lambda f: self.log.error(
                "cluster bus: Redis refused the subscriber connection: {error}",
                error=f.getErrorMessage(),
            )
        )
        factory.startConnecting(
            HostnameEndpoint(self.reactor, self.address.host, self.address.port)
        )
        self._probe_loop.start(self.probe_every, now=False).addErrback(
            lambda f: self.log.failure("cluster bus: the probe loop stopped", f)
        )

    def stopService(self) -> Deferred:
        super().stopService()
        if self._probe_loop.running:
            self._probe_loop.stop()
        for d, _ in list(self._pending.values()):
            d.cancel()
        factory, self._factory = self._factory, None
        self._protocol = None
        if factory is None:
            return Deferred.fromCoroutine(_nothing())
        return factory.disconnect().addBoth(lambda _: None)

    # -- state

    @property
    def state(self) -> str:
        if self._protocol is None or self._channel != self.keys.inbox(self.instance()):
            return BUS_DOWN
        if self.missed_probes:
            return BUS_DEGRADED
        return BUS_OK

    def _subscriber_ready(self, protocol: Any) -> None:
        if self._factory is None:
            protocol.transport.loseConnection()
            return
        self._protocol = protocol
        self._channel = None
        self.missed_probes = 0
        self._probe_sent = None
        self.resubscribe()

    def _subscriber_lost(self, protocol: Any) -> None:
        if self._protocol is protocol:
            self._protocol = None
            self._channel = None
            if self._factory is not None:
                self.log.warn("cluster bus: subscriber connection lost; reconnecting")

    def resubscribe(self) -> Deferred | None:
        """Listen on the current instance's inbox (after connecting or a new instance)."""
        protocol = self._protocol
        if protocol is None:
            return None
        wanted = self.keys.inbox(self.instance())
        old = self._channel
        if old == wanted:
            return None
        d = protocol.subscribe(wanted)

        def subscribed(_: Any) -> None:
            if self._protocol is protocol:
                self._channel = wanted
                self.log.info("cluster bus: listening on {channel}", channel=wanted)
                for callback in self.on_subscribed:
                    try:
                        callback()
                    except Exception:
                        self.log.failure("cluster bus: on_subscribed failed")

        d.addCallback(subscribed)
        if old is not None:
            protocol.unsubscribe(old).addErrback(lambda f: None)
        return d.addErrback(
            lambda f: self.log.warn(
                "cluster bus: subscribing to {channel} failed: {error}",
                channel=wanted,
                error=f.getErrorMessage(),
            )
        )

    # -- probes

    def _probe(self) -> None:
        try:
            if self._probe_sent is not None:
                self.missed_probes += 1
                if self.metrics is not None:
                    self.metrics.bus_probes_missed.inc()
                if self.missed_probes >= self.probe_misses and self._protocol is not None:
                    self._drop_subscriber()
            self._probe_seq += 1
            self._probe_sent = self._probe_seq
            message = {"k": "probe", "n": self._probe_seq}
            d = self._publish(self.instance(), message)
            d.addErrback(lambda f: None)  # a missing probe is what gets counted
        except Exception:
            self.log.failure("cluster bus: probe failed")

    def _drop_subscriber(self) -> None:
        self.resubscribes += 1
        if self.metrics is not None:
            self.metrics.bus_resubscribes.inc()
        self.log.warn(
            "cluster bus: {missed} probes missed; subscribing again",
            missed=self.missed_probes,
        )
        protocol, self._protocol, self._channel = self._protocol, None, None
        protocol.transport.abortConnection()

    def _probe_received(self, message: dict) -> None:
        if message.get("n") == self._probe_sent:
            self._probe_sent = None
            self.missed_probes = 0
            self.last_probe_ms = self.clock.seconds() * 1000

    # -- calls

    def _publish(self, instance: str, message: dict) -> Deferred:
        payload = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
        return self.redis.command("PUBLISH", self.keys.inbox(instance), payload)

    def call(self, instance: str, kind: str, body: dict, timeout: float) -> Deferred:
        """Fire with the callee's answer body; fail with ``NodeUnreachable``, ``CallTimeout``
        or ``RemoteError``."""
        call_id = secrets.token_hex(8)
        message = dict(body, k=kind, id=call_id, r=self.instance())
        answer: Deferred = Deferred(lambda _: self._forget(call_id))
        self._pending[call_id] = (answer, instance)

        def timed_out(result: Any, seconds: float) -> Any:
            if isinstance(result, Failure) and result.check(
                NodeUnreachable, RemoteError, txredisapi.RedisError
            ):
                return result
            raise CallTimeout(f"node {instance} did not answer within {seconds:g} s")

        answer.addTimeout(timeout, self.clock, onTimeoutCancel=timed_out)
        started = self.clock.seconds()

        def published(receivers: Any) -> None:
            if not int(receivers) and not answer.called:
                self._pending.pop(call_id, None)
                answer.errback(NodeUnreachable(f"node {instance} is not listening"))

        def not_published(failure: Failure) -> None:
            if not answer.called:
                self._pending.pop(call_id, None)
                answer.errback(failure)

        self._publish(instance, message).addCallbacks(published, not_published)

        def observed(result: Any) -> Any:
            self._pending.pop(call_id, None)
            if self.metrics is not None:
                outcome = "ok" if not isinstance(result, Failure) else "error"
                self.metrics.routed_seconds.labels(kind, outcome).observe(
                    self.clock.seconds() - started
                )
            return result

        return answer.addBoth(observed)

    def _forget(self, call_id: str) -> None:
        self._pending.pop(call_id, None)

    def callees(self) -> list[str]:
        """The instances calls are waiting on."""
        return sorted({callee for _, callee in self._pending.values()})

    def fail_calls_to(self, instance: str, error: Exception) -> None:
        """Fail every call waiting on ``instance`` (its lease is gone: it will not answer)."""
        for call_id, (answer, callee) in list(self._pending.items()):
            if callee == instance and not answer.called:
                self._pending.pop(call_id, None)
                answer.errback(error)

    def _received(self, channel: Any, raw: Any) -> None:
        try:
            message = json.loads(raw)
            kind = message.get("k")
            if kind == "reply":
                self._reply_received(message)
            elif kind == "probe":
                self._probe_received(message)
            else:
                self._call_received(kind, message)
        except Exception:
            self.log.failure("cluster bus: bad message on {channel}", channel=channel)

    def _reply_received(self, message: dict) -> None:
        pending = self._pending.pop(str(message.get("id")), None)
        if pending is None:
            return  # timed out already
        answer, _ = pending
        if message.get("ok"):
            answer.callback(message.get("body"))
        else:
            answer.errback(
                RemoteError(message.get("error", "internal"), message.get("detail", ""))
            )

    def _call_received(self, kind: str, message: dict) -> None:
        handler = self.handlers.get(kind)
        reply_to = message.get("r")
        call_id = message.get("id")
        if handler is None:
            d = fail(RemoteError("unknown_call", f"no handler for {kind!r}"))
        else:
            d = maybeDeferred(handler, message)

        def answered(body: Any) -> dict:
            return {"k": "reply", "id": call_id, "ok": True, "body": body}

        def failed(failure: Failure) -> dict:
            error: Any = failure.value
            if isinstance(error, RemoteError):
                code, detail = error.code, error.detail
            else:
                code, detail = self.error_codes(error)
                if code == "internal":
                    self.log.failure("cluster bus: {kind} call failed", failure, kind=kind)
            return {"k": "reply", "id": call_id, "ok": False, "error": code, "detail": detail}

        def send(reply: dict) -> Any:
            if reply_to is None or call_id is None:
                return None
            return self._publish(reply_to, reply)

        d.addCallbacks(answered, failed).addCallback(send).addErrback(
            lambda f: self.log.warn(
                "cluster bus: answer to {kind} call not sent: {error}",
                kind=kind,
                error=f.getErrorMessage(),
            )
        )


async def _nothing() -> None:
    return None
