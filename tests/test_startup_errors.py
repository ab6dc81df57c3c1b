"""Every start-up problem is one line naming the option or variable, with a non-zero exit.

Each case runs the real ``twistd elevgw`` in a subprocess: what a user sees is what twistd
prints, not what ``Options`` raises.
"""

import os
import socket
import subprocess
import sys

import pytest
from twisted.python import usage

import elevgw
from elevgw.tap import Options

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: What twistd itself logs before it starts the service ("starting up", "reactor class").
TWISTD_PREAMBLE = "[twisted.scripts._twistd_unix.UnixAppLogger#info]"


def twistd(tmp_path, *args, env=None):
    environ = dict(os.environ, **(env or {}))
    environ["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(ROOT, "src"), ROOT, environ.get("PYTHONPATH", "")]
    )
    return subprocess.run(
        [*TWISTD, "-n", "--pidfile", "", "elevgw", *args],
        cwd=str(tmp_path),
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def lines_of(result):
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.strip() and TWISTD_PREAMBLE not in line]


API = ["--api-endpoint", "tcp:0:interface=127.0.0.1"]


@pytest.mark.parametrize(
    "args, env, expected",
    [
        (
            ["--heartbeat-timeout=-5"],
            {},
            "elevgw: --heartbeat-timeout must be a number of seconds greater than 0, not '-5'",
        ),
        (
            [],
            {"ELEVGW_HEARTBEAT_TIMEOUT": "-3"},
            "elevgw: ELEVGW_HEARTBEAT_TIMEOUT must be a number of seconds greater than 0, "
            "not '-3' (fix or unset the variable)",
        ),
        (
            ["--ws-endpoint", "tcp:99999"],
            {},
            "elevgw: --ws-endpoint 'tcp:99999': port 99999 is not between 0 and 65535",
        ),
        (["--ws-endpoint", "tcp:abc"], {}, "elevgw: --ws-endpoint 'tcp:abc' is not a listening"),
        (
            ["--ws-endpoint", "ssl:0:privateKey=missing.pem:certKey=missing.pem"],
            {},
            "elevgw: --ws-endpoint 'ssl:0:privateKey=missing.pem:certKey=missing.pem': "
            "cannot read",
        ),
        (
            ["--store", "sqlite:/nonexistent/dir/x.db"],
            {},
            "elevgw: --store sqlite:/nonexistent/dir/x.db: folder /nonexistent/dir does not "
            "exist; create it or choose another path",
        ),
        (
            [],
            {"ELEVGW_STORE": "sqlite:/nonexistent/dir/x.db"},
            "elevgw: ELEVGW_STORE sqlite:/nonexistent/dir/x.db: folder /nonexistent/dir",
        ),
        (["--store", "mysql://db"], {}, "elevgw: --store: must be sqlite:PATH or redis://"),
        (
            ["--log-level", "chatty"],
            {},
            "elevgw: --log-level must be debug, info, warn or error, not 'chatty'",
        ),
        ([], {"ELEVGW_BACKEND_URL": "ftp://x"}, "elevgw: ELEVGW_BACKEND_URL must be an http(s)"),
        (
            ["--no-such-option"],
            {},
            "elevgw: option --no-such-option not recognized; twistd elevgw --help lists",
        ),
        (
            ["--api-endpoint", "tcp:0"],
            {},
            "elevgw: the API on 'tcp:0' is reachable from other hosts: set ELEVGW_API_KEY",
        ),
    ],
)
def test_a_bad_setting_stops_twistd_with_one_line(tmp_path, args, env, expected):
    result = twistd(tmp_path, *API, *args, env=env)
    assert result.returncode == 1
    assert lines_of(result) == [result.stderr.strip()], result.stdout + result.stderr
    assert result.stderr.startswith(expected), result.stderr
    assert not (tmp_path / "elevgw.sqlite3").exists()


def test_a_port_in_use_stops_twistd_with_one_line_naming_the_option(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = twistd(tmp_path, *API, "--ws-endpoint", f"tcp:{port}:interface=127.0.0.1")
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    [line] = [line for line in output.splitlines() if "elevgw:" in line or "error" in line]
    assert line == output.strip().splitlines()[-1]
    assert line.endswith(
        f"elevgw: cannot listen on --ws-endpoint tcp:{port}:interface=127.0.0.1: Address "
        "already in use; stop the process that holds the port (another elevgw?) or choose "
        "another port"
    ), line


def test_version_is_elevgws(tmp_path):
    result = twistd(tmp_path, "--version")
    assert result.returncode == 0
    assert result.stdout.startswith(f"elevgw {elevgw.__version__} (Twisted "), result.stdout


def test_options_called_directly_raise_usage_errors_naming_the_source(monkeypatch, tmp_path):
    """Outside twistd (tests, other programs) errors stay ``UsageError``s."""
    monkeypatch.setenv("ELEVGW_SWEEP_INTERVAL", "0")
    with pytest.raises(usage.UsageError, match="^ELEVGW_SWEEP_INTERVAL must be"):
        Options().parseOptions([])
    # The command line wins, and then names itself.
    with pytest.raises(usage.UsageError, match="^--sweep-interval must be"):
        Options().parseOptions(["--sweep-interval", "soon"])
    assert Options().parseOptions(["--sweep-interval", "5"]) is None


def test_an_environment_value_replaced_on_the_command_line_is_not_blamed(monkeypatch):
    monkeypatch.setenv("ELEVGW_BACKEND_URL", "http://backend:5000")
    with pytest.raises(usage.UsageError, match="^--backend-url must be"):
        Options().parseOptions(["--backend-url", "ftp://x"])


def test_a_folder_that_cannot_be_written_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: a file where a folder must be
        locked.rmdir()
        locked.write_text("")
        expected = "does not exist"
    else:
        expected = "is not writable"
    with pytest.raises(usage.UsageError, match=expected):
        Options().parseOptions(["--store", f"sqlite:{locked}/x.db"])


def test_the_start_line_shows_no_webhook_password():
    from elevgw.service import _without_password

    assert _without_password("https://hook:s3cret@backend:8443/x") == "https://backend:8443/x"
    assert _without_password("http://backend:5000") == "http://backend:5000"


def test_a_store_that_fails_to_start_ends_twistd_with_one_line_naming_the_option(tmp_path):
    (tmp_path / "broken.sqlite3").write_text("not a database")
    result = twistd(tmp_path, *API, "--store", "sqlite:broken.sqlite3")
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    [line] = [line for line in output.splitlines() if "elevgw could not start:" in line]
    assert line.endswith(
        "elevgw could not start: --store sqlite:broken.sqlite3: sqlite: file is not a database"
    )
