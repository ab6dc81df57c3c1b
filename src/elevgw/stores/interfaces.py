"""The device store: what the gateway keeps about devices and their logs.

Two implementations (SQLite for one node, Redis for production and clusters) provide
``IDeviceStore``; ``tests/test_store_contract.py`` holds every one of them to the same behaviour.

Every method returns a ``Deferred``. A store that cannot reach its backend fails that Deferred
with ``StoreUnavailable`` (never with a driver's own exception), so callers map it to HTTP 503 /
the ``store_unavailable`` error frame in one place.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

import attrs
from zope.interface import Attribute, Interface

from elevgw.core import ids


class StoreUnavailable(Exception):
    """The store's backend did not answer (down, timed out, locked)."""


@attrs.frozen
class Device:
    """A registered device as the store holds it.

    ``last_seen`` is epoch seconds (float) of the last frame the gateway recorded, or ``None``
    if the device never connected. The store is not written per heartbeat: the gateway
    records ``last_seen`` when a session ends and in batches once per sweep.
    """

    device_id: str
    location: str
    token_hash: str
    created: float
    last_seen: float | None = None


@attrs.frozen
class LogEntry:
    """One ``log`` frame as stored: server time in epoch milliseconds and the device's payload."""

    ts: int
    payload: Any


#: Where a device sits in ``list_devices`` order: ``(created, device_id)``.
DevicePosition = tuple[float, str]


def position_of(device: Device) -> DevicePosition:
    return (device.created, device.device_id)


def fold_query(query: str) -> str:
    """A search string as the stores compare it: ASCII letters lower-cased, nothing else.

    Both stores fold only ASCII (SQLite's ``lower()`` and Lua's ``string.lower`` do no more),
    so a query matches the same devices whichever store is behind the gateway.
    """
    return query.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def new_device_id() -> str:
    return ids.new_id(ids.DEVICE)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """Hash a device token for storage.

    Tokens are 256 random bits, so a plain SHA-256 is as strong as a slow KDF here and keeps a
    reconnect storm cheap: one hash per handshake.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(token: str, token_hash: str) -> bool:
    """Compare a presented token with a stored hash in constant time."""
    return hmac.compare_digest(hash_token(token), token_hash)


class IDeviceStore(Interface):
    """Persistent devices and logs. All methods return Deferreds; see the module docstring."""

    name = Attribute("Short name of the implementation for logs and metrics ('sqlite', 'redis').")

    def start():
        """Connect and create whatever schema is missing. Fires when the store is usable."""

    def stop():
        """Release connections and threads. Fires when done."""

    def ping():
        """Fire with ``None`` when the backend answers; fail with ``StoreUnavailable`` if not."""

    def add_device(device):
        """Persist a new ``Device``. Fires with ``None``."""

    def get_device(device_id):
        """Fire with the ``Device`` or ``None`` if unknown (revoked devices are unknown)."""

    def list_devices():
        """Fire with every ``Device``, ordered by ``created`` then ``device_id``."""

    def page_devices(after, limit, query=None):
        """Fire with ``(devices, next)``: a page of ``list_devices``, without loading them all.

        ``devices``: up to ``limit`` devices past the ``DevicePosition`` ``after`` (``None``:
        from the start), in ``list_devices`` order, whose id or location contains ``query``
        (compared after ``fold_query`` on both sides; ``None`` or empty matches all).
        ``next``: the position to pass as ``after`` for the rest, ``None`` once none is left.
        A store may bound the work of one call and stop early with fewer than ``limit``
        devices and a ``next`` (the Redis store does, so a search never holds Redis long):
        a caller pages on until ``next`` is ``None``, never stops at a short page.
        """

    def delete_device(device_id):
        """Remove the device and its credentials (its logs may stay). Fire with ``True`` if it existed."""

    def set_token_hash(device_id, token_hash):
        """Replace the device's token hash. Fire with ``True``, or ``False`` if unknown."""

    def record_last_seen(seen):
        """``seen`` maps device_id to epoch seconds; unknown ids are ignored. Fires with ``None``."""

    def append_log(device_id, entry):
        """Persist a ``LogEntry``; fire only once it is durable in the store."""

    def get_logs(device_id, limit, before=None):
        """Fire with up to ``limit`` ``LogEntry``, newest first, with ``ts < before`` if given."""


class BadCursor(ValueError):
    """An event-log cursor that this log never handed out (malformed, or another store's)."""


@attrs.frozen
class EventRecord:
    """One entry of the event log as it is appended and read back.

    ``type`` is the event's kind (``status``, ``snapshot``, ``command``), ``ts`` epoch
    milliseconds of the event, ``event_id`` the id its webhook carries as
    ``X-Elevgw-Event-Id``, ``body`` the rest of the webhook body (a JSON object). ``cursor`` is
    set by the log: an opaque string that grows with every append (on Redis, across the
    cluster), ``None`` before the entry is stored.
    """

    type: str
    device_id: str
    ts: int
    event_id: str
    body: dict
    cursor: str | None = None


