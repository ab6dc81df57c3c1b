"""The OSS snapshot store: real oss2 against a real local OSS endpoint (tests/oss_server.py).

No oss2 mocks: the server recomputes each signature V4 with the test's secret, so a passing
upload proves oss2 signed it right, and a 403 proves the check is real. The server runs on
the reactor the test runs on, so every upload that succeeds also proves oss2 ran off the
reactor thread: from the reactor thread it could never have been answered.
"""

from __future__ import annotations

import os
import re
import struct
import threading
import time
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import task
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface.verify import verifyObject

from elevgw.snapshots.interfaces import ISnapshotStore, SnapshotStoreError, StoredSnapshot
from elevgw.snapshots.oss import (
    OSSSnapshotStore,
    SnapshotStoreTimeout,
    from_spec,
    normalize_endpoint,
    region_from_endpoint,
)
from images import tiny_png
from oss_server import FakeOSS

BUCKET = "elevgw-test"
ACCESS_KEY_ID = "LTAI5tTestKeyId"
ACCESS_KEY_SECRET = "test-secret-0123456789abcdef"
REGION = "cn-test"
DEVICE = "dev_0123456789abcdef"
TAKEN_AT = 1767225600123  # 2026-01-01T00:00:00.123Z
KEY_PATTERN = r"^snapshots/{}/2026/01/01/000000\.123-[0-9a-f]{{8}}\.{}$"


def jpeg_image() -> bytes:
    """Random bytes behind the magic: the store only sniffs, and the checksums get real work."""
    return b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + os.urandom(4096) + b"\xff\xd9"


def webp_image() -> bytes:
    body = b"WEBPVP8 " + os.urandom(1024)
    return b"RIFF" + struct.pack("<I", len(body)) + body


IMAGES = {
    "png": (tiny_png, "image/png"),
    "jpg": (jpeg_image, "image/jpeg"),
    "webp": (webp_image, "image/webp"),
}


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


@pytest_twisted.async_yield_fixture
async def oss(reactor):
    server = FakeOSS(BUCKET, ACCESS_KEY_ID, ACCESS_KEY_SECRET, REGION)
    await server.listen(reactor)
    yield server
    server.release_hung()
    await server.stop_listening()


@pytest_twisted.async_yield_fixture
async def make_store(oss, reactor):
    """Build and start stores against ``oss``; every one is stopped after the test."""
    stores = []

    def make(**options):
        credentials = {
            "access_key_id": options.pop("access_key_id", ACCESS_KEY_ID),
            "access_key_secret": options.pop("access_key_secret", ACCESS_KEY_SECRET),
        }
        options = {"region": REGION, "timeout": 5.0, "retry_backoff": 0.05, **options}
        store = OSSSnapshotStore(BUCKET, oss.url, reactor=reactor, **credentials, **options)
        store.start()
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.stop()


@pytest_twisted.async_yield_fixture
async def http(reactor):
    pool = HTTPConnectionPool(reactor, persistent=False)
    yield HTTPClient(Agent(reactor, pool=pool))
    await pool.closeCachedConnections()


async def fetch(http, reactor, url):
    response = await http.get(url, timeout=5, reactor=reactor)
    body = await response.content()
    return response.code, response.headers.getRawHeaders("content-type", [None])[0], body


async def failure_of(d, reactor):
    """Await ``d``, which must fail; return its exception and how long it took (seconds)."""
    started = reactor.seconds()
    try:
        await d
    except Exception as error:
        return error, reactor.seconds() - started
    raise AssertionError("expected a failure")


# -- storing and fetching


@pytest.mark.parametrize("extension", sorted(IMAGES))
@pytest_twisted.ensureDeferred
async def test_image_is_stored_and_served_through_its_signed_url(
    extension, make_store, oss, http, reactor
):
    make_image, content_type = IMAGES[extension]
    image = make_image()
    store = make_store()

    stored = await store.put(DEVICE, image, TAKEN_AT)

    assert isinstance(stored, StoredSnapshot)
    assert re.match(KEY_PATTERN.format(DEVICE, extension), stored.key)
    assert (stored.device_id, stored.content_type, stored.size, stored.taken_at) == (
        DEVICE,
        content_type,
        len(image),
        TAKEN_AT,
    )
    assert oss.objects[stored.key].data == image
    (put,) = oss.puts()
    assert put.authorization.startswith("OSS4-HMAC-SHA256 Credential=" + ACCESS_KEY_ID + "/")
    assert urlsplit(put.uri).path.startswith("/{}/".format(BUCKET)), "path-style for an IP"
    url = urlsplit(stored.url)
    assert url.path == "/{}/{}".format(BUCKET, stored.key)
    assert parse_qs(url.query)["x-oss-expires"] == ["3600"]

    assert await fetch(http, reactor, stored.url) == (200, content_type, image)


