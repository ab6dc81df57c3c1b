"""The northbound HTTP API: what the business backend calls.

``DeviceAPI`` is every route group (``elevgw.north.devices``, ``elevgw.north.commands``, …)
on one Klein app; ``APIResource`` serves it, with ``POST /api/send`` answered outside Klein;
``APISite`` counts requests instead of writing an access log line per request.
"""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Site

from elevgw.north.base import APIDeps
from elevgw.north.commands import CommandRoutes
from elevgw.north.console.routes import ConsoleRoutes
from elevgw.north.devices import DeviceRoutes
from elevgw.north.events import EventRoutes
from elevgw.north.limits import APIChannel, LimitedRequest, WaitingCalls
from elevgw.north.openapi import OpenAPIRoutes


class DeviceAPI(DeviceRoutes, CommandRoutes, ConsoleRoutes, EventRoutes, OpenAPIRoutes):
    """Every route. A new route group is a mixin of ``elevgw.north.base.APIBase`` added here."""

    def __init__(self, deps: APIDeps) -> None:
        super().__init__(deps)

    def resource(self) -> Resource:
        return APIResource(self)


class APIResource(Resource):
    """The API's root: Klein's resource, except that ``POST /api/send`` runs its handler here.

    ``/api/send`` is the call a backend makes hundreds of times a second, and Klein's
    per-call machinery (a werkzeug URL adapter, a chain of Deferreds, chunked encoding)
    cost more than the command itself. Worse, werkzeug's matcher and Klein's
    ``render`` each build a self-referencing closure per call: about 40 objects of cyclic
    garbage per request, which under load made long collector pauses that stopped every
    device's heartbeat (figures: ``docs/benchmarks.rst``, "Why the hot paths look as they do"). Answered synchronously here, the
    same handler with the same error table sends one write with a ``Content-Length`` and
    leaves nothing for the cyclic collector. Every other route goes through Klein.
    """

    isLeaf = True

    def __init__(self, api: DeviceAPI) -> None:
        super().__init__()
        self._api = api
        self._klein = api.app.resource()
        self._direct = {(b"POST", b"/api/send"): DeviceAPI.send}
        self.waiting = WaitingCalls(
            api.max_waiting_calls, lambda: api.metrics.limit_hit("api_waiting")
        )

    def render(self, request):
        handler = self._direct.get((request.method, request.path))
        if handler is not None:
            return self._api.answer_now(handler, request)
        if request.path not in _MONITORING and not self.waiting.admit(request):
            request.setHeader(b"Retry-After", b"1")
            return self._api._json(
                request,
                {"error": "busy", "detail": "too many API calls waiting, retry later"},
                503,
            )
        return self._klein.render(request)


#: Answered at once and needed most when the node is busy: never refused as busy.
_MONITORING = frozenset((b"/healthz", b"/readyz", b"/metrics"))


class APIRequest(LimitedRequest):
    """A request that remembers when it arrived, for the latency metric."""

    started = 0.0

    def process(self) -> None:
        self.started = self.channel.site.clock.seconds()  # type: ignore[attr-defined]
        super().process()

    def render(self, resrc: Any) -> None:
        # Twisted's ``process`` has just set ``Server: TwistedWeb/<version>``: the API, like
        # the device port, does not say what software it runs.
        self.responseHeaders.removeHeader(b"server")
        super().render(resrc)


class APISite(Site):
    """The API's ``Site``: counts requests and latency instead of writing an access log line
    per request (at hundreds of commands a second that log would cost more than the call)."""

    requestFactory = APIRequest
    protocol = APIChannel  # type: ignore[assignment]
    displayTracebacks = False
    noisy = False

    def logPrefix(self) -> str:
        """Names the listener in Twisted's "… starting on PORT" line."""
        return "elevgw API"

    def __init__(self, api: DeviceAPI, clock: Any) -> None:
        # The API takes JSON only: no form decoding, which parses the Content-Type of every
        # POST with the email package.
        super().__init__(api.resource(), parsePOSTFormSubmission=False)
        self.clock = clock
        self.max_body = api.max_body
        metrics = api.metrics
        self.limit_hit = metrics.limit_hit
        self._requests = metrics.api_requests
        self._seconds = metrics.api_seconds
        self._counters: dict[tuple[bytes, int], Any] = {}

    def log(self, request: Any) -> None:
        self._seconds.observe(self.clock.seconds() - request.started)
        # Any token is a valid HTTP method, so unknown ones share one label value (a client
        # must not grow the metric without bound); the labelled child is looked up once.
        method = request.method if request.method in _METHODS else b"other"
        key = (method, request.code)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self._requests.labels(method.decode(), str(key[1]))
        counter.inc()


_METHODS = frozenset((b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"))
