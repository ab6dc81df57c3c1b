"""A WebSocket fuzzer against the device endpoint: random frame sequences, cut into random
reads, go to a gateway with the lean frame path and to one without it (Autobahn handles
every frame); both must write the same bytes after every read and end in the same state.

The frames mix what devices send (heartbeats, logs, acks, bad JSON, bad UTF-8, binary
snapshots, fragmented messages with pings and pongs between fragments, close frames) with
what a broken or hostile client sends (unmasked frames, RSV bits, reserved opcodes,
continuations out of place, oversized and fragmented control frames, non-minimal lengths,
frames over the size limit), and the gateway ending the session in the middle of a read.
Autobahn's behaviour is the reference: a difference is a bug
in the lean path.
"""

from __future__ import annotations

import json
import struct

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from device_harness import CLOSE_ME, Harness, client_frame

MAX_MESSAGE = 300  # small, so that frames over it (1009) are generated often

_TEXT_PAYLOADS = st.one_of(
    st.just(b'{"type":"heartbeat"}'),
    st.just(b'{"type": "heartbeat", "device_id": "dev_0123456789abcdef"}'),
    st.just(b'{"type":"heartbeat","device_id":"dev_other"}'),
    st.builds(
        lambda i, p: json.dumps({"type": "log", "id": i, "payload": p}).encode(),
        st.text(max_size=8),
        st.text(max_size=40),
    ),
    st.just(b'{"type":"ack","id":"cmd_1","payload":{"ok":true}}'),
    st.just(b'{"type":"reboot"}'),
    st.just(b'{"type":"log","payload":"' + CLOSE_ME + b'"}'),
    st.just(b"[1, 2]"),
    st.just(b""),
    st.just(b'{"type":"heartbeat","x":"\xff"}'),  # not UTF-8
    st.just('{"type":"heartbeat","x":"é"}'.encode()[:-3]),  # a cut code point
    st.binary(max_size=40),
    st.builds(lambda n: b'{"type":"log","payload":"' + b"z" * n + b'"}', st.integers(90, 320)),
)


@st.composite
def masks(draw):
    if draw(st.integers(0, 15)) == 0:
        return None  # unmasked: a protocol error from a client
    return draw(st.binary(min_size=4, max_size=4))


@st.composite
def frame_events(draw):
    """The bytes of one frame (or of one fragmented message)."""
    kind = draw(
        st.sampled_from(
            ["text"] * 8
            + ["binary", "fragmented", "ping", "pong", "close", "bad_control", "odd_data"]
        )
    )
    key = draw(masks())
    if kind == "text":
        payload = draw(_TEXT_PAYLOADS)
        long_length = len(payload) < 126 and draw(st.integers(0, 20)) == 0
        rsv = 4 if draw(st.integers(0, 30)) == 0 else 0
        return client_frame(1, payload, key=key, long_length=long_length, rsv=rsv)
    if kind == "binary":
        return client_frame(2, draw(st.binary(max_size=60)), key=key)
    if kind == "fragmented":
        payload = draw(_TEXT_PAYLOADS)
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
        pieces = [payload[a:b] for a, b in zip([0] + cuts, cuts + [len(payload)], strict=True)]
        out = b""
        for i, piece in enumerate(pieces):
            opcode = 1 if i == 0 else 0
            out += client_frame(opcode, piece, fin=i == len(pieces) - 1, key=key)
            if i < len(pieces) - 1 and draw(st.booleans()):
                out += client_frame(draw(st.sampled_from([9, 10])), b"c", key=key)
        return out
    if kind == "ping":
        return client_frame(9, draw(st.binary(max_size=20)), key=key)
    if kind == "pong":
        return client_frame(10, draw(st.binary(max_size=20)), key=key)
    if kind == "close":
        code = draw(st.sampled_from([None, 1000, 1001, 3000, 4000, 999, 1005, 5000]))
        body = b"" if code is None else struct.pack("!H", code) + draw(st.binary(max_size=10))
        return client_frame(8, body, key=key)
    if kind == "bad_control":
        opcode, fin, size = draw(
            st.sampled_from([(9, False, 3), (9, True, 126), (8, True, 1), (11, True, 2)])
        )
        return client_frame(opcode, b"q" * size, fin=fin, key=key)
    # odd data frames: reserved opcodes, a continuation outside a message, a lone first fragment
    opcode, fin = draw(st.sampled_from([(3, True), (0, True), (0, False), (1, False)]))
    return client_frame(opcode, b'{"type":"heartbeat"}', fin=fin, key=key)


@st.composite
def sessions(draw):
    """A device's byte stream and where the network cuts it into reads."""
    stream = b"".join(draw(st.lists(frame_events(), min_size=1, max_size=12)))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=8))))
    reads = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)], strict=True)]
    return [read for read in reads if read]


def check_same_behaviour(reads: list[bytes]) -> None:
    lean = Harness(lean=True, max_message_size=MAX_MESSAGE)
    plain = Harness(lean=False, max_message_size=MAX_MESSAGE)
    for i, data in enumerate(reads):
        assert lean.feed(data) == plain.feed(data), f"read {i} answered differently"
        assert lean.observed() == plain.observed(), f"state differs after read {i}"


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(sessions())
@example([client_frame(1, b'{"type":"heartbeat"}') * 3])
@example([client_frame(1, b'{"type":"heartbeat"}', key=None)])
@example([client_frame(1, b"a" * 301)])
@example(
    [
        client_frame(1, b'{"type":', fin=False) + client_frame(9, b""),
        client_frame(0, b'"heartbeat"}') + client_frame(1, b'{"type":"heartbeat"}')[:3],
        client_frame(1, b'{"type":"heartbeat"}')[3:],
    ]
)
def test_lean_and_autobahn_paths_answer_every_frame_sequence_alike(reads):
    check_same_behaviour(reads)
