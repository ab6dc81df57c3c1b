"""``redis://`` URLs, parsed without importing txredisapi (which installs the global reactor),
so ``twistd elevgw`` can refuse a bad ``--store`` while it parses options."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import attrs


@attrs.frozen
class RedisAddress:
    """Where a ``redis://[[user]:password@]host[:port][/db]`` URL points."""

    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """Parse a ``redis://`` URL; raise ``ValueError`` with a one-line reason if it is not one."""
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ValueError(f"not a redis:// URL: {url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"bad port in {url!r}")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"database must be a number, not {path!r}, in {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"options in {url!r} are not supported")
    return RedisAddress(
        host=parts.hostname,
        port=port,
        db=int(path) if path else 0,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )
