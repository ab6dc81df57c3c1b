#!/usr/bin/env python3
"""Run the elevgw benchmarks: gateway on core 0, load generator on core 1, figures to files.

For every scenario the runner starts a fresh gateway (``twistd -n elevgw`` in a new temp
folder holding its SQLite store, snapshots and log, bulk-provisioned with the devices the
scenario needs) pinned with ``taskset -c 0``, waits for ``/healthz``, measures its idle RSS,
runs ``bench/loadgen.py`` pinned with ``taskset -c 1``, samples the gateway's RSS and CPU
from ``/proc/<pid>/status`` and ``/proc/<pid>/stat`` (and both cores from ``/proc/stat``, to
show what other processes took), stops the gateway and removes the folder. ``flood`` and
``capacity`` also run against ``bench/baseline.py`` (same pinning), so their figures are
ratios to the stack's ceiling.

Each run appends one JSON line to ``bench/results.jsonl``; the table in
``docs/benchmarks.rst`` (between the ``results:begin`` and ``results:end`` comments) is
rewritten with this invocation's runs, the command line and the date::

    python bench/run.py --quick                 # smoke run: 1,000 devices, 20 s
    python bench/run.py                         # full size: 15,000 devices, 2 min
    python bench/run.py --scenarios flood,storm --profile /tmp/profiles
    python bench/run.py --pythonpath /tmp/patched/src --label patched --no-docs

``--profile DIR`` records the gateway with ``py-spy`` (``--nonblocking``, on core 1) during
each measured window and writes the raw stacks plus a summary of the hottest lines there;
profiled figures are flagged ``"profiled": true`` (sampling slows the gateway a little).
``--pythonpath`` runs the gateway from another source tree (to measure a patch before it
lands). The open-files limit is raised to the hard limit (20,000 on these machines).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
LOADGEN = os.path.join(HERE, "loadgen.py")
FLOODER = os.path.join(HERE, "flooder.py")
BASELINE = os.path.join(HERE, "baseline.py")
SCENARIOS = ("flood", "capacity", "storm", "commands", "snapshots")
WITH_BASELINE = ("flood", "capacity", "storm")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: ``flood`` measures the stack's ceiling: 100 devices each sending as fast as the gateway
#: answers, far past the per-device message rate a real device is held to.
SCENARIO_GATEWAY_ARGS = {
    "flood": ["--message-rate", "1000000000", "--message-burst", "1000000000"]
}
BEGIN = ".. results:begin"
END = ".. results:end"


# ---------------------------------------------------------------------------------------------
# /proc sampling
# ---------------------------------------------------------------------------------------------


def proc_rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of the process (all threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cores_busy() -> dict[str, tuple[int, int]]:
    """``{"cpu0": (busy_ticks, total_ticks), …}`` from ``/proc/stat``."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                ticks = [int(v) for v in values[:8]]
                idle = ticks[3] + ticks[4]
                out[name] = (sum(ticks) - idle, sum(ticks))
    return out


