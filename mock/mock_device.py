#!/usr/bin/env python3
"""Simulated elevator display devices for any elevgw gateway.

A standalone tool: it speaks only the device WebSocket protocol and the registration route of
the northbound API (see README.rst and docs/protocol.rst), and imports nothing from the gateway package.

One device, with credentials you already have::

    python mock/mock_device.py --device-id dev_x --token T [--url ws://127.0.0.1:8080/ws]

One device registered through the API first::

    python mock/mock_device.py --api http://127.0.0.1:8000 --register --location "上海中心01号"

A fleet of 1000 devices in one process (registered first, credentials kept for next time)::

    python mock/mock_device.py --api http://127.0.0.1:8000 --fleet 1000 --save-credentials fleet.jsonl
    python mock/mock_device.py --fleet 1000 --credentials fleet.jsonl

Each device heartbeats every ``--heartbeat`` seconds, sends a play log every ``--log-every``
seconds, acks every command and answers the ``snapshot`` command with a generated PNG (a
colour gradient with the UTC time drawn on it). It reconnects with exponential backoff and
jitter, except after close 4001 (taken over), close 4003 (revoked) or an HTTP 401 handshake.

The PNG generator and the frame builders are pure module-level functions so they can be
unit-tested; everything that does I/O runs on the reactor and never blocks it once devices are
connecting (credential files are read and written before that).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import struct
import sys
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from autobahn.exception import Disconnected
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import defer, error, task
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python.failure import Failure

DEFAULT_URL = "ws://127.0.0.1:8080/ws"
REGISTER_PATH = "/api/v1/devices/register"
USER_AGENT = "elevgw-mock-device"

#: Close codes after which a device does not reconnect: taken over, revoked.
CLOSE_TAKEN_OVER = 4001
CLOSE_REVOKED = 4003
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001

CLOSE_MEANINGS = {
    1000: "normal closure",
    1001: "going away (gateway draining or restarting)",
    1006: "abnormal closure (no close frame)",
    1008: "policy violation (rate limit)",
    1009: "message too big",
    1011: "gateway internal error",
    4000: "heartbeat timeout",
    4001: "taken over by another connection",
    4003: "revoked",
}

#: A connection that stayed open this long (seconds) resets the reconnect backoff.
STABLE_CONNECTION = 10.0

# ---------------------------------------------------------------------------------------------
# PNG generation (pure)
# ---------------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# A 3x5 pixel font, enough for a clock.
_GLYPHS: dict[str, tuple[str, ...]] = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "001", "001", "001"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
    ":": ("0", "1", "0", "1", "0"),
}
_GLYPH_HEIGHT = 5


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data and the CRC-32 of type and data."""
    crc = zlib.crc32(data, zlib.crc32(kind)) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png(
    width: int, height: int, rgb: bytes | bytearray, text: Mapping[str, str] | None = None
) -> bytes:
    """An 8-bit truecolour PNG of ``rgb`` (``height`` rows of ``width`` RGB triples, top first).

    ``text`` becomes ``tEXt`` chunks (Latin-1; characters outside it are replaced).
    """
    stride = width * 3
    if width < 1 or height < 1 or len(rgb) != stride * height:
        raise ValueError(f"need {stride * height} RGB bytes for {width}x{height}, got {len(rgb)}")
    raw = b"".join(
        b"\x00" + bytes(rgb[row * stride : (row + 1) * stride]) for row in range(height)
    )
    chunks = [png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))]
    for key, value in (text or {}).items():
        chunks.append(
            png_chunk(
                b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1", "replace")
            )
        )
    chunks.append(png_chunk(b"IDAT", zlib.compress(raw, 9)))
    chunks.append(png_chunk(b"IEND", b""))
    return PNG_SIGNATURE + b"".join(chunks)


def _text_width(text: str, scale: int) -> int:
    return sum(len(_GLYPHS[c][0]) * scale for c in text) + (len(text) - 1) * scale


def _draw_text(
    pixels: bytearray,
    width: int,
    height: int,
    text: str,
    left: int,
    top: int,
    scale: int,
    colour: tuple[int, int, int],
) -> None:
    x = left
    for char in text:
        glyph = _GLYPHS[char]
        for gy, row in enumerate(glyph):
            for gx, bit in enumerate(row):
                if bit != "1":
                    continue
                for dy in range(scale):
                    for dx in range(scale):
                        px, py = x + gx * scale + dx, top + gy * scale + dy
                        if 0 <= px < width and 0 <= py < height:
                            i = (py * width + px) * 3
                            pixels[i : i + 3] = bytes(colour)
        x += (len(glyph[0]) + 1) * scale


def snapshot_png(device_id: str, when: float, width: int = 64, height: int = 36) -> bytes:
    """A small test card for ``device_id``: a red/green gradient tinted blue per device, with the
    UTC time ``when`` (epoch seconds) drawn as HH:MM:SS when it fits, and the device id and time
    in ``tEXt`` chunks. Deterministic for a given device id, time and size."""
    tint = zlib.crc32(device_id.encode("utf-8")) & 0xFF
    pixels = bytearray(width * height * 3)
    for y in range(height):
        green = 255 * y // max(1, height - 1)
        for x in range(width):
            i = (y * width + x) * 3
            pixels[i] = 255 * x // max(1, width - 1)
            pixels[i + 1] = green
            pixels[i + 2] = tint
    clock = time.strftime("%H:%M:%S", time.gmtime(when))
    scale = 3
    while scale > 1 and (
        _text_width(clock, scale) + 2 > width or _GLYPH_HEIGHT * scale + 2 > height
    ):
        scale -= 1
    if _text_width(clock, scale) + 1 <= width and _GLYPH_HEIGHT * scale + 1 <= height:
        left = (width - _text_width(clock, scale)) // 2
        top = (height - _GLYPH_HEIGHT * scale) // 2
        _draw_text(pixels, width, height, clock, left + 1, top + 1, scale, (0, 0, 0))
        _draw_text(pixels, width, height, clock, left, top, scale, (255, 255, 255))
    text = {
        "Software": USER_AGENT,
        "Source": device_id,
        "Creation Time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)),
    }
    return encode_png(width, height, pixels, text)


