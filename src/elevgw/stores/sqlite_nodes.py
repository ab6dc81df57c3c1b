"""SQLite is single-node: a node says so at start-up when another one uses the same file.

Each node writes a row (node id, host, pid) into ``elevgw_nodes`` of the SQLite file when it
starts and deletes it when it stops. At start, rows of live processes on this host (and any
row of another host, which cannot be checked from here) are other nodes: two nodes on one
SQLite file share devices and logs but not presence, so neither sees the other's sessions
(no takeover across them, no routing, each lists only its own devices online). Rows of
processes that are gone (a crash) are removed.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

_SCHEMA = """
CREATE TABLE IF NOT EXISTS elevgw_nodes (
    node_id TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started REAL NOT NULL,
    PRIMARY KEY (host, pid)
)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SQLiteNodeCheck:
    """A resource of the service tree (``start``/``stop``) on the SQLite store's connection."""

    log = Logger()

    def __init__(self, store: Any, node_id: str, path: str) -> None:
        self._store = store
        self.node_id = node_id
        self.path = path
        self.host = socket.gethostname()
        self.pid = os.getpid()
        #: ``(node_id, host, pid)`` of the other nodes found at start.
        self.others: list[tuple[str, str, int]] = []

    def _register(self, txn: Any) -> list[tuple[str, str, int]]:
        txn.execute(_SCHEMA)
        txn.execute("SELECT node_id, host, pid FROM elevgw_nodes")
        others = []
        for node_id, host, pid in txn.fetchall():
            if host == self.host and (pid == self.pid or not _alive(pid)):
                txn.execute("DELETE FROM elevgw_nodes WHERE host = ? AND pid = ?", (host, pid))
            else:
                others.append((node_id, host, pid))
        txn.execute(
            "INSERT OR REPLACE INTO elevgw_nodes (node_id, host, pid, started) VALUES (?, ?, ?, ?)",
            (self.node_id, self.host, self.pid, time.time()),
        )
        return others

    def start(self) -> Deferred:
        def checked(others: list) -> None:
            self.others = others
            for node_id, host, pid in others:
                self.log.error(
                    "SQLite is single-node: node {other} (host {host}, pid {pid}) also uses"
                    " {path}. Nodes on one SQLite file do not see each other's devices (no"
                    " takeover, routing or cluster-wide presence): run one node per SQLite file,"
                    " or --store redis://… for a cluster",
                    other=node_id,
                    host=host,
                    pid=pid,
                    path=self.path,
                    event="sqlite_shared",
                )

        def failed(failure: Any) -> None:
            self.log.warn(
                "could not check for other nodes on {path}: {error}",
                path=self.path,
                error=failure.getErrorMessage(),
            )

        return self._store.interaction(self._register).addCallbacks(checked, failed)

    def stop(self) -> Deferred:
        d = self._store.interaction(
            lambda txn: txn.execute(
                "DELETE FROM elevgw_nodes WHERE host = ? AND pid = ?", (self.host, self.pid)
            )
        )
        return d.addErrback(lambda _: None)
