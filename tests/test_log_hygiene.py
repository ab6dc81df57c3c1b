"""Logging that fits the event: an expected dependency failure is one warning with its cause,
a traceback means a bug, and credentials never reach a log line."""

from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from elevgw.core.gateway import Gateway
from elevgw.events import model as events
from elevgw.observe import logs
from elevgw.snapshots.interfaces import SnapshotStoreError
from elevgw.testing import FakeConnection
from images import tiny_png


class Snapshots:
    def __init__(self, error):
        self.error = error

    def put(self, device_id, data, taken_at):
        return fail(self.error)


def snapshot_failure_events(error):
    clock = Clock()
    gateway = Gateway(None, Snapshots(error), events.NullSink(), clock)
    session = gateway.connected("dev_1", FakeConnection())
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        gateway.binary_received(session, tiny_png())
    finally:
        globalLogPublisher.removeObserver(seen.append)
    return [e for e in seen if "snapshot" in e.get("log_format", "")]


def test_a_snapshot_store_timeout_is_one_warning_with_its_cause():
    (event,) = snapshot_failure_events(SnapshotStoreError("storing k on OSS timed out: 10 s"))
    assert event["log_level"] is LogLevel.warn
    assert "log_failure" not in event
    assert "timed out" in formatEvent(event)


def test_an_unexpected_snapshot_failure_is_logged_with_its_traceback():
    (event,) = snapshot_failure_events(ZeroDivisionError("a bug"))
    assert event["log_level"] is LogLevel.critical and "log_failure" in event


def filtered(**fields):
    seen = []
    observer = logs.GatewayLogFilter(seen.append, LogLevel.debug, "node-1")
    observer({"log_level": LogLevel.info, "log_format": "x", **fields})
    return seen[0]


def test_credentials_never_reach_a_log_line():
    event = filtered(
        request=b"GET /ws?device_id=dev_1&token=s3cr3t-token HTTP/1.1\r\n"
        b"Authorization: Bearer api-key-value\r\n\r\n",
        url="https://b.oss-cn-hangzhou.aliyuncs.com/k.png?OSSAccessKeyId=AKID&Signature=sig%3D",
        header="Authorization: Bearer other-key",
        store="redis://:redis-pass@10.0.0.5:6379/0 and redis://user:pw2@h/1",
    )
    text = " ".join(str(v) for k, v in event.items() if not k.startswith("log_"))
    for secret in (
        "s3cr3t-token",
        "api-key-value",
        "AKID",
        "sig%3D",
        "other-key",
        "redis-pass",
        "pw2",
    ):
        assert secret not in text
    assert "device_id=dev_1" in event["request"] and "\\x0d\\x0a" in event["request"]
    assert event["store"].startswith("redis://:[redacted]@10.0.0.5:6379/0")
