"""``twistd elevgw``: options and ``makeService``.

Every option can also come from ``ELEVGW_<OPTION>`` (dashes as underscores), which is where
secrets belong: the command line shows in ``ps``. The command line wins over the environment.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import re
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import MultiService
from twisted.logger import Logger, LogLevel
from twisted.python import usage
from twisted.python.failure import Failure

from elevgw.config import Settings, default_node_id
from elevgw.stores.redis_url import parse_redis_url


def _number(kind: type, minimum: float, doc: str) -> Any:
    """A usage coerce function: ``kind`` (int or float) that must exceed ``minimum``."""
    words = "a whole number" if kind is int else "a number"

    def coerce(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"not {words}: {value!r}")
        if not number > minimum:
            raise ValueError(f"must be greater than {minimum}: {value!r}")
        return number

    coerce.coerceDoc = doc  # type: ignore[attr-defined]
    return coerce


_positive_float = _number(float, 0, "Seconds, greater than 0.")
_positive_int = _number(int, 0, "A whole number greater than 0.")
_count = _number(int, -1, "A whole number, 0 or more.")


def _switch(value: str) -> bool:
    text = value.strip().lower()
    if text in ("on", "yes", "true", "1"):
        return True
    if text in ("off", "no", "false", "0"):
        return False
    raise ValueError(f"not on or off: {value!r}")


_switch.coerceDoc = "on or off."  # type: ignore[attr-defined]


def _gc_thresholds(value: str) -> tuple[int, ...] | None:
    from elevgw.observe.gc_tuning import parse_thresholds

    return parse_thresholds(value)


_gc_thresholds.coerceDoc = "python, or thresholds such as 50000,20,100."  # type: ignore[attr-defined]


def _log_level(value: str) -> LogLevel:
    try:
        return LogLevel.levelWithName(value.strip().lower())
    except Exception:
        raise ValueError("not a log level (debug, info, warn, error): {!r}".format(value))


_log_level.coerceDoc = "debug, info, warn or error."  # type: ignore[attr-defined]


def is_loopback_endpoint(description: str) -> bool:
    """Whether a server endpoint string only accepts local connections."""
    parts = [part.replace("\\:", ":") for part in re.split(r"(?<!\\):", description)]
    if parts[0].lower() == "unix":
        return True
    for part in parts[1:]:
        if part.startswith("interface="):
            host = part[len("interface=") :]
            if host == "localhost":
                return True
            try:
                return ipaddress.ip_address(host).is_loopback
            except ValueError:
                return False
    return False


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Runs the elevgw gateway: device WebSockets on --ws-endpoint, the backend API on "
        "--api-endpoint. Every option can also be set as ELEVGW_<OPTION> in the environment "
        "(e.g. ELEVGW_API_KEY); use that for secrets."
    )

    optParameters: list[list[Any]] = [
        ["ws-endpoint", None, "tcp:8080", "Device WebSocket listener (Twisted endpoint string)."],
        [
            "api-endpoint",
            None,
            "tcp:8000:interface=127.0.0.1",
            "Backend API listener (endpoint string).",
        ],
        [
            "store",
            None,
            "sqlite:elevgw.sqlite3",
            "Device store: sqlite:PATH or redis://host:port/db.",
        ],
        ["snapshots", None, "file:snapshots", "Snapshot store: file:FOLDER or oss://BUCKET."],
        [
            "public-url",
            None,
            None,
            "Base URL put in front of /snapshots/... (default: the API's address).",
        ],
        ["backend-url", None, None, "Backend base URL for webhooks (default: webhooks off)."],
        ["api-key", None, None, "Bearer key the API requires (prefer ELEVGW_API_KEY)."],
        [
            "webhook-secret",
            None,
            None,
            "HMAC key for webhook signatures (prefer ELEVGW_WEBHOOK_SECRET).",
        ],
        [
            "heartbeat-timeout",
            None,
            30.0,
            "Close sessions silent for this many seconds.",
            _positive_float,
        ],
        ["sweep-interval", None, 10.0, "Seconds between liveness sweeps.", _positive_float],
        [
            "max-message-size",
            None,
            8388608,
            "Largest device frame in bytes (over: close 1009).",
            _positive_int,
        ],
        [
            "node-id",
            None,
            None,
            "This node's name in logs and presence (default: host name + pid).",
        ],
        [
            "drain-timeout",
            None,
            10.0,
            "Seconds SIGTERM waits for sockets and webhooks.",
            _positive_float,
        ],
        [
            "lifecycle-log-rate",
            None,
            100,
            "Device online/offline log lines a second; the rest are summed in one line"
            " (0: every line).",
            _count,
        ],
        ["redis-prefix", None, "elevgw:", "Prefix of every Redis key."],
        ["log-maxlen", None, 10000, "Redis: cap of each device's log stream.", _positive_int],
        ["store-timeout", None, 2.0, "Seconds before a store call fails.", _positive_float],
        ["webhook-timeout", None, 5.0, "Seconds one webhook request may take.", _positive_float],
        [
            "webhook-retry-for",
            None,
            300.0,
            "Seconds a webhook event is retried before it is given up.",
            _positive_float,
        ],
        [
            "webhook-queue-size",
            None,
            100000,
            "Webhook events held at most (then the oldest of the busiest device is dropped).",
            _positive_int,
        ],
        ["webhook-concurrency", None, 16, "Webhook requests in flight at most.", _positive_int],
        ["oss-region", None, None, "OSS region for signature V4 (default: from OSS_ENDPOINT)."],
        ["oss-pool-size", None, 4, "Threads (and connections) for oss2 calls.", _positive_int],
        [
            "oss-timeout",
            None,
            10.0,
            "Seconds one snapshot may take to store on OSS, retries included.",
            _positive_float,
        ],
        ["oss-retries", None, 2, "Extra attempts after a transient OSS failure.", _count],
        [
            "oss-url-expiry",
            None,
            3600,
            "Seconds a signed OSS URL stays valid (at most 604800).",
            _positive_int,
        ],
        ["oss-url-base", None, None, "Hand out plain URLs under this base (CDN, own domain)."],
        [
            "log-level",
            None,
            "info",
            "Lowest level logged: debug (adds a line per command and snapshot), info, warn, "
            "error.",
            _log_level,
        ],
        [
            "gc-thresholds",
            None,
            "50000,20,100",
            "Cyclic GC thresholds, or 'python' for CPython's own (700,10,10).",
            _gc_thresholds,
        ],
        [
            "fast-writes",
            None,
            "on",
            "Frames to a device leave at once when nothing is queued for it (off: Twisted's"
            " queued write).",
            _switch,
        ],
    ]

    optFlags: list[list[Any]] = [
        ["oss-public-urls", None, "Hand out plain URLs on the bucket's domain (public bucket)."],
    ]

    def parseOptions(self, options=None):
        args = list(options) if options is not None else []
        super().parseOptions(self._environment_args() + args)

    def _environment_args(self) -> list[str]:
        args = []
        for entry in self.optParameters:
            name = entry[0]
            value = os.environ.get("ELEVGW_" + name.upper().replace("-", "_"))
            if value:
                args.append(f"--{name}={value}")
        for entry in self.optFlags:
            name = entry[0]
            value = os.environ.get("ELEVGW_" + name.upper().replace("-", "_"), "")
            if value.strip().lower() in ("1", "true", "yes", "on"):
                args.append("--" + name)
        return args

    def postOptions(self) -> None:
        # usage does not coerce defaults
        if isinstance(self["log-level"], str):
            self["log-level"] = _log_level(self["log-level"])
        if isinstance(self["gc-thresholds"], str):
            self["gc-thresholds"] = _gc_thresholds(self["gc-thresholds"])
        if isinstance(self["fast-writes"], str):
            self["fast-writes"] = _switch(self["fast-writes"])
        if self["node-id"] is None:
            self["node-id"] = default_node_id()
        for name in ("public-url", "backend-url"):
            url = self[name]
            if url is not None:
                parts = urlsplit(url)
                if parts.scheme not in ("http", "https") or not parts.netloc:
                    raise usage.UsageError(f"--{name} must be an http(s):// URL, not {url!r}")
        self._check_stores()
        if not is_loopback_endpoint(self["api-endpoint"]) and not self["api-key"]:
            raise usage.UsageError(
                "the API on {!r} is reachable from other hosts: set ELEVGW_API_KEY (or --api-key), "
                "or bind it to a loopback interface".format(self["api-endpoint"])
            )

    def _check_stores(self) -> None:
        """Refuse a store or snapshot spec now: twistd calls ``makeService`` outside its
        usage-error handling, so a refusal there would print a traceback."""
        store = self["store"]
        if store.startswith("redis://"):
            try:
                parse_redis_url(store)
            except ValueError as e:
                raise usage.UsageError("--store: {}".format(e))
        elif not (store.startswith("sqlite:") and len(store) > len("sqlite:")):
            raise usage.UsageError(
                "--store must be sqlite:PATH or redis://host:port/db, not {!r}".format(store)
            )
        snapshots = self["snapshots"]
        if snapshots.startswith("oss://"):
            from elevgw.snapshots.oss import from_spec

            try:
                from_spec(snapshots, os.environ, None, **self.settings().oss_options())
            except ValueError as e:
                raise usage.UsageError(str(e))
        if not (
            (snapshots.startswith("file:") and len(snapshots) > len("file:"))
            or snapshots.startswith("oss://")
        ):
            raise usage.UsageError(
                "--snapshots must be file:FOLDER or oss://BUCKET, not {!r}".format(snapshots)
            )

    def settings(self) -> Settings:
        return Settings(
            ws_endpoint=self["ws-endpoint"],
            api_endpoint=self["api-endpoint"],
            store=self["store"],
            snapshots=self["snapshots"],
            public_url=self["public-url"],
            backend_url=self["backend-url"],
            api_key=self["api-key"],
            webhook_secret=self["webhook-secret"],
            heartbeat_timeout=self["heartbeat-timeout"],
            sweep_interval=self["sweep-interval"],
            max_message_size=self["max-message-size"],
            node_id=self["node-id"],
            drain_timeout=self["drain-timeout"],
            lifecycle_log_rate=self["lifecycle-log-rate"],
            redis_prefix=self["redis-prefix"],
            log_maxlen=self["log-maxlen"],
            store_timeout=self["store-timeout"],
            webhook_timeout=self["webhook-timeout"],
            webhook_retry_for=self["webhook-retry-for"],
            webhook_queue_size=self["webhook-queue-size"],
            webhook_concurrency=self["webhook-concurrency"],
            oss_region=self["oss-region"],
            oss_pool_size=self["oss-pool-size"],
            oss_timeout=self["oss-timeout"],
            oss_retries=self["oss-retries"],
            oss_url_expiry=self["oss-url-expiry"],
            oss_public_urls=bool(self["oss-public-urls"]),
            oss_url_base=self["oss-url-base"],
            gc_thresholds=self["gc-thresholds"],
            fast_writes=self["fast-writes"],
        )


def makeService(options: Options) -> MultiService:
    """The root of the service tree: log filtering, GC tuning, then the gateway.

    A part that fails to start once the reactor runs (a store that does not answer) ends the
    process with one error line and exit status 1, not a gateway running without a store.
    """
    from twisted.internet import reactor

    from elevgw.observe.gc_tuning import GCTuningService
    from elevgw.observe.logs import LogFilterService
    from elevgw.service import ConfigError, GatewayService

    settings = options.settings()
    try:
        gateway = GatewayService(settings, reactor)
    except ConfigError as e:
        raise usage.UsageError(str(e))
    root = MultiService()
    LogFilterService(options["log-level"], settings.node_id).setServiceParent(root)
    GCTuningService(settings.gc_thresholds, gateway.metrics.gc_pauses).setServiceParent(root)
    gateway.setName("gateway")
    gateway.setServiceParent(root)
    gateway.ready.addErrback(_stop_on_start_failure, reactor)
    return root


_log = Logger()


def _stop_on_start_failure(failure: Failure, reactor: Any) -> None:
    _log.critical(
        "elevgw could not start: {why}",
        why=failure.getErrorMessage() or repr(failure.value),
    )
    # twistd exits 0 once its reactor stops; the status is set as the interpreter exits,
    # after twistd has removed its pid file.
    atexit.register(os._exit, 1)
    reactor.callWhenRunning(reactor.stop)