@attrs.frozen
class EventPage:
    """A page of the event log: ``records`` oldest first, and the cursor to read on from.

    ``next`` is the cursor of the last entry examined, which with a ``device_id`` or
    ``type`` filter may be an entry that did not match: reading on from it never examines the
    same entries twice.
    """

    records: list
    next: str


class IEventLog(Interface):
    """The gateway's event log in the store: every event sent (or meant) for the backend.

    Each store implements it next to its devices (a table on SQLite, a stream on Redis). All
    methods return Deferreds and fail with ``StoreUnavailable`` when the backend is down.
    """

    start_cursor = Attribute("The cursor before every entry (read from it to get everything).")

    def start():
        """Create whatever the log needs in the store (after the store itself started)."""

    def append(records):
        """Append ``EventRecord``s in order; fire with their cursors, in the same order."""

    def read(after, limit, device_id=None, type=None):
        """Fire with an ``EventPage`` of up to ``limit`` records with a cursor after ``after``
        (``None``: from the oldest), matching ``device_id`` and ``type`` when given.

        Fails with ``BadCursor`` for a cursor this log cannot have handed out.
        """

    def last_cursor():
        """Fire with the newest entry's cursor, or ``start_cursor`` when the log is empty."""

    def trim(max_age, max_entries, now):
        """Drop entries older than ``max_age`` seconds before ``now`` (epoch seconds) and all
        but the newest ``max_entries`` (approximately on Redis). Fire with the entries left."""

    def parse_cursor(cursor):
        """A sortable key of ``cursor``; raises ``BadCursor`` if it is not one of this log's."""


# Command states. ``queued`` and ``sent`` are unfinished; the others are terminal.
QUEUED = "queued"
SENT = "sent"
ACKED = "acked"
FAILED = "failed"
EXPIRED = "expired"
TIMED_OUT = "timed_out"
CANCELED = "canceled"
SUPERSEDED = "superseded"
UNFINISHED_STATES = frozenset({QUEUED, SENT})
TERMINAL_STATES = frozenset({ACKED, FAILED, EXPIRED, TIMED_OUT, CANCELED, SUPERSEDED})
COMMAND_STATES = (QUEUED, SENT, ACKED, FAILED, EXPIRED, TIMED_OUT, CANCELED, SUPERSEDED)


class QueueFull(Exception):
    """The device already has as many commands waiting for delivery as it may."""


@attrs.frozen
class CommandRecord:
    """A command as the store keeps it. Times are epoch milliseconds.

    ``expires`` is set for a command given a ``ttl``: such a command is *pending* while it is
    ``queued`` or ``sent`` (delivered, and sent again on every reconnect, until acked or
    expired). A command without one is written at once or refused, and never sent again.
    """

    id: str
    device_id: str
    command: str
    data: Any
    state: str
    created: int
    updated: int
    expires: int | None = None
    collapse_key: str | None = None
    result: Any = None

    @property
    def pending(self) -> bool:
        return self.expires is not None and self.state in UNFINISHED_STATES

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES


@attrs.frozen
class Delivery:
    """What a device gets when its queue is taken: ``send`` in order; ``expired`` just now."""

    send: list[CommandRecord]
    expired: list[CommandRecord]


class ICommandQueue(Interface):
    """Every command's state, and the per-device queue of pending ones, kept in the store.

    Each method is one atomic step (a transaction, a Lua script), so nodes sharing the store
    and a device reconnecting anywhere see each command move through its states once.
    Methods return Deferreds and fail with ``StoreUnavailable`` like ``IDeviceStore``'s.
    Only the newest ``history`` commands of a device that are not pending are kept.
    """

    def start():
        """Create whatever schema is missing (the store is started). Fires when usable."""

    def stop():
        """Release what the queue holds of its own (the store's connection is the store's)."""

    def add(record, max_pending):
        """Store a new ``CommandRecord``; fire with the commands it superseded.

        A record with a ``collapse_key`` supersedes the device's ``queued`` commands with the
        same key. A pending record fails with ``QueueFull`` when the device would then hold
        more than ``max_pending`` pending commands.
        """

    def record(records):
        """Store commands already written to their devices (no queue, no cap). Fires ``None``."""

    def take(device_ids, now, resend):
        """Fire with ``{device_id: Delivery}`` for devices that have pending commands.

        Pending commands past ``expires`` become ``expired``; ``queued`` ones become ``sent``
        and are returned in order with, when ``resend``, the ``sent`` ones not acked yet.
        """

    def finish(device_id, command_id, state, result, now):
        """Move an unfinished command to the terminal ``state`` with ``result``.

        Fires with ``(record, changed)``: the record as it now is (``None`` if unknown) and
        whether this call finished it (``False``: it was terminal already).
        """

    def finish_many(steps, now):
        """``finish`` for each ``(device_id, command_id, state, result)`` of ``steps``, in one
        transaction or script; fire with their ``(record, changed)`` in the same order."""

    def expire_due(now, limit):
        """Expire up to ``limit`` pending commands past ``expires``; fire with them."""

    def get(device_id, command_id):
        """Fire with the ``CommandRecord`` or ``None``."""

    def recent(device_id, limit):
        """Fire with the device's newest ``limit`` commands, oldest first."""

    def depth():
        """Fire with the number of pending commands of every device."""
