"""Structured logs: JSON lines with the gateway's fields, and a real ``twistd`` run that
logs in JSON, serves, and drains on SIGTERM."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from twisted.logger import Logger, LogLevel, LogPublisher, globalLogPublisher

import elevgw
from elevgw.observe import logs


def test_json_lines_carry_structured_fields_and_the_node():
    output = io.StringIO()
    observer = logs.GatewayLogFilter(logs.JSONLinesObserver(output), LogLevel.info, "node-7")
    try:
        globalLogPublisher.addObserver(observer)
        Logger(namespace="elevgw.test").info(
            "device {device_id} online ({reason})",
            device_id="dev_1",
            reason="connected",
            event="device_online",
        )
    finally:
        globalLogPublisher.removeObserver(observer)
    line = json.loads(output.getvalue().strip().splitlines()[-1])
    assert line["message"] == "device dev_1 online (connected)"
    assert line["device_id"] == "dev_1" and line["event"] == "device_online"
    assert line["node"] == "node-7" and line["level"] == "info"
    assert line["namespace"] == "elevgw.test"


def test_failures_carry_the_error_but_never_reach_clients_as_json_lines_only():
    output = io.StringIO()
    observer = logs.JSONLinesObserver(output)
    try:
        raise ValueError("boom")
    except ValueError:
        from twisted.python.failure import Failure

        failure = Failure()
    observer(
        {
            "log_format": "it failed",
            "log_level": LogLevel.critical,
            "log_failure": failure,
            "log_namespace": "x",
            "log_time": 1.0,
        }
    )
    line = json.loads(output.getvalue())
    assert line["error"] == "boom" and "ValueError" in line["traceback"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, seconds=20.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def test_twistd_runs_logs_json_and_exits_cleanly_on_sigterm(tmp_path):
    """The real command line: ``twistd --logger elevgw.observe.logs.json_lines -n elevgw``."""
    import urllib.request

    ws_port, api_port = free_port(), free_port()
    env = dict(os.environ, ELEVGW_NODE_ID="json-node")
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--logger",
            "elevgw.observe.logs.json_lines",
            "--pidfile",
            "",
            "-n",
            "elevgw",
            "--ws-endpoint",
            f"tcp:{ws_port}:interface=127.0.0.1",
            "--api-endpoint",
            f"tcp:{api_port}:interface=127.0.0.1",
        ],
        cwd=str(tmp_path),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:

        def healthy():
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{api_port}/healthz", timeout=1
                ) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(healthy)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    # twistd re-raises the signal after a clean shutdown, so the exit status says SIGTERM.
    assert process.returncode in (0, -signal.SIGTERM), err
    lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    assert lines, err
    messages = [line["message"] for line in lines]
    assert any(m.startswith("elevgw json-node: devices on") for m in messages), messages
    # The first lines a user sees say what listens where, with this version.
    assert f"elevgw API starting on {api_port}" in messages, messages
    assert f"elevgw device WebSocket starting on {ws_port}" in messages, messages
    [started] = [m for m in messages if m.startswith("elevgw json-node: devices on")]
    assert started.endswith(f"store sqlite, webhooks off (elevgw {elevgw.__version__})")
    assert "Server Shut Down." in messages
    # Every line from the gateway's start to its stop names the node; twistd's own lines
    # before the service tree starts (loading, reactor) cannot know it yet.
    first = next(i for i, m in enumerate(messages) if m.startswith("elevgw json-node: devices"))
    last = max(i for i, line in enumerate(lines) if line["namespace"].startswith("elevgw"))
    assert all(line["node"] == "json-node" for line in lines[first : last + 1])
    assert (tmp_path / "elevgw.sqlite3").exists()


def test_a_port_in_use_stops_twistd_with_an_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "--pidfile",
                "",
                "-n",
                "elevgw",
                "--ws-endpoint",
                f"tcp:{port}:interface=127.0.0.1",
                "--api-endpoint",
                "tcp:0:interface=127.0.0.1",
            ],
            cwd=str(tmp_path),
            capture_output=True,
            timeout=30,
        )
    assert result.returncode != 0
    assert b"Address already in use" in result.stdout + result.stderr


def test_the_log_level_filter_covers_every_logger_and_can_be_undone():
    """``--log-level`` filters Twisted's and Autobahn's events too, not only the gateway's."""
    output = io.StringIO()
    observer = logs.JSONLinesObserver(output)
    publisher = LogPublisher(observer)
    service = logs.LogFilterService(LogLevel.info, "node-3", publisher)
    service.startService()
    ours = Logger(namespace="elevgw.test", observer=publisher)
    twisted_own = Logger(namespace="twisted.web.server", observer=publisher)
    ours.debug("command {command_id} sent", command_id="cmd_1")
    twisted_own.debug("a Twisted debug line")
    ours.info("device online")
    twisted_own.warn("a Twisted warning")
    service.stopService()
    ours.debug("command {command_id} sent", command_id="cmd_2")
    lines = [json.loads(line) for line in output.getvalue().splitlines()]
    assert [line["message"] for line in lines] == [
        "device online",
        "a Twisted warning",
        "command cmd_2 sent",
    ]
    assert [line["node"] for line in lines] == ["node-3", "node-3", ""]


def test_the_log_filter_relies_on_the_publishers_observer_list():
    """``LogFilterService`` reads ``LogPublisher._observers``; this fails if Twisted renames it."""
    publisher = LogPublisher()
    observer = logs.JSONLinesObserver(io.StringIO())
    publisher.addObserver(observer)
    assert publisher._observers == [observer]


@pytest.mark.parametrize("value, level", [("debug", LogLevel.debug), ("WARN", LogLevel.warn)])
def test_log_level_option(value, level):
    from elevgw.tap import Options

    options = Options()
    options.parseOptions(["--log-level", value])
    assert options["log-level"] == level


def test_bad_log_level_is_a_usage_error():
    from twisted.python import usage

    from elevgw.tap import Options

    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--log-level", "chatty"])


def test_default_log_level_is_info():
    from elevgw.tap import Options

    options = Options()
    options.parseOptions([])
    assert options["log-level"] == LogLevel.info
