"""Snapshots on Aliyun OSS, uploaded with oss2 on a thread pool the store owns.

oss2 is blocking (it is built on ``requests``), so every oss2 call runs on the store's own
bounded ``ThreadPool`` through ``deferToThreadPool``; the reactor thread only schedules, waits
(retry back-off is a ``deferLater``) and maps results. Requests are signed with signature V4
(``oss2.AuthV4``, which needs the bucket's region): OSS has retired V1 for new accounts and new
buckets, so a V1 client would be refused by a freshly made bucket. See docs/oss.rst.

One ``put`` has one deadline, ``timeout`` seconds, that covers waiting for a free thread, every
attempt and the back-off between them; each attempt's socket timeout is what is left of it.
Connection failures, 5xx and 429 answers and CRC mismatches are retried (at most ``retries``
times, doubling the back-off); 4xx answers are not. Running out of time fails with
``SnapshotStoreTimeout`` (the API answers 504), any other failure with ``SnapshotStoreError``
(502).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import oss2
import requests
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from elevgw.snapshots.interfaces import (
    IMAGE_TYPES,
    ISnapshotStore,
    SnapshotStoreError,
    StoredSnapshot,
    snapshot_key,
    sniff_image_type,
)

MAX_URL_EXPIRY = 7 * 24 * 3600  # signature V4 caps signed URLs at 7 days
_ALIYUN_ENDPOINT = re.compile(r"^oss-(?P<region>[a-z0-9-]+?)(?:-internal)?\.aliyuncs\.com$")


class SnapshotStoreTimeout(SnapshotStoreError):
    """OSS did not answer within the store's ``timeout``: the API answers 504, not 502."""

    timed_out = True


class _OutOfTime(Exception):
    """The attempt's deadline passed while it waited for a free thread."""


