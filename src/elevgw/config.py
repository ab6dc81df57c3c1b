"""The gateway's settings as one value, built from ``twistd elevgw`` options (``elevgw.tap``)
or directly by tests."""

from __future__ import annotations

import os
import socket

import attrs


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@attrs.frozen
class Settings:
    ws_endpoint: str = "tcp:8080"
    api_endpoint: str = "tcp:8000:interface=127.0.0.1"
    store: str = "sqlite:elevgw.sqlite3"
    snapshots: str = "file:snapshots"
    public_url: str | None = None
    backend_url: str | None = None
    api_key: str | None = None
    webhook_secret: str | None = None
    heartbeat_timeout: float = 30.0
    sweep_interval: float = 10.0
    max_message_size: int = 8 * 1024 * 1024
    node_id: str = attrs.field(factory=default_node_id)
    drain_timeout: float = 10.0
    lifecycle_log_rate: int = 100
    message_rate: float = 50.0
    message_burst: int = 200
    max_pending_writes: int = 16
    max_outbound_buffer: int = 1024 * 1024
    handshake_timeout: float = 10.0
    max_sessions: int = 50_000
    limit_cooldown: float = 30.0
    max_body_size: int = 64 * 1024
    max_waiting_calls: int = 1000
    redis_prefix: str = "elevgw:"
    log_maxlen: int = 10000
    store_timeout: float = 2.0
    webhook_timeout: float = 5.0
    webhook_retry_for: float = 300.0
    webhook_queue_size: int = 100_000
    webhook_concurrency: int = 16
    command_queue_size: int = 100
    command_history: int = 100
    oss_region: str | None = None
    oss_pool_size: int = 4
    oss_timeout: float = 10.0
    oss_retries: int = 2
    oss_url_expiry: int = 3600
    oss_public_urls: bool = False
    oss_url_base: str | None = None
    #: ``None``: CPython's own thresholds (see ``elevgw.observe.gc_tuning``).
    gc_thresholds: tuple[int, ...] | None = (50_000, 20, 100)
    fast_writes: bool = True
    #: Listen with ``SO_REUSEPORT`` (each ``--workers`` worker).
    reuse_port: bool = False
    #: A worker's own API listener, beside the shared one (``--worker-api-port``).
    worker_api_endpoint: str | None = None
    lean_frames: bool = True
    event_log: bool = True
    event_log_max_age: float = 7 * 86400.0
    event_log_maxlen: int = 1_000_000
    event_log_wait: float = 2.0
    slim_connections: bool = True
    lean_reactor: bool = True
    storm_freeze: bool = True
    flap_threshold: float = 60.0
    silent_after: float = 86400.0
    stall_threshold: float = 1.0
    cluster_lease: float = 10.0
    bus_probe_interval: float = 2.0

    def oss_options(self) -> dict:
        """Keyword arguments for ``elevgw.snapshots.oss.from_spec``."""
        options = dict(
            pool_size=self.oss_pool_size,
            timeout=self.oss_timeout,
            retries=self.oss_retries,
            url_expiry=self.oss_url_expiry,
            public=self.oss_public_urls,
            public_url_base=self.oss_url_base,
        )
        if self.oss_region:
            options["region"] = self.oss_region
        return options
