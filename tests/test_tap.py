"""``twistd elevgw``: found as a plugin, options parsed from the command line and environment."""

import subprocess
import sys

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage

from elevgw.tap import Options, is_loopback_endpoint


def parse(args, environ=None, monkeypatch=None):
    options = Options()
    options.parseOptions(args)
    return options


def test_twistd_lists_the_elevgw_plugin(tmp_path):
    names = [maker.tapname for maker in getPlugins(IServiceMaker)]
    assert "elevgw" in names
    result = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(tmp_path),
    )
    assert "elevgw" in result.stdout, result.stderr


def test_defaults_are_the_spec_defaults():
    settings = parse([]).settings()
    assert settings.ws_endpoint == "tcp:8080"
    assert settings.api_endpoint == "tcp:8000:interface=127.0.0.1"
    assert settings.store == "sqlite:elevgw.sqlite3"
    assert settings.snapshots == "file:snapshots"
    assert settings.backend_url is None and settings.api_key is None
    assert (settings.heartbeat_timeout, settings.sweep_interval) == (30.0, 10.0)
    assert settings.max_message_size == 8388608
    assert settings.node_id


def test_environment_fills_options_and_the_command_line_wins(monkeypatch):
    monkeypatch.setenv("ELEVGW_API_KEY", "from-env")
    monkeypatch.setenv("ELEVGW_HEARTBEAT_TIMEOUT", "45")
    monkeypatch.setenv("ELEVGW_WS_ENDPOINT", "tcp:9090")
    settings = parse(["--ws-endpoint", "tcp:7070"]).settings()
    assert settings.api_key == "from-env"
    assert settings.heartbeat_timeout == 45.0
    assert settings.ws_endpoint == "tcp:7070"


@pytest.mark.parametrize(
    "args",
    [
        ["--heartbeat-timeout", "soon"],
        ["--sweep-interval", "0"],
        ["--max-message-size", "-5"],
        ["--lifecycle-log-rate", "-1"],
        ["--lifecycle-log-rate", "lots"],
        ["--backend-url", "ftp://x"],
        ["--public-url", "nohost"],
        ["--api-endpoint", "tcp:8000"],
        ["--api-endpoint", "tcp:8000:interface=0.0.0.0"],
    ],
)
def test_bad_options_are_one_line_usage_errors(args):
    with pytest.raises(usage.UsageError):
        parse(args)


def test_bad_environment_value_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("ELEVGW_SWEEP_INTERVAL", "often")
    with pytest.raises(usage.UsageError):
        parse([])


def test_public_api_needs_an_api_key():
    options = parse(["--api-endpoint", "tcp:8000", "--api-key", "k"])
    assert options.settings().api_key == "k"


@pytest.mark.parametrize(
    "description, loopback",
    [
        ("tcp:8000:interface=127.0.0.1", True),
        ("tcp6:8000:interface=\\:\\:1", True),
        ("tcp:8000:interface=10.0.0.1", False),
        ("tcp:8000:interface=localhost", True),
        ("unix:/run/elevgw.sock", True),
        ("tcp:8000", False),
        ("ssl:8443:privateKey=k.pem", False),
    ],
)
def test_loopback_detection(description, loopback):
    assert is_loopback_endpoint(description) is loopback


def test_make_service_refuses_an_unknown_store():
    from elevgw.tap import makeService

    with pytest.raises(usage.UsageError):
        makeService(parse(["--store", "mysql://x"]))
