"""The node's lease: proof, kept in Redis and timed by Redis's clock, that this node is alive.

Every node instance holds one lease (``{prefix}cluster:leases``, expiry in Redis's epoch ms)
and renews it every ``renew_every`` seconds; presence entries of an instance count only
while its lease lives, so a dead node's devices are offline for every reader the moment its
lease runs out, and the reapers (``elevgw.cluster.reaper``) then take them over. Renewing
costs one script call per node, whatever the number of devices.

Renewal outcomes:

- ``ok``: the lease runs ``lease`` seconds from now (Redis's now).
- ``missing``: Redis does not know the instance and never reaped it: Redis lost its data (a
  restart without persistence). The node registers the same instance again and re-publishes
  its sessions (``on_reassert``), so the devices stay connected.
- ``expired`` / ``reaped``: the lease ran out (this node was cut off); its devices are being
  or have been reaped. The node fences (below) and starts a new instance.

Self-fencing: a node that has not renewed for ``fence_after`` seconds (by its own clock,
counted from when the last successful renewal was *sent*) closes every device socket with
1001 and emits no offline event: the reapers emit ``node_lost`` for those devices once the
lease is gone. Fencing before the lease can expire in Redis is what keeps "one holder per
device" true while this node cannot see Redis; it needs only that the node's clock and
Redis's run at about the same rate, never that they agree on the time.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from elevgw.cluster.keys import LUA_PRELUDE, ClusterKeys
from elevgw.cluster.redis_calls import RedisCalls, Script

#: How long a reaped instance is remembered (ms): longer than any partition a node survives.
REAPED_MEMORY_MS = 24 * 3600 * 1000

_REGISTER = Script(
    LUA_PRELUDE
    + """
    local now = now_ms()
    redis.call('HSET', KEYS[2], 'node_id', ARGV[2], 'started', ms(now), 'renewed', ms(now))
    redis.call('ZADD', KEYS[1], ms(now + tonumber(ARGV[3])), ARGV[1])
    return ms(now)
    """
)

_RENEW = Script(
    LUA_PRELUDE
    + """
    local now = now_ms()
    local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
    if not expiry then
        if redis.call('ZSCORE', KEYS[3], ARGV[1]) then return {'reaped', ms(now)} end
        return {'missing', ms(now)}
    end
    if tonumber(expiry) <= now then return {'expired', ms(now)} end
    redis.call('ZADD', KEYS[1], ms(now + tonumber(ARGV[2])), ARGV[1])
    redis.call('HSET', KEYS[2], 'renewed', ms(now))
    return {'ok', ms(now)}
    """
)

# A node leaving cleanly gives its lease back; devices it could not release (Redis blipped
# during the drain) stay under an expired lease, so the reapers take them over at once.
_RETIRE = Script(
    LUA_PRELUDE
    + """
    local now = now_ms()
    if redis.call('SCARD', KEYS[3]) == 0 then
        redis.call('ZREM', KEYS[1], ARGV[1])
        redis.call('DEL', KEYS[2])
        return 1
    end
    if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
        redis.call('ZADD', KEYS[1], ms(now), ARGV[1])
    end
    return 0
    """
)

#: Seconds between registration attempts while the node holds no lease.
REGISTER_RETRY = 0.25

# Which of the given instances hold no live lease (dead, reaped or unknown).
_DEAD = Script(
    LUA_PRELUDE
    + """
    local now = now_ms()
    local dead = {}
    for _, instance in ipairs(ARGV) do
        local expiry = redis.call('ZSCORE', KEYS[1], instance)
        if not expiry or tonumber(expiry) <= now then dead[#dead + 1] = instance end
    end
    return dead
    """
)

OK = "ok"
MISSING = "missing"
EXPIRED = "expired"
REAPED = "reaped"


def new_instance(node_id: str) -> str:
    return f"{node_id}/{secrets.token_hex(4)}"


class LeaseKeeper(Service):
    """Registers and renews this node's lease; fences the node when it cannot.

    :param on_fence: called with no argument when the node must drop its devices (close 1001,
        no offline events).
    :param on_instance: called with ``(old_instance, new_instance)`` after a fence, once the
        new instance holds a lease (the bus moves to the new inbox).
    :param on_reassert: called with the instance when Redis forgot it (lost its data) and the
        node registered it again; returns a Deferred that fires once presence is re-published.

    ``held`` (a ``Deferred`` that fires with ``None``) fires the first time the node holds a
    lease; the node accepts devices from then on.
    """

    log = Logger()

    def __init__(
        self,
        redis: RedisCalls,
        keys: ClusterKeys,
        node_id: str,
        clock: Any,
        lease: float = 15.0,
        renew_every: float | None = None,
        fence_after: float | None = None,
        on_fence: Callable[[], None] = lambda: None,
        on_instance: Callable[[str, str], None] = lambda old, new: None,
        on_reassert: Callable[[str], Any] = lambda instance: None,
        metrics: Any = None,
    ) -> None:
        if lease <= 0:
            raise ValueError(f"the lease must be positive, not {lease}")
        self.redis = redis
        self.keys = keys
        self.node_id = node_id
        self.clock = clock
        self.lease = lease
        self.renew_every = renew_every if renew_every is not None else lease / 5
        self.fence_after = fence_after if fence_after is not None else lease * 2 / 3
        if not 0 < self.renew_every < self.fence_after < lease:
            raise ValueError("need 0 < renew_every < fence_after < lease")
        self.on_fence = on_fence
        self.on_instance = on_instance
        self.on_reassert = on_reassert
        self.metrics = metrics
        self.instance = new_instance(node_id)
        #: Local clock time the last successful renewal (or registration) was sent.
        self.renewed_at: float | None = None
        #: Whether the node may hold devices: it has a lease it renewed in time.
        self.holding = False
        self.fences = 0
        #: Set by ``retire``: the node is leaving, its lease is given back for good.
        self.retired = False
        self._registered = False
        self._in_flight: Deferred | None = None
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = clock
        self._held_waiters: list[Deferred] = []

    # -- service

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.renew_every, now=True).addErrback(
            lambda f: self.log.failure("the lease loop stopped", f)
        )

    def stopService(self) -> Deferred | None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return None

    def retire(self) -> Deferred:
        """Give the lease back (after the drain released the sessions) and renew it no more.
        Never fails."""
        self.holding = False
        self.retired = True
        if self._loop.running:
            self._loop.stop()
        d = self.redis.script(
            _RETIRE,
            [self.keys.leases, self.keys.node(self.instance), self.keys.held(self.instance)],
            [self.instance],
        )

        def failed(failure: Failure) -> None:
            self.log.warn(
                "cluster: could not give back the lease of {instance}: {error};"
                " it expires by itself",
                instance=self.instance,
                error=failure.getErrorMessage(),
            )

        return d.addCallbacks(lambda _: None, failed)

    def dead(self, instances: list[str]) -> Deferred:
        """Fires with those of ``instances`` whose lease is gone (by Redis's clock)."""
        if not instances:
            return succeed([])
        return self.redis.script(_DEAD, [self.keys.leases], instances)

    def when_held(self) -> Deferred:
        """Fires once the node holds a lease (at once if it does)."""
        if self.holding:
            d: Deferred = Deferred()
            d.callback(None)
            return d
        d = Deferred()
        self._held_waiters.append(d)
        return d

    def age(self) -> float | None:
        """Seconds since the last successful renewal was sent, or ``None`` before the first."""
        if self.renewed_at is None:
            return None
        return self.clock.seconds() - self.renewed_at

    # -- the loop

    def tick(self) -> None:
        """One renewal (or registration) attempt, and the fencing check. Never raises."""
        try:
            self._check_fence()
            if self._in_flight is not None:
                return  # Redis is slow: one call at a time, the fence check above still runs
            sent_at = self.clock.seconds()
            if self._registered:
                d = self._renew(sent_at)
            else:
                d = self._register(sent_at)
            self._in_flight = d
            d.addErrback(self._failed)
            d.addBoth(self._done)
        except Exception:
            self.log.failure("cluster: lease tick failed")

    def _done(self, _: Any) -> None:
        self._in_flight = None

    def _failed(self, failure: Failure) -> None:
        if not self._registered and self._loop.running:
            # No lease yet (starting, or fenced): try again soon rather than a period later.
            self.clock.callLater(min(self.renew_every, REGISTER_RETRY), self._retry_register)
        if self.metrics is not None:
            self.metrics.lease_failures.inc()
        self.log.warn(
            "cluster: lease of {instance} not renewed: {error}",
            instance=self.instance,
            error=failure.getErrorMessage(),
        )

    def _retry_register(self) -> None:
        if not self._registered and self._loop.running and not self.retired:
            self.tick()

    def _check_fence(self) -> None:
        if not self.holding or self.renewed_at is None:
            return
        if self.clock.seconds() - self.renewed_at >= self.fence_after:
            self._fence(f"no renewal for {self.fence_after:g} s")

    def _fence(self, why: str) -> None:
        """Drop every device (1001, no offline events) and go on as a new instance: the old
        one's entries are left to the reapers, never registered again."""
        self.holding = False
        self._registered = False
        self.fences += 1
        if self.metrics is not None:
            self.metrics.fences.inc()
        self.log.error(
            "cluster: node {node_id} fenced ({why}): closing its device sockets (1001);"
            " the other nodes report them offline once the lease of {instance} has expired",
            node_id=self.node_id,
            why=why,
            instance=self.instance,
        )
        try:
            self.on_fence()
        except Exception:
            self.log.failure("cluster: fencing failed")
        self._switch_instance()

    def _register(self, sent_at: float) -> Deferred:
        instance = self.instance

        def registered(_: Any) -> None:
            self._registered = True
            self._renewed(sent_at)
            self.log.info(
                "cluster: node {node_id} holds a lease as {instance}",
                node_id=self.node_id,
                instance=instance,
            )

        return self._call_register(instance).addCallback(registered)

    def _call_register(self, instance: str) -> Deferred:
        return self.redis.script(
            _REGISTER,
            [self.keys.leases, self.keys.node(instance)],
            [instance, self.node_id, int(self.lease * 1000)],
        )

    def _renew(self, sent_at: float) -> Deferred:
        instance = self.instance
        d = self.redis.script(
            _RENEW,
            [self.keys.leases, self.keys.node(instance), self.keys.reaped],
            [instance, int(self.lease * 1000)],
        )

        def renewed(reply: list) -> Any:
            outcome = reply[0]
            if instance != self.instance or self.retired:
                return None  # fenced or retired while the call was out
            if outcome == OK:
                self._renewed(sent_at)
                return None
            if outcome == MISSING:
                return self._reassert(sent_at)
            self._fence(f"lease {outcome}")
            return None

        return d.addCallback(renewed)

    def _reassert(self, sent_at: float) -> Deferred:
        self.log.warn(
            "cluster: Redis no longer knows {instance} (it lost its data?);"
            " registering again and re-publishing this node's devices",
            instance=self.instance,
        )
        instance = self.instance

        def registered(_: Any) -> Any:
            self._renewed(sent_at)
            return self.on_reassert(instance)

        return self._call_register(instance).addCallback(registered)

    def _switch_instance(self) -> None:
        old, self.instance = self.instance, new_instance(self.node_id)
        try:
            self.on_instance(old, self.instance)
        except Exception:
            self.log.failure("cluster: switching instance failed")

    def _renewed(self, sent_at: float) -> None:
        self.renewed_at = sent_at
        if self.metrics is not None:
            self.metrics.lease_renewals.inc()
        if not self.holding:
            self.holding = True
            waiters, self._held_waiters = self._held_waiters, []
            for waiter in waiters:
                waiter.callback(None)