# ---------------------------------------------------------------------------------------------
# Frames and small protocol helpers (pure)
# ---------------------------------------------------------------------------------------------


def _dump(frame: dict[str, Any]) -> bytes:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def heartbeat_frame(device_id: str) -> bytes:
    return _dump({"type": "heartbeat", "device_id": device_id})


def play_log_payload(ad: str, ts_ms: int, duration_ms: int = 15000) -> dict[str, Any]:
    """What a screen reports after playing an ad: which ad, when (epoch ms) and for how long."""
    return {"event": "play", "ad": ad, "ts": ts_ms, "duration_ms": duration_ms}


def log_frame(device_id: str, log_id: str, payload: Any) -> bytes:
    return _dump({"type": "log", "device_id": device_id, "id": log_id, "payload": payload})


def ack_frame(device_id: str, command_id: str | None, command: Any) -> bytes:
    """The device's answer to a command; ``id`` is left out when the command had none."""
    frame: dict[str, Any] = {"type": "ack", "device_id": device_id}
    if command_id is not None:
        frame["id"] = command_id
    frame["payload"] = {"ok": True, "command": command}
    return _dump(frame)


def snapshot_frame(device_id: str, command_id: str | None, image: bytes) -> bytes:
    """A snapshot as text: ``payload`` is the image in base64, ``id`` the snapshot command's id."""
    frame: dict[str, Any] = {"type": "snapshot", "device_id": device_id}
    if command_id is not None:
        frame["id"] = command_id
    frame["payload"] = base64.b64encode(image).decode("ascii")
    return _dump(frame)


def parse_server_frame(data: bytes) -> dict[str, Any] | None:
    """The JSON object a gateway sent, or None when the frame is not one."""
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def device_url(base: str, device_id: str, token: str) -> str:
    """``base`` with ``device_id`` and ``token`` added to its query, URL-encoded."""
    parts = urlsplit(base)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("device_id", "token")]
    query += [("device_id", device_id), ("token", token)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def backoff_delay(
    attempt: int, jitter: float, initial: float = 1.0, maximum: float = 60.0
) -> float:
    """Seconds to wait before reconnect ``attempt`` (0 for the first).

    The ceiling doubles from ``initial`` up to ``maximum``; ``jitter`` (uniform in [0, 1)) puts
    the delay between half the ceiling and the ceiling, so a fleet that lost its gateway at once
    does not come back in the same second.
    """
    ceiling = min(maximum, initial * 2 ** min(attempt, 32))
    return ceiling * (0.5 + jitter / 2)


def handshake_status(status_line: str | None) -> int | None:
    """The status code of an HTTP status line such as ``HTTP/1.1 401 Unauthorized``."""
    if not status_line:
        return None
    fields = status_line.split()
    if len(fields) >= 2 and fields[1].isdigit():
        return int(fields[1])
    return None


def describe_close(code: int | None, reason: str | None) -> str:
    meaning = CLOSE_MEANINGS.get(code or 0, "")
    text = f"code {code}" + (f" ({meaning})" if meaning else "")
    return text + (f", reason {reason!r}" if reason else "")


# ---------------------------------------------------------------------------------------------
# Output and counters
# ---------------------------------------------------------------------------------------------


class Console:
    """Lines on stdout. Per-device lines only when ``per_device``; error lines always, but at most
    ``errors_per_window`` between two ``take_suppressed`` calls when that is set (a fleet that
    loses its gateway would otherwise print one line per device per retry)."""

    def __init__(self, stream: TextIO, per_device: bool, errors_per_window: int | None) -> None:
        self.per_device = per_device
        self._stream = stream
        self._errors_per_window = errors_per_window
        self._errors_in_window = 0
        self._suppressed = 0

    def line(self, text: str) -> None:
        self._stream.write(text + "\n")
        self._stream.flush()

    def device(self, device_id: str, text: str) -> None:
        if self.per_device:
            self.line(f"{device_id}: {text}")

    def error(self, device_id: str, text: str) -> None:
        if self._errors_per_window is not None and not self.per_device:
            if self._errors_in_window >= self._errors_per_window:
                self._suppressed += 1
                return
            self._errors_in_window += 1
        self.line(f"{device_id}: {text}")

    def take_suppressed(self) -> int:
        suppressed, self._suppressed, self._errors_in_window = self._suppressed, 0, 0
        return suppressed


@dataclass
class Stats:
    """Fleet counters. ``connected`` is the current number of open sockets, ``reconnects`` the
    sessions opened again by a device that had been connected before, ``errors`` the failed
    connects and handshakes, abnormal closes and error frames, ``stopped`` the devices that gave
    up (401, 4001, 4003, --no-reconnect)."""

    devices: int = 0
    connected: int = 0
    reconnects: int = 0
    commands: int = 0
    snapshots: int = 0
    errors: int = 0
    stopped: int = 0

    def summary(self) -> str:
        return (
            f"connected={self.connected}/{self.devices} reconnects={self.reconnects} "
            f"commands={self.commands} snapshots={self.snapshots} errors={self.errors} "
            f"stopped={self.stopped}"
        )


@dataclass(frozen=True)
class Credentials:
    device_id: str
    token: str
    location: str | None = None

    def to_json(self) -> str:
        value = {"device_id": self.device_id, "token": self.token, "location": self.location}
        return json.dumps(value, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> Credentials:
        value = json.loads(line)
        return cls(str(value["device_id"]), str(value["token"]), value.get("location"))


def read_credentials(path: str) -> list[Credentials]:
    """Credentials saved by ``--save-credentials``: one JSON object a line, blank lines skipped."""
    with open(path, encoding="utf-8") as f:
        return [Credentials.from_json(line) for line in f if line.strip()]


def write_credentials(path: str, credentials: Sequence[Credentials]) -> None:
    """Write ``credentials`` as JSON lines, readable by the owner only (they hold tokens)."""
    temporary = f"{path}.tmp{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(c.to_json() + "\n" for c in credentials)
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------
# Connecting
# ---------------------------------------------------------------------------------------------


class ConnectPacer:
    """Runs queued connection attempts at no more than ``rate`` per second, first come first
    served, so a fleet (or a fleet reconnecting after a gateway restart) does not open all its
    sockets in the same tick.

    A token bucket on ``clock`` (an ``IReactorTime``): it refills at ``rate`` tokens a second up
    to one ``tick``'s worth (at least one), and a queued attempt waits for a whole token.
    """

    def __init__(
        self, clock: Any, rate: float, on_error: Callable[[Failure], None], tick: float = 0.05
    ) -> None:
        self._clock = clock
        self._queue: deque[Callable[[], None]] = deque()
        self._rate = rate
        self._tick = tick
        self._burst = max(1.0, rate * tick)
        self._tokens = 1.0
        self._refilled_at = clock.seconds()
        self._on_error = on_error
        self._call: Any = None
        self._running = False

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, connect: Callable[[], None]) -> None:
        self._queue.append(connect)
        if self._call is None and not self._running:
            self._run()

    def stop(self) -> None:
        self._queue.clear()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _run(self) -> None:
        self._call = None
        now = self._clock.seconds()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled_at) * self._rate)
        self._refilled_at = now
        self._running = True
        try:
            while self._queue and self._tokens >= 1.0 - 1e-9:  # float clock steps
                self._tokens -= 1.0
                connect = self._queue.popleft()
                try:
                    connect()
                except Exception:
                    self._on_error(Failure())
        finally:
            self._running = False
        if self._queue:
            wait = max(self._tick, (1.0 - self._tokens) / self._rate)
            self._call = self._clock.callLater(wait, self._run)


