"""Writes that leave at once: a plain TCP transport whose queue is empty sends right away.

Twisted queues every ``transport.write`` and sends it on the next reactor pass: an
``epoll_ctl`` to ask for writability, a pass that reports the socket writable, ``doWrite``,
another ``epoll_ctl`` to stop asking. For a pong that round was a large part of the whole
cost of a heartbeat, and every command frame waited for the next pass, behind whatever else
that pass had to do (figures: ``docs/benchmarks.rst``).

Only an empty queue is skipped: anything already queued keeps its order, so a device that
stops reading fills its socket buffer, then Twisted's queue, exactly as before. TLS
transports and anything that is not a plain ``tcp.Server`` keep Twisted's write.

While the protocol handles one read (``hold`` … ``release``), its writes are held and leave together at
the end of it: a device that sends eight heartbeats in one segment gets its eight pongs in
one send, as Twisted's queue would have made them, instead of eight (without this a flood of
pipelined heartbeats runs slower than the bare Autobahn server).

``queued_bytes`` measures that queue, so the protocol can close a device that lets it grow
past ``--max-outbound-buffer``.

This reads ``FileDescriptor``'s queue attributes (``_tempDataBuffer``, ``_tempDataLen``,
``dataBuffer``, ``offset``, ``_writeDisconnected``), unchanged since Twisted 8. ``tests/test_write_through.py``
fails if they ever change meaning.
"""

from __future__ import annotations

import functools
from typing import Any

from twisted.internet import tcp

_queued_write = tcp.Server.write


def install(transport: Any) -> bool:
    """Give ``transport`` the at-once ``write``; ``False`` (and no change) if it is not plain
    TCP."""
    if type(transport) is not tcp.Server or transport.TLS:
        return False
    transport.elevgw_held = None  # type: ignore[attr-defined]
    transport.write = functools.partial(_write, transport)  # type: ignore[method-assign]
    return True


def hold(transport: Any) -> list[bytes] | None:
    """Hold ``transport``'s writes until ``release``; the list to pass to it, or ``None``
    when there is nothing to release (not installed, or already held).

    A ``loseConnection`` while held is safe: Twisted closes on its next pass, after what
    is queued by then, and the held bytes are queued at ``release``."""
    if getattr(transport, "elevgw_held", 0) is not None:
        return None
    chunks: list[bytes] = []
    transport.elevgw_held = chunks
    return chunks


def release(transport: Any, chunks: list[bytes]) -> None:
    """Stop holding and send what was held, as one write."""
    transport.elevgw_held = None
    if chunks:
        _write(transport, b"".join(chunks) if len(chunks) > 1 else chunks[0])


def _write(transport: Any, data: bytes) -> None:
    chunks = transport.elevgw_held
    if chunks is not None:
        chunks.append(data)
        return
    if (
        transport._tempDataBuffer
        or transport.offset < len(transport.dataBuffer)
        or transport.TLS
        or transport.disconnecting
        or transport._writeDisconnected
        or not transport.connected
        or not data
    ):
        _queued_write(transport, data)
        return
    sent = transport.writeSomeData(data)
    if not isinstance(sent, int):
        # The socket failed (the peer is gone); queue it and let the reactor find out.
        _queued_write(transport, data)
    elif sent < len(data):
        _queued_write(transport, data[sent:])


def queued_bytes(transport: Any) -> int:
    """Bytes written to ``transport`` and not yet taken by the kernel: Twisted's write queue
    (``_tempDataLen`` plus the unsent rest of ``dataBuffer``). TLS transports queue their
    encrypted bytes there too. 0 for transports without that queue."""
    try:
        return transport._tempDataLen + len(transport.dataBuffer) - transport.offset
    except AttributeError:
        return 0