class Sampler(threading.Thread):
    """Samples a process's RSS and CPU (and the cores) every ``period`` seconds."""

    def __init__(self, pid: int, period: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.period = period
        self.samples: list[tuple[float, int | None, float | None, dict]] = []
        self._stop_event = threading.Event()

    def sample(self) -> tuple[float, int | None, float | None, dict]:
        entry = (time.monotonic(), proc_rss_kb(self.pid), proc_cpu_s(self.pid), cores_busy())
        self.samples.append(entry)
        return entry

    def run(self) -> None:
        while not self._stop_event.wait(self.period):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(2)
        self.sample()

    def at(self, t: float) -> tuple[float, int | None, float | None, dict]:
        """The sample closest to monotonic time ``t``."""
        return min(self.samples, key=lambda s: abs(s[0] - t))

    def window(self, start: float, end: float) -> dict:
        a, b = self.at(start), self.at(end)
        wall = max(b[0] - a[0], 1e-9)
        inside = [s for s in self.samples if a[0] <= s[0] <= b[0] and s[1] is not None]
        out: dict[str, Any] = {
            "cpu_s": round((b[2] or 0) - (a[2] or 0), 2),
            "cpu_pct": round(100 * ((b[2] or 0) - (a[2] or 0)) / wall, 1),
            "rss_kb_start": a[1],
            "rss_kb_end": b[1],
            "rss_kb_max": max((s[1] for s in inside), default=b[1]),
        }
        for core in sorted(b[3]):
            busy = b[3][core][0] - a[3].get(core, (0, 0))[0]
            total = b[3][core][1] - a[3].get(core, (0, 0))[1]
            out[core + "_busy_pct"] = round(100 * busy / total, 1) if total else None
        return out


# ---------------------------------------------------------------------------------------------
# Servers under test
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up within {timeout} s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Server:
    """The gateway or the baseline, started pinned to core 0 in ``folder``."""

    def __init__(
        self, args: argparse.Namespace, target: str, folder: str, extra: list[str] | None = None
    ) -> None:
        self.args = args
        self.extra = extra or []
        self.target = target
        self.folder = folder
        self.ws_port = free_port()
        self.api_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(folder, "twistd.log")
        self.command: list[str] = []

    def start(self) -> None:
        env = dict(os.environ)
        if self.args.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(
                [self.args.pythonpath, REPO] + env.get("PYTHONPATH", "").split(os.pathsep)
            ).rstrip(os.pathsep)
        if self.target != "baseline":
            ws_endpoint = f"tcp:{self.ws_port}"
            if self.args.ws_backlog:
                ws_endpoint += f":backlog={self.args.ws_backlog}"
            command = [
                self.args.twistd,
                "-n",
                "--pidfile=",
                "-l",
                self.log_path,
                "elevgw",
                "--ws-endpoint",
                ws_endpoint,
                "--api-endpoint",
                f"tcp:{self.api_port}:interface=127.0.0.1",
                "--store",
                "sqlite:" + os.path.join(self.folder, "elevgw.sqlite3"),
                "--snapshots",
                "file:" + os.path.join(self.folder, "snapshots"),
            ]
            command += self.extra + self.args.gateway_arg
            command += variant_args(self.args, self.target)
        else:
            # all interfaces, like the gateway's tcp:PORT, so that --spread reaches it
            command = [sys.executable, BASELINE, str(self.ws_port), "--interface", "0.0.0.0"]
            if self.args.ws_backlog:
                command += ["--backlog", str(self.args.ws_backlog)]
        self.command = command
        self.stderr = open(os.path.join(self.folder, "server.stderr"), "wb")
        self.proc = subprocess.Popen(
            ["taskset", "-c", self.args.server_cpu] + command,
            cwd=self.folder,
            env=env,
            stdout=self.stderr,
            stderr=subprocess.STDOUT,
        )
        if self.target != "baseline":
            wait_for(
                lambda: self._alive() and http_ok(f"http://127.0.0.1:{self.api_port}/healthz"),
                30,
                "the gateway",
            )
        else:
            wait_for(lambda: self._alive() and port_open(self.ws_port), 30, "the baseline")

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.target} exited with {self.proc.returncode}; see {self.folder}"
            )
        return True

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> float:
        """SIGTERM (the gateway drains), SIGKILL after 30 s; the seconds it took."""
        t0 = time.monotonic()
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()
        return round(time.monotonic() - t0, 2)

    def log_bytes(self) -> int:
        total = 0
        for name in os.listdir(self.folder):
            if name.startswith("twistd.log"):
                total += os.path.getsize(os.path.join(self.folder, name))
        return total


# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------


def variant_args(args: argparse.Namespace, target: str) -> list[str]:
    """The extra ``twistd elevgw`` options of gateway variant ``target`` (``elevgw:NAME``)."""
    if ":" not in target:
        return []
    return shlex.split(dict(args.variant)[target.split(":", 1)[1]])


def parse_variant(text: str) -> tuple[str, str]:
    name, sep, options = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=OPTIONS, not {text!r}")
    return name.strip(), options


def scenario_params(args: argparse.Namespace, name: str) -> dict:
    if name == "flood":
        return {
            "devices": args.flood_devices,
            "in_flight": args.in_flight,
            "duration": args.flood_duration,
            "warmup": 2.0,
        }
    if name == "capacity":
        return {"devices": args.devices, "duration": args.duration}
    if name == "storm":
        return {
            "devices": args.storm_devices or args.devices,
            "concurrency": args.storm_concurrency,
            "duration": args.duration,
        }
    if name == "commands":
        return {"devices": args.devices, "duration": args.duration, "rate": args.rate}
    if name == "snapshots":
        return {
            "devices": args.devices,
            "duration": args.duration,
            "senders": args.senders,
            "snapshot_size": args.snapshot_size,
        }
    raise ValueError(name)


