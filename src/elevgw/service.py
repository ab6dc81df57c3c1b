"""The gateway assembled as one tree of Twisted services.

``GatewayService`` is a ``MultiService`` whose children each own one resource: the file thread
pool, the device store, the snapshot store, the webhook sink, the sweep and the two listeners.
They start in that order and stop in the reverse one, so nothing is used after it is released.
A part that cannot start (a store that does not answer, a port that is taken) fails
``ready``; ``twistd`` then ends with one line and a non-zero exit (see ``elevgw.tap``).

``stopService`` is the SIGTERM drain, whose Deferred ``twistd`` waits for: stop accepting,
close device sockets with 1001, emit their offline events, flush ``last_seen``, give pending
webhooks a bounded grace period, then stop the children.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from elevgw import __version__
from elevgw.config import Settings
from elevgw.core.command_queue import CommandDispatcher
from elevgw.core.gateway import Gateway
from elevgw.core.sessions import CLOSE_GOING_AWAY
from elevgw.events import model as events
from elevgw.events.health import HealthTracker
from elevgw.events.log import EventLog, EventLogMetrics, ObservingSink
from elevgw.events.webhooks import WebhookSink
from elevgw.listener import Listener
from elevgw.north.api import APISite, DeviceAPI
from elevgw.north.base import APIDeps
from elevgw.observe.metrics import MeasuredStore, Metrics
from elevgw.observe.status import NodeStatus
from elevgw.observe.store_health import StoreHealth, StoreProbe
from elevgw.observe.watchdog import ReactorWatchdog
from elevgw.presence.interfaces import IPresence
from elevgw.presence.local import LocalPresence
from elevgw.snapshots.files import FileSnapshotStore
from elevgw.snapshots.interfaces import ISnapshotStore
from elevgw.south.protocol import DeviceFactory
from elevgw.specs import FileSnapshotsSpec, SQLiteSpec, parse_snapshots, parse_store
from elevgw.startup import StartupError
from elevgw.stores.interfaces import ICommandQueue, IDeviceStore, IEventLog
from elevgw.stores.sqlite import SQLiteStore
from elevgw.stores.sqlite_commands import SQLiteCommandQueue
from elevgw.stores.sqlite_events import SQLiteEventLog
from elevgw.stores.sqlite_nodes import SQLiteNodeCheck
from elevgw.timing import within

#: Seconds between passes that expire queued commands past their ttl (on every device).
COMMAND_EXPIRY_INTERVAL = 1.0


class ConfigError(ValueError):
    """A setting that cannot work (bad store URL, missing OSS key); one line for the operator."""


def make_command_queue(store: IDeviceStore, settings: Settings) -> ICommandQueue:
    """The command queue in ``store`` (the unwrapped SQLite or Redis store), on its connection.

    Any other store (the fakes of ``elevgw.testing``) gets the in-memory queue.
    """
    if isinstance(store, SQLiteStore):
        return SQLiteCommandQueue(store, history=settings.command_history)
    if store.name == "redis":
        from elevgw.stores.redis_commands import RedisCommandQueue

        return RedisCommandQueue(store, history=settings.command_history)  # type: ignore[arg-type]
    from elevgw.testing import MemoryCommandQueue

    return MemoryCommandQueue(history=settings.command_history)


def make_store(settings: Settings, reactor: Any) -> IDeviceStore:
    try:
        spec = parse_store(settings.store)
    except ValueError as e:
        raise ConfigError(f"--store: {e}")
    if isinstance(spec, SQLiteSpec):
        return SQLiteStore(spec.path, reactor)
    # Imported only when chosen: importing txredisapi installs the global reactor.
    from elevgw.stores.redis import RedisStore
    from elevgw.stores.redis_connection import RedisConnection

    # The connection is its own part of the service tree, shared by the store, the event
    # log and the cluster (``GatewayService`` starts it before them and stops it after).
    return RedisStore(
        settings.store,
        prefix=settings.redis_prefix,
        log_maxlen=settings.log_maxlen,
        connection=RedisConnection(settings.store, reactor, settings.store_timeout),
    )


class ThreadPoolService(Service):
    """A thread pool started and stopped with the service tree."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class ResourceService(Service):
    """Starts and stops a resource whose ``start()``/``stop()`` return Deferreds.

    A failed start is handed to ``on_failure`` (the tree's ``ready``), never left unhandled.
    """

    def __init__(self, resource: Any, on_failure: Any) -> None:
        self.resource = resource
        self._on_failure = on_failure
        self.started: Deferred = Deferred()

    def startService(self) -> None:
        super().startService()
        d = maybeDeferred(self.resource.start)
        d.addErrback(self._on_failure)
        d.chainDeferred(self.started)

    def stopService(self) -> Deferred:
        super().stopService()
        return maybeDeferred(self.resource.stop)