@implementer(ISnapshotStore)
class OSSSnapshotStore:
    """Snapshots as objects ``<key_prefix><device_id>/<yyyy>/<mm>/<dd>/<time>-<rand>.<ext>``.

    ``endpoint`` is the region's OSS endpoint, ``https://`` assumed when it has no scheme
    (oss2 itself would assume plain ``http://``). ``region`` (e.g. ``cn-shanghai``) is needed
    by signature V4; it is read from a standard Aliyun endpoint when not given.

    ``pool_size`` bounds both the threads and oss2's HTTP connections. ``timeout`` (seconds) is
    the deadline of one ``put``, retries included. ``retries`` extra attempts are made after a
    transient failure, waiting ``retry_backoff`` seconds, then twice that, and so on.

    The URL handed out is signed for ``url_expiry`` seconds (at most 7 days), unless ``public``
    is true or ``public_url_base`` is given: then it is a plain URL, on the bucket's own domain
    or under ``public_url_base`` (a CDN or a custom domain bound to the bucket), and the bucket
    must allow anonymous reads of the prefix.

    ``reactor`` provides ``IReactorTime`` (deadlines, back-off) and ``IReactorFromThreads``.
    The store owns its thread pool: ``start`` makes it, ``stop`` joins it.
    """

    name = "oss"
    log = Logger()

    def __init__(
        self,
        bucket: str,
        endpoint: str,
        access_key_id: str,
        access_key_secret: str,
        reactor: Any,
        *,
        region: str | None = None,
        pool_size: int = 4,
        timeout: float = 10.0,
        retries: int = 2,
        retry_backoff: float = 0.5,
        url_expiry: int = 3600,
        public: bool = False,
        public_url_base: str | None = None,
        key_prefix: str = "snapshots/",
    ) -> None:
        self._endpoint = normalize_endpoint(endpoint)
        if not oss2.utils.is_valid_bucket_name(bucket):
            raise ValueError(
                "{!r} is not a valid OSS bucket name (3 to 63 lowercase letters, digits "
                "and hyphens)".format(bucket)
            )
        region = region or region_from_endpoint(self._endpoint)
        if not region:
            raise ValueError(
                "the OSS region of {} is not known: set it (OSS_REGION, e.g. cn-shanghai)".format(
                    self._endpoint
                )
            )
        if not access_key_id or not access_key_secret:
            raise ValueError("an OSS access key id and secret are needed")
        if pool_size < 1:
            raise ValueError("the OSS pool size must be at least 1")
        if timeout <= 0 or retry_backoff < 0 or retries < 0:
            raise ValueError("the OSS timeout must be positive, retries and back-off not negative")
        if not 0 < url_expiry <= MAX_URL_EXPIRY:
            raise ValueError("the OSS URL expiry must be 1 to {} seconds".format(MAX_URL_EXPIRY))
        self._bucket = bucket
        self._region = region
        self._auth = oss2.AuthV4(access_key_id, access_key_secret)
        self._reactor = reactor
        self._pool_size = pool_size
        self._timeout = timeout
        self._retries = retries
        self._retry_backoff = retry_backoff
        self._url_expiry = url_expiry
        self._key_prefix = _normalize_prefix(key_prefix)
        self._plain_url_base: str | None = None
        if public_url_base:
            self._plain_url_base = _normalize_url_base(public_url_base)
        elif public:
            self._plain_url_base = _bucket_url(self._endpoint, bucket)
        self._pool: ThreadPool | None = None
        self._session: Any = None
        self._uploads: set[Deferred] = set()

    def __repr__(self) -> str:
        return "<OSSSnapshotStore bucket={} endpoint={} region={}>".format(
            self._bucket, self._endpoint, self._region
        )

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def region(self) -> str:
        return self._region

    @property
    def key_prefix(self) -> str:
        return self._key_prefix

    def start(self) -> Deferred:
        """Make the thread pool and oss2's connection pool. Fires at once."""
        if self._pool is None:
            self._session = oss2.Session(pool_size=self._pool_size)
            self._pool = ThreadPool(minthreads=0, maxthreads=self._pool_size, name="elevgw-oss")
            self._pool.start()
        return succeed(None)

    def stop(self) -> Deferred:
        """Refuse new puts, let running uploads end, join the threads, close connections.

        The join happens on a helper thread, so a thread blocked in an upload (at most
        ``timeout`` seconds) does not block the reactor; the Deferred fires once every pool
        thread has exited. Puts that never got to run fail with ``SnapshotStoreError``.
        """
        pool, session = self._pool, self._session
        if pool is None:
            return succeed(None)
        self._pool = self._session = None
        joined: Deferred = Deferred()

        def join() -> None:
            try:
                pool.stop()
                session.session.close()
            finally:
                self._reactor.callFromThread(joined.callback, None)

        joiner = threading.Thread(target=join, name="elevgw-oss-stop")
        joiner.start()

        def abandon_leftovers(_: object) -> None:
            joiner.join()  # it is past its last statement: this does not block
            for upload in list(self._uploads):
                upload.cancel()

        joined.addCallback(abandon_leftovers)
        return joined

    def put(self, device_id: str, data: bytes, taken_at_ms: int) -> Deferred:
        """Upload the image; fire with a ``StoredSnapshot`` whose URL is signed or plain.

        Raises ``ValueError`` at once for bytes that are not a PNG, JPEG or WebP image (nothing
        is uploaded). Fails with ``SnapshotStoreTimeout`` when the deadline passes, else with
        ``SnapshotStoreError`` whose message says what OSS (or the network) answered.
        """
        extension = sniff_image_type(data)
        if extension is None:
            raise ValueError("not a PNG, JPEG or WebP image")
        key = self._key_prefix + snapshot_key(device_id, taken_at_ms, extension)
        content_type = IMAGE_TYPES[extension]
        upload = Deferred.fromCoroutine(self._upload(key, data, content_type))
        self._uploads.add(upload)

        def forget(result: object) -> object:
            self._uploads.discard(upload)
            return result

        def stored(url: str) -> StoredSnapshot:
            return StoredSnapshot(
                device_id=device_id,
                key=key,
                url=url,
                content_type=content_type,
                size=len(data),
                taken_at=taken_at_ms,
            )

        def stopped(failure: Any) -> None:
            failure.trap(CancelledError)
            raise SnapshotStoreError(
                "the OSS store stopped before {} was stored".format(key)
            ) from None

        upload.addBoth(forget)
        upload.addCallbacks(stored, stopped)
        return upload

    async def _upload(self, key: str, data: bytes, content_type: str) -> str:
        deadline = self._reactor.seconds() + self._timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                budget = deadline - self._reactor.seconds()
                return await self._attempt(key, data, content_type, budget)
            except (CancelledError, SnapshotStoreError):
                raise
            except Exception as error:
                kind, problem = self._describe(error)
                if kind == "unexpected":
                    self.log.failure("oss2 failed unexpectedly storing {key}", key=key)
            if kind == "timeout":
                raise SnapshotStoreTimeout(
                    "storing {} on OSS timed out: {} (attempt {})".format(key, problem, attempt)
                )
            if kind != "transient":
                raise SnapshotStoreError("storing {} on OSS failed: {}".format(key, problem))
            delay = self._retry_backoff * 2 ** (attempt - 1)
            if attempt > self._retries or self._reactor.seconds() + delay >= deadline:
                raise SnapshotStoreError(
                    "storing {} on OSS failed after {} attempt{}: {}".format(
                        key, attempt, "" if attempt == 1 else "s", problem
                    )
                )
            self.log.warn(
                "storing {key} on OSS failed ({problem}), retry {retry} of {retries} in {delay} s",
                key=key,
                problem=problem,
                retry=attempt,
                retries=self._retries,
                delay=delay,
                event="oss_put_retry",
            )
            await deferLater(self._reactor, delay, lambda: None)

    def _attempt(self, key: str, data: bytes, content_type: str, budget: float) -> Deferred:
        if self._pool is None:
            raise SnapshotStoreError("the OSS store is not running")
        abandoned = threading.Event()
        attempt = deferToThreadPool(
            self._reactor,
            self._pool,
            self._put_in_thread,
            self._session,
            key,
            data,
            content_type,
            budget,
            time.monotonic(),
            abandoned,
        )
        # The socket timeout normally ends a hung request first; this guard also covers what it
        # does not (a slow DNS lookup, a request still queued for a thread).
        attempt.addTimeout(max(budget, 0), self._reactor)

        def give_up(failure: Any) -> Any:
            abandoned.set()
            return failure

        attempt.addErrback(give_up)
        return attempt

    def _put_in_thread(
        self,
        session: Any,
        key: str,
        data: bytes,
        content_type: str,
        budget: float,
        submitted: float,
        abandoned: threading.Event,
    ) -> str:
        """Runs on a pool thread: PutObject, then the URL (signing is oss2's job too)."""
        socket_timeout = budget - (time.monotonic() - submitted)
        if abandoned.is_set() or socket_timeout <= 0:
            raise _OutOfTime()
        # Content-MD5 makes OSS refuse a body damaged on the way (it is signed, too).
        headers = {
            "Content-Type": content_type,
            "Content-MD5": base64.b64encode(hashlib.md5(data).digest()).decode("ascii"),
        }
        # A Bucket is cheap (no I/O); one per attempt carries this attempt's timeout while
        # sharing the session, hence the connection pool, with every other attempt.
        bucket = oss2.Bucket(
            self._auth,
            self._endpoint,
            self._bucket,
            session=session,
            connect_timeout=socket_timeout,
            region=self._region,
        )
        bucket.put_object(key, data, headers=headers)
        if self._plain_url_base is not None:
            return self._plain_url_base + quote(key, safe="/")
        return bucket.sign_url("GET", key, self._url_expiry, slash_safe=True)

    def _describe(self, error: Exception) -> tuple[str, str]:
        """``(kind, problem)``; kind is 'timeout', 'transient', 'permanent' or 'unexpected'."""
        if isinstance(error, TimeoutError | _OutOfTime):
            return "timeout", "no answer within {:g} s".format(self._timeout)
        if isinstance(error, oss2.exceptions.RequestError):
            cause = error.exception
            if isinstance(cause, requests.exceptions.Timeout):
                return "timeout", "no answer within {:g} s".format(self._timeout)
            return "transient", "cannot reach {}: {}".format(self._endpoint, _root_cause(cause))
        if isinstance(error, oss2.exceptions.InconsistentError):
            return "transient", "the CRC64 of the stored object differs from the upload"
        if isinstance(error, oss2.exceptions.ServerError):
            problem = "OSS answered {} {}: {} (request id {})".format(
                error.status, error.code or "error", error.message or "-", error.request_id or "-"
            )
            retry = error.status >= 500 or error.status == 429
            return ("transient" if retry else "permanent"), problem
        if isinstance(error, oss2.exceptions.OssError):
            return "permanent", str(error.body)
        return "unexpected", "{}: {}".format(type(error).__name__, error)


