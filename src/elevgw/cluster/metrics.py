"""The cluster's series in the node's ``/metrics`` (registered on the node's registry)."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from elevgw.observe.metrics import LATENCY_BUCKETS


class ClusterMetrics:
    def __init__(self, registry: Any, lease_age: Any, bus_up: Any) -> None:
        self.lease_renewals = Counter(
            "elevgw_cluster_lease_renewals", "Lease renewals that succeeded.", registry=registry
        )
        self.lease_failures = Counter(
            "elevgw_cluster_lease_failures", "Lease renewals that failed.", registry=registry
        )
        self.fences = Counter(
            "elevgw_cluster_fences",
            "Times this node dropped its devices because it could not renew its lease.",
            registry=registry,
        )
        lease_gauge = Gauge(
            "elevgw_cluster_lease_age_seconds",
            "Seconds since the last successful lease renewal was sent (-1: none yet).",
            registry=registry,
        )
        lease_gauge.set_function(lambda: _or(lease_age(), -1.0))
        bus_gauge = Gauge(
            "elevgw_cluster_bus_up",
            "1 when this node's inbox answered its last probe, 0.5 degraded, 0 down.",
            registry=registry,
        )
        bus_gauge.set_function(bus_up)
        self.bus_probes_missed = Counter(
            "elevgw_cluster_bus_probes_missed",
            "Inbox probes that did not come back in time.",
            registry=registry,
        )
        self.bus_resubscribes = Counter(
            "elevgw_cluster_bus_resubscribes",
            "Times the inbox subscription was dropped and made again.",
            registry=registry,
        )
        self.routed_seconds = Histogram(
            "elevgw_cluster_routed_seconds",
            "Calls routed to another node, by kind and outcome, as the caller saw them.",
            ["kind", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.cross_node_takeovers = Counter(
            "elevgw_cluster_takeovers",
            "Devices this node took over from another node.",
            registry=registry,
        )
        self.reaped = Counter(
            "elevgw_cluster_reaped",
            "Devices of dead nodes this node reaped (each reported offline, node_lost).",
            registry=registry,
        )


def _or(value: float | None, default: float) -> float:
    return default if value is None else value
