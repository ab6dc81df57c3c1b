#!/usr/bin/env python3
"""``--workers``: one process against several on the same host, on a real redis-server.

For each worker count the runner starts ``twistd -n elevgw --workers W`` on one Redis (the
devices are registered once, through the API, and kept for every run), then runs
``bench/loadgen.py``'s scenarios against it and prints one JSON line per scenario plus a
summary table. Nothing is pinned: the workers and the load generator share both cores, which
is the point of the flood ratio (see ``docs/benchmarks.rst``)::

    python bench/workers.py                                   # 1 and 2 workers, 30,000 devices
    python bench/workers.py --workers 2 --devices 30000 --scenarios capacity
    python bench/workers.py --devices 2000 --duration 10      # smoke run

The open-files limit is raised to the hard limit; one process here holds just under 20,000
sockets, so ``capacity`` runs only where every worker's share fits.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from processes import free_port, http_ok, redis_binary, wait_for  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
LOADGEN = os.path.join(HERE, "loadgen.py")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: ``flood`` measures the stack's ceiling, far past the message rate a real device is held to.
SCENARIO_GATEWAY_ARGS = {"flood": ["--message-rate=1000000000", "--message-burst=1000000000"]}
#: Sockets one process may hold here, with room for its files and the store connection.
PER_PROCESS = 19_000


def tree_cpu_seconds(pid: int) -> float:
    """User plus system CPU of ``pid`` and its children, from /proc."""
    total = 0.0
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        except (OSError, IndexError, ValueError):
            pass
    return total


class Gateway:
    def __init__(self, workers: int, redis_url: str, folder: str, extra: list[str]) -> None:
        self.workers = workers
        self.ws_port, self.api_port = free_port(), free_port()
        log = open(os.path.join(folder, f"gateway-{workers}.log"), "wb")
        command = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "elevgw",
            f"--store={redis_url}",
            f"--ws-endpoint=tcp:{self.ws_port}",
            f"--api-endpoint=tcp:{self.api_port}:interface=127.0.0.1",
            f"--snapshots=file:{folder}/snapshots",
            "--heartbeat-timeout=30",
        ]
        if workers > 1:
            command.append(f"--workers={workers}")
        command += extra
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "src"), REPO])
        self.proc = subprocess.Popen(
            command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        wait_for(lambda: http_ok(f"http://127.0.0.1:{self.api_port}/healthz"), 60, "the gateway")
        time.sleep(1.0 if workers > 1 else 0.1)  # every worker listening

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def loadgen(mode: str, gateway: Gateway, args: argparse.Namespace, *extra: str) -> dict:
    command = [
        sys.executable,
        LOADGEN,
        mode,
        "--ws-url",
        f"ws://127.0.0.1:{gateway.ws_port}/ws",
        "--api-url",
        f"http://127.0.0.1:{gateway.api_port}",
        "--credentials",
        args.credentials,
        "--spread",
        "16",
        *extra,
    ]
    before = tree_cpu_seconds(gateway.proc.pid)
    began = time.monotonic()
    out = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - began
    cpu = tree_cpu_seconds(gateway.proc.pid) - before
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"loadgen {mode} failed: {out.stderr[-2000:]}")
    result = json.loads(lines[-1])
    result["gateway_cpu_cores"] = round(cpu / wall, 2) if wall else None
    return result


def run(args: argparse.Namespace) -> list[dict]:
    folder = tempfile.mkdtemp(prefix="elevgw-bench-workers-")
    redis_port = free_port()
    redis = subprocess.Popen(
        [redis_binary(), "--port", str(redis_port), "--save", "", "--appendonly", "no"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
    )
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    results = []
    try:
        time.sleep(0.5)
        if os.path.exists(args.credentials):
            os.remove(args.credentials)
        first = Gateway(1, redis_url, folder, [])
        try:
            subprocess.run(
                [
                    sys.executable,
                    LOADGEN,
                    "provision",
                    "--api-url",
                    f"http://127.0.0.1:{first.api_port}",
                    "--devices",
                    str(args.devices),
                    "--credentials",
                    args.credentials,
                ],
                check=True,
                capture_output=True,
                timeout=1800,
            )
        finally:
            first.stop()
        for workers in args.workers:
            for scenario in args.scenarios:
                devices = args.flood_devices if scenario == "flood" else args.devices
                if scenario == "capacity" and devices > workers * PER_PROCESS:
                    print(f"[capacity/{workers}] skipped: {devices:,} devices do not fit")
                    continue
                gateway = Gateway(
                    workers, redis_url, folder, SCENARIO_GATEWAY_ARGS.get(scenario, [])
                )
                try:
                    extra = ["--devices", str(devices)]
                    if scenario == "flood":
                        extra += ["--in-flight", "8", "--duration", str(args.duration)]
                    elif scenario == "capacity":
                        extra += ["--duration", str(args.duration)]
                    result = loadgen(scenario, gateway, args, *extra)
                finally:
                    gateway.stop()
                result.update(workers=workers, scenario=scenario)
                results.append(result)
                print(json.dumps(result), flush=True)
                print(summary(result), flush=True)
    finally:
        redis.terminate()
        redis.wait()
        shutil.rmtree(folder, ignore_errors=True)
    return results


def summary(r: dict) -> str:
    head = f"[{r['scenario']}/{r['workers']} worker(s)]"
    cores = f"gateway {r['gateway_cpu_cores']} cores"
    if r["scenario"] == "flood":
        return f"{head} {r['round_trips_per_s']:,.0f} round trips/s; {cores}"
    if r["scenario"] == "storm":
        return (
            f"{head} {r['handshakes_per_s']:,.0f} handshakes/s, {r['handshakes']:,} opened,"
            f" refused {r['refused_total']}; {cores}"
        )
    rtt = r["rtt_ms"]
    return (
        f"{head} {r.get('connected', '?')} connected; pong p50 {rtt.get('p50')} /"
        f" p99 {rtt.get('p99')} ms; disconnects {r.get('disconnects', '?')}; {cores}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    parser.add_argument("--devices", type=int, default=30_000)
    parser.add_argument("--flood-devices", type=int, default=100)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--scenarios", default="capacity,storm,flood")
    parser.add_argument(
        "--credentials", default=os.path.join(tempfile.gettempdir(), "elevgw-bench-workers.jsonl")
    )
    args = parser.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    args.scenarios = args.scenarios.split(",")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
