"""The operator console in a real headless Chromium against a real gateway and devices.

The gateway runs on ephemeral loopback ports in this process; devices are real WebSocket
clients (``wsclient.TestDevice``) that answer commands and snapshot requests as firmware does.
Each test leaves a screenshot of the page it checked in ``docs/console/`` when
``ELEVGW_CONSOLE_SCREENSHOTS`` names that folder (the README shows them), else in ``tmp_path``.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from browser import PHONE
from images import tiny_png
from wsclient import connect_device

API_KEY = "console-test-key"

pytest_plugins = ["browser"]


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = os.environ.get("ELEVGW_CONSOLE_SCREENSHOTS")
    return Path(folder) if folder else tmp_path


class Firmware:
    """A connected device that acks commands and answers ``snapshot`` with an image."""

    def __init__(self, connection, device_id: str) -> None:
        self.connection = connection
        self.device_id = device_id
        self.commands: list[dict] = []
        self._loop = defer.ensureDeferred(self._answer())

    async def _answer(self) -> None:
        while not self.connection.closed.called:
            try:
                frame = await self.connection.frame(timeout=3600)
            except (defer.CancelledError, defer.TimeoutError):
                return
            if not isinstance(frame, dict) or frame.get("type") != "command":
                continue
            self.commands.append(frame)
            if frame["payload"] == "snapshot":
                image = base64.b64encode(tiny_png(64, 48)).decode()
                self.connection.send(
                    {
                        "type": "snapshot",
                        "device_id": self.device_id,
                        "id": frame["id"],
                        "payload": image,
                    }
                )
            else:
                self.connection.send(
                    {
                        "type": "ack",
                        "device_id": self.device_id,
                        "id": frame["id"],
                        "payload": {"done": frame["payload"]},
                    }
                )

    async def close(self) -> None:
        await self.connection.close()
        self._loop.cancel()


async def fleet(gateway, locations, connected):
    """Registers a device per location; connects the first ``connected`` of them."""
    registered = [await gateway.register(location) for location in locations]
    devices = []
    for creds in registered[:connected]:
        connection = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
        devices.append(Firmware(connection, creds["device_id"]))
    return registered, devices


async def sign_in(browser, gateway, key=API_KEY, page="#/devices"):
    await browser.open(f"{gateway.base}/console/{page}")
    await browser.type("#api-key", key)
    await browser.click(".sign-in button")


async def close_all(devices):
    for device in devices:
        await device.close()


@pytest_twisted.ensureDeferred
async def test_sign_in_asks_for_the_key_and_refuses_a_wrong_one(gateway_factory, browser, shots):
    gateway = await gateway_factory(api_key=API_KEY)
    await browser.open(f"{gateway.base}/console/")
    await browser.element("#api-key")
    assert await browser.script("return document.querySelector('#nav').hidden") is True
    await browser.screenshot(shots / "sign-in.png")
    await sign_in(browser, gateway, key="not-the-key")
    assert "refused" in await browser.wait_text("[role=alert]", "refused")
    assert await browser.script("return sessionStorage.getItem('elevgw.apiKey')") is None
    await sign_in(browser, gateway)
    await browser.wait_text("h1", "Devices")
    assert await browser.script("return sessionStorage.getItem('elevgw.apiKey')") == API_KEY
    assert API_KEY not in await browser.script("return location.href")


@pytest_twisted.ensureDeferred
async def test_devices_page_shows_who_is_online_and_follows_a_disconnect(
    gateway_factory, browser, shots
):
    gateway = await gateway_factory(api_key=API_KEY)
    locations = ["上海中心01号", "上海中心02号", "北京国贸03号", "广州塔04号"]
    registered, devices = await fleet(gateway, locations, connected=3)
    try:
        await sign_in(browser, gateway)
        await browser.wait_text(".devices tbody", registered[3]["device_id"])
        rows = await browser.script(
            "return [...document.querySelectorAll('.devices tbody tr')]"
            ".map(r => [r.dataset.device, r.querySelector('.state').textContent])"
        )
        assert dict(rows) == {
            registered[0]["device_id"]: "online",
            registered[1]["device_id"]: "online",
            registered[2]["device_id"]: "online",
            registered[3]["device_id"]: "offline",
        }
        await browser.screenshot(shots / "devices.png")

        gone = registered[1]["device_id"]
        await devices[1].close()
        await browser.wait_for(
            f"document.querySelector('tr[data-device=\"{gone}\"] .state').textContent === 'offline'",
            "the disconnected device shown offline",
            timeout=25,
        )

        await browser.type("input[name=q]", "上海")
        await browser.wait_for(
            "document.querySelectorAll('.devices tbody tr').length === 2", "two devices in 上海"
        )
        await browser.run(
            lambda: (
                browser.driver.find_element("css selector", "select[name=online]")
                .find_element("css selector", "option[value=true]")
                .click()
            )
        )
        await browser.wait_for(
            "document.querySelectorAll('.devices tbody tr').length === 1", "one online in 上海"
        )
        assert "online=true" in await browser.script("return location.hash")
    finally:
        await close_all(devices)


@pytest_twisted.ensureDeferred
async def test_devices_page_pages_through_the_fleet(gateway_factory, browser):
    gateway = await gateway_factory()
    for n in range(60):
        await gateway.register(f"大楼{n:02}号")
    await browser.open(f"{gateway.base}/console/#/devices")
    await browser.wait_text("[aria-live=polite]", "50 devices shown")
    await browser.click("button.more")
    await browser.wait_text("[aria-live=polite]", "60 devices shown.")
    assert await browser.script("return document.querySelector('button.more').hidden") is True


@pytest_twisted.ensureDeferred
async def test_device_page_takes_a_snapshot_and_sends_a_command(gateway_factory, browser, shots):
    gateway = await gateway_factory(api_key=API_KEY)
    registered, devices = await fleet(gateway, ["上海中心01号 A座"], connected=1)
    device_id = registered[0]["device_id"]
    devices[0].connection.send(
        {
            "type": "log",
            "device_id": device_id,
            "payload": {"level": "info", "msg": "屏幕亮度 80%"},
        }
    )
    try:
        await sign_in(browser, gateway, page=f"#/device/{device_id}")
        await browser.wait_text("h1", "上海中心01号 A座")
        await browser.wait_text("h1 .badge", "online")
        await browser.wait_text(".logs", "屏幕亮度 80%")
        await browser.wait_text(".panel .facts", "Connects")

        await browser.click(".panel button[type=button]:not(.warn)")  # Take snapshot
        await browser.wait_for(
            "[...document.querySelectorAll('.gallery img')]"
            ".some(i => i.src.startsWith('blob:') && i.complete && i.naturalWidth === 64)",
            "the new snapshot shown",
        )
        assert [c["payload"] for c in devices[0].commands] == ["snapshot"]

        await browser.type("input[name=command]", "SET_VOLUME")
        await browser.type("textarea[name=data]", '{"volume": 3}')
        await browser.type("input[name=wait]", "5")
        await browser.click(".command-form button[type=submit]")
        shown = await browser.wait_text(".command-form + div", "acked")
        sent = devices[0].commands[-1]
        assert sent["payload"] == "SET_VOLUME" and sent["data"] == {"volume": 3}
        assert sent["id"] in shown and '{"done":"SET_VOLUME"}' in shown
        await browser.wait_text(".state-acked", "acked")
        await browser.screenshot(shots / "device.png")
    finally:
        await close_all(devices)


@pytest_twisted.ensureDeferred
async def test_rotating_the_token_shows_the_new_one_once_and_revoking_leaves(
    gateway_factory, browser
):
    gateway = await gateway_factory(api_key=API_KEY)
    registered, _ = await fleet(gateway, ["深圳湾05号"], connected=0)
    device_id = registered[0]["device_id"]
    await sign_in(browser, gateway, page=f"#/device/{device_id}")
    await browser.wait_text("h1", "深圳湾05号")
    await browser.click(".danger button.warn")
    await browser.click(".danger .question ~ button.warn")
    token = await browser.text_of(".token-box code")
    assert token and token != registered[0]["token"]
    connection = await connect_device(gateway.ws_port, device_id, token)
    await connection.close()

    buttons = ".danger > span:nth-of-type(2) button.warn"
    await browser.click(buttons)
    await browser.click(".danger .question ~ button.warn")
    await browser.wait_text("h1", "Devices")
    status, _ = await gateway.call("GET", f"/api/v1/devices/{device_id}")
    assert status == 404


@pytest_twisted.ensureDeferred
async def test_fleet_page_shows_counts_health_and_the_chart(gateway_factory, browser, shots):
    gateway = await gateway_factory(api_key=API_KEY)
    gateway.service.node_status.tick = 0.05
    gateway.service.node_status.sample_every = 0.25  # "minutes" of a quarter second
    registered, _ = await fleet(gateway, [f"商场{n}号" for n in range(6)], connected=0)
    devices = []
    try:
        # A morning in fast motion for the chart: devices come, one drops out, two return.
        for step, creds in enumerate(registered + registered[:2]):
            if step == 6:
                await devices.pop(0).close()
            if len(devices) < 6 and creds["device_id"] not in [d.device_id for d in devices]:
                connection = await connect_device(
                    gateway.ws_port, creds["device_id"], creds["token"]
                )
                devices.append(Firmware(connection, creds["device_id"]))
            await deferLater(reactor, 0.3, lambda: None)
        await sign_in(browser, gateway, page="#/fleet")
        await browser.wait_text("h1", "Fleet")
        await browser.wait_text(".facts", "sqlite: answering")
        await browser.wait_text(".facts", "Reactor lag")
        await browser.wait_for("document.querySelector('svg.chart polyline')", "the online chart")
        await browser.wait_text(".figure.online .value", str(len(devices)))
        await browser.wait_text(".figure.devices .value", "6")
        await browser.wait_text(".panel", "Top flapping devices")
        await browser.screenshot(shots / "fleet.png")
    finally:
        await close_all(devices)


@pytest_twisted.ensureDeferred
async def test_console_is_usable_on_a_phone(gateway_factory, browser, shots):
    gateway = await gateway_factory()
    for n in range(8):
        await gateway.register(f"写字楼{n:02}号")
    await browser.size(PHONE)
    await browser.open(f"{gateway.base}/console/#/devices")
    await browser.wait_text("[aria-live=polite]", "8 devices shown")
    overflow = await browser.script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, "the devices page scrolls sideways on a phone"
    await browser.screenshot(shots / "devices-phone.png")
    await browser.click(".devices tbody a")
    await browser.wait_text("h1", "写字楼00号")
    await browser.wait_text(".logs, .panel", "No logs.")
    overflow = await browser.script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, "the device page scrolls sideways on a phone"
    await browser.screenshot(shots / "device-phone.png")


RECORD_STREAM_STATES = """
window.streamStates = [];
const live = document.getElementById('live');
new MutationObserver(() => window.streamStates.push(live.dataset.state))
    .observe(live, {attributes: true, childList: true});
