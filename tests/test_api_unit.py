"""The API's routes on StubTreq, over fakes: statuses, error codes and the narrow seams."""

import json

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from elevgw.core.commands import CommandRouter
from elevgw.core.sessions import CLOSE_REVOKED, SessionRegistry
from elevgw.north.api import DeviceAPI
from elevgw.north.base import APIDeps
from elevgw.observe.metrics import Metrics
from elevgw.presence.local import LocalPresence
from elevgw.testing import FakeConnection, MemoryDeviceStore, MemorySnapshotStore, RecordingSink


class API:
    def __init__(self, api_key=None):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = MemoryDeviceStore()
        self.registry = SessionRegistry(self.clock, RecordingSink(), 30.0)
        self.api = DeviceAPI(
            APIDeps(
                store=self.store,
                presence=LocalPresence(self.registry, "node-a"),
                commands=CommandRouter(self.registry, self.clock),
                snapshots=MemorySnapshotStore(),
                metrics=Metrics("node-a"),
                node_id="node-a",
                health=lambda: succeed({"status": "ok"}),
                api_key=api_key,
            )
        )
        self.http = StubTreq(self.api.resource())
        self.api_key = api_key

    async def call(self, method, path, body=None, raw=None):
        headers = {"Authorization": "Bearer " + self.api_key} if self.api_key else {}
        data = raw if raw is not None else (json.dumps(body).encode() if body else None)
        response = await self.http.request(
            method, "http://gateway" + path, data=data, headers=headers
        )
        content = await response.content()
        return response.code, json.loads(content) if content else None


@pytest.fixture
def api():
    return API()


@pytest_twisted.ensureDeferred
async def test_register_then_look_up_a_device_that_is_offline(api):
    status, created = await api.call("POST", "/api/v1/devices/register", {"location": "lobby"})
    assert status == 201 and created["device_id"].startswith("dev_")
    status, device = await api.call("GET", "/api/v1/devices/" + created["device_id"])
    assert status == 200
    assert device["online"] is False and device["node"] is None


@pytest_twisted.ensureDeferred
async def test_a_connected_device_shows_its_node_and_gets_commands(api):
    _, created = await api.call("POST", "/api/v1/devices/register", {"location": "lobby"})
    device_id = created["device_id"]
    connection = FakeConnection()
    api.registry.attach(device_id, connection)
    _, listed = await api.call("GET", "/api/v1/devices")
    assert [(d["device_id"], d["online"], d["node"]) for d in listed["devices"]] == [
        (device_id, True, "node-a")
    ]
    status, sent = await api.call(
        "POST", "/api/send", {"device_id": device_id, "command": "REBOOT"}
    )
    assert status == 200 and sent["ok"] is True
    frame = json.loads(connection.sent[-1])
    assert frame == {"type": "command", "id": sent["id"], "payload": "REBOOT", "data": None}


@pytest_twisted.ensureDeferred
async def test_revoke_goes_through_presence_and_closes_with_4003(api):
    _, created = await api.call("POST", "/api/v1/devices/register", {"location": "lobby"})
    connection = FakeConnection()
    api.registry.attach(created["device_id"], connection)
    status, body = await api.call("DELETE", "/api/v1/devices/" + created["device_id"])
    assert status == 200 and body["was_online"] is True
    assert connection.closed_with[0] == CLOSE_REVOKED


@pytest.mark.parametrize(
    "method, path, body, raw, status, code",
    [
        ("POST", "/api/send", {"device_id": "dev_x", "command": "REBOOT"}, None, 404, None),
        ("POST", "/api/send", {"command": "REBOOT"}, None, 400, "bad_device_id"),
        ("POST", "/api/send", None, b"{nope", 400, "bad_json"),
        ("POST", "/api/v1/devices/register", {"location": ""}, None, 400, "bad_location"),
        ("GET", "/api/v1/devices/dev_nobody", None, None, 404, "unknown_device"),
        ("GET", "/no/such/route", None, None, 404, "not_found"),
        ("PUT", "/api/v1/devices", None, None, 405, "method_not_allowed"),
        ("GET", "/api/v1/devices/dev_1/logs?limit=0", None, None, 400, "bad_limit"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_calls_get_json_errors_from_the_one_table(
    api, method, path, body, raw, status, code
):
    got, answer = await api.call(method, path, body, raw)
    assert got == status
    if code is not None:
        assert answer["error"] == code
    assert "detail" in answer


@pytest_twisted.ensureDeferred
async def test_a_store_that_is_down_answers_503(api):
    api.store.available = False
    status, answer = await api.call("GET", "/api/v1/devices")
    assert (status, answer["error"]) == (503, "store_unavailable")


@pytest_twisted.ensureDeferred
async def test_the_api_key_is_required_when_set():
    api = API(api_key="k3y")
    assert (await api.call("GET", "/api/v1/devices"))[0] == 200
    api.api_key = "wrong"
    status, answer = await api.call("GET", "/api/v1/devices")
    assert (status, answer["error"]) == (401, "unauthorized")
