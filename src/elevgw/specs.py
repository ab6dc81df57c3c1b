"""The store and snapshot-store specs (``--store``, ``--snapshots``), parsed in one place.

Option checking (``elevgw.tap``) and the service assembly (``elevgw.service``) both read a
spec through these functions, so they can never disagree about what is valid.
"""

from __future__ import annotations

import attrs

from elevgw.stores.redis_url import RedisAddress, parse_redis_url


@attrs.frozen
class SQLiteSpec:
    path: str


@attrs.frozen
class FileSnapshotsSpec:
    folder: str


@attrs.frozen
class OSSSnapshotsSpec:
    """``oss://BUCKET``; the OSS store reads the rest (endpoint, keys) from the environment."""

    url: str


def parse_store(spec: str) -> SQLiteSpec | RedisAddress:
    """``sqlite:PATH`` or ``redis://…``; ``ValueError`` saying what is wrong otherwise."""
    if spec.startswith("sqlite:"):
        path = spec[len("sqlite:") :]
        if not path:
            raise ValueError("sqlite: needs a file path, e.g. sqlite:elevgw.sqlite3")
        return SQLiteSpec(path)
    if spec.startswith("redis://"):
        return parse_redis_url(spec)
    raise ValueError(f"must be sqlite:PATH or redis://host:port/db, not {spec!r}")


def parse_snapshots(spec: str) -> FileSnapshotsSpec | OSSSnapshotsSpec:
    """``file:FOLDER`` or ``oss://BUCKET``; ``ValueError`` otherwise."""
    if spec.startswith("file:"):
        folder = spec[len("file:") :]
        if not folder:
            raise ValueError("file: needs a folder, e.g. file:snapshots")
        return FileSnapshotsSpec(folder)
    if spec.startswith("oss://"):
        return OSSSnapshotsSpec(spec)
    raise ValueError(f"must be file:FOLDER or oss://BUCKET, not {spec!r}")
