"""One gateway node as a member of a cluster: the parts, wired, as one child service.

``ClusterNode`` holds the lease keeper, the bus and the reaper (child services, started in
that order and stopped in the reverse one), and gives the gateway what changes in a
cluster: presence from Redis (``presence``), a command router that reaches devices on any
node (``commands``), and the session registry's announcer that settles online/offline in
Redis. On SIGTERM the gateway's drain calls ``settle`` once its sessions are closed (their
releases reach Redis, so they get their ``shutdown`` events) and ``retire`` (the lease goes
back at once; anything not released is reaped by the others without waiting).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from elevgw.cluster.bus import BUS_DOWN, BUS_OK, Bus, RemoteError
from elevgw.cluster.keys import ClusterKeys
from elevgw.cluster.leases import LeaseKeeper
from elevgw.cluster.lifecycle import ClusterAnnouncer
from elevgw.cluster.metrics import ClusterMetrics
from elevgw.cluster.reaper import Reaper
from elevgw.cluster.redis_calls import RedisCalls
from elevgw.cluster.routing import ClusterCommands, Handlers, error_code, route_disconnect
from elevgw.core.sessions import CLOSE_GOING_AWAY, CLOSE_TAKEN_OVER, SessionRegistry
from elevgw.events import model as events
from elevgw.presence.redis import RedisPresence
from elevgw.stores.redis_url import RedisAddress

_BUS_UP = {BUS_OK: 1.0, BUS_DOWN: 0.0}


class ClusterNode(MultiService):
    log = Logger()

    def __init__(
        self,
        redis: RedisCalls,
        address: RedisAddress,
        prefix: str,
        node_id: str,
        registry: SessionRegistry,
        router: Any,
        event_sink: events.IEventSink,
        reactor: Any,
        metrics_registry: Any,
        lease: float = 10.0,
        probe_every: float = 2.0,
    ) -> None:
        super().__init__()
        self.node_id = node_id
        self.keys = keys = ClusterKeys(prefix)
        self.registry = registry
        self.metrics = ClusterMetrics(
            metrics_registry, lease_age=self._lease_age, bus_up=self._bus_up
        )
        self.lease: LeaseKeeper = LeaseKeeper(
            redis,
            keys,
            node_id,
            reactor,
            lease=lease,
            on_fence=self._fence,
            on_instance=self._new_instance,
            on_reassert=self._reassert,
            metrics=self.metrics,
        )
        self.bus: Bus = Bus(
            redis,
            address,
            keys,
            self.instance,
            reactor,
            reactor,
            probe_every=probe_every,
            metrics=self.metrics,
            error_codes=error_code,
        )
        self.presence = RedisPresence(
            redis, keys, registry, node_id, self.instance, route_disconnect(self.bus)
        )
        self.commands = ClusterCommands(router, registry, self.presence, self.bus, self.instance)
        self.announcer = ClusterAnnouncer(
            self.presence, self.bus, registry, event_sink, reactor, node_id, metrics=self.metrics
        )
        Handlers(router, registry, reactor, self.announcer).install(self.bus)
        registry.announcer = self.announcer
        self.bus.on_subscribed.append(self._reconcile)
        self.reaper = Reaper(
            redis,
            keys,
            event_sink,
            reactor,
            consumer=self.instance,
            every=max(lease / 5, 0.05),
            claim_idle=lease * 2,
            on_reaped=self._reaped,
            after_round=self._end_calls_to_dead_nodes,
            metrics=self.metrics,
        )
        self.lease.setServiceParent(self)
        self.bus.setServiceParent(self)
        self.reaper.setServiceParent(self)

    def instance(self) -> str:
        return self.lease.instance

    def holding(self) -> bool:
        """Whether this node may take devices: it holds a live lease."""
        return self.lease.holding

    def when_held(self) -> Deferred:
        return self.lease.when_held()

    def _lease_age(self) -> float | None:
        return self.lease.age()

    def _bus_up(self) -> float:
        return _BUS_UP.get(self.bus.state, 0.5)

    # -- what the lease keeper and reaper tell us

    def _fence(self) -> None:
        count = self.registry.end_all(events.OFFLINE_SHUTDOWN, CLOSE_GOING_AWAY, announce=False)
        self.announcer.forget_all()
        self.log.error("cluster: fenced, {count} device sockets closed (1001)", count=count)

    def _new_instance(self, old: str, new: str) -> None:
        self.bus.resubscribe()

    def _reassert(self, instance: str) -> Deferred:
        d = self.presence.reassert(instance, self.registry.sessions())

        def reasserted(taken: list) -> None:
            for device_id in taken:
                session = self.registry.get(device_id)
                if session is not None:
                    self.announcer.forget(session)
                    self.registry.end(
                        session,
                        events.ONLINE_TAKEOVER,
                        CLOSE_TAKEN_OVER,
                        announce=False,
                        why="taken over by another node",
                    )
            self.log.info(
                "cluster: presence of {count} sessions re-published ({taken} had moved)",
                count=len(self.registry),
                taken=len(taken),
            )

        return d.addCallback(reasserted)

    def _reconcile(self) -> None:
        d = Deferred.fromCoroutine(self.announcer.reconcile())
        d.addErrback(
            lambda f: self.log.warn(
                "cluster: checking sessions against presence failed: {error}",
                error=f.getErrorMessage(),
            )
        )

    def _reaped(self, instance: str) -> None:
        # Calls still waiting on it (a snapshot, a wait) end now: its devices went with it.
        self.bus.fail_calls_to(
            instance, RemoteError("device_disconnected", f"node {instance} was lost")
        )

    def _end_calls_to_dead_nodes(self) -> Deferred:
        """Whichever node reaps a dead one, calls this node is waiting on it end too."""

        def dead(instances: list[str]) -> None:
            for instance in instances:
                self._reaped(instance)

        return self.lease.dead(self.bus.callees()).addCallback(dead)

    # -- the gateway's view

    def health(self) -> dict:
        """The cluster part of ``/healthz``; ``ok`` is whether this node may hold devices."""
        age = self.lease.age()
        return {
            "ok": self.lease.holding and self.bus.state != BUS_DOWN,
            "instance": self.instance(),
            "lease": "held" if self.lease.holding else "lost",
            "lease_age": None if age is None else round(age, 3),
            "bus": self.bus.state,
            "routed_p99_ms": _p99_ms(self.metrics.routed_seconds),
        }

    def settle(self) -> Deferred:
        """Fires once the releases of ended sessions have been tried (for the drain)."""
        return self.announcer.settled()

    def retire(self) -> Deferred:
        return self.lease.retire()

    def stopService(self) -> Deferred:
        self.announcer.stop()
        return super().stopService()


def _p99_ms(histogram: Any) -> float | None:
    """The 99th percentile of routed calls (all kinds), from the histogram's buckets."""
    buckets: dict[float, float] = {}
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    if not buckets:
        return None
    total = buckets.get(float("inf"), 0.0)
    if not total:
        return None
    for bound in sorted(buckets):
        if buckets[bound] >= 0.99 * total:
            return None if bound == float("inf") else bound * 1000
    return None
