"""The wire format: every way a device frame can be wrong gets its own error code."""

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_a_frame_nested_past_the_limit_is_bad_json_however_deep():
    for depth in (33, 990, 100_000):
        raw = b'{"type": "log", "payload": ' + b"[" * depth + b"]" * depth + b"}"
        assert error_code(raw) == wire.BAD_JSON
    nested = {"a": [1, {"b": [2, {"c": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}]}]}
    assert parse({"type": "log", "payload": nested}).payload == nested  # brackets in strings


def test_nesting_is_measured_not_guessed_from_bracket_counts():
    wide = [[i] for i in range(1000)]  # 2,000 brackets, 3 deep with the frame
    assert parse({"type": "log", "payload": wide}).payload == wide
    deep = {"type": "log", "payload": "a"}
    for _ in range(32):
        deep["payload"] = [deep["payload"]]  # 33 deep with the frame
    assert error_code(deep) == wire.BAD_JSON
    deep["payload"] = deep["payload"][0]  # 32: the limit
    assert parse(deep).type == "log"


def test_what_a_frame_echoes_back_is_short_and_printable():
    with pytest.raises(wire.FrameError) as raised:
        parse({"type": "x\n" * 100_000})
    assert len(raised.value.detail) < 200 and "\n" not in raised.value.detail
    with pytest.raises(wire.FrameError) as raised:
        parse({"type": [[[[[[]]]]]]})
    assert "an array" in raised.value.detail
    with pytest.raises(wire.FrameError) as raised:
        parse({"type": "log", "device_id": "d" * 7_000_000})
    assert len(raised.value.detail) < 200


def test_a_lone_surrogate_in_an_id_still_makes_valid_utf8_frames():
    frame = parse(b'{"type": "log", "id": "\\ud800"}')
    assert json.loads(wire.ack_frame(frame.id).decode("utf-8"))["id"] == "\ud800"
    assert wire.error_frame("bad_json", "x", frame.id).decode("utf-8")


def _check_frame_or_error(data: bytes) -> None:
    """Any input gives a frame or a ``FrameError``, and either answer encodes as UTF-8 JSON."""
    try:
        frame = wire.parse_frame(data, DEVICE)
    except wire.FrameError as e:
        answer = wire.error_frame(e.code, e.detail, e.frame_id)
    else:
        assert frame.type in wire.FRAME_TYPES
        answer = wire.ack_frame(frame.id)
    json.loads(answer.decode("utf-8"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_give_a_frame_or_an_error_never_an_exception(data):
    _check_frame_or_error(data)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=256))
def test_any_text_gives_a_frame_or_an_error_never_an_exception(text):
    _check_frame_or_error(text.encode("utf-8", "surrogatepass"))


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["type", "device_id", "payload", "id", "other"]), json_values, max_size=5
    )
    | json_values,
    st.sampled_from([None, *sorted(wire.FRAME_TYPES)]),
)
def test_any_json_value_gives_a_frame_or_an_error_never_an_exception(value, frame_type):
    if isinstance(value, dict) and frame_type is not None:
        value = {**value, "type": frame_type}
    _check_frame_or_error(json.dumps(value).encode("utf-8", "surrogatepass"))


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=3000), st.sampled_from(["[", '{"a":']))
def test_any_nesting_depth_gives_a_frame_or_an_error(depth, opener):
    closer = "]" if opener == "[" else "}"
    raw = '{"type":"log","payload":' + opener * depth + "1" + closer * depth + "}"
    _check_frame_or_error(raw.encode())