def from_spec(
    spec: str, environ: Mapping[str, str], reactor: Any, **options: Any
) -> OSSSnapshotStore:
    """The store for ``--snapshots oss://BUCKET[/PREFIX]``, keys from ``environ``.

    Reads ``OSS_ENDPOINT``, ``OSS_ACCESS_KEY_ID``, ``OSS_ACCESS_KEY_SECRET`` (all required) and
    ``OSS_REGION`` (when the endpoint does not name it). A path after the bucket replaces the
    default key prefix ``snapshots/``. ``options`` go to ``OSSSnapshotStore``. Raises
    ``ValueError`` with a one-line message for the operator.
    """
    parts = urlsplit(spec)
    if parts.scheme != "oss" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError("--snapshots oss: wants oss://BUCKET or oss://BUCKET/PREFIX")
    if "@" in parts.netloc or ":" in parts.netloc:
        raise ValueError("--snapshots oss://BUCKET takes no keys or port: keys come from OSS_*")
    if parts.path.strip("/"):
        if "key_prefix" in options:
            raise ValueError("give the OSS key prefix once, in oss://BUCKET/PREFIX or as option")
        options["key_prefix"] = parts.path
    needed = ("OSS_ENDPOINT", "OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET")
    values = {name: (environ.get(name) or "").strip() for name in needed}
    missing = [name for name in needed if not values[name]]
    if missing:
        raise ValueError(
            "--snapshots {} needs {} in the environment (e.g. "
            "OSS_ENDPOINT=https://oss-cn-shanghai.aliyuncs.com)".format(spec, ", ".join(missing))
        )
    options.setdefault("region", (environ.get("OSS_REGION") or "").strip() or None)
    return OSSSnapshotStore(
        parts.netloc,
        values["OSS_ENDPOINT"],
        values["OSS_ACCESS_KEY_ID"],
        values["OSS_ACCESS_KEY_SECRET"],
        reactor,
        **options,
    )


