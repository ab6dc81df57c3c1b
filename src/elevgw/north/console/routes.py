"""The console's routes: its static files, and the node status its fleet page draws."""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource

from elevgw.north.base import APIBase, APIDeps, app
from elevgw.north.console import ConsoleFiles
from elevgw.north.errors import ApiError


class ConsoleRoutes(APIBase):
    def __init__(self, deps: APIDeps) -> None:
        super().__init__(deps)
        self._console_files = ConsoleFiles()

    @app.route("/console", methods=["GET", "HEAD"])
    def console_root(self, request: Any) -> bytes:
        """Relative, so it also holds behind a proxy that serves the gateway under a prefix."""
        request.redirect(b"console/")
        return b""

    @app.route("/console/", branch=True, methods=["GET", "HEAD"])
    def console(self, request: Any) -> Resource:
        """The static pages, without the key: they hold no data (see ``elevgw.north.console``)."""
        return self._console_files

    @app.route("/api/v1/status", methods=["GET"])
    async def node_status(self, request: Any) -> bytes:
        """This node's health and a day of one-minute samples (``elevgw.observe.status``)."""
        self._authorize(request)
        if self.status is None:
            raise ApiError(404, "not_found", "this gateway reports no node status")
        return self._json(request, await self.status())
