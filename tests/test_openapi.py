"""The API as a document: every route is in ``openapi.json``, the live API serves it, and
schemathesis drives a running gateway from it: whatever it sends, good or bad, the answer is
a documented status with JSON, never a 5xx or a traceback."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import pytest_twisted
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode, checks

from elevgw.north.base import app
from elevgw.north.openapi import document

API_KEY = "openapi-test-key"
_METHODS = {"get", "post", "put", "patch", "delete"}


def klein_routes() -> set[tuple[str, str]]:
    """``(path, method)`` of every route on the Klein app, in OpenAPI's path syntax."""
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.endswith("<path:__rest__>"):
            continue  # what Klein adds under a ``branch=True`` route: the branch's own path
        path = re.sub(r"<(?:[a-z]+:)?(\w+)>", r"{\1}", rule.rule)
        for method in rule.methods or ():
            if method.lower() in _METHODS:
                routes.add((path, method.lower()))
    return routes


def documented_routes() -> set[tuple[str, str]]:
    return {
        (path, method)
        for path, item in document()["paths"].items()
        for method in item
        if method in _METHODS
    }


def test_every_route_of_the_app_is_in_the_document():
    missing = klein_routes() - documented_routes()
    assert not missing, f"add these to src/elevgw/north/openapi.json: {sorted(missing)}"


def test_the_document_describes_no_route_the_app_lacks():
    assert documented_routes() - klein_routes() == set()


def test_every_operation_documents_its_errors_as_json():
    for path, item in document()["paths"].items():
        for method, operation in item.items():
            if method not in _METHODS:
                continue
            assert operation.get("operationId"), (path, method)
            for status, answer in operation["responses"].items():
                if status.startswith(("4", "5")) and "$ref" not in answer:
                    assert "application/json" in answer["content"], (path, method, status)


@pytest_twisted.ensureDeferred
async def test_the_api_serves_its_document(gateway_factory):
    gateway = await gateway_factory(api_key=API_KEY)
    status, body = await gateway.call("GET", "/api/v1/openapi.json")
    assert status == 200 and body == document()
    status, body = await gateway.call(
        "GET", "/api/v1/openapi.json", headers={"Authorization": "Bearer wrong"}
    )
    assert (status, body["error"]) == (401, "unauthorized")


# -- the live API, driven from the document


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(base: str, method: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        base + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + API_KEY},
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        return json.loads(answer.read())


@pytest.fixture(scope="module")
def live_api(tmp_path_factory):
    """A gateway under ``twistd`` (schemathesis calls with blocking ``requests``, so the
    gateway cannot share this process's reactor): its base URL."""
    folder = tmp_path_factory.mktemp("live-api")
    api_port = _free_port()
    env = dict(os.environ, ELEVGW_API_KEY=API_KEY)
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--pidfile",
            "",
            "-n",
            "elevgw",
            "--ws-endpoint",
            f"tcp:{_free_port()}:interface=127.0.0.1",
            "--api-endpoint",
            f"tcp:{api_port}:interface=127.0.0.1",
        ],
        cwd=str(folder),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{api_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _call(base, "GET", "/healthz")
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.1)
        _call(base, "POST", "/api/v1/devices/register", {"location": "schemathesis"})
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    log = output.decode("utf-8", "replace")
    assert "Traceback" not in log, log[-5000:]


# A stream is held open until the client leaves: nothing to answer within a request.
schema = schemathesis.openapi.from_dict(document()).exclude(path="/api/v1/events/stream")
# Unknown query arguments are ignored, as by most HTTP APIs: not a rejected-input case.
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
    max_examples=30,
    allow_extra_parameters=False,
)


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)
def test_the_live_api_answers_every_input_with_a_documented_json_status(case, live_api):
    if case.path_parameters and "timeout" in (case.query or {}):
        case.query["timeout"] = 0.05  # an unknown device answers at once; keep waits short
    response = case.call(base_url=live_api, headers={"Authorization": "Bearer " + API_KEY})
    assert response.status_code < 500 or response.status_code in (502, 503, 504), (
        response.status_code,
        response.text[:500],
    )
    assert "Traceback" not in response.text
    if response.status_code >= 400:
        body = json.loads(response.text)
        assert set(body) == {"error", "detail"}, body
    # ``/api/v1/devices/register`` is also ``/api/v1/devices/{device_id}`` with the id
    # "register", so its 405 rightly allows GET and DELETE: not a mismatch. A cursor
    # (``after``) is opaque: one of the right shape that no page handed out is rightly 400.
    case.validate_response(
        response,
        excluded_checks=[checks.allow_header_conformance, checks.positive_data_acceptance],
    )
