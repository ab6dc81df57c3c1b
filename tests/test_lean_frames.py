"""The lean frame path (``elevgw.south.lean_frames``) keeps the WebSocket protocol intact.

Each test feeds a gateway with the lean path on the same reads as one with it off (Autobahn
handles every frame) and checks what the device gets, and that both gateways agree byte for
byte. ``test_conformance.py`` does the same with generated frame sequences.
"""

import json
import os
import struct

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from device_harness import CLOSE_ME, Harness, client_frame, close_code, server_frames
from elevgw.south import lean_frames

HEARTBEAT = json.dumps({"type": "heartbeat"}).encode()
PONG = b'{"type":"pong","ts":1700000000000}'


def both(max_message_size: int = 8 * 1024 * 1024) -> tuple[Harness, Harness]:
    return Harness(lean=True, max_message_size=max_message_size), Harness(
        lean=False, max_message_size=max_message_size
    )


def feed_both(lean: Harness, plain: Harness, *reads: bytes) -> list[tuple[int, bool, bytes]]:
    """Feed both harnesses ``reads``; the frames written, once both agree on every read."""
    written = b""
    for data in reads:
        out = lean.feed(data)
        assert out == plain.feed(data)
        written += out
    assert lean.observed() == plain.observed()
    return server_frames(written)


def test_a_heartbeat_is_answered_on_the_lean_path_without_autobahn_parsing_it():
    lean, plain = both()
    calls = []
    lean.protocol.processData = lambda: calls.append(1)  # Autobahn's frame parser
    assert feed_both(lean, plain, client_frame(1, HEARTBEAT)) == [(1, True, PONG)]
    assert calls == []


def test_several_frames_in_one_read_each_get_their_answer_in_order():
    lean, plain = both()
    frames = [
        client_frame(1, HEARTBEAT),
        client_frame(1, b'{"type":"log","id":"l1","payload":{"floor":3}}'),
        client_frame(1, b"not json"),
        client_frame(1, HEARTBEAT),
    ]
    out = feed_both(lean, plain, b"".join(frames))
    answers = [json.loads(payload) for _, _, payload in out]
    assert [a["type"] for a in answers] == ["pong", "ack", "error", "pong"]
    assert answers[1]["id"] == "l1" and answers[2]["error"] == "bad_json"


@pytest.mark.parametrize("cut", range(1, 12))
def test_a_frame_split_across_reads_is_answered_once_it_is_complete(cut):
    lean, plain = both()
    data = client_frame(1, HEARTBEAT) * 2
    assert feed_both(lean, plain, data[:cut], data[cut:]) == [(1, True, PONG)] * 2


def test_a_frame_split_into_single_bytes_is_answered_once():
    lean, plain = both()
    data = client_frame(1, HEARTBEAT)
    assert feed_both(lean, plain, *[data[i : i + 1] for i in range(len(data))]) == [
        (1, True, PONG)
    ]


def test_frames_with_a_16_bit_length_take_the_lean_path():
    lean, plain = both()
    payload = json.dumps({"type": "log", "payload": "x" * 3000}).encode()
    assert len(payload) > lean_frames._INT_UNMASK_BELOW
    out = feed_both(lean, plain, client_frame(1, payload))
    assert out == []  # a log without id gets no ack
    assert lean.store.logs[0][1].payload == "x" * 3000


def test_fragmented_message_with_control_frames_between_fragments():
    lean, plain = both()
    message = b'{"type":"log","id":"frag","payload":"' + b"y" * 40 + b'"}'
    reads = [
        client_frame(1, message[:10], fin=False) + client_frame(9, b"ping-1"),
        client_frame(0, message[10:30], fin=False),
        client_frame(10, b"unsolicited pong") + client_frame(9, b""),
        client_frame(0, message[30:], fin=True) + client_frame(1, HEARTBEAT),
    ]
    out = feed_both(lean, plain, *reads)
    assert out[0] == (10, True, b"ping-1")
    assert out[1] == (10, True, b"")
    assert json.loads(out[2][2]) == {"type": "ack", "id": "frag"}
    assert out[3] == (1, True, PONG)


def test_bad_utf8_is_answered_with_an_error_frame_and_the_socket_stays_open():
    lean, plain = both()
    out = feed_both(lean, plain, client_frame(1, b'{"type":"heartbeat","x":"\xff\xfe"}'))
    (frame,) = out
    assert json.loads(frame[2])["error"] == "bad_json"
    assert "UTF-8" in json.loads(frame[2])["detail"]
    assert feed_both(lean, plain, client_frame(1, HEARTBEAT)) == [(1, True, PONG)]


def test_bad_utf8_split_across_fragments_gets_the_same_error_frame():
    lean, plain = both()
    payload = '{"type":"heartbeat","x":"é"}'.encode()
    cut = payload.index(b"\xc3") + 1  # inside the two-byte character
    out = feed_both(
        lean,
        plain,
        client_frame(1, payload[:cut], fin=False),
        client_frame(0, payload[cut:-1] + b"\xff", fin=True),
    )
    assert json.loads(out[0][2])["error"] == "bad_json"


def test_an_unmasked_frame_is_a_protocol_error_1002():
    lean, plain = both()
    (frame,) = feed_both(lean, plain, client_frame(1, HEARTBEAT, key=None))
    assert frame[0] == 8 and close_code(frame[2]) == 1002


def test_rsv_bits_without_an_extension_are_a_protocol_error_1002():
    lean, plain = both()
    (frame,) = feed_both(lean, plain, client_frame(1, HEARTBEAT, rsv=4))
    assert frame[0] == 8 and close_code(frame[2]) == 1002