@pytest_twisted.ensureDeferred
async def test_signed_url_is_checked_by_the_server(make_store, oss, http, reactor):
    store = make_store(url_expiry=60)
    stored = await store.put(DEVICE, tiny_png(), TAKEN_AT)
    url = urlsplit(stored.url)
    anonymous = url._replace(query="").geturl()
    tampered = stored.url.replace("x-oss-expires=60", "x-oss-expires=600")

    assert (await fetch(http, reactor, anonymous))[0] == 403
    assert (await fetch(http, reactor, tampered))[0] == 403
    oss.clock_offset = 61
    assert (await fetch(http, reactor, stored.url))[0] == 403
    oss.clock_offset = 0
    assert (await fetch(http, reactor, stored.url))[0] == 200


@pytest_twisted.ensureDeferred
async def test_public_mode_hands_out_plain_urls_on_the_bucket(make_store, oss, http, reactor):
    oss.public_read = True
    image = jpeg_image()
    store = make_store(public=True)

    stored = await store.put(DEVICE, image, TAKEN_AT)

    assert stored.url == "{}/{}/{}".format(oss.url, BUCKET, stored.key)
    assert await fetch(http, reactor, stored.url) == (200, "image/jpeg", image)


@pytest_twisted.ensureDeferred
async def test_public_url_base_replaces_the_bucket_domain(make_store):
    store = make_store(public_url_base="https://img.example.com/elevators/")

    stored = await store.put(DEVICE, tiny_png(), TAKEN_AT)

    assert stored.url == "https://img.example.com/elevators/" + stored.key


@pytest_twisted.ensureDeferred
async def test_key_prefix_is_put_in_front_of_the_key(make_store, oss):
    store = make_store(key_prefix="/fleet-a/shots")

    stored = await store.put(DEVICE, tiny_png(), TAKEN_AT)

    assert stored.key.startswith("fleet-a/shots/{}/2026/01/01/".format(DEVICE))
    assert stored.key in oss.objects


# -- failures


@pytest_twisted.ensureDeferred
async def test_wrong_secret_fails_at_once_without_retry(make_store, oss, reactor):
    store = make_store(access_key_secret="not-the-secret", retries=3)

    error, _ = await failure_of(store.put(DEVICE, tiny_png(), TAKEN_AT), reactor)

    assert type(error) is SnapshotStoreError
    assert "403 SignatureDoesNotMatch" in str(error)
    assert "not-the-secret" not in str(error)
    assert len(oss.puts()) == 1
    assert oss.objects == {}


@pytest_twisted.ensureDeferred
async def test_two_server_errors_then_success_is_stored_after_retries(make_store, oss):
    oss.fail_next(2)
    image = webp_image()
    store = make_store(retries=2)

    stored = await store.put(DEVICE, image, TAKEN_AT)

    assert [seen.status for seen in oss.puts()] == [500, 500, 200]
    assert oss.objects[stored.key].data == image


@pytest_twisted.ensureDeferred
async def test_server_errors_beyond_the_retries_fail_with_the_last_answer(
    make_store, oss, reactor
):
    oss.fail_next(10)
    store = make_store(retries=2)

    error, _ = await failure_of(store.put(DEVICE, tiny_png(), TAKEN_AT), reactor)

    assert type(error) is SnapshotStoreError
    assert "after 3 attempts" in str(error) and "500 InternalError" in str(error)
    assert len(oss.puts()) == 3


@pytest_twisted.ensureDeferred
async def test_access_denied_is_not_retried(make_store, oss, reactor):
    oss.deny_all = True
    store = make_store(retries=3)

    error, _ = await failure_of(store.put(DEVICE, tiny_png(), TAKEN_AT), reactor)

    assert type(error) is SnapshotStoreError
    assert "403 AccessDenied" in str(error)
    assert len(oss.puts()) == 1


