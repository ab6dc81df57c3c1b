"""The wire format: every way a device frame can be wrong gets its own error code."""

import base64
import json

import pytest

from elevgw.core import wire

DEVICE = "dev_0011223344556677"


def parse(value) -> wire.Frame:
    data = value if isinstance(value, bytes) else json.dumps(value).encode()
    return wire.parse_frame(data, DEVICE)


def error_code(value) -> str:
    with pytest.raises(wire.FrameError) as raised:
        parse(value)
    return raised.value.code


@pytest.mark.parametrize("kind", ["heartbeat", "log", "snapshot", "ack"])
def test_known_types_parse_with_payload_and_id(kind):
    frame = parse({"type": kind, "device_id": DEVICE, "payload": {"a": 1}, "id": "x1"})
    assert frame == wire.Frame(type=kind, payload={"a": 1}, id="x1")


def test_device_id_may_be_left_out():
    assert parse({"type": "heartbeat"}).type == "heartbeat"


@pytest.mark.parametrize(
    "raw, code",
    [
        (b"not json", wire.BAD_JSON),
        (b"", wire.BAD_JSON),
        (b"\xff\xfe{}", wire.BAD_JSON),
        (b"[1, 2]", wire.NOT_AN_OBJECT),
        (b'"heartbeat"', wire.NOT_AN_OBJECT),
        (b"null", wire.NOT_AN_OBJECT),
        (b'{"payload": 1}', wire.MISSING_TYPE),
        (b'{"type": "selfie"}', wire.UNKNOWN_TYPE),
        (b'{"type": 7}', wire.UNKNOWN_TYPE),
        (b'{"type": ["heartbeat"]}', wire.UNKNOWN_TYPE),
        (b'{"type": {"a": 1}}', wire.UNKNOWN_TYPE),
        (b'{"type": "log", "device_id": "dev_other"}', wire.DEVICE_MISMATCH),
        (b'{"type": "log", "id": 5}', wire.BAD_ID),
        (b'{"type": "log", "id": "' + b"x" * 200 + b'"}', wire.BAD_ID),
    ],
)
def test_bad_frames_raise_their_error_code(raw, code):
    assert error_code(raw) == code


def test_error_keeps_the_frame_id_so_the_device_can_match_it():
    with pytest.raises(wire.FrameError) as raised:
        parse({"type": "selfie", "id": "f-9"})
    assert raised.value.frame_id == "f-9"


def test_decode_image_accepts_base64_and_data_urls():
    data = b"\x89PNG\r\n\x1a\nrest"
    encoded = base64.b64encode(data).decode()
    assert wire.decode_image(encoded) == data
    assert wire.decode_image("data:image/png;base64," + encoded) == data


@pytest.mark.parametrize("payload", [None, "", 12, {"img": "x"}, "not base64!!", "abc"])
def test_decode_image_refuses_what_is_not_base64(payload):
    with pytest.raises(wire.FrameError) as raised:
        wire.decode_image(payload, "s1")
    assert raised.value.code == wire.BAD_IMAGE and raised.value.frame_id == "s1"


def test_built_frames_are_the_documented_json():
    assert json.loads(wire.pong_frame(1700000000123)) == {"type": "pong", "ts": 1700000000123}
    assert json.loads(wire.ack_frame("l1")) == {"type": "ack", "id": "l1"}
    assert json.loads(wire.ack_frame("s1", url="http://x/y.png")) == {
        "type": "ack",
        "id": "s1",
        "url": "http://x/y.png",
    }
    assert json.loads(wire.error_frame("bad_json", "nope")) == {
        "type": "error",
        "error": "bad_json",
        "detail": "nope",
    }
    assert json.loads(wire.command_frame("cmd_1", "REBOOT", {"delay": 5})) == {
        "type": "command",
        "id": "cmd_1",
        "payload": "REBOOT",
        "data": {"delay": 5},
    }
    assert (
        json.loads(wire.command_frame("cmd_2", "播放", "上海").decode("utf-8"))["data"] == "上海"
    )
