#!/usr/bin/env python3
"""What one page of ``GET /api/v1/devices`` costs on a large fleet, SQLite and Redis.

For each store the runner starts ``twistd -n elevgw`` (Redis: a private redis-server),
registers ``--devices`` devices through the API, connects none of them, then times each kind
of request the console's devices page makes, ``--repeat`` times, and prints one JSON line per
request kind plus a table (milliseconds, client side, on loopback)::

    python bench/console_paging.py                     # 20,000 devices on each store
    python bench/console_paging.py --devices 2000 --stores sqlite --repeat 5   # smoke run

The worst cases are searches that match nothing and ``online=true`` with nobody online: both
examine every device the request may (see ``elevgw.north.device_pages``); the whole unpaged
list is timed for comparison.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Api:
    """One keep-alive connection to the gateway's API."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method: str, path: str, body=None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data else {}
        self.connection.request(method, path, body=data, headers=headers)
        response = self.connection.getresponse()
        content = response.read()
        return response.status, json.loads(content) if content else {}


def start_gateway(store: str, directory: str) -> tuple[subprocess.Popen, Api]:
    api_port, ws_port = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "src"), REPO]))
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--pidfile=",
            "--logfile=" + os.path.join(directory, "elevgw.log"),
            "-n",
            "elevgw",
            f"--api-endpoint=tcp:{api_port}:interface=127.0.0.1",
            f"--ws-endpoint=tcp:{ws_port}:interface=127.0.0.1",
            "--store=" + store,
            "--snapshots=file:" + os.path.join(directory, "snapshots"),
        ],
        cwd=directory,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            api = Api(api_port)
            if api.call("GET", "/healthz")[0] == 200:
                return process, api
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the gateway on {store} did not start; see {directory}/elevgw.log")


def timed(api: Api, path: str, repeat: int) -> dict:
    times, body = [], {}
    for _ in range(repeat):
        began = time.perf_counter()
        status, body = api.call("GET", path)
        times.append((time.perf_counter() - began) * 1000)
        assert status == 200, (path, body)
    return {
        "p50_ms": round(statistics.median(times), 2),
        "max_ms": round(max(times), 2),
        "devices": len(body["devices"]),
        "next": body.get("next") is not None,
    }


def run(store_name: str, store: str, devices: int, repeat: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="elevgw-paging-") as directory:
        process, api = start_gateway(store, directory)
        try:
            began = time.monotonic()
            for n in range(devices):
                status, body = api.call(
                    "POST", "/api/v1/devices/register", {"location": f"大楼{n:05}号 电梯{n % 8}"}
                )
                assert status == 201, body
            registering = time.monotonic() - began
            middle = None
            for _ in range(devices // 2 // 1000 or 1):
                path = "/api/v1/devices?limit=" + str(min(1000, max(1, devices // 2)))
                if middle:
                    path += "&after=" + urllib.parse.quote(middle)
                status, page = api.call("GET", path)
                assert status == 200, page
                middle = page["next"]
            after = urllib.parse.quote(middle)
            requests = {
                "first page (limit=50)": "/api/v1/devices?limit=50",
                "a page in the middle": f"/api/v1/devices?limit=50&after={after}",
                "search, one match": "/api/v1/devices?limit=50&q="
                + urllib.parse.quote(f"大楼{devices - 1:05}号"),
                "search, no match": "/api/v1/devices?limit=50&q=nowhere",
                "online=true, none online": "/api/v1/devices?limit=50&online=true",
                "online=false, first page": "/api/v1/devices?limit=50&online=false",
                "whole list (no paging)": "/api/v1/devices",
            }
            results = []
            for name, path in requests.items():
                figures = timed(api, path, repeat if "whole" not in name else max(3, repeat // 4))
                results.append({"store": store_name, "request": name, **figures})
                print(json.dumps(results[-1], ensure_ascii=False), flush=True)
            print(
                json.dumps(
                    {"store": store_name, "registered": devices, "seconds": round(registering, 1)}
                ),
                flush=True,
            )
            return results
        finally:
            process.terminate()
            process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--stores", default="sqlite,redis")
    options = parser.parse_args()
    results = []
    for name in options.stores.split(","):
        if name == "sqlite":
            with tempfile.TemporaryDirectory(prefix="elevgw-paging-db-") as folder:
                store = "sqlite:" + os.path.join(folder, "elevgw.sqlite3")
                results += run(name, store, options.devices, options.repeat)
        elif name == "redis":
            from redis_support import RedisServer

            server = RedisServer()
            server.start()
            try:
                results += run(name, server.url, options.devices, options.repeat)
            finally:
                server.stop()
                server.cleanup()
        else:
            raise SystemExit(f"unknown store {name!r}: sqlite or redis")
    print()
    print(f"{'request':28} {'store':7} {'p50 ms':>8} {'max ms':>8} {'rows':>6} next")
    for r in results:
        print(
            f"{r['request']:28} {r['store']:7} {r['p50_ms']:8.2f} {r['max_ms']:8.2f}"
            f" {r['devices']:6} {'yes' if r['next'] else 'no'}"
        )


if __name__ == "__main__":
    main()
