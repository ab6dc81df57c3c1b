"""The performance switches (``--lean-frames``, …): on by default, each can be switched off
from the command line or the environment, and the gateway works either way."""

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python import usage

from elevgw.config import Settings
from elevgw.south.lean_reactor import LeanReactorService
from elevgw.south.process import lean_services
from elevgw.south.storm_freeze import StormFreezer
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


@pytest.mark.parametrize("name", ["lean-reactor", "storm-freeze"])
def test_process_switches_are_on_by_default_and_can_be_switched_off(name):
    attribute = name.replace("-", "_")
    assert getattr(settings_from([]), attribute) is True
    assert getattr(settings_from([f"--{name}", "off"]), attribute) is False


def test_the_process_switches_choose_the_services_at_the_root():
    class Registry:
        on_session_ended: list = []

        def __len__(self):
            return 0

    class Gateway:
        registry = Registry()

    class Service:
        gateway = Gateway()

    on = lean_services(Settings(), Service(), reactor)
    assert [type(s) for s in on] == [LeanReactorService, StormFreezer]
    off = lean_services(Settings(lean_reactor=False, storm_freeze=False), Service(), reactor)
    assert off == []


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