def loadgen_command(args, name: str, params: dict, server: Server) -> list[str]:
    command = [
        sys.executable,
        LOADGEN,
        name,
        "--ws-url",
        f"ws://127.0.0.1:{server.ws_port}/ws",
        "--api-url",
        f"http://127.0.0.1:{server.api_port}",
        "--credentials",
        args.credentials,
        "--client",
        args.client,
        "--spread",
        str(args.spread),
        "--max-runtime",
        str(params["duration"] + 600),
    ]
    for key, value in params.items():
        command += ["--" + key.replace("_", "-"), str(value)]
    return ["taskset", "-c", args.loadgen_cpu] + command


def provision(args, count: int, db_path: str) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            LOADGEN,
            "provision",
            "--sqlite",
            db_path,
            "--devices",
            str(count),
            "--credentials",
            args.credentials,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_flooder(args, params: dict, server: Server) -> subprocess.Popen:
    """``bench/flooder.py`` as the device after the scenario's own, pinned beside the load
    generator, until ``stop_flooder``."""
    command = [
        "taskset",
        "-c",
        args.loadgen_cpu,
        sys.executable,
        FLOODER,
        "--ws-url",
        f"ws://127.0.0.1:{server.ws_port}/ws",
        "--credentials",
        args.credentials,
        "--index",
        str(params["devices"]),
        "--duration",
        str(params["duration"] + 600),
    ]
    print(f"[flooder] {shlex.join(command)}", file=sys.stderr, flush=True)
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def stop_flooder(flooder: subprocess.Popen) -> dict:
    flooder.send_signal(signal.SIGTERM)
    out, _ = flooder.communicate(timeout=30)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": f"exit {flooder.returncode}"}


def run_one(args, name: str, target: str, profile_dir: str | None) -> dict:
    params = scenario_params(args, name)
    folder = tempfile.mkdtemp(prefix=f"elevgw-bench-{name}-{target}-", dir=args.tmpdir)
    record: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "label": args.label,
        "scenario": name,
        "target": target,
        "params": params,
        "client": args.client,
        "profiled": bool(profile_dir),
    }
    try:
        if target != "baseline":
            # With --flooder, one more device: the flooder's, not one of the scenario's.
            record["provision"] = provision(
                args,
                params["devices"] + bool(args.flooder),
                os.path.join(folder, "elevgw.sqlite3"),
            )
        server = Server(args, target, folder, SCENARIO_GATEWAY_ARGS.get(name))
        server.start()
        sampler = Sampler(server.pid)
        sampler.sample()
        sampler.start()
        time.sleep(args.settle)
        idle = sampler.sample()
        flooder = start_flooder(args, params, server) if args.flooder else None
        command = loadgen_command(args, name, params, server)
        print(f"[{name}/{target}] {shlex.join(command)}", file=sys.stderr, flush=True)
        loadgen = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        profiler = Profiler(args, server.pid, profile_dir, f"{name}-{target}", params)
        assert loadgen.stdout is not None
        result = None
        for line in loadgen.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "window":
                profiler.start_at(event["start"], event["end"])
            elif event.get("event") == "measured":
                profiler.stop()
            elif "mode" in event:
                result = event
        loadgen.wait(timeout=60)
        if flooder is not None:
            record["flooder"] = stop_flooder(flooder)
        sampler.stop()
        profile = profiler.finish()
        if result is None:
            raise RuntimeError(f"loadgen exited with {loadgen.returncode} and no result")
        start, end = result["window_monotonic"]
        if name == "storm":
            end = start + result["storm_s"]
        stats = sampler.window(start, end)
        handled = result.get("heartbeats_sent") if name == "capacity" else None
        if name == "flood":
            handled = result.get("round_trips")
        if handled:
            # the server's CPU (all threads, user + system) per heartbeat it answered
            stats["cpu_us_per_heartbeat"] = round(stats["cpu_s"] * 1e6 / handled, 1)
        stats["idle_rss_kb"] = idle[1]
        stats["cpu_total_s"] = round(sampler.samples[-1][2] or 0, 2)
        connected = result.get("opened") or 0
        if connected and stats["rss_kb_max"] and idle[1]:
            stats["rss_per_device_kb"] = round((stats["rss_kb_max"] - idle[1]) / connected, 2)
        stats["log_bytes"] = server.log_bytes()
        stats["stop_s"] = server.stop()
        record["server"] = stats
        record["server_command"] = shlex.join(server.command)
        record["loadgen_command"] = shlex.join(command[3:])
        record["result"] = result
        if profile:
            record["profile"] = profile
        record["loadavg"] = os.getloadavg()
    finally:
        try:
            server.stop()
        except Exception:
            pass
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            record["folder"] = folder
    return record


