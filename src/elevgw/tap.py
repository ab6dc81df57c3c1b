"""``twistd elevgw``: options and ``makeService``.

Every option can also come from ``ELEVGW_<OPTION>`` (dashes as underscores), which is where
secrets belong: the command line shows in ``ps``. The command line wins over the environment.

Every refusal is one line that names the option (or the variable it came from) and what to
do; under ``twistd`` it ends the process with status 1 instead of ``twistd``'s usage text.
"""

from __future__ import annotations

import atexit
import getopt
import ipaddress
import os
import re
import sys
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import MultiService
from twisted.internet import endpoints
from twisted.logger import Logger, LogLevel
from twisted.python import usage
from twisted.python.failure import Failure

import elevgw
from elevgw.config import Settings, default_node_id
from elevgw.specs import OSSSnapshotsSpec, SQLiteSpec, parse_snapshots, parse_store
from elevgw.startup import exit_with, one_line_errors


def _number(kind: type, minimum: float, what: str) -> Any:
    """A usage coerce function: ``kind`` (int or float) that must exceed ``minimum``.

    ``what`` completes "must be …" in the error, e.g. "a number of seconds greater than 0".
    """

    def coerce(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            number = None
        if number is None or not number > minimum:
            raise ValueError(f"must be {what}, not {value!r}")
        return number

    coerce.coerceDoc = what[0].upper() + what[1:] + "."  # type: ignore[attr-defined]
    return coerce


_positive_float = _number(float, 0, "a number of seconds greater than 0")
_positive_int = _number(int, 0, "a whole number greater than 0")
_count = _number(int, -1, "a whole number, 0 or more")


def _switch(value: str) -> bool:
    text = value.strip().lower()
    if text in ("on", "yes", "true", "1"):
        return True
    if text in ("off", "no", "false", "0"):
        return False
    raise ValueError(f"must be on or off, not {value!r}")


_switch.coerceDoc = "on or off."  # type: ignore[attr-defined]


def _gc_thresholds(value: str) -> tuple[int, ...] | None:
    from elevgw.observe.gc_tuning import parse_thresholds

    return parse_thresholds(value)


_gc_thresholds.coerceDoc = "python, or thresholds such as 50000,20,100."  # type: ignore[attr-defined]


def _workers(value: str) -> int:
    if value.strip().lower() == "auto":
        return max(1, os.cpu_count() or 1)
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"not 'auto' or a whole number of 1 or more: {value!r}")
    return count


_workers.coerceDoc = "auto, or a whole number of 1 or more."  # type: ignore[attr-defined]


