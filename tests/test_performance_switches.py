"""The performance switches (``--lean-frames``, …): on by default, each can be switched off
from the command line or the environment, and the gateway works either way."""

import pytest
import pytest_twisted
from twisted.python import usage

from elevgw.tap import Options
from wsclient import connect_device


def settings_from(args):
    options = Options()
    options.parseOptions(args)
    return options.settings()


def test_lean_frames_is_on_by_default_and_can_be_switched_off():
    assert settings_from([]).lean_frames is True
    assert settings_from(["--lean-frames", "off"]).lean_frames is False
    assert settings_from(["--lean-frames=no"]).lean_frames is False
    assert settings_from(["--lean-frames", "on"]).lean_frames is True


def test_slim_connections_is_on_by_default_and_can_be_switched_off(monkeypatch):
    assert settings_from([]).slim_connections is True
    assert settings_from(["--slim-connections", "off"]).slim_connections is False
    monkeypatch.setenv("ELEVGW_SLIM_CONNECTIONS", "no")
    assert settings_from([]).slim_connections is False


def test_lean_frames_from_the_environment(monkeypatch):
    monkeypatch.setenv("ELEVGW_LEAN_FRAMES", "off")
    assert settings_from([]).lean_frames is False
    assert settings_from(["--lean-frames", "on"]).lean_frames is True


def test_a_switch_that_is_neither_on_nor_off_is_a_usage_error():
    with pytest.raises(usage.UsageError):
        settings_from(["--lean-frames", "sometimes"])


@pytest.mark.parametrize("lean", [True, False])
@pytest_twisted.ensureDeferred
async def test_devices_are_served_with_the_lean_path_on_and_off(gateway_factory, lean):
    gateway = await gateway_factory(lean_frames=lean)
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    (protocol,) = gateway.service.device_factory.open_connections
    assert protocol._lean is lean
    assert (await device.request({"type": "heartbeat"}))["type"] == "pong"
    assert (await device.request(b"\xff"))["error"] == "bad_json"
    await device.close()