class Profiler:
    """py-spy on the server during the measured window (when ``--profile`` is given)."""

    def __init__(self, args, pid: int, folder: str | None, name: str, params: dict) -> None:
        self.args = args
        self.pid = pid
        self.folder = folder
        self.name = name
        self.params = params
        self.proc: subprocess.Popen | None = None
        self.timer: threading.Timer | None = None
        self.raw = os.path.join(folder, name + ".txt") if folder else ""

    def start_at(self, start: float, end: float) -> None:
        if not self.folder:
            return
        duration = max(1, int(end - start) + 1)

        def launch() -> None:
            self.proc = subprocess.Popen(
                [
                    "taskset",
                    "-c",
                    self.args.loadgen_cpu,
                    self.args.py_spy,
                    "record",
                    "--nonblocking",
                    "--threads",
                    "--rate",
                    str(self.args.profile_rate),
                    "--duration",
                    str(duration),
                    "--format",
                    "raw",
                    "--output",
                    self.raw,
                    "--pid",
                    str(self.pid),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

        self.timer = threading.Timer(max(0.0, start - time.monotonic()), launch)
        self.timer.start()

    def stop(self) -> None:
        """End the recording now (py-spy writes what it has on SIGINT)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer.join()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def finish(self) -> dict | None:
        if self.timer is not None:
            self.timer.join()
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if not os.path.exists(self.raw):
            return {"error": "py-spy wrote nothing"}
        summary = summarize_profile(self.raw)
        with open(self.raw.replace(".txt", "-summary.txt"), "w") as f:
            f.write(format_summary(summary))
        return {
            "raw": self.raw,
            "samples": summary["samples"],
            "top": summary["self_functions"][:15],
        }


def summarize_profile(path: str) -> dict:
    """Where the reactor thread spent its samples, from py-spy's collapsed stacks (``raw``).

    Shares are of the main (reactor) thread's samples, per source line and per function
    (lines folded), self and inclusive; ``elevgw`` lists elevgw's own lines, inclusive.
    """
    lines_self: collections.Counter = collections.Counter()
    functions_self: collections.Counter = collections.Counter()
    functions_inclusive: collections.Counter = collections.Counter()
    elevgw_lines: collections.Counter = collections.Counter()
    threads: collections.Counter = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(";")
            if frames[0].startswith("thread ("):
                thread, frames = frames[0], frames[1:]
            else:
                thread = "MainThread"
            threads[thread.split(": ", 1)[-1]] += n
            if "MainThread" not in thread or not frames:
                continue
            total += n
            lines_self[frames[-1]] += n
            functions = [re.sub(r":\d+\)$", ")", frame) for frame in frames]
            functions_self[functions[-1]] += n
            for function in set(functions):
                functions_inclusive[function] += n
            for frame in set(frames):
                if "elevgw/" in frame:
                    elevgw_lines[frame] += n

    def shares(counter: collections.Counter, limit: int) -> list:
        return [[round(100 * n / total, 1), frame] for frame, n in counter.most_common(limit)]

    return {
        "samples": total,
        "threads": dict(threads),
        "self_lines": shares(lines_self, 40),
        "self_functions": shares(functions_self, 40),
        "inclusive_functions": shares(functions_inclusive, 80),
        "elevgw_lines": shares(elevgw_lines, 40),
    }


def format_summary(summary: dict) -> str:
    out = [f"reactor-thread samples: {summary['samples']}; all threads: {summary['threads']}"]
    for key, title in (
        ("self_functions", "self time by function"),
        ("self_lines", "self time by line"),
        ("inclusive_functions", "inclusive time by function"),
        ("elevgw_lines", "elevgw lines, inclusive"),
    ):
        out += ["", title + ":"]
        out += [f"{share:5.1f}%  {frame}" for share, frame in summary[key]]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Targets, results, the docs table
# ---------------------------------------------------------------------------------------------


def judge(record: dict, baseline: dict | None) -> dict:
    """The capacity targets, met or not, for one gateway run (``None`` where a figure is missing)."""
    name = record["scenario"]
    r = record.get("result", {})
    server = record.get("server", {})
    checks: dict[str, Any] = {}
    if name == "flood":
        if baseline:
            ratio = r["round_trips_per_s"] / max(baseline["result"]["round_trips_per_s"], 1e-9)
            record["ratio_to_baseline"] = round(ratio, 3)
            checks["rt_per_s >= 150% of baseline"] = ratio >= 1.5
    elif name == "capacity":
        checks["p99 pong <= 1.5 ms"] = r["rtt_ms"].get("p99", 1e9) <= 1.5
        checks["all connected, no disconnects"] = (
            r["opened"] == r["devices"] and r["disconnects"] == 0
        )
        per_device = server.get("rss_per_device_kb")
        checks["RSS <= 8 KB per device"] = per_device is not None and per_device <= 8
        per_heartbeat = server.get("cpu_us_per_heartbeat")
        checks["CPU <= 55 µs per heartbeat"] = per_heartbeat is not None and per_heartbeat <= 55
        if baseline:
            record["ratio_to_baseline"] = {
                "rtt_p99": _ratio(r["rtt_ms"].get("p99"), baseline["result"]["rtt_ms"].get("p99")),
                "rss_per_device": _ratio(
                    per_device, baseline.get("server", {}).get("rss_per_device_kb")
                ),
            }
    elif name == "storm":
        if baseline:
            record["ratio_to_baseline"] = _ratio(
                r["handshakes_per_s"], baseline["result"]["handshakes_per_s"]
            )
        checks[">= 2000 handshakes/s"] = r["handshakes_per_s"] >= 2000
        checks["none refused or failed"] = (
            r["opened"] == r["devices"] and r["refused_total"] == 0 and r["connect_failed"] == 0
        )
    elif name == "commands":
        checks["p99 call-to-frame < 10 ms"] = r["command_ms"].get("p99", 1e9) < 10
        checks["no errors, all delivered"] = (
            r["http_errors"] == 0
            and r["commands_ok"] == r["commands_issued"] == r["commands_received"]
            and r["disconnects"] == 0
        )
    elif name == "snapshots":
        checks["others' heartbeat p99 < 50 ms"] = r["rtt_ms"].get("p99", 1e9) < 50
        checks["snapshots acked, no errors"] = (
            r["snapshot_acks"] >= r["snapshots_sent"] - r["senders"] and r["error_frames"] == 0
        )
    return {"checks": checks, "met": bool(checks) and all(checks.values())}


def _ratio(a, b):
    if a is None or not b:
        return None
    return round(a / b, 3)


def headline(record: dict) -> str:
    r = record.get("result", {})
    s = record.get("server", {})
    name = record["scenario"]
    if "error" in record:
        return "failed: " + record["error"]
    if name == "flood":
        return "{:,.0f} round trips/s; RTT p50 {} ms, p99 {} ms; {} µs CPU per round trip".format(
            r["round_trips_per_s"],
            r["rtt_ms"].get("p50"),
            r["rtt_ms"].get("p99"),
            s.get("cpu_us_per_heartbeat"),
        )
    if name == "capacity":
        return (
            "{opened:,}/{devices:,} connected; pong p50 {p50} / p90 {p90} / p99 {p99} / p99.9"
            " {p999} / max {mx} ms; {cpu} µs CPU per heartbeat; {disc} disconnects; RSS idle"
            " {idle:,} KB, +{per} KB per device".format(
                opened=r["opened"],
                devices=r["devices"],
                p50=r["rtt_ms"].get("p50"),
                p90=r["rtt_ms"].get("p90"),
                p99=r["rtt_ms"].get("p99"),
                p999=r["rtt_ms"].get("p99.9"),
                mx=r["rtt_ms"].get("max"),
                cpu=s.get("cpu_us_per_heartbeat"),
                disc=r["disconnects"],
                idle=s.get("idle_rss_kb") or 0,
                per=s.get("rss_per_device_kb"),
            )
        )
    if name == "storm":
        return (
            "{hs:,.0f} handshakes/s ({ok:,}/{n:,} in {t} s at concurrency {c}); refused"
            " {ref}, connect errors {err}; handshake p50 {p50} / p99 {p99} / max {mx} ms".format(
                hs=r["handshakes_per_s"],
                ok=r["opened"],
                n=r["devices"],
                t=r["storm_s"],
                c=r["concurrency"],
                ref=", ".join(f"{k} {v}" for k, v in sorted(r["refused"].items())) or 0,
                err=r["connect_failed"],
                p50=r["handshake_ms"].get("p50"),
                p99=r["handshake_ms"].get("p99"),
                mx=r["handshake_ms"].get("max"),
            )
        )
    if name == "commands":
        return (
            "{ok:,}/{issued:,} OK at {rate:g}/s, {recv:,} received; call-to-frame p50 {p50} /"
            " p99 {p99} / max {mx} ms; HTTP p99 {hp99} ms; {err} errors".format(
                ok=r["commands_ok"],
                issued=r["commands_issued"],
                rate=r["rate"],
                recv=r["commands_received"],
                p50=r["command_ms"].get("p50"),
                p99=r["command_ms"].get("p99"),
                mx=r["command_ms"].get("max"),
                hp99=r["http_ms"].get("p99"),
                err=r["http_errors"],
            )
        )
    if name == "snapshots":
        return (
            "{sent:,} snapshots sent, {acks:,} acked (ack p99 {ap99} ms); others' pong p50 {p50}"
            " / p99 {p99} / max {mx} ms".format(
                sent=r["snapshots_sent"],
                acks=r["snapshot_acks"],
                ap99=r["snapshot_ack_ms"].get("p99"),
                p50=r["rtt_ms"].get("p50"),
                p99=r["rtt_ms"].get("p99"),
                mx=r["rtt_ms"].get("max"),
            )
        )
    return ""


def key_figures(record: dict) -> str:
    """The figures that compare runs of one scenario, in a few words."""
    r = record.get("result", {})
    s = record.get("server", {})
    name = record["scenario"]
    if "error" in record:
        return "failed"
    if name == "flood":
        return "{:,.0f}/s, {} µs".format(r["round_trips_per_s"], s.get("cpu_us_per_heartbeat"))
    if name == "capacity":
        rtt = r["rtt_ms"]
        return "{} / {} / {} ms, {} µs, {} KB".format(
            rtt.get("p50"),
            rtt.get("p99"),
            rtt.get("p99.9"),
            s.get("cpu_us_per_heartbeat"),
            s.get("rss_per_device_kb"),
        )
    if name == "storm":
        return "{:,.0f}/s".format(r["handshakes_per_s"])
    return headline(record)


SUMMARY_COLUMNS = {
    "flood": "round trips/s, server CPU per round trip",
    "capacity": "pong p50 / p99 / p99.9, server CPU per heartbeat, RSS per device",
    "storm": "handshakes/s",
}


def summary_table(records: list[dict]) -> list[str]:
    """One row per scenario and server, one column per repeat (in the order they ran)."""
    rows: dict[tuple[str, str], list[str]] = {}
    for record in records:
        rows.setdefault((record["scenario"], record["target"]), []).append(key_figures(record))
    runs = max((len(v) for v in rows.values()), default=0)
    lines = [".. list-table::", "   :header-rows: 1", ""]
    lines.append("   * - scenario (figures)")
    lines.append("     - server")
    for i in range(runs):
        lines.append(f"     - run {i + 1}")
    for (scenario, target), cells in rows.items():
        lines.append(f"   * - {scenario} ({SUMMARY_COLUMNS.get(scenario, 'headline')})")
        lines.append(f"     - {target}")
        for i in range(runs):
            lines.append("     - " + (cells[i] if i < len(cells) else "\\"))
    return lines


def rst_table(records: list[dict]) -> list[str]:
    rows = [
        ["scenario", "server", "figures", "vs baseline", "server CPU", "load gen CPU", "target"]
    ]
    for record in records:
        s = record.get("server", {})
        r = record.get("result", {})
        ratio = record.get("ratio_to_baseline")
        if isinstance(ratio, dict):
            ratio_text = ", ".join(f"{k} ×{v:.2f}" for k, v in ratio.items() if v is not None)
        else:
            ratio_text = f"{100 * ratio:.0f}%" if ratio is not None else ""
        verdict = record.get("verdict")
        if verdict is None:
            verdict_text = ""
        else:
            verdict_text = "; ".join(
                ("met: " if ok else "NOT met: ") + check for check, ok in verdict["checks"].items()
            )
        rows.append(
            [
                record["scenario"],
                record["target"],
                headline(record),
                ratio_text,
                "{}% of core 0".format(s.get("cpu_pct", "?")),
                "{}% of core 1".format(
                    r.get("loadgen", {}).get("cpu_window_pct_of_one_core", "?")
                ),
                verdict_text,
            ]
        )
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in rows:
        lines.append("   * - " + (row[0] or "\\"))
        for cell in row[1:]:
            lines.append("     - " + (cell or "\\"))
    return lines


def update_docs(
    path: str, records: list[dict], command: str, started: str, section: str = "main"
) -> None:
    """Replace the block between ``.. results:begin SECTION`` and ``.. results:end SECTION``."""
    begin, end = f"{BEGIN} {section}", f"{END} {section}"
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    else:
        text = "Benchmarks\n==========\n"
    if begin not in text or end not in text:
        text = text.rstrip("\n") + f"\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    load = ", ".join(
        "{} {}: core 0 {}% / core 1 {}% busy".format(
            r["scenario"],
            r["target"],
            r.get("server", {}).get("cpu0_busy_pct"),
            r.get("server", {}).get("cpu1_busy_pct"),
        )
        for r in records
    )
    block = [
        begin,
        "",
        f"Run of {started} (UTC), ``{command}``"
        + (f", label ``{records[0]['label']}``" if records and records[0].get("label") else "")
        + ", commit ``{}``:".format(records[0].get("commit") if records else git_describe()),
        "",
    ]
    if any(r.get("run", 1) > 1 for r in records):
        block += summary_table(records) + [""]
    block += rst_table(records)
    block += [
        "",
        "Whole-machine load during each window (gateway or baseline on core 0, load generator"
        " on core 1; anything above their own CPU is other processes): " + load + ".",
        "",
        end,
    ]
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + "\n".join(block) + tail)


def git_describe() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no", "src"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return rev + ("+dirty src" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    bin_dir = os.path.dirname(sys.executable)
    parser = argparse.ArgumentParser(
        description="Run the elevgw benchmarks (see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--quick", action="store_true", help="1,000 devices, 20 s windows")
    parser.add_argument("--devices", type=int, default=None, help="capacity/commands/…")
    parser.add_argument("--storm-devices", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None, help="window, s")
    parser.add_argument("--flood-devices", type=int, default=100)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--flood-duration", type=float, default=None)
    parser.add_argument("--storm-concurrency", type=int, default=500)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--senders", type=int, default=50)
    parser.add_argument("--snapshot-size", type=int, default=200_000)
    parser.add_argument("--client", choices=("raw", "autobahn"), default="raw")
    parser.add_argument(
        "--spread",
        type=int,
        default=16,
        help="load generator connects to 127.0.0.1 … 127.0.0.N (see loadgen.py --spread)",
    )
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--ws-backlog", type=int, default=None, help="append :backlog=N")
    parser.add_argument(
        "--gateway-arg", action="append", default=[], help="extra twistd elevgw option"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        type=parse_variant,
        metavar="NAME=OPTIONS",
        help="also run the gateway with these extra options, as target elevgw:NAME"
        " (e.g. 'lean-off=--lean-frames off')",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every scenario this many times, each time every target back to back",
    )
    parser.add_argument("--pythonpath", help="run the gateway from this source tree")
    parser.add_argument("--label", default="")
    parser.add_argument(
        "--flooder",
        action="store_true",
        help="one more device flooding log frames beside each scenario (bench/flooder.py)",
    )
    parser.add_argument(
        "--commit", help="what to record as the gateway's commit (with --pythonpath)"
    )
    parser.add_argument("--profile", metavar="DIR", help="py-spy the server into DIR")
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s")
    parser.add_argument("--settle", type=float, default=2.0, help="s before the idle RSS")
    parser.add_argument("--results", default=os.path.join(HERE, "results.jsonl"))
    parser.add_argument("--docs", default=os.path.join(REPO, "docs", "benchmarks.rst"))
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument(
        "--rebuild-docs",
        action="store_true",
        help="only rewrite --docs-section from the runs in --results labelled --label",
    )
    parser.add_argument("--docs-section", default="main", help="which results block to rewrite")
    parser.add_argument(
        "--credentials", default=os.path.join(tempfile.gettempdir(), "elevgw-bench-creds.jsonl")
    )
    parser.add_argument("--tmpdir", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the gateway folders")
    parser.add_argument("--server-cpu", default="0")
    parser.add_argument("--loadgen-cpu", default="1")
    parser.add_argument("--twistd", default=os.path.join(bin_dir, "twistd"))
    parser.add_argument(
        "--py-spy", default=shutil.which("py-spy") or os.path.join(bin_dir, "py-spy")
    )
    return parser


def rebuild_docs(args: argparse.Namespace) -> int:
    """Rewrite a docs section from the runs in ``--results`` that carry ``--label``."""
    with open(args.results, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    chosen = [r for r in records if r.get("label") == args.label]
    if not chosen:
        raise SystemExit(f"no runs labelled {args.label!r} in {args.results}")
    last_command = chosen[-1].get("command", "")
    chosen = [r for r in chosen if r.get("command") == last_command]
    baselines: dict[str, dict] = {}
    for record in chosen:
        if "error" in record:
            continue
        if record["target"] == "baseline":
            baselines[record["scenario"]] = record
        else:
            record["verdict"] = judge(record, baselines.get(record["scenario"]))
    started = chosen[0]["date"].replace("T", " ")[:16]
    update_docs(args.docs, chosen, last_command, started, args.docs_section)
    print(json.dumps({"rebuilt": args.docs_section, "runs": len(chosen)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rebuild_docs:
        return rebuild_docs(args)
    if args.devices is None:
        args.devices = 1000 if args.quick else 15000
    if args.duration is None:
        args.duration = 20.0 if args.quick else 120.0
    if args.flood_duration is None:
        args.flood_duration = 10.0 if args.quick else 30.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"open files limit: {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}", file=sys.stderr)
    os.sched_setaffinity(0, {int(args.loadgen_cpu)})
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    command = shlex.join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    largest = max(args.devices, args.flood_devices, args.storm_devices or 0)
    subprocess.run(
        [sys.executable, LOADGEN, "provision", "--local", "--devices", str(largest)]
        + ["--credentials", args.credentials],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=300,
    )
    records = []
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for name in names:
        if name not in SCENARIOS:
            raise SystemExit(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    for name, run in [(name, run) for name in names for run in range(args.repeat)]:
        baseline = None
        targets = ["elevgw"] + [f"elevgw:{variant}" for variant, _ in args.variant]
        if name in WITH_BASELINE and not args.no_baseline:
            targets = ["baseline"] + targets
        for target in targets:
            try:
                record = run_one(args, name, target, args.profile)
            except Exception as e:
                record = {
                    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "scenario": name,
                    "target": target,
                    "error": f"{type(e).__name__}: {e}",
                    "label": args.label,
                }
            record["command"] = command
            record["commit"] = args.commit or git_describe()
            record["run"] = run + 1
            if target == "baseline":
                baseline = record if "error" not in record else None
            elif "error" not in record:
                record["verdict"] = judge(record, baseline)
            records.append(record)
            with open(args.results, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            print(
                f"[{name}/{target}] {headline(record)}"
                + (f" -> {record['verdict']}" if "verdict" in record else ""),
                file=sys.stderr,
                flush=True,
            )
    if not args.no_docs:
        update_docs(args.docs, records, command, started, args.docs_section)
    print(json.dumps({"runs": len(records), "results": args.results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
