"""A real webhook backend for tests: records every request, answers as planned."""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from waiting import within

HANG = "hang"


def real_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@attrs.define
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)

    @property
    def event_id(self) -> str:
        return self.headers["x-elevgw-event-id"]


class Receiver(Resource):
    """A webhook backend that records every request.

    Answers come from ``plan`` (one entry per request: a status code, ``(status, headers)``
    or ``HANG``), then ``default``; requests for a device in ``hang_devices`` always hang.
    Answers are written on the next reactor turn, so requests that the sink sends at the
    same time are open at the same time and ``max_open_per_device`` can see it.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Received] = []
        self.plan: deque[Any] = deque()
        self.default: Any = 200
        self.hang_devices: set[str] = set()
        self.max_open_per_device: dict[str, int] = {}
        self._open: dict[str, int] = {}
        self._waiters: list[tuple[int, Deferred[None]]] = []

    def render_POST(self, request: Any) -> Any:
        body = request.content.read()
        received = Received(
            path=request.path.decode(),
            headers={
                name.decode().lower(): values[0].decode()
                for name, values in request.requestHeaders.getAllRawHeaders()
            },
            body=body,
        )
        self.requests.append(received)
        device_id = received.json["device_id"]
        self._open[device_id] = self._open.get(device_id, 0) + 1
        self.max_open_per_device[device_id] = max(
            self.max_open_per_device.get(device_id, 0), self._open[device_id]
        )
        request.notifyFinish().addBoth(lambda _: self._closed(device_id))

        answer = self.plan.popleft() if self.plan else self.default
        if device_id in self.hang_devices:
            answer = HANG
        if answer != HANG:
            real_reactor().callLater(0, self._answer, request, answer)
        self._wake()
        return NOT_DONE_YET

    def _answer(self, request: Any, answer: Any) -> None:
        status, headers = answer if isinstance(answer, tuple) else (answer, {})
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        for name, value in headers.items():
            request.setHeader(name, value)
        request.write(b'{"ok": true}' if status < 300 else b'{"error": "planned"}')
        request.finish()

    def _closed(self, device_id: str) -> None:
        self._open[device_id] -= 1

    def wait_for_requests(self, count: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiters.append((count, d))
        self._wake()
        return within(d)

    def _wake(self) -> None:
        for count, d in list(self._waiters):
            if len(self.requests) >= count:
                self._waiters.remove((count, d))
                d.callback(None)

    def bodies(self, device_id: str) -> list[dict[str, Any]]:
        return [r.json for r in self.requests if r.json["device_id"] == device_id]


class TrackingSite(Site):
    """A Site that knows which of its connections are still open, so teardown can wait."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.open_connections: list[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        closed: Deferred[None] = Deferred()
        self.open_connections.append(closed)
        original = protocol.connectionLost

        def connection_lost(reason: Any) -> None:
            original(reason)
            self.open_connections.remove(closed)
            closed.callback(None)

        protocol.connectionLost = connection_lost
        return protocol
