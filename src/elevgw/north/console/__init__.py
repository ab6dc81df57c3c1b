"""The operator console: static pages under ``/console/`` that call the API from the browser.

The files (``static/``: HTML, CSS and plain JavaScript, no build step) are shipped as package
data and hold no data and no secret, so they are served without the API key; every figure the
console shows comes from API calls that carry the key the operator signs in with. The pages
are strict same-origin: a Content-Security-Policy allows scripts, styles and API calls from
the gateway itself only, and nothing here sends CORS headers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from twisted.web.resource import Resource

STATIC = Path(__file__).resolve().parent / "static"

#: What the console is made of; a file with another ending is not served.
CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
}

#: Images may come from the snapshot store, which may be another host (a bucket); blob: is a
#: snapshot fetched with the API key and shown from memory.
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    b"img-src 'self' blob: data: https: http:; base-uri 'none'; form-action 'none'; "
    b"frame-ancestors 'none'"
)

_HEADERS = (
    (b"Content-Security-Policy", CONTENT_SECURITY_POLICY),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Frame-Options", b"DENY"),
    (b"Referrer-Policy", b"no-referrer"),
    # Revalidated on every load (the ETag answers 304), so an upgrade shows at once.
    (b"Cache-Control", b"no-cache"),
)


class ConsoleFiles(Resource):
    """The console's files, read once from ``folder`` into memory (about 60 KB).

    Only the files found there are served, by exact name: no directories, no paths, so
    nothing else on the disk can be reached through a crafted URL. Serving from memory also
    keeps disk reads off the reactor.
    """

    isLeaf = True

    def __init__(self, folder: Path = STATIC) -> None:
        super().__init__()
        self._files: dict[str, tuple[bytes, bytes, bytes]] = {}
        for path in sorted(folder.iterdir()):
            content_type = CONTENT_TYPES.get(path.suffix)
            if content_type is not None and path.is_file():
                body = path.read_bytes()
                etag = b'"%s"' % hashlib.sha256(body).hexdigest()[:20].encode("ascii")
                self._files[path.name] = (body, content_type, etag)

    def render_GET(self, request: Any) -> bytes:
        for name, value in _HEADERS:
            request.setHeader(name, value)
        path = b"/".join(request.postpath) or b"index.html"
        found = self._files.get(path.decode("utf-8", "replace"))
        if found is None:
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"Not found: the console has no such file.\n"
        body, content_type, etag = found
        if request.setETag(etag):  # the browser's copy is current: 304, no body
            return b""
        request.setHeader(b"Content-Type", content_type)
        return body
