"""``GET /api/v1/openapi.json``: the OpenAPI 3.1 description of every route.

The document is ``openapi.json`` beside this module, shipped as package data and read once.
A new route adds its path there (a test fails for any Klein route the document lacks, and
``tests/test_openapi.py`` drives the live API from it with schemathesis).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from elevgw.north.base import APIBase, app
from elevgw.util import dumps_json


def document() -> dict:
    """The OpenAPI document as a dict (a fresh copy each call)."""
    return json.loads(resources.files("elevgw.north").joinpath("openapi.json").read_bytes())


class OpenAPIRoutes(APIBase):
    _openapi_body: bytes | None = None

    @app.route("/api/v1/openapi.json", methods=["GET"])
    def openapi(self, request: Any) -> bytes:
        self._authorize(request)
        body = OpenAPIRoutes._openapi_body
        if body is None:
            body = OpenAPIRoutes._openapi_body = dumps_json(document())
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return body