@pytest_twisted.ensureDeferred
async def test_refused_endpoint_fails_quickly_after_retries(make_store, oss, reactor):
    store = make_store(retries=2, retry_backoff=0.05, timeout=5.0)
    await store.put(DEVICE, tiny_png(), TAKEN_AT)  # leaves a pooled connection behind
    await oss.stop_listening()

    error, elapsed = await failure_of(store.put(DEVICE, tiny_png(), TAKEN_AT), reactor)

    assert type(error) is SnapshotStoreError
    assert not getattr(error, "timed_out", False)
    assert "after 3 attempts" in str(error)
    assert "refused" in str(error).lower()
    assert elapsed < 2.0


@pytest_twisted.ensureDeferred
async def test_hanging_endpoint_times_out_within_the_timeout(make_store, oss, reactor):
    oss.hang = True
    store = make_store(timeout=1.0, retries=2)

    error, elapsed = await failure_of(store.put(DEVICE, tiny_png(), TAKEN_AT), reactor)

    assert isinstance(error, SnapshotStoreTimeout)
    assert isinstance(error, SnapshotStoreError)
    assert error.timed_out is True
    assert "no answer within 1 s" in str(error)
    assert 0.9 <= elapsed < 1.8
    assert len(oss.puts()) == 1, "a request that used up the deadline is not retried"


@pytest_twisted.ensureDeferred
async def test_reactor_keeps_running_while_oss_hangs(make_store, oss, reactor):
    oss.hang = True
    store = make_store(timeout=1.0)
    ticks = []
    ticker = task.LoopingCall(lambda: ticks.append(reactor.seconds()))
    ticker.clock = reactor
    ticker.start(0.02)
    try:
        await failure_of(store.put(DEVICE, tiny_png(), TAKEN_AT), reactor)
    finally:
        ticker.stop()

    assert len(ticks) >= 20
    assert max(b - a for a, b in zip(ticks, ticks[1:], strict=False)) < 0.5


@pytest_twisted.ensureDeferred
async def test_pool_bounds_concurrent_uploads_and_queued_ones_still_meet_the_deadline(
    make_store, oss, reactor
):
    oss.hang = True
    store = make_store(pool_size=2, timeout=1.0)
    started = reactor.seconds()

    outcomes = [
        await failure_of(d, reactor)
        for d in [store.put(DEVICE, tiny_png(), TAKEN_AT) for _ in range(5)]
    ]

    assert all(isinstance(error, SnapshotStoreTimeout) for error, _ in outcomes)
    assert reactor.seconds() - started < 1.8
    assert oss.max_in_flight == 2


@pytest_twisted.ensureDeferred
async def test_non_image_is_refused_before_anything_is_sent(make_store, oss):
    store = make_store()

    with pytest.raises(ValueError, match="not a PNG, JPEG or WebP"):
        store.put(DEVICE, b"<html>not an image</html>", TAKEN_AT)

    assert oss.seen == []


# -- lifecycle


def oss_threads():
    return [t for t in threading.enumerate() if "elevgw-oss" in t.name]


@pytest_twisted.ensureDeferred
async def test_stop_joins_the_pool_and_later_puts_fail(make_store, oss, reactor):
    store = make_store()
    await store.put(DEVICE, tiny_png(), TAKEN_AT)
    assert oss_threads()

    await store.stop()

    assert oss_threads() == []
    error, _ = await failure_of(store.put(DEVICE, tiny_png(), TAKEN_AT), reactor)
    assert type(error) is SnapshotStoreError and "not running" in str(error)
    assert len(oss.puts()) == 1


@pytest_twisted.ensureDeferred
async def test_stop_waits_for_an_upload_in_flight_without_blocking_the_reactor(
    make_store, oss, reactor
):
    oss.hang = True
    store = make_store(timeout=1.0)
    upload = store.put(DEVICE, tiny_png(), TAKEN_AT)
    while not oss.seen:
        await task.deferLater(reactor, 0.01, lambda: None)
    before = time.monotonic()

    stopping = store.stop()

    assert time.monotonic() - before < 0.1, "stop() returned without joining on the reactor"
    await stopping
    error, _ = await failure_of(upload, reactor)
    assert isinstance(error, SnapshotStoreTimeout)
    assert oss_threads() == []


