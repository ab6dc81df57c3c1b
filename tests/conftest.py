"""Shared fixtures: a real gateway on ephemeral loopback ports, HTTP helpers."""

from __future__ import annotations

import json

import pytest_twisted
import treq
from twisted.internet import reactor

from elevgw.config import Settings
from elevgw.service import GatewayService

#: A real redis-server for the whole session (``redis_server``, ``redis_url``).
pytest_plugins = ["redis_support"]


class RunningGateway:
    """A started ``GatewayService`` plus helpers to call its API over real HTTP."""

    def __init__(self, service: GatewayService, api_key: str | None = None) -> None:
        self.service = service
        self.api_key = api_key

    @property
    def ws_port(self) -> int:
        return self.service.ws_port()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.service.api_port()}"

    def _headers(self, headers=None):
        merged = dict(headers or {})
        if self.api_key and "Authorization" not in merged:
            merged["Authorization"] = "Bearer " + self.api_key
        return merged

    async def call(
        self, method: str, path: str, body=None, headers=None, raw: bytes | None = None
    ):
        """``(status, json body)`` of one API call."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        response = await treq.request(
            method,
            self.base + path,
            data=data,
            headers=self._headers(headers),
            reactor=reactor,
            timeout=30,
        )
        content = await response.content()
        try:
            parsed = json.loads(content) if content else None
        except ValueError:
            parsed = content
        return response.code, parsed

    async def register(self, location: str = "上海中心01号") -> dict:
        status, body = await self.call("POST", "/api/v1/devices/register", {"location": location})
        assert status == 201, body
        return body


async def start_gateway(tmp_path, **overrides) -> RunningGateway:
    settings = dict(
        ws_endpoint="tcp:0:interface=127.0.0.1",
        api_endpoint="tcp:0:interface=127.0.0.1",
        store="sqlite:{}".format(tmp_path / "elevgw.sqlite3"),
        snapshots="file:{}".format(tmp_path / "snapshots"),
        node_id="test-node",
        drain_timeout=2.0,
    )
    settings.update(overrides)
    service = GatewayService(Settings(**settings), reactor)
    service.privilegedStartService()
    service.startService()
    await service.ready
    return RunningGateway(service, settings.get("api_key"))


@pytest_twisted.async_yield_fixture
async def gateway_factory(tmp_path):
    """Start gateways with ``await gateway_factory(**settings)``; all are stopped afterwards."""
    started = []

    async def start(**overrides):
        running = await start_gateway(tmp_path, **overrides)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.service.running:
            await running.service.stopService()


@pytest_twisted.async_yield_fixture
async def gateway(tmp_path):
    running = await start_gateway(tmp_path)
    yield running
    if running.service.running:
        await running.service.stopService()