def test_a_non_minimal_length_is_a_protocol_error_1002():
    lean, plain = both()
    (frame,) = feed_both(lean, plain, client_frame(1, HEARTBEAT, long_length=True))
    assert frame[0] == 8 and close_code(frame[2]) == 1002


@pytest.mark.parametrize("size", [100, 125, 126, 200, 201, 70_000])
def test_frames_over_the_message_size_are_closed_with_1009_and_others_answered(size):
    lean, plain = both(max_message_size=200)
    payload = b'{"type":"heartbeat","pad":"' + b"p" * (size - 29) + b'"}'
    assert len(payload) == size
    out = feed_both(lean, plain, client_frame(1, payload))
    if size <= 200:
        assert out == [(1, True, PONG)]
    else:
        (frame,) = out
        assert frame[0] == 8 and close_code(frame[2]) == 1009


def test_a_message_over_the_size_in_fragments_is_closed_with_1009():
    lean, plain = both(max_message_size=200)
    out = feed_both(
        lean,
        plain,
        client_frame(1, b"a" * 150, fin=False),
        client_frame(0, b"b" * 150, fin=True),
    )
    assert out[-1][0] == 8 and close_code(out[-1][2]) == 1009


def test_the_close_handshake_from_the_device():
    lean, plain = both()
    close = client_frame(8, struct.pack("!H", 1000) + b"bye")
    out = feed_both(lean, plain, client_frame(1, HEARTBEAT) + close + client_frame(1, HEARTBEAT))
    assert out[0] == (1, True, PONG)
    assert out[1][0] == 8 and close_code(out[1][2]) == 1000
    assert len(out) == 2  # nothing answered after the close
    assert lean.transport.disconnecting and plain.transport.disconnecting


def test_the_close_handshake_from_the_gateway_then_frames_in_flight():
    lean, plain = both()
    for harness in (lean, plain):
        harness.gateway.registry.end(harness.protocol.session, "timeout", 4000)
    (frame,) = server_frames(lean.transport.value())
    assert lean.transport.value() == plain.transport.value()
    assert close_code(frame[2]) == 4000
    lean.transport.clear()
    plain.transport.clear()
    out = feed_both(
        lean, plain, client_frame(1, HEARTBEAT) + client_frame(8, struct.pack("!H", 4000))
    )
    assert out == []  # the session ended: the heartbeat is not answered
    assert lean.transport.disconnecting


def test_a_frame_that_makes_the_gateway_close_hands_the_rest_of_the_read_to_autobahn():
    lean, plain = both()
    calls = []
    process_data = lean.protocol.processData

    def counted():
        calls.append(1)
        return process_data()

    lean.protocol.processData = counted
    closing = client_frame(1, b'{"type":"log","payload":"' + CLOSE_ME + b'"}')
    out = feed_both(lean, plain, client_frame(1, HEARTBEAT) + closing + client_frame(1, HEARTBEAT))
    assert [opcode for opcode, _, _ in out] == [1, 8]
    assert calls, "the frame after the close went to the lean path"


def test_frames_to_the_device_are_the_bytes_autobahn_would_write():
    for size in (0, 1, 125, 126, 127, 65535, 65536, 70_000):
        payload = os.urandom(size)
        lean, plain = both()
        for harness in (lean, plain):
            harness.protocol.send_frame(payload)
        assert lean.transport.value() == plain.transport.value()
        assert server_frames(lean.transport.value()) == [(1, True, payload)]


def test_frames_to_the_device_once_closing_are_dropped_on_both_paths():
    # An answer to a store write that finishes after the close has no one to go to; raising
    # would leave an unhandled error in that write's Deferred.
    lean, plain = both()
    for harness in (lean, plain):
        harness.protocol.close(1000, "bye")
        closing = harness.transport.value()
        harness.protocol.send_frame(b"{}")
        assert harness.transport.value() == closing


def test_unmask_matches_the_rfc_for_every_length_up_to_the_big_integer_bound():
    key = os.urandom(4)
    for n in list(range(0, 64)) + [2047, 2048, 5000]:
        payload = os.urandom(n)
        expected = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        assert lean_frames.unmask(key, payload) == expected


def test_connections_that_log_frames_stay_on_autobahn():
    harness = Harness(lean=True)
    assert lean_frames.eligible(harness.protocol)
    harness.protocol.logFrames = True
    assert not lean_frames.eligible(harness.protocol)


@pytest_twisted.ensureDeferred
async def test_lean_path_over_a_real_socket_with_frames_cut_anywhere(gateway):
    """Real sockets: several frames per segment, frames cut across segments, and a
    fragmented message with a ping in the middle, all on one connection."""
    from wsclient import connect_device

    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    (protocol,) = gateway.service.device_factory.open_connections
    assert protocol._lean
    wire = device.protocol.transport
    stream = client_frame(1, HEARTBEAT) * 3 + client_frame(1, b'{"type":"log","id":"x"}')
    for cut in (1, 7, 30):
        wire.write(stream[:cut])
        await deferLater(reactor, 0.02, lambda: None)
        wire.write(stream[cut:])
        answers = [await device.frame() for _ in range(4)]
        assert [a["type"] for a in answers] == ["pong"] * 3 + ["ack"]
    wire.write(
        client_frame(1, b'{"type":', fin=False)
        + client_frame(9, b"p")
        + client_frame(0, b'"heartbeat"}', fin=True)
    )
    assert (await device.frame())["type"] == "pong"
    await device.close()
