"""Writes to devices leave at once when nothing is queued, together when they answer one
read, and queue in order when the device stops reading (``elevgw.south.fast_write``)."""

import json
import socket

import pytest_twisted
from twisted.internet import reactor, tcp
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport

from elevgw.south import fast_write as write_through
from wsclient import connect_device


def server_transport(gateway):
    (protocol,) = gateway.service.device_factory.open_connections
    return protocol.transport


@pytest_twisted.ensureDeferred
async def test_device_sockets_get_at_once_writes_and_twisted_keeps_its_queue(gateway):
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    transport = server_transport(gateway)
    assert type(transport) is tcp.Server
    assert transport.write.func is write_through._write
    # The queue attributes the fast path reads, with the meaning it relies on.
    assert transport._tempDataBuffer == [] and transport.dataBuffer == b""
    assert transport.offset == 0 and transport._writeDisconnected is False
    assert (await device.request({"type": "heartbeat"}))["type"] == "pong"
    await device.close()


def test_other_transports_keep_twisted_write():
    transport = StringTransport()
    assert write_through.install(transport) is False
    assert "write" not in vars(transport)


@pytest_twisted.ensureDeferred
async def test_a_device_that_stops_reading_still_gets_every_frame_in_order(gateway_factory):
    # An outbound buffer larger than the 9 MB sent (the default would close the device).
    gateway = await gateway_factory(max_outbound_buffer=32 * 1024 * 1024)
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    device.protocol.transport.pauseProducing()  # the device stops reading its socket
    transport = server_transport(gateway)
    blob = "x" * 60_000
    ids = []
    queued = False
    for _ in range(150):  # 9 MB: more than the socket buffers hold
        status, body = await gateway.call(
            "POST",
            "/api/send",
            {"device_id": creds["device_id"], "command": "FILL", "data": {"blob": blob}},
        )
        assert status == 200
        ids.append(body["id"])
        queued = queued or bool(transport._tempDataBuffer or transport.dataBuffer)
    assert queued, "the socket never filled: the test did not reach Twisted's queue"
    device.protocol.transport.resumeProducing()
    received = [await device.frame(timeout=10) for _ in ids]
    assert [frame["id"] for frame in received] == ids
    assert all(frame["data"]["blob"] == blob for frame in received)
    assert (await device.request({"type": "heartbeat"}))["type"] == "pong"
    await device.close()


def self_signed(folder):
    """A key and certificate for 127.0.0.1 in ``folder``: ``(key path, cert path)``."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = folder / "key.pem", folder / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest_twisted.ensureDeferred
async def test_tls_device_sockets_keep_twisted_write_and_work(gateway_factory, tmp_path):
    key, cert = self_signed(tmp_path)
    gateway = await gateway_factory(
        ws_endpoint=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    )
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"], tls=True)
    transport = server_transport(gateway)
    assert type(transport) is not tcp.Server  # TLS wraps the socket's transport
    assert getattr(transport.write, "func", None) is not write_through._write
    assert (await device.request({"type": "heartbeat"}))["type"] == "pong"
    status, body = await gateway.call(
        "POST", "/api/send", {"device_id": creds["device_id"], "command": "REBOOT"}
    )
    assert status == 200 and (await device.frame())["id"] == body["id"]
    await device.close()


@pytest_twisted.ensureDeferred
async def test_answers_to_frames_that_came_together_leave_in_one_send(gateway):
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    transport = server_transport(gateway)
    sends = []
    send = transport.writeSomeData

    def counted(data):
        sends.append(bytes(data))
        return send(data)

    transport.writeSomeData = counted
    payload = json.dumps({"type": "heartbeat"}).encode()
    masked = bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload  # a zero mask
    device.protocol.transport.write(masked * 8)  # eight frames in one segment
    pongs = [await device.frame() for _ in range(8)]
    assert [pong["type"] for pong in pongs] == ["pong"] * 8
    assert len(sends) == 1 and sends[0].count(b'"pong"') == 8
    await device.close()


@pytest_twisted.ensureDeferred
async def test_a_write_to_a_broken_socket_is_left_to_the_reactor(gateway):
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    (protocol,) = gateway.service.device_factory.open_connections
    transport = protocol.transport
    transport.socket.shutdown(socket.SHUT_WR)  # from now on every send fails (EPIPE)
    protocol.send_frame(b'{"type":"command","id":"cmd_x","payload":"REBOOT"}')
    # No exception: the frame went to Twisted's queue, whose next write finds the socket broken.
    assert transport._tempDataBuffer or transport.dataBuffer
    await device.closed
    registry = gateway.service.gateway.registry
    for _ in range(100):
        if registry.get(creds["device_id"]) is None:
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert registry.get(creds["device_id"]) is None