@pytest_twisted.ensureDeferred
async def test_stop_during_a_retry_back_off_fails_the_put_at_once(make_store, oss, reactor):
    oss.fail_next(10)
    store = make_store(retries=2, retry_backoff=3.0)
    upload = store.put(DEVICE, tiny_png(), TAKEN_AT)
    while not oss.seen:
        await task.deferLater(reactor, 0.01, lambda: None)

    stopping_at = reactor.seconds()
    await store.stop()

    error, _ = await failure_of(upload, reactor)
    assert type(error) is SnapshotStoreError and "stopped before" in str(error)
    assert reactor.seconds() - stopping_at < 1.0, "the 3 s back-off was not waited out"
    assert len(oss.puts()) == 1


def test_store_provides_the_interface(reactor):
    store = OSSSnapshotStore(BUCKET, "http://127.0.0.1:9", "id", "secret", reactor, region=REGION)
    assert verifyObject(ISnapshotStore, store)
    assert store.name == "oss"
    assert "secret" not in repr(store)


# -- configuration


ENVIRON = {
    "OSS_ENDPOINT": "https://oss-cn-shanghai.aliyuncs.com",
    "OSS_ACCESS_KEY_ID": "LTAI5tExample",
    "OSS_ACCESS_KEY_SECRET": "example-secret",
}


def test_from_spec_reads_endpoint_and_keys_from_the_environment(reactor):
    store = from_spec("oss://my-lift-shots", ENVIRON, reactor, pool_size=8)

    assert (store.bucket, store.endpoint, store.region) == (
        "my-lift-shots",
        "https://oss-cn-shanghai.aliyuncs.com",
        "cn-shanghai",
    )


def test_from_spec_takes_a_key_prefix_from_the_path(reactor):
    store = from_spec("oss://my-lift-shots/fleet/a/", ENVIRON, reactor)

    assert store.key_prefix == "fleet/a/"


@pytest.mark.parametrize("missing", ["OSS_ENDPOINT", "OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET"])
def test_from_spec_names_the_missing_variable(missing, reactor):
    environ = {**ENVIRON, missing: "  "}

    with pytest.raises(ValueError, match=missing) as raised:
        from_spec("oss://my-lift-shots", environ, reactor)

    assert "\n" not in str(raised.value)
    assert "example-secret" not in str(raised.value)


@pytest.mark.parametrize(
    "spec", ["oss://", "oss://Bad_Bucket", "oss://id:secret@bucket", "s3://bucket", "oss://b?x=1"]
)
def test_from_spec_refuses_a_malformed_spec(spec, reactor):
    with pytest.raises(ValueError):
        from_spec(spec, ENVIRON, reactor)


def test_from_spec_wants_a_region_for_an_endpoint_that_does_not_name_one(reactor):
    environ = {**ENVIRON, "OSS_ENDPOINT": "https://oss-accelerate.aliyuncs.com"}

    with pytest.raises(ValueError, match="OSS_REGION"):
        from_spec("oss://my-lift-shots", environ, reactor)
    store = from_spec("oss://my-lift-shots", {**environ, "OSS_REGION": "cn-beijing"}, reactor)
    assert store.region == "cn-beijing"


@pytest.mark.parametrize(
    "endpoint, region",
    [
        ("https://oss-cn-shanghai.aliyuncs.com", "cn-shanghai"),
        ("oss-cn-hangzhou-internal.aliyuncs.com", "cn-hangzhou"),
        ("https://oss-ap-southeast-1.aliyuncs.com", "ap-southeast-1"),
        ("https://oss-accelerate.aliyuncs.com", None),
        ("https://img.example.com", None),
        ("http://127.0.0.1:9000", None),
    ],
)
def test_region_is_read_from_standard_endpoints(endpoint, region):
    assert region_from_endpoint(normalize_endpoint(endpoint)) == region


def test_endpoint_without_scheme_means_https():
    assert normalize_endpoint("oss-cn-shanghai.aliyuncs.com/") == (
        "https://oss-cn-shanghai.aliyuncs.com"
    )
    with pytest.raises(ValueError):
        normalize_endpoint("ftp://oss-cn-shanghai.aliyuncs.com")


def test_signed_urls_cannot_outlive_seven_days(reactor):
    with pytest.raises(ValueError, match="expiry"):
        OSSSnapshotStore(
            BUCKET, ENVIRON["OSS_ENDPOINT"], "id", "secret", reactor, url_expiry=8 * 24 * 3600
        )
