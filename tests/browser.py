"""A real headless Chromium for console tests, driven by Selenium and Debian's chromedriver.

A test module that wants the ``browser`` fixture says ``pytest_plugins = ["browser"]``.

Selenium's calls block until the browser answers, and the gateway under test runs on this
process's reactor: every browser call therefore runs on a thread (``await browser.run(...)``)
so the reactor keeps serving the pages the browser asks for meanwhile.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from twisted.internet.threads import deferToThread

DESKTOP = (1280, 900)
PHONE = (390, 844)


def find_chromium() -> tuple[str, str]:
    """Paths of Chromium and its driver; CI installs both (Debian ``chromium``,
    ``chromium-driver``), so a missing one is an error, not a reason to skip."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        raise RuntimeError(
            "console tests need Chromium and chromedriver: apt-get install chromium chromium-driver"
        )
    return browser, driver


def start_chromium() -> webdriver.Chrome:
    browser, driver = find_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
        "--no-first-run",
        "--force-device-scale-factor=1",
        "--lang=en-US",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


class Browser:
    """Async helpers around one Chromium; see the module docstring for why threads."""

    def __init__(self, driver: webdriver.Chrome) -> None:
        self.driver = driver

    def run(self, function, *args) -> Any:
        return deferToThread(function, *args)

    async def open(self, url: str) -> None:
        await self.run(self.driver.get, url)

    async def size(self, width_height: tuple[int, int]) -> None:
        await self.run(self.driver.set_window_size, *width_height)

    async def script(self, source: str, *args) -> Any:
        return await self.run(self.driver.execute_script, source, *args)

    def _wait(self, check, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                found = check()
            except (StaleElementReferenceException, WebDriverException) as e:
                found, last_error = None, e
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(
            f"timed out after {timeout} s waiting for {what}"
            + (f" (last error: {last_error})" if last_error else "")
            + f"\nconsole log: {self.console_log()}"
        )

    def console_log(self) -> list:
        try:
            return [entry["message"] for entry in self.driver.get_log("browser")]
        except WebDriverException:
            return []

    async def element(self, css: str, timeout: float = 15.0):
        """The first visible element matching ``css``, once there is one."""

        def check():
            for element in self.driver.find_elements(By.CSS_SELECTOR, css):
                if element.is_displayed():
                    return element
            return None

        return await self.run(self._wait, check, timeout, f"a visible {css!r}")

    async def text_of(self, css: str) -> str:
        return (await self.element(css)).text

    async def wait_text(self, css: str, text: str, timeout: float = 15.0) -> str:
        """Waits until an element matching ``css`` contains ``text``; returns its text."""

        def check():
            for element in self.driver.find_elements(By.CSS_SELECTOR, css):
                if text in element.text:
                    return element.text
            return None

        return await self.run(self._wait, check, timeout, f"{text!r} in {css!r}")

    async def wait_for(self, source: str, what: str, timeout: float = 15.0) -> Any:
        """Waits until the JavaScript expression ``source`` is truthy; returns its value."""

        def check():
            return self.driver.execute_script("return " + source)

        return await self.run(self._wait, check, timeout, what)

    async def click(self, css: str) -> None:
        element = await self.element(css)
        await self.run(element.click)

    async def type(self, css: str, text: str, clear: bool = True) -> None:
        element = await self.element(css)
        if clear:
            await self.run(element.clear)
        await self.run(element.send_keys, text)

    async def screenshot(self, path: Path) -> None:
        """A PNG of the viewport (the whole page, up to 2,400 px tall)."""
        height = await self.script("return Math.min(2400, document.documentElement.scrollHeight)")
        width = self.driver.get_window_size()["width"]
        await self.run(self.driver.set_window_size, width, max(height + 140, 400))
        path.parent.mkdir(parents=True, exist_ok=True)
        await self.run(self.driver.save_screenshot, str(path))


@pytest.fixture(scope="module")
def chromium():
    driver = start_chromium()
    yield driver
    driver.quit()


@pytest.fixture
def browser(chromium):
    """A ``Browser`` on a blank page at desktop size, with nothing left from the last test."""
    chromium.delete_all_cookies()
    chromium.set_window_size(*DESKTOP)
    yield Browser(chromium)
    chromium.execute_script("try { sessionStorage.clear() } catch (e) {}")
    chromium.get("about:blank")