def _port_number(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise ValueError(f"not a port number between 1 and 65535: {value!r}")
    return port


_port_number.coerceDoc = "A port number."  # type: ignore[attr-defined]


def _log_level(value: str) -> LogLevel:
    try:
        return LogLevel.levelWithName(value.strip().lower())
    except Exception:
        raise ValueError("must be debug, info, warn or error, not {!r}".format(value))


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
        [
            "message-rate",
            None,
            50.0,
            "Frames a second one device may send on average (over: error frame, then 1008).",
            _positive_float,
        ],
        ["message-burst", None, 200, "Frames one device may send at once.", _positive_int],
        [
            "max-pending-writes",
            None,
            16,
            "Store writes (logs, snapshots) one device may have pending before its socket is"
            " not read until they finish.",
            _positive_int,
        ],
        [
            "max-outbound-buffer",
            None,
            1048576,
            "Bytes waiting for one device to read them, at most (over: close 1008).",
            _positive_int,
        ],
        [
            "handshake-timeout",
            None,
            10.0,
            "Seconds a device has to finish its WebSocket handshake.",
            _positive_float,
        ],
        [
            "max-sessions",
            None,
            50000,
            "Device sessions on this node at most (over: handshake 503 with Retry-After).",
            _positive_int,
        ],
        [
            "limit-cooldown",
            None,
            30.0,
            "Seconds a device closed for a limit (1008) is refused (429) when it reconnects.",
            _positive_float,
        ],
        [
            "max-body-size",
            None,
            65536,
            "Largest API request body in bytes (over: 413).",
            _positive_int,
        ],
        [
            "max-waiting-calls",
            None,
            1000,
            "API calls waiting for an answer at once, at most (over: 503).",
            _positive_int,
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
        [
            "command-queue-size",
            None,
            100,
            "Pending commands (queued or unacked, with a ttl) a device may have (more: 429).",
            _positive_int,
        ],
        [
            "command-history",
            None,
            100,
            "Finished commands kept per device for GET .../commands (older ones are forgotten).",
            _positive_int,
        ],
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
            "cluster-lease",
            None,
            10.0,
            "Redis store: seconds a node's lease lasts; a dead node's devices go offline"
            " this long after it died.",
            _positive_float,
        ],
        [
            "bus-probe-interval",
            None,
            2.0,
            "Redis store: seconds between probes of the node's own inbox.",
            _positive_float,
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
        [
            "lean-frames",
            None,
            "on",
            "Small complete text frames from connected devices, and frames to them, skip"
            " Autobahn's per-frame machinery (off: Autobahn handles every frame).",
            _switch,
        ],
        [
            "slim-connections",
            None,
            "on",
            "Open device connections keep only what they use: no handshake leftovers, protocol"
            " options held once (off: Autobahn's full per-connection state).",
            _switch,
        ],
        [
            "lean-reactor",
            None,
            "on",
            "The epoll reactor dispatches socket events without wrapping each in a logging"
            " context (off: Twisted's dispatch).",
            _switch,
        ],
        [
            "storm-freeze",
            None,
            "on",
            "Freeze the objects of a settled connect storm out of the garbage collector's full"
            " passes; thaw and collect once a quarter of them ended (off: never).",
            _switch,
        ],
        [
            "workers",
            None,
            1,
            "Worker processes sharing the ports (auto: one per core); more than 1 needs Redis.",
            _workers,
        ],
        [
            "worker-api-port",
            None,
            None,
            "With --workers: worker I also serves the API (and /metrics) on this port + I"
            " (default: the API port + 1 + I), on the API's interface.",
            _port_number,
        ],
        [
            "worker-index",
            None,
            None,
            "Set by the --workers parent on each worker; not for use by hand.",
            _count,
        ],
        [
            "event-log",
            None,
            "on",
            "Keep every event sent to the backend in the store, for GET /api/v1/events"
            " (off: webhooks only).",
            _switch,
        ],
        [
            "event-log-max-age",
            None,
            604800.0,
            "Seconds an event-log entry is kept.",
            _positive_float,
        ],
        [
            "event-log-maxlen",
            None,
            1000000,
            "Event-log entries kept at most.",
            _positive_int,
        ],
        [
            "event-log-wait",
            None,
            2.0,
            "Seconds a webhook waits for its event-log cursor before it goes without one.",
            _positive_float,
        ],
        [
            "flap-threshold",
            None,
            60.0,
            "Sessions shorter than this many seconds count as flaps in device health.",
            _positive_float,
        ],
        [
            "silent-after",
            None,
            86400.0,
            "Seconds offline after which GET /api/v1/fleet/health lists a device as silent.",
            _positive_float,
        ],
        [
            "stall-threshold",
            None,
            1.0,
            "Seconds the reactor may run late before it counts as a stall (logged; device"
            " liveness deadlines are extended by it).",
            _positive_float,
        ],
    ]

    optFlags: list[list[Any]] = [
        ["oss-public-urls", None, "Hand out plain URLs on the bucket's domain (public bucket)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        #: Options whose value came from ``ELEVGW_<NAME>`` and not the command line.
        self._from_environment: set[str] = set()
        for name, handler in list(self._dispatch.items()):
            if isinstance(handler, usage.CoerceParameter):
                self._dispatch[name] = _NamedParameter(self, handler.coerce)

    def parseOptions(self, options=None):
        """Parse the environment, then the command line; one line for any refusal.

        Under ``twistd`` (which sets ``parent``) a refusal ends the process with that line
        and status 1: ``twistd`` would print its whole usage text first. Called directly (in
        tests, by other programs) it raises ``usage.UsageError``.
        """
        args = list(options) if options is not None else []
        #: The command line as given: a ``--workers`` parent hands it on to its workers.
        self.command_line = args
        try:
            self._apply_environment(skip=self._command_line_names(args))
            super().parseOptions(args)
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise
            message = str(e)
            if message.startswith("option "):  # from getopt: unknown, or missing its value
                message += "; twistd elevgw --help lists the options"
            exit_with(message)

    def opt_version(self) -> None:
        """Display elevgw's version (and Twisted's) and exit."""
        from twisted import version as twisted_version

        print(f"elevgw {elevgw.__version__} (Twisted {twisted_version.short()})")
        sys.exit(0)

    def source(self, name: str) -> str:
        """Where option ``name``'s value came from, for errors: ``--name`` or ``ELEVGW_NAME``."""
        if name in self._from_environment:
            return _environment_name(name)
        return f"--{name}"

    def _command_line_names(self, args: list[str]) -> set[str]:
        """The options ``args`` sets: the environment's value for those is not even checked."""
        try:
            given, _ = getopt.getopt(args, self.shortOpt, self.longOpt)
        except getopt.error:
            return set()  # parseOptions reports it
        return {self.synonyms.get(option.lstrip("-"), "") for option, _ in given}

    def _apply_environment(self, skip: set[str]) -> None:
        for entry in self.optParameters:
            name = entry[0]
            value = os.environ.get(_environment_name(name))
            if value and name not in skip:
                try:
                    self._dispatch[name].dispatch(name, value)
                except usage.UsageError as e:
                    raise usage.UsageError(
                        "{} {} (fix or unset the variable)".format(
                            _environment_name(name), getattr(e, "reason", e)
                        )
                    )
                self._from_environment.add(name)
        for entry in self.optFlags:
            name = entry[0]
            value = os.environ.get(_environment_name(name), "")
            if value.strip().lower() in ("1", "true", "yes", "on"):
                self.opts[name] = 1

    def postOptions(self) -> None:
        # usage does not coerce defaults
        if isinstance(self["log-level"], str):
            self["log-level"] = _log_level(self["log-level"])
        if isinstance(self["gc-thresholds"], str):
            self["gc-thresholds"] = _gc_thresholds(self["gc-thresholds"])
        if isinstance(self["fast-writes"], str):
            self["fast-writes"] = _switch(self["fast-writes"])
        if isinstance(self["lean-frames"], str):
            self["lean-frames"] = _switch(self["lean-frames"])
        if isinstance(self["event-log"], str):
            self["event-log"] = _switch(self["event-log"])
        if isinstance(self["slim-connections"], str):
            self["slim-connections"] = _switch(self["slim-connections"])
        for name in ("lean-reactor", "storm-freeze"):
            if isinstance(self[name], str):
                self[name] = _switch(self[name])
        if self["node-id"] is None:
            self["node-id"] = default_node_id()
        elif self["worker-index"] is not None:
            self["node-id"] = "{}-{}".format(self["node-id"], self["worker-index"])
        for name in ("public-url", "backend-url"):
            url = self[name]
            if url is not None:
                parts = urlsplit(url)
                if parts.scheme not in ("http", "https") or not parts.netloc:
                    raise usage.UsageError(
                        f"{self.source(name)} must be an http(s):// URL, not {url!r}"
                    )
        for name in ("ws-endpoint", "api-endpoint"):
            self._check_endpoint(name)
        self._check_stores()
        if self["workers"] > 1 and self["store"].startswith("sqlite:"):
            raise usage.UsageError(
                "{} {}: SQLite is single-node; several workers need a shared store, e.g. "
                "--store redis://127.0.0.1:6379/0".format(self.source("workers"), self["workers"])
            )
        if not is_loopback_endpoint(self["api-endpoint"]) and not self["api-key"]:
            raise usage.UsageError(
                "the API on {!r} is reachable from other hosts: set ELEVGW_API_KEY (or --api-key), "
                "or bind it to a loopback interface".format(self["api-endpoint"])
            )

    def _check_endpoint(self, name: str) -> None:
        """Refuse an endpoint string that cannot listen: unparseable, a port out of range,
        a TLS key or certificate that cannot be read. (A port in use is found when binding.)"""
        description = self[name]
        try:
            # Building the endpoint parses the string and loads TLS files; nothing listens
            # and no reactor is touched.
            endpoint = endpoints.serverFromString(None, description)
        except OSError as e:
            raise usage.UsageError(
                f"{self.source(name)} {description!r}: cannot read {e.filename or 'a file'}"
                f" ({e.strerror or e}); check privateKey= and certKey="
            )
        except Exception as e:
            raise usage.UsageError(
                f"{self.source(name)} {description!r} is not a listening endpoint ({e}); write "
                "it like tcp:8080, tcp:8080:interface=127.0.0.1 or "
                "ssl:443:privateKey=key.pem:certKey=cert.pem"
            )
        port = getattr(endpoint, "_port", None)
        if isinstance(port, int) and not 0 <= port <= 65535:
            raise usage.UsageError(
                f"{self.source(name)} {description!r}: port {port} is not between 0 and 65535"
            )

    def _check_stores(self) -> None:
        """Refuse a store or snapshot spec now: twistd calls ``makeService`` outside its
        usage-error handling, so a refusal there would print a traceback."""
        try:
            store = parse_store(self["store"])
        except ValueError as e:
            raise usage.UsageError("{}: {}".format(self.source("store"), e))
        if isinstance(store, SQLiteSpec):
            self._check_sqlite_path(store.path)
        try:
            snapshots = parse_snapshots(self["snapshots"])
        except ValueError as e:
            raise usage.UsageError("{}: {}".format(self.source("snapshots"), e))
        if isinstance(snapshots, OSSSnapshotsSpec):
            from elevgw.snapshots.oss import from_spec

            try:
                from_spec(snapshots.url, os.environ, None, **self.settings().oss_options())
            except ValueError as e:
                raise usage.UsageError(str(e))
        else:
            self._check_snapshot_folder(snapshots.folder)

    def _check_snapshot_folder(self, folder: str) -> None:
        """The file store creates its folder (and any missing parents) when it starts: the
        nearest folder that exists must let this user do so."""
        where = "{} file:{}".format(self.source("snapshots"), folder)
        existing = os.path.abspath(folder)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise usage.UsageError(f"{where}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise usage.UsageError(
                f"{where}: folder {existing} is not writable by this user; fix its permissions "
                "or choose another folder"
            )

    def _check_sqlite_path(self, path: str) -> None:
        """SQLite creates the file but not its folder; say so now rather than fail later
        with the gateway half started."""
        where = "{} sqlite:{}".format(self.source("store"), path)
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise usage.UsageError(f"{where}: {path} is a folder; name a file in it")
        if not os.path.isdir(folder):
            raise usage.UsageError(
                f"{where}: folder {folder} does not exist; create it or choose another path"
            )
        if not os.access(folder, os.W_OK | os.X_OK):
            raise usage.UsageError(
                f"{where}: folder {folder} is not writable by this user; fix its permissions "
                "or choose another path"
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
            message_rate=self["message-rate"],
            message_burst=self["message-burst"],
            max_pending_writes=self["max-pending-writes"],
            max_outbound_buffer=self["max-outbound-buffer"],
            handshake_timeout=self["handshake-timeout"],
            max_sessions=self["max-sessions"],
            limit_cooldown=self["limit-cooldown"],
            max_body_size=self["max-body-size"],
            max_waiting_calls=self["max-waiting-calls"],
            redis_prefix=self["redis-prefix"],
            log_maxlen=self["log-maxlen"],
            store_timeout=self["store-timeout"],
            webhook_timeout=self["webhook-timeout"],
            webhook_retry_for=self["webhook-retry-for"],
            webhook_queue_size=self["webhook-queue-size"],
            webhook_concurrency=self["webhook-concurrency"],
            command_queue_size=self["command-queue-size"],
            command_history=self["command-history"],
            oss_region=self["oss-region"],
            oss_pool_size=self["oss-pool-size"],
            oss_timeout=self["oss-timeout"],
            oss_retries=self["oss-retries"],
            oss_url_expiry=self["oss-url-expiry"],
            oss_public_urls=bool(self["oss-public-urls"]),
            oss_url_base=self["oss-url-base"],
            gc_thresholds=self["gc-thresholds"],
            fast_writes=self["fast-writes"],
            lean_frames=self["lean-frames"],
            reuse_port=self["worker-index"] is not None,
            worker_api_endpoint=self._worker_api_endpoint(),
            event_log=self["event-log"],
            event_log_max_age=self["event-log-max-age"],
            event_log_maxlen=self["event-log-maxlen"],
            event_log_wait=self["event-log-wait"],
            slim_connections=self["slim-connections"],
            lean_reactor=self["lean-reactor"],
            storm_freeze=self["storm-freeze"],
            flap_threshold=self["flap-threshold"],
            silent_after=self["silent-after"],
            stall_threshold=self["stall-threshold"],
            cluster_lease=self["cluster-lease"],
            bus_probe_interval=self["bus-probe-interval"],
        )

    def _worker_api_endpoint(self) -> str | None:
        """Where worker I serves the API on a port of its own (for scraping its metrics)."""
        index = self["worker-index"]
        if index is None:
            return None
        endpoint = endpoints.serverFromString(None, self["api-endpoint"])
        base = self["worker-api-port"]
        if base is None:
            port = getattr(endpoint, "_port", 0)
            if not port:
                return None
            base = port + 1
        interface = getattr(endpoint, "_interface", "") or "0.0.0.0"
        return "tcp:{}:interface={}".format(base + index, interface.replace(":", "\\:"))


class _NamedParameter(usage.CoerceParameter):
    """``usage``'s coerced parameter, with an error that names the option."""

    def dispatch(self, parameterName: str, value: Any) -> None:
        if value is None:
            raise usage.UsageError(f"--{parameterName} needs a value")
        try:
            coerced = self.coerce(value)
        except ValueError as e:
            error = usage.UsageError(f"--{parameterName} {e}")
            error.reason = str(e)  # type: ignore[attr-defined]
            raise error
        self.options.opts[parameterName] = coerced
        self.options._from_environment.discard(parameterName)


def _environment_name(option: str) -> str:
    return "ELEVGW_" + option.upper().replace("-", "_")


def makeService(options: Options) -> MultiService:
    """The root of the service tree: log filtering, GC tuning, then the gateway.

    A part that fails to start once the reactor runs (a store that does not answer) ends the
    process with one error line and exit status 1, not a gateway running without a store.
    """
    from twisted.internet import reactor

    from elevgw.observe.gc_tuning import GCTuningService
    from elevgw.observe.logs import LogFilterService
    from elevgw.service import ConfigError, GatewayService
    from elevgw.south.process import lean_services

    settings = options.settings()
    one_line_errors()
    root = MultiService()
    LogFilterService(options["log-level"], settings.node_id).setServiceParent(root)
    if options["workers"] > 1 and options["worker-index"] is None:
        from elevgw.workers import WorkerSupervisor

        WorkerSupervisor(
            options["workers"], options.command_line, reactor, settings.drain_timeout
        ).setServiceParent(root)
        return root
    try:
        gateway = GatewayService(settings, reactor)
    except ConfigError as e:
        exit_with(str(e))
    if options["worker-index"] is not None:
        from elevgw.workers import ParentWatch

        ParentWatch(reactor).setServiceParent(root)
    GCTuningService(settings.gc_thresholds, gateway.metrics.gc_pauses).setServiceParent(root)
    for service in lean_services(settings, gateway, reactor):
        service.setServiceParent(root)
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
