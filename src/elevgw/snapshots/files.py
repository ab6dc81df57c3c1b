"""Snapshots in a local folder: the embedded default, served by the API at ``/snapshots/<key>``."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from elevgw.snapshots.interfaces import (
    IMAGE_TYPES,
    ISnapshotFiles,
    ISnapshotStore,
    SnapshotStoreError,
    StoredSnapshot,
    snapshot_key,
    sniff_image_type,
)


@implementer(ISnapshotStore, ISnapshotFiles)
class FileSnapshotStore:
    """Snapshots in a local folder, written on a thread pool, served by the API.

    ``public_url`` is the base put in front of ``/snapshots/<key>``; it may be a callable
    returning it, because with ``tcp:0`` the API's address is known only once it listens.
    """

    name = "file"

    def __init__(self, root: str, public_url: Any, reactor: Any, threadpool: Any) -> None:
        self._root = os.path.abspath(root)
        self._public_url = public_url
        self._reactor = reactor
        self._threadpool = threadpool

    def start(self):
        return deferToThreadPool(
            self._reactor, self._threadpool, os.makedirs, self._root, exist_ok=True
        )

    def stop(self):
        return succeed(None)

    def put(self, device_id: str, data: bytes, taken_at_ms: int):
        extension = sniff_image_type(data)
        if extension is None:
            raise ValueError("not a PNG, JPEG or WebP image")
        key = snapshot_key(device_id, taken_at_ms, extension)
        path = self.path_for(key)
        assert path is not None
        base = self._public_url() if callable(self._public_url) else self._public_url
        stored = StoredSnapshot(
            device_id=device_id,
            key=key,
            url="{}/snapshots/{}".format(base.rstrip("/"), key),
            content_type=IMAGE_TYPES[extension],
            size=len(data),
            taken_at=taken_at_ms,
        )
        d = deferToThreadPool(
            self._reactor, self._threadpool, _write_atomically, path, data, self._root
        )
        d.addCallbacks(lambda _: stored, _as_store_error)
        return d

    def path_for(self, key: str) -> str | None:
        """The file for ``key``, or ``None`` if the key would leave the folder or is malformed."""
        if not key or "\\" in key or "\x00" in key or key.startswith("/"):
            return None
        parts = key.split("/")
        if any(part in ("", ".", "..") for part in parts):
            return None
        path = os.path.abspath(os.path.join(self._root, *parts))
        if not path.startswith(self._root + os.sep):
            return None
        return path

    def read(self, key: str):
        """Fire with ``(bytes, content_type)`` for a stored key, or ``None`` if there is none."""
        path = self.path_for(key)
        extension = key.rsplit(".", 1)[-1]
        if path is None or extension not in IMAGE_TYPES:
            return succeed(None)
        d = deferToThreadPool(self._reactor, self._threadpool, _read_or_none, path, self._root)
        d.addCallback(lambda data: None if data is None else (data, IMAGE_TYPES[extension]))
        return d


def _inside(path: str, root: str) -> bool:
    """Whether ``path`` resolves (symbolic links followed) to a place inside ``root``.

    ``path_for`` keeps a key's own text inside the folder; this keeps a symbolic link placed
    under it (by whoever can write there) from serving or overwriting a file elsewhere. It
    touches the file system, so it runs on the thread pool with the read or write."""
    return os.path.realpath(path).startswith(os.path.realpath(root) + os.sep)


def _write_atomically(path: str, data: bytes, root: str) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    if not _inside(folder, root) or os.path.islink(path):
        raise OSError(f"{path} resolves outside the snapshot folder")
    partial = path + ".part"
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, path)


def _read_or_none(path: str, root: str) -> bytes | None:
    if not _inside(path, root):
        return None
    try:
        # O_NOFOLLOW: a link put in place after the check is refused too.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except OSError:  # ELOOP: the file itself is a symbolic link
        return None
    with os.fdopen(fd, "rb") as f:
        try:
            return f.read()
        except IsADirectoryError:
            return None


def _as_store_error(failure):
    raise SnapshotStoreError(str(failure.value))
