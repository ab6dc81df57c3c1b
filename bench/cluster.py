#!/usr/bin/env python3
"""Commands routed through another node of a cluster, against the same node, on one Redis.

Starts a redis-server and two nodes (``twistd -n elevgw --store redis://…``): every device
connects to the *holder*; ``bench/loadgen.py commands`` then sends ``POST /api/send`` at
``--rate`` per second to random devices, once through the *caller* node's API (each call
goes through Redis: a presence lookup, the holder's inbox, the answer back) and once through
the holder's own API (no routing), and prints one JSON line per run plus a summary::

    python bench/cluster.py                              # 15,000 devices, 500/s, 60 s each
    python bench/cluster.py --devices 2000 --duration 10 # smoke run

Devices are written straight into Redis (the documented ``{prefix}device:{id}`` hashes and
the ``{prefix}devices`` sorted set) before the nodes start. Nothing is pinned: both nodes,
Redis and the load generator share the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from processes import free_port, http_ok, redis_binary, wait_for  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
LOADGEN = os.path.join(HERE, "loadgen.py")
sys.path.insert(0, os.path.join(REPO, "src"))

from elevgw.stores.interfaces import hash_token  # noqa: E402


def _resp(*args: object) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def provision(port: int, count: int, credentials: str, prefix: str = "elevgw:") -> None:
    """Write ``count`` devices into Redis (pipelined) and their credentials as JSON lines."""
    now_ms = int(time.time() * 1000)
    commands = []
    with open(credentials, "w") as out:
        for i in range(count):
            device_id, token = "dev_" + secrets.token_hex(8), secrets.token_urlsafe(32)
            out.write(json.dumps({"device_id": device_id, "token": token}) + "\n")
            commands.append(
                _resp(
                    "HSET",
                    f"{prefix}device:{device_id}",
                    "location",
                    f"bench-{i:05d}",
                    "token_hash",
                    hash_token(token),
                    "created",
                    now_ms,
                )
            )
            commands.append(_resp("ZADD", f"{prefix}devices", now_ms, device_id))
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(b"".join(commands))
        reader = connection.makefile("rb")
        for _ in commands:
            line = reader.readline()
            if line.startswith(b"-"):
                raise RuntimeError(line.decode())


class Node:
    def __init__(self, name: str, redis_url: str, folder: str) -> None:
        self.name = name
        self.ws_port, self.api_port = free_port(), free_port()
        self.log = open(os.path.join(folder, f"{name}.log"), "wb")
        command = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "elevgw",
            f"--node-id={name}",
            f"--store={redis_url}",
            f"--ws-endpoint=tcp:{self.ws_port}",
            f"--api-endpoint=tcp:{self.api_port}:interface=127.0.0.1",
            f"--snapshots=file:{folder}/snapshots-{name}",
            "--heartbeat-timeout=30",
        ]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "src"), REPO]))
        self.proc = subprocess.Popen(
            command, cwd=folder, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )
        wait_for(lambda: http_ok(f"http://127.0.0.1:{self.api_port}/healthz"), 60, name)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def commands(holder: Node, api: Node, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        LOADGEN,
        "commands",
        "--ws-url",
        f"ws://127.0.0.1:{holder.ws_port}/ws",
        "--api-url",
        f"http://127.0.0.1:{api.api_port}",
        "--credentials",
        args.credentials,
        "--spread",
        "16",
        "--devices",
        str(args.devices),
        "--rate",
        str(args.rate),
        "--duration",
        str(args.duration),
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"loadgen commands failed: {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def routed_p99(node: Node) -> float | None:
    """The caller node's own p99 of routed sends so far (``/healthz``), in ms."""
    with urllib.request.urlopen(f"http://127.0.0.1:{node.api_port}/healthz", timeout=5) as r:
        return json.load(r)["cluster"]["routed_p99_ms"]


def summary(label: str, r: dict) -> str:
    return (
        "[{label}] {ok:,}/{issued:,} OK at {rate:g}/s, {recv:,} received; call-to-frame p50 "
        "{p50} / p99 {p99} / max {mx} ms; HTTP p50 {hp50} / p99 {hp99} ms; {err} errors; caller's routed p99 {rp99} ms".format(
            rp99=r.get("routed_p99_ms"),
            label=label,
            ok=r["commands_ok"],
            issued=r["commands_issued"],
            rate=r["rate"],
            recv=r["commands_received"],
            p50=r["command_ms"].get("p50"),
            p99=r["command_ms"].get("p99"),
            mx=r["command_ms"].get("max"),
            hp50=r["http_ms"].get("p50"),
            hp99=r["http_ms"].get("p99"),
            err=r["http_errors"],
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=15_000)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--runs", default="routed,local", help="routed, local or both")
    parser.add_argument("--keep", action="store_true", help="keep the nodes' logs (and say where)")
    parser.add_argument(
        "--credentials", default=os.path.join(tempfile.gettempdir(), "elevgw-bench-cluster.jsonl")
    )
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    folder = tempfile.mkdtemp(prefix="elevgw-bench-cluster-")
    redis_port = free_port()
    redis = subprocess.Popen(
        [redis_binary(), "--port", str(redis_port), "--save", "", "--appendonly", "no"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
    )
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    nodes = []
    try:
        time.sleep(0.5)
        provision(redis_port, args.devices, args.credentials)
        holder = Node("holder", redis_url, folder)
        nodes.append(holder)
        caller = Node("caller", redis_url, folder)
        nodes.append(caller)
        for run in args.runs.split(","):
            api = caller if run == "routed" else holder
            result = commands(holder, api, args)
            result.update(run=run, devices=args.devices)
            result["routed_p99_ms"] = routed_p99(caller)
            print(json.dumps(result), flush=True)
            print(summary(run, result), flush=True)
    finally:
        for node in nodes:
            node.stop()
        redis.terminate()
        redis.wait()
        if args.keep:
            print(f"logs kept in {folder}", flush=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
