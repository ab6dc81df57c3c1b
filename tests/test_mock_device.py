"""Unit tests of the pure parts of mock/mock_device.py (a script, not a package: loaded by path)."""

import base64
import importlib.util
import io
import json
import pathlib
import struct
import subprocess
import sys
import zlib
from urllib.parse import parse_qs, urlsplit

import pytest
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import Clock

_PATH = pathlib.Path(__file__).resolve().parent.parent / "mock" / "mock_device.py"


def _load():
    spec = importlib.util.spec_from_file_location("mock_device", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


mock_device = _load()


def _chunks(png: bytes):
    """(type, data) of every chunk, checking each CRC with zlib.crc32 on the way."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    position = 8
    chunks = []
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        kind = png[position + 4 : position + 8]
        data = png[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", png[position + 8 + length : position + 12 + length])
        assert crc == zlib.crc32(kind + data) & 0xFFFFFFFF, kind
        chunks.append((kind, data))
        position += 12 + length
    assert position == len(png)
    return chunks


def _pixels(png: bytes):
    chunks = _chunks(png)
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, interlace) == (8, 2, 0)
    raw = zlib.decompress(b"".join(data for kind, data in chunks if kind == b"IDAT"))
    stride = width * 3 + 1
    assert len(raw) == stride * height
    assert all(raw[row * stride] == 0 for row in range(height))  # filter type None
    return (
        width,
        height,
        b"".join(raw[row * stride + 1 : (row + 1) * stride] for row in range(height)),
    )


def test_snapshot_png_is_a_valid_64x36_png_naming_its_device():
    png = mock_device.snapshot_png("dev_x", 1_700_000_000.0)
    chunks = _chunks(png)
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, pixels = _pixels(png)
    assert (width, height) == (64, 36)
    assert len(set(pixels[i : i + 3] for i in range(0, len(pixels), 3))) > 100  # a gradient
    assert (b"tEXt", b"Source\x00dev_x") in chunks


def test_snapshot_png_draws_the_time_and_honours_the_size():
    first = mock_device.snapshot_png("dev_x", 1_700_000_000.0, width=40, height=20)
    later = mock_device.snapshot_png("dev_x", 1_700_000_001.0, width=40, height=20)
    assert _pixels(first)[:2] == (40, 20)
    assert _pixels(first)[2] != _pixels(later)[2]
    assert mock_device.snapshot_png("dev_x", 1_700_000_000.0, width=40, height=20) == first
    assert _pixels(mock_device.snapshot_png("d", 0.0, width=1, height=1))[:2] == (1, 1)


def test_encode_png_rejects_pixels_of_the_wrong_size():
    with pytest.raises(ValueError):
        mock_device.encode_png(2, 2, b"\x00" * 11)


def test_heartbeat_and_log_frames_are_json_with_their_fields():
    assert json.loads(mock_device.heartbeat_frame("dev_x")) == {
        "type": "heartbeat",
        "device_id": "dev_x",
    }
    payload = mock_device.play_log_payload("ad_042", 1_700_000_000_000)
    frame = json.loads(mock_device.log_frame("dev_x", "log_1", payload))
    assert frame == {"type": "log", "device_id": "dev_x", "id": "log_1", "payload": payload}
    assert payload["event"] == "play" and payload["ad"] == "ad_042"


def test_ack_frame_carries_the_command_id_and_name():
    frame = json.loads(mock_device.ack_frame("dev_x", "cmd_1", "REBOOT"))
    assert frame == {
        "type": "ack",
        "device_id": "dev_x",
        "id": "cmd_1",
        "payload": {"ok": True, "command": "REBOOT"},
    }
    assert "id" not in json.loads(mock_device.ack_frame("dev_x", None, "REBOOT"))


def test_snapshot_frame_carries_the_png_in_base64_under_the_command_id():
    png = mock_device.snapshot_png("dev_x", 0.0)
    frame = json.loads(mock_device.snapshot_frame("dev_x", "cmd_7", png))
    assert (frame["type"], frame["device_id"], frame["id"]) == ("snapshot", "dev_x", "cmd_7")
    assert base64.b64decode(frame["payload"], validate=True) == png


def test_parse_server_frame_accepts_only_json_objects():
    assert mock_device.parse_server_frame(b'{"type":"pong","ts":1}') == {"type": "pong", "ts": 1}
    assert mock_device.parse_server_frame(b"[1]") is None
    assert mock_device.parse_server_frame(b"\xff not json") is None


def test_device_url_encodes_credentials_and_keeps_other_query_fields():
    url = mock_device.device_url("ws://h:8080/ws?tenant=a&token=old", "dev 1", "a+b/c=&")
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("ws", "h:8080", "/ws")
    assert parse_qs(parts.query) == {"tenant": ["a"], "device_id": ["dev 1"], "token": ["a+b/c=&"]}


def test_backoff_grows_from_one_second_to_sixty_with_jitter():
    assert 0.5 <= mock_device.backoff_delay(0, 0.0) <= mock_device.backoff_delay(0, 0.999) <= 1
    assert mock_device.backoff_delay(3, 0.999) <= 8 < mock_device.backoff_delay(4, 0.0) * 2 + 1e-9
    assert 30 <= mock_device.backoff_delay(10, 0.0) <= mock_device.backoff_delay(500, 0.999) <= 60


def test_handshake_status_reads_the_status_line():
    assert mock_device.handshake_status("HTTP/1.1 401 Unauthorized") == 401
    assert mock_device.handshake_status(None) is None
    assert mock_device.handshake_status("garbage") is None


def test_credentials_round_trip_through_a_json_lines_file(tmp_path):
    path = str(tmp_path / "fleet.jsonl")
    saved = [
        mock_device.Credentials("dev_1", "t1", "上海中心01号"),
        mock_device.Credentials("d2", "t2"),
    ]
    mock_device.write_credentials(path, saved)
    assert mock_device.read_credentials(path) == saved
    assert (tmp_path / "fleet.jsonl").stat().st_mode & 0o777 == 0o600


def test_connect_pacer_starts_at_most_rate_connections_per_second():
    clock = Clock()
    errors = []
    pacer = mock_device.ConnectPacer(clock, rate=100, on_error=errors.append, tick=0.05)
    started = []
    for i in range(300):
        pacer.submit(lambda i=i: started.append(i))
    assert len(started) == 1
    clock.pump([0.05] * 20)
    assert len(started) == 101
    clock.pump([0.05] * 40)
    assert started == list(range(300)) and not errors and len(pacer) == 0
    clock.advance(1)
    pacer.submit(lambda: started.append("late"))
    assert started[-1] == "late"  # an idle pacer starts the next attempt at once


def test_connect_pacer_reports_a_failing_attempt_and_goes_on():
    clock = Clock()
    errors = []
    pacer = mock_device.ConnectPacer(clock, rate=1000, on_error=errors.append)
    started = []
    pacer.submit(lambda: 1 / 0)
    pacer.submit(lambda: started.append("next"))
    clock.pump([0.05] * 2)
    assert started == ["next"] and errors[0].check(ZeroDivisionError)


class _FakeApi:
    """register_with_retries answers with ``answer(location)``, by default a Deferred the test
    fires."""

    def __init__(self, answer=lambda location: Deferred()):
        self.answer = answer
        self.calls = []

    def register_with_retries(self, location):
        d = self.answer(location)
        self.calls.append((location, d))
        return d


def _register(api, locations, concurrency=50):
    console = mock_device.Console(io.StringIO(), per_device=False, errors_per_window=20)
    return ensureDeferred(
        mock_device.register_fleet(Clock(), api, locations, concurrency, console)
    )


def test_register_fleet_keeps_at_most_concurrency_requests_in_flight():
    api = _FakeApi()
    locations = [f"loc {i}" for i in range(120)]
    result = _register(api, locations)
    while len(api.calls) < len(locations):
        assert sum(not d.called for _, d in api.calls) == 50
        location, d = next(c for c in api.calls if not c[1].called)
        d.callback(mock_device.Credentials(f"dev_{location}", "t", location))
    for _, d in api.calls:
        if not d.called:
            d.callback(mock_device.Credentials("dev", "t"))
    assert len(result.result) == 120
    assert sorted(location for location, _ in api.calls) == sorted(locations)


def test_register_fleet_registers_every_location_of_a_large_fleet():
    # Regression: with the first requests slow and the rest queued behind a DeferredSemaphore,
    # answers that came back at once released the queue recursively; past the recursion limit
    # registrations were lost or the registration never finished.
    locations = [f"loc {i}" for i in range(5000)]
    slow = []

    def answer(location):
        if len(slow) < 50:
            slow.append((location, Deferred()))
            return slow[-1][1]
        return succeed(mock_device.Credentials(location, "t"))

    result = _register(_FakeApi(answer), locations)
    for location, d in slow:
        d.callback(mock_device.Credentials(location, "t"))
    assert sorted(c.device_id for c in result.result) == sorted(locations)


def test_register_fleet_stops_after_the_first_failure():
    api = _FakeApi()
    result = _register(api, [f"loc {i}" for i in range(5000)])
    for _, d in list(api.calls):
        d.errback(mock_device.RegistrationError("HTTP 401", retry=False))
    assert result.result == [] and len(api.calls) == 50


def test_console_limits_error_lines_in_fleet_mode(capsys):
    console = mock_device.Console(sys.stdout, per_device=False, errors_per_window=2)
    console.device("dev_1", "connected")
    for i in range(5):
        console.error("dev_1", f"failure {i}")
    assert capsys.readouterr().out == "dev_1: failure 0\ndev_1: failure 1\n"
    assert console.take_suppressed() == 3


def test_parser_requires_credentials_or_registration():
    parser = mock_device.build_parser()
    for argv in (
        [],
        ["--device-id", "d"],
        ["--fleet", "3"],
        ["--register"],
        ["--fleet", "3", "--api", "http://h", "--device-id", "d"],
        ["--device-id", "d", "--token", "t", "--url", "http://h/ws"],
    ):
        with pytest.raises(SystemExit):
            mock_device.check_args(parser, parser.parse_args(argv))
    for argv in (
        ["--device-id", "d", "--token", "t"],
        ["--api", "http://h", "--register", "--location", "上海中心01号"],
        ["--fleet", "3", "--credentials", "f.jsonl"],
    ):
        mock_device.check_args(parser, parser.parse_args(argv))


def test_importing_the_script_installs_no_reactor_and_needs_no_gateway():
    source = _PATH.read_text(encoding="utf-8")
    assert "import elevgw" not in source and "from elevgw" not in source
    probe = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('mock_device', {str(_PATH)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['mock_device'] = module\n"
        "spec.loader.exec_module(module)\n"
        "print('twisted.internet.reactor' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False"