class GatewayService(MultiService):
    log = Logger()

    def __init__(
        self,
        settings: Settings,
        reactor: Any,
        store: IDeviceStore | None = None,
        snapshots: ISnapshotStore | None = None,
        event_sink: events.IEventSink | None = None,
    ) -> None:
        """Parts not given are made from ``settings``; tests hand in fakes
        (``elevgw.testing``)."""
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        #: Fires once every part has started, or fails with the first part that could not.
        self.ready: Deferred = Deferred()
        self._starting: list[Deferred] = []
        self.metrics = Metrics(settings.node_id)

        threadpool = ThreadPool(minthreads=1, maxthreads=4, name="elevgw-files")
        if store is None:
            store = make_store(settings, reactor)
        raw_store = store
        self.store_health = StoreHealth(store.name, reactor)
        self.store = MeasuredStore(store, self.metrics, reactor, self.store_health)
        self.snapshots = snapshots or self._make_snapshot_store(settings.snapshots, threadpool)
        self.webhooks: events.IEventSink = event_sink or self._make_event_sink(settings)
        self.device_health = HealthTracker(reactor, flap_threshold=settings.flap_threshold)
        #: The event log (``None`` with ``--event-log off``); it forwards to the webhooks.
        self.event_log = self._make_event_log(settings, self.webhooks)
        self.event_sink: events.IEventSink = self.event_log or ObservingSink(
            self.webhooks, [self.device_health]
        )
        self.gateway = Gateway(
            self.store,
            self.snapshots,
            self.event_sink,
            clock=reactor,
            heartbeat_timeout=settings.heartbeat_timeout,
            node_id=settings.node_id,
            metrics=self.metrics,
            lifecycle_log_rate=settings.lifecycle_log_rate,
            message_rate=settings.message_rate,
            message_burst=settings.message_burst,
            max_pending_writes=settings.max_pending_writes,
            max_sessions=settings.max_sessions,
            limit_cooldown=settings.limit_cooldown,
        )
        self.cluster = self._make_cluster(raw_store)
        self.presence: IPresence = (
            self.cluster.presence
            if self.cluster is not None
            else LocalPresence(self.gateway.registry, settings.node_id)
        )
        self.command_queue = make_command_queue(raw_store, settings)
        self.dispatcher = CommandDispatcher(
            self.command_queue,
            self.gateway.registry,
            self.gateway.commands,
            reactor,
            self.event_sink,
            metrics_registry=self.metrics.registry,
            max_pending=settings.command_queue_size,
        )
        self.gateway.dispatcher = self.dispatcher
        if self.cluster is not None:
            self.dispatcher.install_remote(self.cluster.bus, self.cluster.commands.call_holder)
        self.device_factory = DeviceFactory(
            self.gateway,
            settings.max_message_size,
            reactor=reactor,
            fast_writes=settings.fast_writes,
            lean_path=settings.lean_frames,
            slim_connections=settings.slim_connections,
            max_outbound_buffer=settings.max_outbound_buffer,
            handshake_timeout=settings.handshake_timeout,
        )
        self.node_status = NodeStatus(
            self.store,
            self.metrics,
            self.webhooks,
            settings.node_id,
            reactor,
            sessions=self.gateway.registry.__len__,
        )
        self.api = DeviceAPI(
            APIDeps(
                store=self.store,
                presence=self.presence,
                commands=self.cluster.commands
                if self.cluster is not None
                else self.gateway.commands,
                snapshots=self.snapshots,
                metrics=self.metrics,
                node_id=settings.node_id,
                health=self.health,
                api_key=settings.api_key,
                max_body=settings.max_body_size,
                max_waiting_calls=settings.max_waiting_calls,
                status=self.node_status.report,
                command_queue=self.dispatcher,
            )
        )

        self.watchdog = ReactorWatchdog(
            reactor, stall_threshold=settings.stall_threshold, registry=self.metrics.registry
        )
        self.gateway.registry.stalled = self.watchdog.stalled_between

        self.watchdog.setServiceParent(self)
        ThreadPoolService(threadpool).setServiceParent(self)
        connection = getattr(raw_store, "connection", None)
        if connection is not None and not getattr(raw_store, "owns_connection", True):
            self._add_resource(connection, "--store " + _store_display(settings.store))
        self._add_resource(self.store, "--store " + _store_display(settings.store))
        self._add_resource(self.command_queue, "--store " + _store_display(settings.store))
        if isinstance(raw_store, SQLiteStore):
            self._add_resource(SQLiteNodeCheck(raw_store, settings.node_id, raw_store.path))
        self._add_resource(self.snapshots, "--snapshots " + settings.snapshots)
        self._add_resource(_EventSinkResource(self.event_sink))
        if self.event_log is not None:
            self.event_log.setServiceParent(self)
            self.api.event_log = self.event_log
        self.api.device_health = self.device_health
        self.api.silent_after = settings.silent_after
        if self.cluster is not None:
            self.cluster.setServiceParent(self)
            self.gateway.admitting = self.cluster.holding
            # Ready once the node holds its lease, or after the store's timeout (Redis
            # down: the node answers 503 and takes its lease once Redis is back).
            self._starting.append(
                within(self.cluster.when_held(), settings.store_timeout, reactor)
            )
        sweep = TimerService(settings.sweep_interval, self._run_sweep)
        sweep.clock = reactor
        sweep.setServiceParent(self)
        expiry = TimerService(COMMAND_EXPIRY_INTERVAL, self.dispatcher.expire_due)
        expiry.clock = reactor
        expiry.setServiceParent(self)
        StoreProbe(self.store, reactor).setServiceParent(self)
        site = APISite(self.api, reactor)
        self.node_status.setServiceParent(self)
        self.api_listener = Listener(
            reactor, settings.api_endpoint, site, "--api-endpoint", settings.reuse_port
        )
        self.ws_listener = Listener(
            reactor,
            settings.ws_endpoint,
            self.device_factory,
            "--ws-endpoint",
            settings.reuse_port,
        )
        self.api_listener.setServiceParent(self)
        if settings.worker_api_endpoint:
            Listener(
                reactor, settings.worker_api_endpoint, site, "--worker-api-port"
            ).setServiceParent(self)
        self.ws_listener.setServiceParent(self)

    def _make_cluster(self, raw_store: Any) -> Any:
        """Nodes on a Redis store form a cluster; SQLite is one node."""
        if getattr(raw_store, "name", None) != "redis":
            return None
        from elevgw.cluster.node import ClusterNode

        return ClusterNode(
            raw_store.connection,
            raw_store.address,
            self.settings.redis_prefix,
            self.settings.node_id,
            self.gateway.registry,
            self.gateway.commands,
            self.event_sink,
            self.reactor,
            self.metrics.registry,
            lease=self.settings.cluster_lease,
            probe_every=self.settings.bus_probe_interval,
        )

    def _add_resource(self, resource: Any, source: str = "") -> None:
        """``source`` names the option the resource comes from in a failure to start it."""
        service = ResourceService(resource, lambda failure: self._start_failed(failure, source))
        self._starting.append(service.started)
        service.setServiceParent(self)

    def _start_failed(self, failure: Failure, source: str = "") -> Failure:
        if not self.ready.called:
            if source:
                self.ready.errback(StartupError(f"{source}: {failure.getErrorMessage()}"))
            else:
                self.ready.errback(failure)
        return failure

    def _make_event_sink(self, settings: Settings) -> events.IEventSink:
        if not settings.backend_url:
            return events.NullSink()
        try:
            sink: WebhookSink = WebhookSink(
                settings.backend_url,
                self.reactor,
                secret=settings.webhook_secret,
                request_timeout=settings.webhook_timeout,
                retry_for=settings.webhook_retry_for,
                max_queued=settings.webhook_queue_size,
                concurrency=settings.webhook_concurrency,
                on_delivery=self.metrics.webhook_delivery_hook(),
            )
        except ValueError as e:
            raise ConfigError("webhooks: {}".format(e))
        self.metrics.watch_webhooks(sink)
        return sink

    def _make_event_log(self, settings: Settings, forward: events.IEventSink) -> EventLog | None:
        if not settings.event_log:
            return None
        store = self.store.wrapped
        log: IEventLog
        if store.name == "sqlite":
            log = SQLiteEventLog(store)
        elif store.name == "redis":
            from elevgw.stores.redis_events import RedisEventLog

            log = RedisEventLog(store, maxlen=settings.event_log_maxlen)
        else:
            self.log.info("no event log on a {name} store", name=store.name)
            return None
        return EventLog(
            log,
            self.reactor,
            forward,
            observers=[self.device_health],
            max_age=settings.event_log_max_age,
            max_entries=settings.event_log_maxlen,
            forward_after=settings.event_log_wait,
            metrics=EventLogMetrics(self.metrics.registry),
        )

    def _make_snapshot_store(self, spec: str, threadpool: ThreadPool) -> ISnapshotStore:
        try:
            parsed = parse_snapshots(spec)
        except ValueError as e:
            raise ConfigError(f"--snapshots: {e}")
        if isinstance(parsed, FileSnapshotsSpec):
            return FileSnapshotStore(parsed.folder, self.public_url, self.reactor, threadpool)
        from elevgw.snapshots.oss import from_spec

        try:
            return from_spec(parsed.url, os.environ, self.reactor, **self.settings.oss_options())
        except ValueError as e:
            raise ConfigError(str(e))

    def public_url(self) -> str:
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        address = self.api_listener.address()
        host = getattr(address, "host", "127.0.0.1")
        if host in ("0.0.0.0", "::", ""):
            host = os.uname().nodename
        if ":" in host:
            host = f"[{host}]"
        return "http://{}:{}".format(host, getattr(address, "port", 8000))

    def ws_port(self) -> int:
        return self.ws_listener.address().port

    def api_port(self) -> int:
        return self.api_listener.address().port

    async def health(self) -> dict:
        """What ``/healthz`` reports: ``status`` is ``ok`` while the store answers."""
        report: dict[str, Any] = {
            "status": "ok",
            "node_id": self.settings.node_id,
            "sessions": len(self.gateway.registry),
        }
        try:
            await self.store.ping()
        except Exception as e:
            report["status"] = "unavailable"
            report["store"] = str(e)
        if self.cluster is not None:
            report["cluster"] = cluster = self.cluster.health()
            if not cluster.pop("ok"):
                report["status"] = "unavailable"
        return report

    def startService(self) -> None:
        super().startService()
        self.log.info(
            "elevgw {node_id}: devices on {ws}, API on {api}, store {store}, webhooks {webhooks}"
            " (elevgw {version})",
            node_id=self.settings.node_id,
            ws=self.settings.ws_endpoint,
            api=self.settings.api_endpoint,
            store=self.store.name,
            webhooks="to " + _without_password(self.settings.backend_url)
            if self.settings.backend_url
            else "off",
            version=__version__,
        )

        def started(_: Any) -> None:
            if not self.ready.called:
                self.ready.callback(None)

        # A failure has reached ``ready`` already (``_start_failed``).
        gatherResults(self._starting, consumeErrors=True).addCallbacks(started, lambda _: None)

    def _run_sweep(self) -> None:
        try:
            self.gateway.sweep()
        except Exception:
            self.log.failure("sweep failed")

    async def _drain(self) -> None:
        self.api.draining = True
        await self.ws_listener.stopService()
        closing = self.device_factory.connections_closed()
        count = self.gateway.registry.end_all(events.OFFLINE_SHUTDOWN, CLOSE_GOING_AWAY)
        if count:
            self.log.info("draining: closed {count} device sessions (1001)", count=count)
        # The offline events are queued already; their delivery runs while sockets close.
        deadline = self.reactor.seconds() + self.settings.drain_timeout
        await within(closing, self.settings.drain_timeout / 2, self.reactor)
        self.device_factory.abort_all()
        if self.cluster is not None:
            remaining = max(0.0, deadline - self.reactor.seconds())
            await within(self.cluster.settle(), remaining, self.reactor)
            await within(self.cluster.retire(), remaining, self.reactor)
        remaining = max(0.0, deadline - self.reactor.seconds())
        await within(self.gateway.last_seen_written(), remaining, self.reactor)
        remaining = max(0.0, deadline - self.reactor.seconds())
        await within(self.dispatcher.recorded(), remaining, self.reactor)
        remaining = max(0.0, deadline - self.reactor.seconds())
        delivered = await within(self.event_sink.drain(remaining), remaining, self.reactor)
        if delivered is False:
            self.log.warn(
                "draining: webhook events still pending after {seconds} s are dropped",
                seconds=self.settings.drain_timeout,
            )

    def stopService(self) -> Deferred:
        d = Deferred.fromCoroutine(self._drain())
        d.addErrback(lambda f: self.log.failure("draining failed", f))

        def release(_: Any) -> Deferred:
            self.gateway.registry.lifecycle_lines.stop()
            return MultiService.stopService(self)

        return d.addCallback(release)


class _EventSinkResource:
    """The event sink as a resource of the tree: nothing to start, ``stop`` after the drain."""

    def __init__(self, sink: events.IEventSink) -> None:
        self._sink = sink

    def start(self) -> Deferred:
        return succeed(None)

    def stop(self) -> Deferred:
        return maybeDeferred(self._sink.stop)


def _without_password(url: str) -> str:
    """``url`` fit for a log line: a ``user:password@`` in it is cut."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _store_display(spec: str) -> str:
    """``--store``'s value fit for a log line: a Redis URL without its password."""
    try:
        return str(parse_store(spec)) if spec.startswith("redis://") else spec
    except ValueError:
        return spec
