"""``--workers N``: one host as a small cluster of worker processes under a thin parent.

Each worker is a whole gateway node (its own reactor, sessions, store connection and cluster
membership) started as ``twistd -n elevgw … --worker-index I``. The workers share the device
and API ports through ``SO_REUSEPORT``, so the kernel spreads new connections over their
accept queues and no queue is shared between processes. The parent only supervises:

- it restarts a worker that exits, after a backoff that doubles up to a minute and starts
  over once a worker has run for a while (the cluster's reaper handles the dead worker's
  devices, as for any node that dies);
- it relays every worker's log lines (JSON lines on the worker's stdout) into its own log,
  each tagged with ``worker`` and the worker's ``node``, so there is one log stream;
- on SIGTERM it sends SIGTERM to every worker and exits once all have drained, killing any
  that is still there after the drain timeout and a margin;
- a worker whose parent died (``kill -9`` of the parent) notices within a second and drains.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from elevgw.timing import PeriodicService, within

TWISTD = "from twisted.scripts.twistd import run; run()"
#: A worker that ran this long before exiting is restarted after the shortest backoff again.
STABLE_AFTER = 60.0
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 60.0


def worker_arguments(args: list[str], index: int) -> list[str]:
    """The worker's ``elevgw`` arguments: the parent's, without ``--workers``, plus its index."""
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        kept.append(arg)
    return kept + [f"--worker-index={index}"]


class _Worker(ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started_at = supervisor.reactor.seconds()
        self.ended: Deferred = Deferred()
        self._buffers = {1: b"", 2: b""}
        self.pid: int | None = None

    def childDataReceived(self, fd: int, data: bytes) -> None:
        lines = (self._buffers.get(fd, b"") + data).split(b"\n")
        self._buffers[fd] = lines.pop()
        for line in lines:
            if line.strip():
                self.supervisor.relay(self.index, line, fd)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._buffers.items():
            if rest.strip():
                self.supervisor.relay(self.index, rest, fd)
        self.supervisor.worker_ended(self, reason)
        self.ended.callback(None)

    def makeConnection(self, process: Any) -> None:
        #: Kept: the transport forgets its pid once the process has ended.
        self.pid = process.pid
        super().makeConnection(process)


class WorkerSupervisor(Service):
    """The parent of ``count`` workers (see the module docstring)."""

    log = Logger()

    def __init__(
        self,
        count: int,
        args: list[str],
        reactor: Any,
        drain_timeout: float,
        executable: str = sys.executable,
    ) -> None:
        self.count = count
        self.args = args
        self.reactor = reactor
        self.drain_timeout = drain_timeout
        self.executable = executable
        self.workers: dict[int, _Worker] = {}
        self._backoff = dict.fromkeys(range(count), FIRST_BACKOFF)
        self._restarts: dict[int, Any] = {}
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        self.log.info(
            "elevgw: starting {count} workers sharing the device and API ports", count=self.count
        )
        for index in range(self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        worker = _Worker(self, index)
        argv = [
            self.executable,
            "-c",
            TWISTD,
            "-n",
            "--pidfile=",
            "--logger=elevgw.observe.logs.json_lines",
            "elevgw",
            *worker_arguments(self.args, index),
        ]
        self.reactor.spawnProcess(
            worker, self.executable, argv, env=os.environ.copy(), childFDs={0: "w", 1: "r", 2: "r"}
        )
        self.workers[index] = worker
        self.log.info("worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def worker_ended(self, worker: _Worker, reason: Failure) -> None:
        index = worker.index
        if self.workers.get(index) is worker:
            del self.workers[index]
        if self._stopping:
            return
        ran = self.reactor.seconds() - worker.started_at
        if ran >= STABLE_AFTER:
            self._backoff[index] = FIRST_BACKOFF
        delay = self._backoff[index]
        self._backoff[index] = min(delay * 2, MAX_BACKOFF)
        self.log.warn(
            "worker {index} (pid {pid}) exited ({why}); restarting it in {delay:.0f} s",
            index=index,
            pid=worker.pid,
            why=reason.getErrorMessage(),
            delay=delay,
        )
        self._restarts[index] = self.reactor.callLater(delay, self._spawn, index)

    def relay(self, index: int, line: bytes, fd: int) -> None:
        """Write one of a worker's log lines into this process's log, tagged with the worker."""
        text = line.decode("utf-8", "replace")
        event: dict[str, Any] = {
            "log_format": "{worker_line}",
            "log_level": LogLevel.info if fd == 1 else LogLevel.warn,
            "log_namespace": f"elevgw.worker{index}",
            "log_time": self.reactor.seconds(),
            "log_source": None,
            "worker": index,
        }
        try:
            fields = json.loads(text)
        except ValueError:
            fields = None
        if isinstance(fields, dict) and "message" in fields:
            event.update({k: v for k, v in fields.items() if not k.startswith("log_")})
            event["worker_line"] = fields["message"]
            event["log_namespace"] = f"{fields.get('namespace') or 'elevgw'} worker{index}"
            try:
                event["log_level"] = LogLevel.levelWithName(fields.get("level", "info"))
            except Exception:
                pass
            if isinstance(fields.get("time"), (int, float)):
                event["log_time"] = fields["time"] / 1000
        else:
            event["worker_line"] = text
        globalLogPublisher(event)

    def stopService(self) -> Deferred:
        super().stopService()
        self._stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        workers = list(self.workers.values())
        for worker in workers:
            _signal(worker, "TERM")
        ended = DeferredList([w.ended for w in workers])
        d = within(ended, self.drain_timeout + 5.0, self.reactor)

        def kill_stragglers(_: Any) -> Deferred:
            stragglers = [w for w in workers if not w.ended.called]
            for worker in stragglers:
                self.log.warn("worker {index} did not drain in time: killed", index=worker.index)
                _signal(worker, "KILL")
            return DeferredList([w.ended for w in stragglers])

        return d.addCallback(kill_stragglers)


def _signal(worker: _Worker, name: str) -> None:
    try:
        worker.transport.signalProcess(name)  # type: ignore[union-attr]
    except Exception:
        pass  # already gone


class ParentWatch(PeriodicService):
    """In a worker: drain and stop once the parent is gone (``kill -9`` of the parent), so
    no worker outlives its supervisor holding the ports."""

    def __init__(self, reactor: Any, interval: float = 1.0) -> None:
        super().__init__(interval, self._check, reactor)
        self._parent = os.getppid()
        self._warned = False

    def _check(self) -> None:
        if os.getppid() != self._parent and not self._warned:
            self._warned = True
            Logger().warn("the worker's parent is gone: draining")
            os.kill(os.getpid(), signal.SIGTERM)
