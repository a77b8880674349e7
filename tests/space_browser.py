"""Serve the Space demo as its own process and drive its page in headless Chromium (Selenium + chromedriver).

Chromium comes from Debian (`apt-get install chromium chromium-driver`, which installs a matching chromedriver);
Selenium is pointed at both executables, so it never downloads a browser or driver. `browser_unavailable()` says
why the browser tests cannot run on a machine, or None when they can.

Used by `tests/test_space_browser.py` (on a tiny model) and `scripts/space_screenshot.py` (the README
screenshot, on the embedded SmolLM2).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SPACE_APP = ROOT / "spaces" / "alphaedit-demo" / "app.py"
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1280,2300")


def _executables() -> tuple[str | None, str | None]:
    browser = next((path for name in CHROMIUM_CANDIDATES if (path := shutil.which(name))), None)
    return browser, shutil.which("chromedriver")


def browser_unavailable() -> str | None:
    """Why the page cannot be driven here (a sentence for pytest's skip reason), or None when it can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium; it is in the dev extra)"
    browser, driver = _executables()
    if browser is None or driver is None:
        missing = " and ".join(name for name, path in (("chromium", browser), ("chromedriver", driver)) if not path)
        return f"{missing} not found on PATH (Debian: apt-get install -y chromium chromium-driver)"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served_demo(command: Sequence[str], port: int, log_file: Path, *, startup_seconds: float = 600,
                env: dict[str, str] | None = None) -> Iterator[str]:
    """Run `command` (which must serve the demo on 127.0.0.1:`port`) until the page answers; yields its URL.

    The process's output goes to `log_file` (quoted in the error if it exits or never answers); it is stopped
    when the block ends.
    """
    url = f"http://127.0.0.1:{port}/"
    environment = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT), **(env or {})}
    with open(log_file, "w", encoding="utf-8") as log:
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=ROOT)
    try:
        deadline = time.monotonic() + startup_seconds
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the demo exited with status {process.returncode} before serving:\n"
                                   f"{log_file.read_text(encoding='utf-8')[-4000:]}")
            try:
                with urllib.request.urlopen(url + "config", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the demo did not answer on {url} within {startup_seconds:.0f} s:\n"
                                   f"{log_file.read_text(encoding='utf-8')[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def demo_command(*flags: str, port: int) -> list[str]:
    """`python spaces/alphaedit-demo/app.py` (the Space's own entry point) with `flags` and the port."""
    return [sys.executable, str(SPACE_APP), "--host", "127.0.0.1", "--port", str(port), *flags]


@contextlib.contextmanager
def headless_chromium() -> Iterator[Any]:
    """A Selenium driver of headless Chromium with a fresh profile (removed afterwards)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = _executables()
    profile = tempfile.mkdtemp(prefix="alphaedit-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


class DemoPage:
    """The demo's page in a browser, addressed by the components' `elem_id`s."""

    def __init__(self, driver: Any, url: str, timeout: float = 120) -> None:
        self.driver = driver
        self.url = url
        self.timeout = timeout

    def open(self) -> None:
        self.driver.get(self.url)
        self.wait_for(lambda: self._element("#prompt textarea") is not None, "the page to render its form")

    def fill(self, **values: str) -> None:
        """Set text fields (by elem_id) the way typing does: the value, then an `input` event."""
        for elem_id, text in values.items():
            field = self.driver.find_element("css selector", f"#{elem_id} textarea, #{elem_id} input")
            self.driver.execute_script(
                "arguments[0].value = arguments[1];"
                "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));", field, text)

    def click(self, elem_id: str) -> None:
        self.driver.find_element("id", elem_id).click()

    def text(self, elem_id: str) -> str:
        return self.driver.find_element("id", elem_id).text

    def value(self, elem_id: str) -> str:
        return self.driver.find_element("css selector", f"#{elem_id} textarea, #{elem_id} input").get_attribute(
            "value")

    def table(self, elem_id: str) -> list[list[str]]:
        """The body rows of a Dataframe component, as cell texts."""
        return self.driver.execute_script(
            "return Array.from(document.querySelectorAll('#' + arguments[0] + ' [role=row].virtual-row'))"
            ".map(row => Array.from(row.querySelectorAll('[role=gridcell]')).map(cell => cell.textContent.trim()));",
            elem_id)

    def toasts(self) -> list[str]:
        """The texts of the error / info messages shown at the top of the page."""
        return [toast.text for toast in self.driver.find_elements("css selector", "[data-testid='toast-body']")]

    def wait_for(self, condition: Callable[[], Any], what: str) -> Any:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                result = condition()
                if result:
                    return result
            time.sleep(0.25)
        raise AssertionError(f"waited {self.timeout:.0f} s for {what}; the page says:\n{self.text_of_page()[-3000:]}")

    def text_of_page(self) -> str:
        return self.driver.find_element("tag name", "body").text

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))

    def _element(self, selector: str) -> Any:
        found = self.driver.find_elements("css selector", selector)
        return found[0] if found else None
