"""Prometheus metrics of one gateway, served at ``/metrics``.

Each ``GatewayService`` gets its own ``CollectorRegistry`` (tests run several gateways in one
process). Label values are bound once, here, so the hot path (a heartbeat) costs one
pre-bound ``inc()`` and never formats a label.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from zope.interface import implementer

from elevgw import __version__
from elevgw.core import wire
from elevgw.stores.interfaces import IDeviceStore

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SIZE_BUCKETS = (1024, 8192, 32768, 131072, 262144, 524288, 1048576, 2097152, 4194304, 8388608)

FRAME_IN_TYPES = (*sorted(wire.FRAME_TYPES), "binary", "invalid")
FRAME_OUT_TYPES = ("pong", "ack", "error", "command")
HANDSHAKE_OUTCOMES = ("accepted", "unauthorized", "unavailable", "refused")

# What ``generate_latest`` writes. prometheus_client names it ``CONTENT_TYPE_PLAIN_0_0_4`` only
# from 0.23 on; before that, ``CONTENT_TYPE_LATEST`` held this value.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _WithoutCreated:
    """A registry as ``/metrics`` shows it: without the ``_created`` series.

    prometheus_client adds a ``<name>_created`` timestamp to every counter and histogram
    child: about a third of the text, read by nobody (Prometheus finds resets by itself).
    Its switch, ``disable_created_metrics()``, is process-wide; this leaves other registries
    in the process as they are.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Any:
        for metric in self._registry.collect():  # fresh objects on every collect
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class Metrics:
    def __init__(self, node_id: str = "") -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        Gauge(
            "elevgw_info",
            "Gateway version and node id.",
            ["version", "node_id"],
            registry=registry,
        ).labels(__version__, node_id).set(1)
        self.sessions = Gauge(
            "elevgw_sessions", "Device sessions connected to this node.", registry=registry
        )
        self.handshakes = Counter(
            "elevgw_handshakes",
            "Device WebSocket handshakes by outcome (unauthorized=401, unavailable=503).",
            ["outcome"],
            registry=registry,
        )
        self.handshake = {o: self.handshakes.labels(o) for o in HANDSHAKE_OUTCOMES}
        self.gc_pauses = Histogram(
            "elevgw_gc_pause_seconds",
            "Pauses of the cyclic garbage collector (the reactor stands still meanwhile).",
            ["generation"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=registry,
        )
        # Frame counters are plain ints bumped on the reactor thread (``counts[type] += 1``)
        # and turned into counters at scrape time: a prometheus_client child's ``inc()`` takes
        # a lock, which is most of what a heartbeat costs beyond Autobahn's framing.
        self.frames_in: dict[str, int] = dict.fromkeys(FRAME_IN_TYPES, 0)
        self.frames_out: dict[str, int] = dict.fromkeys(FRAME_OUT_TYPES, 0)
        registry.register(_FrameCollector(self.frames_in, self.frames_out))
        self.frame_errors = Counter(
            "elevgw_frame_errors",
            "Error frames sent to devices by error code.",
            ["code"],
            registry=registry,
        )
        self.closes = Counter(
            "elevgw_closes",
            "Device sockets closed, by WebSocket close code (1006: dropped without a close).",
            ["code"],
            registry=registry,
        )
        self.offline = Counter(
            "elevgw_offline",
            "Sessions that ended with an offline event, by reason.",
            ["reason"],
            registry=registry,
        )
        self.takeovers = Counter(
            "elevgw_takeovers",
            "Sessions taken over by a newer connection of the same device (4001).",
            registry=registry,
        )
        self.commands = Counter(
            "elevgw_commands",
            "Commands from the API by outcome (sent, offline).",
            ["outcome"],
            registry=registry,
        )
        self.snapshot_requests = Counter(
            "elevgw_snapshot_requests",
            "Snapshot API requests by outcome (ok, offline, timeout, disconnected, failed).",
            ["outcome"],
            registry=registry,
        )
        self.snapshot_bytes = Histogram(
            "elevgw_snapshot_bytes",
            "Size of stored snapshots.",
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.snapshot_store_seconds = Histogram(
            "elevgw_snapshot_store_seconds",
            "Time to store one snapshot (upload latency), by outcome.",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.store_seconds = Histogram(
            "elevgw_store_seconds",
            "Device store call latency by operation.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.store_errors = Counter(
            "elevgw_store_errors",
            "Device store calls that failed, by operation.",
            ["operation"],
            registry=registry,
        )
        self.sweep_seconds = Histogram(
            "elevgw_sweep_seconds",
            "Duration of one liveness sweep.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.api_requests = Counter(
            "elevgw_api_requests",
            "Northbound API requests by method and status.",
            ["method", "status"],
            registry=registry,
        )
        self.api_seconds = Histogram(
            "elevgw_api_seconds",
            "Northbound API request latency.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.webhook_seconds = Histogram(
            "elevgw_webhook_seconds",
            "Webhook request latency (one attempt), by its outcome.",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

        self.limit_hits = Counter(
            "elevgw_limit_hits",
            "Times a limit was reached, by limit: message_rate (warned), message_rate_close,"
            " pending_writes (reading paused), outbound_buffer_close, handshake_timeout,"
            " handshake_size, sessions (503), api_waiting (503), body_size (413), header_size (431),"
            " url_length (414), json_depth.",
            ["limit"],
            registry=registry,
        )

    def limit_hit(self, limit: str) -> None:
        """Count one hit of ``limit`` (rare by nature: no pre-bound child)."""
        self.limit_hits.labels(limit).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(_WithoutCreated(self.registry)), CONTENT_TYPE

    def webhook_delivery_hook(self) -> Any:
        """The ``on_delivery`` hook for ``WebhookSink``: times each attempt by outcome."""
        seconds = self.webhook_seconds

        def delivery(outcome: str, elapsed: float) -> None:
            seconds.labels(outcome).observe(elapsed)

        return delivery

    def watch_webhooks(self, sink: Any) -> None:
        """Export the webhook sink's own counters and queue length at scrape time."""
        self.registry.register(_WebhookCollector(sink))

    def watch_sessions(self, count: Any) -> None:
        """Read the session gauge from ``count()`` at scrape time (nothing per connect)."""
        self.sessions.set_function(count)


STORE_OPERATIONS = (
    "ping",
    "add_device",
    "get_device",
    "list_devices",
    "page_devices",
    "delete_device",
    "set_token_hash",
    "record_last_seen",
    "append_log",
    "get_logs",
)


@implementer(IDeviceStore)
class MeasuredStore:
    """Wraps a device store so every call's latency and failures reach the metrics.

    It forwards everything else (``start``, ``stop``, ``name``, implementation extras) as is,
    so the gateway holds one store object whichever implementation is behind it.
    """

    def __init__(self, store: Any, metrics: Metrics, clock: Any, health: Any = None) -> None:
        """``health`` (a ``StoreHealth``) hears whether each call succeeded."""
        self.wrapped = store
        self._clock = clock
        self._health = health
        for operation in STORE_OPERATIONS:
            setattr(self, operation, self._measured(operation, metrics))

    def _measured(self, operation: str, metrics: Metrics) -> Any:
        call = getattr(self.wrapped, operation)
        seconds = metrics.store_seconds.labels(operation)
        errors = metrics.store_errors.labels(operation)
        clock = self._clock
        health = self._health

        def measured(*args: Any, **kwargs: Any) -> Any:
            started = clock.seconds()

            def done(result: Any) -> Any:
                seconds.observe(clock.seconds() - started)
                if health is not None:
                    health.answered()
                return result

            def failed(failure: Any) -> Any:
                errors.inc()
                if health is not None:
                    health.failed(failure)
                return failure

            return call(*args, **kwargs).addCallbacks(done, failed)

        return measured

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


class _WebhookCollector:
    """Reads ``WebhookSink.stats`` / ``queued`` / ``in_flight`` when Prometheus scrapes."""

    def __init__(self, sink: Any) -> None:
        self._sink = sink

    def describe(self) -> list:
        return []

    def collect(self) -> Any:
        deliveries = CounterMetricFamily(
            "elevgw_webhook_deliveries",
            "Webhook events by outcome: delivered, retried (attempts), rejected (4xx), "
            "failed (given up after --webhook-retry-for), dropped (queue full or shutdown).",
            labels=["outcome"],
        )
        for outcome, count in sorted(self._sink.stats.items()):
            deliveries.add_metric([outcome], count)
        yield deliveries
        yield GaugeMetricFamily(
            "elevgw_webhook_queue", "Webhook events waiting for delivery.", value=self._sink.queued
        )
        yield GaugeMetricFamily(
            "elevgw_webhook_in_flight", "Webhook requests in flight.", value=self._sink.in_flight
        )


class _FrameCollector:
    def __init__(self, frames_in: dict[str, int], frames_out: dict[str, int]) -> None:
        self._in = frames_in
        self._out = frames_out

    def describe(self) -> list:
        return []

    def collect(self) -> Any:
        for name, doc, counts in (
            ("elevgw_frames_in", "Frames received from devices by type.", self._in),
            ("elevgw_frames_out", "Frames sent to devices by type.", self._out),
        ):
            family = CounterMetricFamily(name, doc, labels=["type"])
            for kind, count in counts.items():
                family.add_metric([kind], count)
            yield family