def normalize_endpoint(endpoint: str) -> str:
    """``scheme://host[:port]``, ``https`` when no scheme is given; ``ValueError`` if not."""
    endpoint = endpoint.strip().rstrip("/")
    if "://" not in endpoint:
        endpoint = "https://" + endpoint
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
        example = "https://oss-cn-shanghai.aliyuncs.com"
        raise ValueError("the OSS endpoint must look like {}, not {!r}".format(example, endpoint))
    return "{}://{}".format(parts.scheme, parts.netloc)


def region_from_endpoint(endpoint: str) -> str | None:
    """``cn-shanghai`` for ``https://oss-cn-shanghai[-internal].aliyuncs.com``, else ``None``."""
    match = _ALIYUN_ENDPOINT.match(urlsplit(endpoint).hostname or "")
    if match is None or match.group("region").startswith("accelerate"):
        return None
    return match.group("region")


def _bucket_url(endpoint: str, bucket: str) -> str:
    """Where the bucket's objects are, as oss2 addresses them: path-style for an IP or
    ``localhost`` endpoint, the bucket's own domain otherwise."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
        path_style = True
    except ValueError:
        path_style = host == "localhost"
    if path_style:
        return "{}://{}/{}/".format(parts.scheme, parts.netloc, bucket)
    return "{}://{}.{}/".format(parts.scheme, bucket, parts.netloc)


def _normalize_url_base(base: str) -> str:
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise ValueError("the OSS public URL base must be an http(s) URL, not {!r}".format(base))
    return base.rstrip("/") + "/"


def _normalize_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise ValueError("the OSS key prefix {!r} has an empty or dot segment".format(prefix))
    return prefix + "/" if prefix else ""


def _root_cause(error: BaseException) -> str:
    """The innermost reason (``Connection refused``) under requests' and urllib3's wrappers."""
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        strerror = getattr(current, "strerror", None)
        if isinstance(current, OSError) and strerror:
            return str(strerror)
        candidates = [getattr(current, "reason", None), current.__cause__, current.__context__]
        candidates += [arg for arg in current.args if isinstance(arg, BaseException)]
        current = next((c for c in candidates if isinstance(c, BaseException)), None)
    return str(error)
