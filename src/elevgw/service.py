"""The gateway assembled as a Twisted service: stores, listeners, the sweep, the drain.

``GatewayService`` owns every resource it starts (thread pool, store connections, ports) and
releases them in ``stopService``, whose Deferred ``twistd`` waits for: that is the SIGTERM
drain (stop accepting, close device sockets with 1001, emit their offline events, give
pending webhooks a bounded grace period).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from elevgw.config import Settings
from elevgw.core.gateway import Gateway
from elevgw.core.sessions import CLOSE_GOING_AWAY
from elevgw.events import model as events
from elevgw.events.webhooks import WebhookSink
from elevgw.listener import Listener
from elevgw.north.api import APISite, DeviceAPI
from elevgw.observe.logs import Logger
from elevgw.observe.metrics import MeasuredStore, Metrics
from elevgw.snapshots.files import FileSnapshotStore
from elevgw.south.protocol import DeviceFactory
from elevgw.stores.interfaces import IDeviceStore
from elevgw.stores.sqlite import SQLiteStore


class ConfigError(ValueError):
    """A setting that cannot work (bad store URL, missing OSS key); one line for the operator."""


def make_store(settings: Settings, reactor: Any) -> IDeviceStore:
    spec = settings.store
    if spec.startswith("sqlite:"):
        path = spec[len("sqlite:") :]
        if not path:
            raise ConfigError("--store sqlite: needs a file path, e.g. sqlite:elevgw.sqlite3")
        return SQLiteStore(path, reactor)
    if spec.startswith("redis://"):
        # Imported only when chosen: importing txredisapi installs the global reactor.
        from elevgw.stores.redis import RedisStore

        try:
            return RedisStore(
                spec,
                prefix=settings.redis_prefix,
                log_maxlen=settings.log_maxlen,
                reactor=reactor,
                timeout=settings.store_timeout,
            )
        except ValueError as e:
            raise ConfigError("--store: {}".format(e))
    raise ConfigError(f"--store must be sqlite:PATH or redis://host:port/db, not {spec!r}")


class GatewayService(MultiService):
    log = Logger()

    def __init__(self, settings: Settings, reactor: Any) -> None:
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.threadpool = ThreadPool(minthreads=1, maxthreads=4, name="elevgw-files")
        self.metrics = Metrics(settings.node_id)
        self.store = MeasuredStore(make_store(settings, reactor), self.metrics, reactor)
        self.snapshots = self._make_snapshot_store(settings.snapshots)
        self.event_sink: events.IEventSink = self._make_event_sink(settings)
        self.gateway = Gateway(
            self.store,
            self.snapshots,
            self.event_sink,
            clock=reactor,
            heartbeat_timeout=settings.heartbeat_timeout,
            node_id=settings.node_id,
            metrics=self.metrics,
            lifecycle_log_rate=settings.lifecycle_log_rate,
        )
        self.device_factory = DeviceFactory(
            self.gateway, settings.max_message_size, reactor=reactor
        )
        self.api = DeviceAPI(self.gateway, api_key=settings.api_key)
        site = APISite(self.api, reactor)
        self.ws_listener = Listener(reactor, settings.ws_endpoint, self.device_factory)
        self.api_listener = Listener(reactor, settings.api_endpoint, site)
        self.ws_listener.setServiceParent(self)
        self.api_listener.setServiceParent(self)
        self._sweep = task.LoopingCall(self._run_sweep)
        self._sweep.clock = reactor
        self.ready: Deferred = Deferred()

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

    def _make_snapshot_store(self, spec: str):
        if spec.startswith("file:"):
            path = spec[len("file:") :]
            if not path:
                raise ConfigError("--snapshots file: needs a folder, e.g. file:snapshots")
            return FileSnapshotStore(path, self.public_url, self.reactor, self.threadpool)
        if spec.startswith("oss://"):
            from elevgw.snapshots.oss import from_spec

            try:
                return from_spec(spec, os.environ, self.reactor, **self.settings.oss_options())
            except ValueError as e:
                raise ConfigError(str(e))
        raise ConfigError(f"--snapshots must be file:PATH or oss://BUCKET, not {spec!r}")

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

    def startService(self) -> None:
        self.threadpool.start()
        starting = gatherResults([self.store.start(), self.snapshots.start()], consumeErrors=True)
        super().startService()
        self._sweep.start(self.settings.sweep_interval, now=False).addErrback(
            lambda f: self.log.failure("the sweep stopped", f)
        )
        self.log.info(
            "elevgw {node_id}: devices on {ws}, API on {api}, store {store}",
            node_id=self.settings.node_id,
            ws=self.settings.ws_endpoint,
            api=self.settings.api_endpoint,
            store=self.store.name,
        )

        def started(_):
            self.ready.callback(None)

        def failed(failure):
            self.log.failure("starting the stores failed", failure)
            self.ready.errback(failure)

        starting.addCallbacks(started, failed)

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
        await _within(closing, self.settings.drain_timeout / 2, self.reactor)
        self.device_factory.abort_all()
        remaining = max(0.0, deadline - self.reactor.seconds())
        await _within(self.gateway.last_seen_written(), remaining, self.reactor)
        remaining = max(0.0, deadline - self.reactor.seconds())
        delivered = await _within(self.event_sink.drain(remaining), remaining, self.reactor)
        if delivered is False:
            self.log.warn(
                "draining: webhook events still pending after {seconds} s are dropped",
                seconds=self.settings.drain_timeout,
            )
        await self.event_sink.stop()

    def stopService(self) -> Deferred:
        d = Deferred.fromCoroutine(self._drain())
        d.addErrback(lambda f: self.log.failure("draining failed", f))

        def release(_):
            if self._sweep.running:
                self._sweep.stop()
            self.gateway.registry.lifecycle_lines.stop()
            stopping = [MultiService.stopService(self), self.store.stop(), self.snapshots.stop()]
            return DeferredList(stopping, consumeErrors=True)

        def stop_threads(_):
            self.threadpool.stop()

        return d.addCallback(release).addCallback(stop_threads)


def _within(d: Deferred, seconds: float, clock: Any) -> Deferred:
    """``d``'s result, or ``None`` after ``seconds`` at the latest; never fails."""
    done: Deferred = Deferred()

    def expire() -> None:
        if not done.called:
            done.callback(None)

    timer = clock.callLater(seconds, expire)

    def finished(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if not done.called:
            done.callback(None if isinstance(result, Failure) else result)

    d.addBoth(finished)
    return done
