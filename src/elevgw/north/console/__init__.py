"""The operator console: static pages under ``/console/`` that call the API from the browser.

The files (``static/``: HTML, CSS and plain JavaScript, no build step) are shipped as package
data and hold no data and no secret, so they are served without the API key; every figure the
console shows comes from API calls that carry the key the operator signs in with. The pages
are strict same-origin: a Content-Security-Policy allows scripts, styles and API calls from
the gateway itself only, and nothing here sends CORS headers.
"""

from __future__ import annotations

from pathlib import Path

from twisted.web import static
from twisted.web.resource import Resource

STATIC = Path(__file__).resolve().parent / "static"

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
    # Revalidated on every load (File answers If-Modified-Since), so an upgrade shows at once.
    (b"Cache-Control", b"no-cache"),
)


class ConsoleFiles(static.File):
    """``static.File`` with the console's headers and without directory listings."""

    contentTypes = {
        ".html": "text/html; charset=utf-8",
        ".js": "text/javascript; charset=utf-8",
        ".css": "text/css; charset=utf-8",
        ".svg": "image/svg+xml",
        ".png": "image/png",
    }
    defaultType = "application/octet-stream"

    def directoryListing(self) -> Resource:
        return self.childNotFound

    def render(self, request):
        for name, value in _HEADERS:
            request.setHeader(name, value)
        return super().render(request)


def console_files() -> Resource:
    return ConsoleFiles(str(STATIC))