def websocket_endpoint(reactor: Any, url: str, timeout: float) -> Any:
    """A client endpoint for a ``ws://`` or ``wss://`` URL."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    endpoint: Any
    if isIPAddress(host):
        endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    elif isIPv6Address(host):
        endpoint = TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    else:
        endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if parts.scheme == "wss":
        from twisted.internet.endpoints import wrapClientTLS
        from twisted.internet.ssl import optionsForClientTLS

        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
    return endpoint


@dataclass(frozen=True)
class DeviceSettings:
    url: str
    heartbeat: float = 5.0
    log_every: float = 30.0
    binary_snapshots: bool = False
    reconnect: bool = True
    #: Start each device's heartbeat and log timers at a random phase (fleets).
    spread_timers: bool = False
    #: Leave pongs and the acks of logs out of the per-device output.
    quiet: bool = False
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    close_timeout: float = 3.0


class DeviceProtocol(WebSocketClientProtocol):
    """One device connection; everything it hears goes to its ``SimulatedDevice``."""

    def onOpen(self) -> None:
        self.factory.device.on_open(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.device.on_message(self, payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.device.on_close(self, wasClean, code, reason)


class DeviceFactory(WebSocketClientFactory):
    """Builds the connections of one device, reused across its reconnects: the handshake URL
    carries the device's credentials. No auto-ping (the device heartbeats at the application
    level, as the gateway expects) and no per-message compression."""

    protocol = DeviceProtocol

    def __init__(
        self, device: SimulatedDevice, url: str, settings: DeviceSettings, reactor: Any
    ) -> None:
        super().__init__(url, useragent=USER_AGENT, reactor=reactor)
        self.device = device
        self.setProtocolOptions(
            autoPingInterval=0,
            perMessageCompressionOffers=[],
            openHandshakeTimeout=settings.handshake_timeout,
            closeHandshakeTimeout=settings.close_timeout,
        )


class SimulatedDevice:
    """One simulated screen: keeps a socket to the gateway open, reconnecting as a real device
    would, heartbeats, logs and answers commands.

    ``on_finished(device, reason, fatal)`` is called once, when the device has stopped for good:
    ``fatal`` is true when it stopped on its own (refused, taken over, revoked, or closed with
    reconnecting off) rather than because ``stop()`` was called.
    """

    def __init__(
        self,
        reactor: Any,
        credentials: Credentials,
        settings: DeviceSettings,
        endpoint: Any,
        pacer: ConnectPacer,
        stats: Stats,
        console: Console,
        rng: random.Random,
        on_finished: Callable[[SimulatedDevice, str, bool], None],
    ) -> None:
        self.device_id = credentials.device_id
        self._reactor = reactor
        self._settings = settings
        self._endpoint = endpoint
        self._pacer = pacer
        self._stats = stats
        self._console = console
        self._rng = rng
        self._on_finished = on_finished
        url = device_url(settings.url, credentials.device_id, credentials.token)
        self._factory = DeviceFactory(self, url, settings, reactor)
        self._state = "idle"
        self._protocol: DeviceProtocol | None = None
        self._connecting: defer.Deferred | None = None
        self._opened_at: float | None = None
        self._ever_opened = False
        self._attempt = 0
        self._retry: Any = None
        self._timers: dict[str, Any] = {}
        self._stop_waiters: list[defer.Deferred] = []

    @property
    def state(self) -> str:
        return self._state

    def start(self) -> None:
        self._console.device(self.device_id, f"connecting to {self._settings.url}")
        self._queue_connect()

    def stop(self) -> defer.Deferred:
        """Close with 1000 and stop reconnecting; fires when the socket is gone. Cancelling the
        Deferred drops the connection without waiting for the closing handshake."""
        if self._state == "stopped":
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred(lambda _: self._abort())
        self._stop_waiters.append(waiter)
        if self._state in ("idle", "queued", "backoff"):
            if self._retry is not None and self._retry.active():
                self._retry.cancel()
            self._finish("stopped", fatal=False)
        elif self._state == "connecting":
            self._state = "stopping"
            if self._protocol is not None:
                self._protocol.dropConnection(abort=True)
            elif self._connecting is not None:
                self._connecting.cancel()
        elif self._state == "open":
            self._state = "stopping"
            assert self._protocol is not None
            self._protocol.sendClose(CLOSE_NORMAL, "mock device stopping")
        return waiter

    def _abort(self) -> None:
        if self._protocol is not None:
            self._protocol.dropConnection(abort=True)

    # -- connecting ----------------------------------------------------------------------------

    def _queue_connect(self) -> None:
        self._state = "queued"
        self._pacer.submit(self._connect)

    def _connect(self) -> None:
        if self._state != "queued":
            return
        self._state = "connecting"
        self._opened_at = None
        d = self._endpoint.connect(self._factory)
        self._connecting = d
        d.addCallbacks(self._tcp_connected, self._connect_failed)

    def _tcp_connected(self, protocol: DeviceProtocol) -> None:
        self._connecting = None
        self._protocol = protocol
        if self._state == "stopping":
            protocol.dropConnection(abort=True)

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self._state == "stopping":
            self._finish("stopped", fatal=False)
            return
        self._stats.errors += 1
        why = failure.getErrorMessage() or repr(failure.value)
        if failure.check(error.ConnectionRefusedError):
            why = "connection refused"
        elif failure.check(error.TimeoutError):
            why = "connection timed out"
        self._retry_later(f"cannot connect: {why}")

    def _retry_later(self, why: str, as_error: bool = True) -> None:
        """Reconnect after a backoff delay, or stop for good with reconnecting off. ``as_error``
        is false after an orderly close (a draining gateway): worth a per-device line only."""
        say = self._console.error if as_error else self._console.device
        if not self._settings.reconnect:
            say(self.device_id, f"{why}; not reconnecting (--no-reconnect)")
            self._finish(why, fatal=True)
            return
        if self._opened_at is not None:
            if self._reactor.seconds() - self._opened_at >= STABLE_CONNECTION:
                self._attempt = 0
        delay = backoff_delay(self._attempt, self._rng.random())
        self._attempt += 1
        say(self.device_id, f"{why}; reconnecting in {delay:.1f} s")
        self._state = "backoff"
        self._retry = self._reactor.callLater(delay, self._queue_connect)

    def _finish(self, reason: str, fatal: bool) -> None:
        self._state = "stopped"
        self._stop_timers()
        if fatal:
            self._stats.stopped += 1
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)
        self._on_finished(self, reason, fatal)

    # -- the session -----------------------------------------------------------------------------

    def on_open(self, protocol: DeviceProtocol) -> None:
        self._protocol = protocol
        if self._state == "stopping":
            protocol.sendClose(CLOSE_NORMAL, "mock device stopping")
            return
        self._state = "open"
        self._opened_at = self._reactor.seconds()
        self._stats.connected += 1
        again = ""
        if self._ever_opened:
            self._stats.reconnects += 1
            again = " again"
        self._ever_opened = True
        self._console.device(self.device_id, f"connected{again} to {self._settings.url}")
        spread = self._settings.spread_timers
        heartbeat = self._settings.heartbeat
        self._schedule("heartbeat", self._rng.uniform(0, heartbeat) if spread else 0.0)
        log_every = self._settings.log_every
        if log_every > 0:
            self._schedule("log", self._rng.uniform(0, log_every) if spread else log_every)

    def on_close(
        self, protocol: DeviceProtocol, was_clean: bool, code: int | None, reason: str | None
    ) -> None:
        self._stop_timers()
        self._protocol = None
        was_open = self._opened_at is not None
        if was_open:
            self._stats.connected -= 1
        if self._state == "stopping":
            self._console.device(self.device_id, f"closed: {describe_close(code, reason)}")
            self._finish("stopped", fatal=False)
            return
        if self._state == "stopped":
            return
        if not was_open:
            self._stats.errors += 1
            status = handshake_status(getattr(protocol, "http_status_line", None))
            if status == 401:
                why = (
                    "handshake refused with HTTP 401: unknown device, or a wrong or revoked "
                    "token; not reconnecting"
                )
                self._console.error(self.device_id, why)
                self._finish("refused (401)", fatal=True)
                return
            if status is not None:
                self._retry_later(f"handshake refused with HTTP {status}")
            else:
                self._retry_later(f"handshake failed: {reason}")
            return
        closed = f"closed: {describe_close(code, reason)}"
        if code == CLOSE_TAKEN_OVER:
            self._stats.errors += 1
            self._console.error(
                self.device_id, f"{closed}; another connection took over, stopping"
            )
            self._finish("taken over (4001)", fatal=True)
        elif code == CLOSE_REVOKED:
            self._stats.errors += 1
            self._console.error(self.device_id, f"{closed}; device revoked, stopping")
            self._finish("revoked (4003)", fatal=True)
        elif code in (CLOSE_NORMAL, CLOSE_GOING_AWAY):
            self._retry_later(closed, as_error=False)
        else:
            self._stats.errors += 1
            self._retry_later(closed)

    def on_message(self, protocol: DeviceProtocol, payload: bytes, is_binary: bool) -> None:
        if is_binary:
            self._console.device(self.device_id, f"<- binary frame of {len(payload)} bytes")
            return
        frame = parse_server_frame(payload)
        if frame is None:
            self._stats.errors += 1
            text = payload[:200].decode("utf-8", "replace")
            self._console.error(self.device_id, f"<- not a JSON object: {text!r}")
            return
        kind = frame.get("type")
        if kind == "command":
            self._on_command(frame)
        elif kind == "pong":
            if not self._settings.quiet:
                self._console.device(self.device_id, f"<- pong ts={frame.get('ts')}")
        elif kind == "ack":
            text = "<- ack" + (f" {frame['id']}" if frame.get("id") is not None else "")
            if "url" in frame:
                self._console.device(self.device_id, f"{text} url={frame['url']}")
            elif not self._settings.quiet:
                self._console.device(self.device_id, text)
        elif kind == "error":
            self._stats.errors += 1
            self._console.error(
                self.device_id,
                f"<- error {frame.get('error')}: {frame.get('detail')}"
                + (f" (id {frame['id']})" if frame.get("id") else ""),
            )
        else:
            self._console.device(self.device_id, f"<- {payload.decode('utf-8', 'replace')}")

    def _on_command(self, frame: dict[str, Any]) -> None:
        self._stats.commands += 1
        command_id = frame.get("id")
        name = frame.get("payload")
        data = json.dumps(frame.get("data"), ensure_ascii=False)
        self._console.device(self.device_id, f"<- command {command_id} {name} data={data}")
        if name == "snapshot":
            image = snapshot_png(self.device_id, time.time())
            if self._settings.binary_snapshots:
                sent = self._send(image, binary=True)
                how = "binary frame"
            else:
                sent = self._send(snapshot_frame(self.device_id, command_id, image))
                how = "base64"
            if sent:
                self._stats.snapshots += 1
                self._console.device(
                    self.device_id, f"-> snapshot {command_id} ({len(image)} bytes PNG, {how})"
                )
        elif self._send(ack_frame(self.device_id, command_id, name)):
            self._console.device(self.device_id, f"-> ack {command_id} {name}")

    def _send(self, data: bytes, binary: bool = False) -> bool:
        protocol = self._protocol
        if protocol is None or protocol.state != WebSocketProtocol.STATE_OPEN:
            return False
        try:
            protocol.sendMessage(data, isBinary=binary)
        except Disconnected:
            return False
        return True

    # -- timers ----------------------------------------------------------------------------------

    def _schedule(self, name: str, delay: float) -> None:
        self._timers[name] = self._reactor.callLater(delay, self._fire, name)

    def _fire(self, name: str) -> None:
        if self._state != "open":
            return
        try:
            if name == "heartbeat":
                self._send(heartbeat_frame(self.device_id))
                interval = self._settings.heartbeat
            else:
                ad = f"ad_{self._rng.randrange(1, 100):03d}"
                payload = play_log_payload(ad, int(time.time() * 1000))
                self._send(log_frame(self.device_id, f"log_{uuid.uuid4().hex[:16]}", payload))
                interval = self._settings.log_every
        except Exception:
            self._stats.errors += 1
            self._console.error(self.device_id, f"cannot send {name}: {Failure().getTraceback()}")
            interval = self._settings.heartbeat
        self._schedule(name, interval)

    def _stop_timers(self) -> None:
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()


# ---------------------------------------------------------------------------------------------
# Registration through the northbound API
# ---------------------------------------------------------------------------------------------


class RegistrationError(Exception):
    def __init__(self, message: str, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


class ApiClient:
    """The one API call the mock needs, over one treq client and connection pool."""

    def __init__(self, reactor: Any, base: str, api_key: str | None, pool_size: int) -> None:
        import treq.client
        from twisted.web.client import Agent, HTTPConnectionPool

        self._reactor = reactor
        self._base = base.rstrip("/")
        self._headers: dict[bytes | str, bytes | str] = {}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = pool_size
        self._http = treq.client.HTTPClient(Agent(reactor, pool=self._pool))

    async def register(self, location: str, timeout: float = 10.0) -> Credentials:
        """Register one device; raises ``RegistrationError`` (``retry`` tells whether trying
        again may help: connection errors and 5xx)."""
        try:
            response = await self._http.post(
                self._base + REGISTER_PATH,
                json={"location": location},
                headers=self._headers,
                timeout=timeout,
                reactor=self._reactor,
            )
            body = await response.content()
        except defer.CancelledError:
            raise RegistrationError("request timed out", retry=True)
        except Exception as e:
            raise RegistrationError(f"{type(e).__name__}: {e}", retry=True)
        text = body.decode("utf-8", "replace")
        if response.code != 201:
            raise RegistrationError(
                f"register answered HTTP {response.code}: {text[:300]}",
                retry=response.code >= 500 or response.code == 429,
            )
        try:
            value = json.loads(text)
            return Credentials(value["device_id"], value["token"], value.get("location"))
        except (ValueError, KeyError, TypeError):
            raise RegistrationError(f"unexpected register answer: {text[:300]}", retry=False)

    async def register_with_retries(self, location: str, attempts: int = 3) -> Credentials:
        for attempt in range(attempts):
            try:
                return await self.register(location)
            except RegistrationError as e:
                if not e.retry or attempt == attempts - 1:
                    raise
            await task.deferLater(self._reactor, 0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def close(self) -> defer.Deferred:
        return self._pool.closeCachedConnections()


async def register_fleet(
    reactor: Any,
    api: ApiClient,
    locations: Sequence[str],
    concurrency: int,
    console: Console,
) -> list[Credentials]:
    """Register one device per location, at most ``concurrency`` at a time. The first
    registration that fails for good (a 4xx such as a wrong API key, or an API still down or
    failing after its retries) stops the ones not yet sent: the rest would fail the same way."""
    registered: list[Credentials] = []
    failures: list[str] = []
    started = reactor.seconds()
    pending = iter(locations)

    async def worker() -> None:
        for location in pending:
            if failures:
                return
            try:
                registered.append(await api.register_with_retries(location))
            except RegistrationError as e:
                if not failures:
                    console.line(f"cannot register {location!r}, stopping registration: {e}")
                failures.append(str(e))

    def progress() -> None:
        console.line(f"registering: {len(registered)}/{len(locations)} done")

    loop = task.LoopingCall(progress)
    loop.clock = reactor
    loop.start(10, now=False).addErrback(lambda f: console.line(f.getTraceback()))
    try:
        workers = min(concurrency, len(locations))
        await defer.gatherResults(
            [defer.ensureDeferred(worker()) for _ in range(workers)], consumeErrors=True
        )
    finally:
        loop.stop()
    elapsed = reactor.seconds() - started
    console.line(
        f"registered {len(registered)}/{len(locations)} devices in {elapsed:.1f} s"
        + (f" ({len(failures)} failed)" if failures else "")
    )
    return registered


# ---------------------------------------------------------------------------------------------
# The fleet (one device is a fleet of one)
# ---------------------------------------------------------------------------------------------


class Fleet:
    """Runs simulated devices until ``stop()`` or until every device stopped on its own.

    ``done`` fires once with the exit status: 1 when a device ended on its own (refused,
    taken over, revoked, closed with reconnecting off) and no device is left, else 0.
    """

    def __init__(
        self,
        reactor: Any,
        credentials: Sequence[Credentials],
        settings: DeviceSettings,
        connect_rate: float,
        console: Console,
        summary_every: float | None,
        seed: int | None = None,
    ) -> None:
        self._reactor = reactor
        self._console = console
        self._settings = settings
        self.stats = Stats(devices=len(credentials))
        self.done: defer.Deferred = defer.Deferred()
        self._pacer = ConnectPacer(reactor, connect_rate, self._internal_error)
        self._fatal = 0
        self._finished = 0
        self._stopping: defer.Deferred | None = None
        self._started_at = 0.0
        self._all_connected = False
        self._ever_all_connected = False
        self._summary_every = summary_every
        self._summary: task.LoopingCall | None = None
        self._watch: task.LoopingCall | None = None
        rng = random.Random(seed)
        endpoint = websocket_endpoint(reactor, settings.url, settings.connect_timeout)
        self.devices = [
            SimulatedDevice(
                reactor,
                c,
                settings,
                endpoint,
                self._pacer,
                self.stats,
                console,
                random.Random(rng.random()),
                self._device_finished,
            )
            for c in credentials
        ]

    def start(self) -> None:
        self._started_at = self._reactor.seconds()
        if self._summary_every:
            self._console.line(
                f"fleet: connecting {len(self.devices)} devices to {self._settings.url}"
            )
            self._summary = task.LoopingCall(self._print_summary)
            self._summary.clock = self._reactor
            self._summary.start(self._summary_every, now=False).addErrback(self._internal_error)
            self._watch = task.LoopingCall(self._check_all_connected)
            self._watch.clock = self._reactor
            self._watch.start(0.1, now=False).addErrback(self._internal_error)
        for device in self.devices:
            device.start()

    def stop(self, grace: float = 5.0) -> defer.Deferred:
        """Close every device with 1000; after ``grace`` seconds drop the ones still closing."""
        if self._stopping is None:
            self._stopping = defer.DeferredList(
                [d.stop() for d in self.devices], consumeErrors=True
            )
            self._stopping.addTimeout(grace, self._reactor)
            self._stopping.addErrback(self._stop_failed)
            self._stopping.addCallback(lambda _: self._end(0))
            self._pacer.stop()
        return self._when_done()

    def _stop_failed(self, failure: Failure) -> None:
        if not failure.check(defer.TimeoutError, defer.CancelledError):
            self._internal_error(failure)

    def _when_done(self) -> defer.Deferred:
        """A new Deferred that fires with None once ``done`` has (``done`` keeps its result)."""
        d: defer.Deferred = defer.Deferred()

        def fire(result: Any) -> Any:
            d.callback(None)
            return result

        self.done.addBoth(fire)
        return d

    def _end(self, status: int) -> None:
        if self.done.called:
            return
        for loop in (self._summary, self._watch):
            if loop is not None and loop.running:
                loop.stop()
        self._pacer.stop()
        if self._summary_every:
            self._print_summary()
        self.done.callback(status)

    def _device_finished(self, device: SimulatedDevice, reason: str, fatal: bool) -> None:
        self._finished += 1
        if fatal:
            self._fatal += 1
        if self._stopping is None and self._finished == len(self.devices):
            if self._summary_every:
                self._console.line("fleet: no device left running")
            self._end(1 if self._fatal else 0)

    def _check_all_connected(self) -> None:
        """Say when the whole fleet is connected: after the start, and again after an outage
        (how long a reconnect storm takes to settle)."""
        if self.stats.connected < len(self.devices):
            self._all_connected = False
        elif not self._all_connected:
            self._all_connected = True
            elapsed = self._reactor.seconds() - self._started_at
            count = len(self.devices)
            if self._ever_all_connected:
                self._console.line(
                    f"fleet: all {count} devices connected again (t={elapsed:.1f}s)"
                )
            else:
                self._console.line(f"fleet: all {count} devices connected in {elapsed:.1f} s")
            self._ever_all_connected = True

    def _print_summary(self) -> None:
        elapsed = self._reactor.seconds() - self._started_at
        line = f"fleet t={elapsed:.0f}s {self.stats.summary()}"
        suppressed = self._console.take_suppressed()
        if suppressed:
            line += f" ({suppressed} error lines not shown)"
        self._console.line(line)

    def _internal_error(self, failure: Failure) -> None:
        self.stats.errors += 1
        self._console.line(f"internal error: {failure.getTraceback()}")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _positive(kind: Callable[[str], float | int], allow_zero: bool = False) -> Callable:
    def convert(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}")
        if value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if allow_zero else '> 0'}: {text}")
        return value

    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mock_device.py",
        description="Simulated elevator display devices for an elevgw gateway.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  one device with known credentials:
    %(prog)s --device-id dev_x --token T --url ws://127.0.0.1:8080/ws
  register one device through the API, then connect it:
    %(prog)s --api http://127.0.0.1:8000 --register --location "上海中心01号"
  register 1000 devices, keep their credentials, connect them all:
    %(prog)s --api http://127.0.0.1:8000 --fleet 1000 --save-credentials fleet.jsonl
  the same fleet again, without registering:
    %(prog)s --fleet 1000 --credentials fleet.jsonl

Ctrl-C (SIGINT) or SIGTERM closes every socket with 1000 and exits; scripts that start the mock
in the background should send SIGTERM (a background job of a non-interactive shell ignores
SIGINT).

exit status: 0 when stopped by --duration, Ctrl-C or SIGTERM; 1 when the devices ended on their own
(handshake refused with 401, taken over with 4001, revoked with 4003, or closed while
--no-reconnect) or registration failed; 2 for bad arguments.""",
    )
    device = parser.add_argument_group("device")
    device.add_argument("--device-id", help="the device to connect as")
    device.add_argument("--token", help="its token")
    device.add_argument(
        "--url", default=DEFAULT_URL, help=f"gateway WebSocket URL (default {DEFAULT_URL})"
    )
    api = parser.add_argument_group("registration through the API")
    api.add_argument("--api", metavar="URL", help="the API base URL, e.g. http://127.0.0.1:8000")
    api.add_argument(
        "--api-key",
        default=os.environ.get("ELEVGW_API_KEY"),
        help="sent as 'Authorization: Bearer KEY' (default: $ELEVGW_API_KEY)",
    )
    api.add_argument(
        "--register", action="store_true", help="register a new device through --api first"
    )
    api.add_argument(
        "--location",
        help="location of the registered device ('mock elevator'); a fleet numbers it: LOC #00001",
    )
    fleet = parser.add_argument_group("fleet")
    fleet.add_argument(
        "--fleet",
        type=_positive(int),
        metavar="N",
        help="run N devices in this process (registered through --api unless --credentials)",
    )
    fleet.add_argument(
        "--connect-rate",
        type=_positive(float),
        default=200.0,
        metavar="PER_SECOND",
        help="new connections per second, reconnects included (default 200)",
    )
    fleet.add_argument(
        "--credentials",
        metavar="FILE",
        help="use credentials saved with --save-credentials (JSON lines) instead of registering",
    )
    fleet.add_argument(
        "--save-credentials",
        metavar="FILE",
        help="write the credentials in use to FILE as JSON lines (mode 0600)",
    )
    fleet.add_argument(
        "--register-concurrency",
        type=_positive(int),
        default=50,
        metavar="N",
        help="registrations in flight at once (default 50)",
    )
    fleet.add_argument(
        "--summary-every",
        type=_positive(float),
        default=10.0,
        metavar="SECONDS",
        help="fleet summary interval (default 10)",
    )
    fleet.add_argument(
        "-v", "--verbose", action="store_true", help="per-device output in fleet mode too"
    )
    behaviour = parser.add_argument_group("behaviour")
    behaviour.add_argument(
        "--heartbeat",
        type=_positive(float),
        default=5.0,
        metavar="SECONDS",
        help="heartbeat interval (default 5)",
    )
    behaviour.add_argument(
        "--log-every",
        type=_positive(float, allow_zero=True),
        default=30.0,
        metavar="SECONDS",
        help="play-log interval, 0 for none (default 30)",
    )
    behaviour.add_argument(
        "--binary-snapshots",
        action="store_true",
        help="send snapshots as binary frames of raw PNG instead of base64 JSON",
    )
    behaviour.add_argument(
        "--no-reconnect", action="store_true", help="stop a device when its socket closes"
    )
    behaviour.add_argument(
        "--duration", type=_positive(float), metavar="SECONDS", help="stop after SECONDS"
    )
    behaviour.add_argument(
        "-q", "--quiet", action="store_true", help="leave pongs and log acks out of the output"
    )
    behaviour.add_argument("--seed", type=int, help="seed the jitter, for repeatable runs")
    behaviour.add_argument(
        "--debug", action="store_true", help="show Twisted and Autobahn log messages on stderr"
    )
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if urlsplit(args.url).scheme not in ("ws", "wss") or not urlsplit(args.url).hostname:
        parser.error(f"--url must be a ws:// or wss:// URL, not {args.url!r}")
    if args.register and not args.api:
        parser.error("--register needs --api")
    if args.fleet is not None:
        if args.device_id or args.token:
            parser.error(
                "--fleet takes no --device-id/--token (it registers or uses --credentials)"
            )
        if not args.api and not args.credentials:
            parser.error("--fleet needs --api (to register the devices) or --credentials FILE")
    elif not args.credentials and not args.register:
        if not (args.device_id and args.token):
            parser.error(
                "give --device-id and --token, or --api URL --register, or --credentials FILE"
            )
    elif (args.device_id or args.token) and (args.register or args.credentials):
        parser.error("--device-id/--token do not go with --register or --credentials")


