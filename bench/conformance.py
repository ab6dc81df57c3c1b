#!/usr/bin/env python3
"""Run the Autobahn WebSocket test suite's fuzzing client against two gateways, one with the
lean path (every performance switch on) and one without (all off), and compare the outcome
of every case.

The suite (``autobahntestsuite`` 0.8.2, the last release that runs) is Python 2 code; it
needs a Python 2.7 and a folder it is installed in, neither of which elevgw depends on::

    python2.7 -m pip install --target /tmp/ab27 autobahntestsuite==0.8.2
    python bench/conformance.py --python2 python2.7 --suite /tmp/ab27

The gateway is not an echo server (it answers JSON frames with JSON, anything else with an
error frame), so many cases "fail" the suite's echo expectations on both gateways alike; what
this checks is that both gateways behave the same in every case: the suite's verdicts, the
close codes and reasons, and every message received (pong timestamps aside). Cases 9.*
(performance), 12.* and 13.* (compression, which the gateway declines) are left out. Prints
one JSON line; exits 1 if any case differs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
LOADGEN = os.path.join(HERE, "loadgen.py")
OFF = ["--lean-frames", "off", "--slim-connections", "off", "--lean-reactor", "off"]
OFF += ["--storm-freeze", "off"]
RUN_SUITE = (
    "import site, sys; site.addsitedir(sys.argv[1]); "
    "sys.argv = ['wstest', '-m', 'fuzzingclient', '-s', sys.argv[2]]; "
    "from autobahntestsuite.wstest import run; run()"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(folder: str, twistd: str, extra: list[str]) -> tuple[subprocess.Popen, int]:
    ws, api = free_port(), free_port()
    command = [twistd, "-n", "--pidfile=", "-l", "twistd.log", "elevgw"]
    command += ["--ws-endpoint", f"tcp:{ws}:interface=127.0.0.1"]
    command += ["--api-endpoint", f"tcp:{api}:interface=127.0.0.1"]
    command += ["--store", "sqlite:elevgw.sqlite3", "--snapshots", "file:snapshots"]
    # the suite sends hundreds of frames a second on one connection
    command += ["--message-rate", "1000000", "--message-burst", "1000000"] + extra
    proc = subprocess.Popen(
        command, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{api}/healthz", timeout=1):
                return proc, ws
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the gateway in {folder} did not come up")


def outcome(report: dict) -> str:
    kept = [
        report["behavior"],
        report["behaviorClose"],
        report["remoteCloseCode"],
        report["remoteCloseReason"],
        report["wasClean"],
        report["received"],
    ]
    return re.sub(r'\\"ts\\":\d+|"ts":\d+', "ts", json.dumps(kept))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python2", required=True, help="a Python 2.7 interpreter")
    parser.add_argument("--suite", required=True, help="folder autobahntestsuite is installed in")
    parser.add_argument(
        "--twistd", default=os.path.join(os.path.dirname(sys.executable), "twistd")
    )
    parser.add_argument("--keep", action="store_true", help="keep the reports folder")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="elevgw-conformance-")
    gateways = []
    try:
        creds = os.path.join(work, "creds.jsonl")
        servers = []
        for name, extra in (("lean-on", []), ("lean-off", OFF)):
            folder = os.path.join(work, name)
            os.makedirs(folder)
            subprocess.run(
                [sys.executable, LOADGEN, "provision", "--sqlite"]
                + [
                    os.path.join(folder, "elevgw.sqlite3"),
                    "--devices",
                    "1",
                    "--credentials",
                    creds,
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            proc, port = start_gateway(folder, args.twistd, extra)
            gateways.append(proc)
            with open(creds) as f:
                device = json.loads(f.readline())
            query = f"device_id={device['device_id']}&token={device['token']}"
            servers.append({"agent": name, "url": f"ws://127.0.0.1:{port}/ws?{query}"})
        spec = {
            "outdir": os.path.join(work, "reports"),
            "servers": servers,
            "cases": ["*"],
            "exclude-cases": ["9.*", "12.*", "13.*"],
            "exclude-agent-cases": {},
        }
        spec_path = os.path.join(work, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        subprocess.run(
            [args.python2, "-c", RUN_SUITE, args.suite, spec_path],
            check=True,
            cwd=work,
            stdout=subprocess.DEVNULL,
            timeout=3600,
        )
        reports = os.path.join(work, "reports")
        with open(os.path.join(reports, "index.json")) as f:
            index = json.load(f)
        verdicts: dict[str, int] = {}
        differ = []
        for case, entry in index["lean-on"].items():
            other = index["lean-off"][case]
            loaded = []
            for item in (entry, other):
                with open(
                    os.path.join(reports, item["reportfile"].replace(".html", ".json"))
                ) as f:
                    loaded.append(json.load(f))
            if outcome(loaded[0]) != outcome(loaded[1]):
                differ.append(case)
            key = f"{entry['behavior']}/{entry['behaviorClose']}"
            verdicts[key] = verdicts.get(key, 0) + 1
        print(
            json.dumps(
                {
                    "cases": len(index["lean-on"]),
                    "differ": differ,
                    "verdicts_lean_on": verdicts,
                    "reports": reports if args.keep else None,
                }
            )
        )
        return 1 if differ else 0
    finally:
        for proc in gateways:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