"""


@pytest_twisted.ensureDeferred
async def test_a_dropped_stream_says_so_and_resumes_without_losing_events(
    gateway_factory, browser
):
    gateway = await gateway_factory(api_key=API_KEY)
    registered, devices = await fleet(gateway, ["上海中心01号", "上海中心02号"], connected=1)
    gone, late = registered[0]["device_id"], registered[1]["device_id"]
    try:
        await sign_in(browser, gateway)
        await browser.wait_text("#live", "Live")
        await browser.wait_text(".devices tbody", gone)
        # An entry seen before the drop gives the console a Last-Event-ID to resume from.
        connection = await connect_device(gateway.ws_port, late, registered[1]["token"])
        devices.append(Firmware(connection, late))
        await browser.wait_for(
            f"document.querySelector('tr[data-device=\"{late}\"] .state').textContent === 'online'",
            "the late device shown online",
        )
        await browser.script(RECORD_STREAM_STATES)
        for subscription in list(gateway.service.event_log._live):
            subscription.close("gone")  # the gateway ends the stream, as a proxy cutting it would
        await browser.wait_for(
            "window.streamStates.includes('disconnected')", "the header saying so", timeout=5
        )
        await devices[0].close()  # while the console waits to reconnect
        await browser.wait_text("#live", "Live")
        await browser.wait_for(
            f"document.querySelector('tr[data-device=\"{gone}\"] .state').textContent === 'offline'",
            "the offline event missed while disconnected, delivered on resume",
            timeout=10,
        )
    finally:
        await close_all(devices)


@pytest_twisted.ensureDeferred
async def test_a_stream_dropped_before_any_event_reloads_the_page(gateway_factory, browser):
    """Nothing to resume from: the console reloads what it shows once it is back."""
    gateway = await gateway_factory()
    registered, devices = await fleet(gateway, ["上海中心01号"], connected=1)
    gone = registered[0]["device_id"]
    try:
        await browser.open(f"{gateway.base}/console/#/devices")
        await browser.wait_text("#live", "Live")
        await browser.wait_text(".devices tbody", "online")
        for subscription in list(gateway.service.event_log._live):
            subscription.close("gone")
        await devices[0].close()
        await browser.wait_for(
            f"document.querySelector('tr[data-device=\"{gone}\"] .state').textContent === 'offline'",
            "the device shown offline after the reload",
            timeout=10,
        )
    finally:
        await close_all(devices)


@pytest_twisted.ensureDeferred
async def test_a_stopped_gateway_shows_the_stream_disconnected(gateway_factory, browser):
    gateway = await gateway_factory()
    await browser.open(f"{gateway.base}/console/#/fleet")
    await browser.wait_text("#live", "Live")
    await gateway.service.stopService()
    text = await browser.wait_text("#live", "Disconnected", timeout=10)
    assert "retrying in" in text


@pytest_twisted.ensureDeferred
async def test_without_an_event_log_the_console_says_so_and_polls(gateway_factory, browser):
    gateway = await gateway_factory(event_log=False)
    registered, devices = await fleet(gateway, ["北京国贸03号"], connected=1)
    device_id = registered[0]["device_id"]
    try:
        await browser.open(f"{gateway.base}/console/#/device/{device_id}")
        await browser.wait_text("#live", "No live stream")
        await browser.wait_text("h1 .badge", "online")
        await browser.wait_text(".panel", "Snapshots taken here appear below.")
    finally:
        await close_all(devices)


@pytest_twisted.ensureDeferred
async def test_fleet_page_follows_devices_going_offline(gateway_factory, browser):
    gateway = await gateway_factory()
    _, devices = await fleet(gateway, [f"商场{n}号" for n in range(3)], connected=3)
    try:
        await browser.open(f"{gateway.base}/console/#/fleet")
        await browser.wait_text("#live", "Live")
        await browser.wait_text(".figure.online .value", "3")
        await devices[2].close()
        await browser.wait_text(".figure.online .value", "2", timeout=10)
    finally:
        await close_all(devices[:2])


@pytest_twisted.ensureDeferred
async def test_a_sparse_filter_fills_the_page_over_several_requests(
    gateway_factory, browser, monkeypatch
):
    """The gateway answers short pages (each request examines little); the console asks on."""
    from elevgw.north import device_pages

    monkeypatch.setattr(device_pages, "STORE_CHUNK", 10)
    monkeypatch.setattr(device_pages, "MAX_STORE_CALLS", 1)
    gateway = await gateway_factory()
    registered = [await gateway.register(f"楼{n:02}") for n in range(45)]
    wanted = registered[37]
    connection = await connect_device(gateway.ws_port, wanted["device_id"], wanted["token"])
    try:
        await browser.open(f"{gateway.base}/console/#/devices?online=true")
        await browser.wait_text("[aria-live=polite]", "1 device shown.")
        rows = await browser.script(
            "return [...document.querySelectorAll('.devices tbody tr')].map(r => r.dataset.device)"
        )
        assert rows == [wanted["device_id"]]
    finally:
        await connection.close()


@pytest_twisted.ensureDeferred
async def test_commands_queue_for_an_offline_device_cancel_and_follow_delivery_live(
    gateway_factory, browser
):
    gateway = await gateway_factory()
    registered, _ = await fleet(gateway, ["深圳湾06号"], connected=0)
    creds = registered[0]
    await browser.open(f"{gateway.base}/console/#/device/{creds['device_id']}")
    await browser.wait_text("h1 .badge", "offline")

    async def queue(command: str) -> None:
        await browser.type("input[name=command]", command)
        await browser.type("input[name=ttl]", "300")
        await browser.click(".command-form button[type=submit]")
        await browser.wait_text(".command-form + div", "queued")

    await queue("SHOW_AD")
    await queue("REBOOT")
    await browser.wait_for(
        "document.querySelectorAll('.state-queued').length === 2", "two queued commands"
    )
    await browser.run(
        lambda: [
            row.find_element("css selector", "button").click()
            for row in browser.driver.find_elements("css selector", "tr")
            if "REBOOT" in row.text
        ]
    )
    await browser.wait_text(".state-canceled", "canceled")

    connection = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    device = Firmware(connection, creds["device_id"])
    try:
        await browser.wait_text(".state-acked", "acked", timeout=10)  # live, no reload
        assert [c["payload"] for c in device.commands] == ["SHOW_AD"]
    finally:
        await device.close()