def _raise_file_limit(needed: int, console: Console) -> None:
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
        if soft < needed:
            console.line(f"warning: open-file limit {soft} is below the {needed} this fleet needs")


async def run(reactor: Any, args: argparse.Namespace) -> int:
    """Register or load credentials, run the devices, and return the exit status."""
    fleet_mode = args.fleet is not None
    console = Console(sys.stdout, per_device=not fleet_mode or args.verbose, errors_per_window=20)
    wanted = args.fleet or 1
    credentials: list[Credentials] = []
    if args.credentials:
        try:
            credentials = read_credentials(args.credentials)
        except (OSError, ValueError, KeyError) as e:
            console.line(f"cannot read credentials from {args.credentials}: {e}")
            return 1
        credentials = credentials[:wanted]
        console.line(f"using {len(credentials)} saved credentials from {args.credentials}")
    elif args.device_id:
        credentials = [Credentials(args.device_id, args.token)]

    if len(credentials) < wanted and args.api:
        api = ApiClient(reactor, args.api, args.api_key, args.register_concurrency)
        base = args.location or ("mock fleet" if fleet_mode else "mock elevator")
        try:
            if fleet_mode:
                locations = [f"{base} #{i:05d}" for i in range(len(credentials) + 1, wanted + 1)]
                credentials += await register_fleet(
                    reactor, api, locations, args.register_concurrency, console
                )
            else:
                try:
                    new = await api.register_with_retries(base)
                except RegistrationError as e:
                    console.line(f"cannot register: {e}")
                    return 1
                console.line(
                    f"registered {new.device_id} at {new.location!r}: "
                    f"--device-id {new.device_id} --token {new.token}"
                )
                credentials.append(new)
        finally:
            await api.close()
    elif len(credentials) < wanted:
        console.line(f"warning: only {len(credentials)} credentials for a fleet of {wanted}")
    if not credentials:
        console.line("no device to run")
        return 1
    if args.save_credentials:
        write_credentials(args.save_credentials, credentials)
        console.line(f"saved {len(credentials)} credentials to {args.save_credentials}")

    if fleet_mode:
        _raise_file_limit(len(credentials) + 64, console)
    settings = DeviceSettings(
        url=args.url,
        heartbeat=args.heartbeat,
        log_every=args.log_every,
        binary_snapshots=args.binary_snapshots,
        reconnect=not args.no_reconnect,
        spread_timers=fleet_mode,
        quiet=args.quiet,
    )
    fleet = Fleet(
        reactor,
        credentials,
        settings,
        args.connect_rate,
        console,
        summary_every=args.summary_every if fleet_mode else None,
        seed=args.seed,
    )
    reactor.addSystemEventTrigger("before", "shutdown", fleet.stop)
    if args.duration:
        reactor.callLater(args.duration, fleet.stop)
    fleet.start()
    return await fleet.done


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    level = LogLevel.debug if args.debug else LogLevel.error
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=level)]
            )
        ],
        redirectStandardIO=False,
    )

    async def react_main(reactor: Any) -> None:
        status = await run(reactor, args)
        if status:
            raise SystemExit(status)

    task.react(lambda reactor: defer.ensureDeferred(react_main(reactor)))


if __name__ == "__main__":
    main()
