"""Headless Chromium for the report tests: Debian's ``chromium`` and ``chromium-driver`` driven by Selenium.

``scripts/install-browser.sh`` installs both (CI runs it as root). Without them the browser tests skip, unless
``DAY0_REQUIRE_BROWSER=1`` (set by .ci/run after the install), where a missing browser fails them instead.

The browser runs with every network route dead (a proxy on a closed loopback port, no name resolution), and
``offline_violations`` lists what the page tried to fetch from anywhere but itself, plus the console's errors
(a Content-Security-Policy refusal is one): a report that needs the network fails its test, it does not
quietly work online only.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = ("/usr/bin/chromedriver",)
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:", "chrome:", "devtools:")
SCREENSHOTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "browser"


def _first(paths: tuple[str, ...]) -> str | None:
    return next((p for p in paths if Path(p).is_file()), None)


def require_browser() -> tuple[str, str]:
    """(chromium, chromedriver), or skip (fail under DAY0_REQUIRE_BROWSER=1) naming what is missing."""
    binary, driver = _first(CHROMIUM), _first(CHROMEDRIVER) or shutil.which("chromedriver")
    missing = [n for n, p in (("chromium", binary), ("chromium-driver", driver)) if p is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip: the [dev] extra)")
    if missing:
        why = f"no headless browser: {', '.join(missing)} missing (scripts/install-browser.sh installs them)"
        if os.environ.get("DAY0_REQUIRE_BROWSER") == "1":
            pytest.fail(why)
        pytest.skip(why)
    assert binary is not None and driver is not None
    return binary, driver


@contextmanager
def browser(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = require_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--window-size={width},{height}", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                # every route off this machine is dead: a page that needs the network shows it at once
                "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
                "--host-resolver-rules=MAP * ~NOTFOUND"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    drv = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield drv
    finally:
        drv.quit()


def offline_violations(drv: Any) -> list[str]:
    """Requests the page sent anywhere but itself (file:, data:, blob:), then the console's errors (a CSP
    refusal, a script error). Reads and clears the logs: call once after the page has done its work."""
    found = []
    for entry in drv.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if not url.startswith(LOCAL_SCHEMES):
                found.append(f"request: {url}")
    found += [f"console: {e['message']}" for e in drv.get_log("browser") if e.get("level") == "SEVERE"]
    return found


def wait_for_flips(drv: Any, timeout_s: float = 60) -> str:
    """Until the flip viewer has read its data (or said why not); returns its state."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(drv, timeout_s, poll_frequency=0.05).until(
        lambda d: d.find_element(By.ID, "flip-status").get_attribute("data-state") != "loading")
    return str(drv.find_element(By.ID, "flip-status").get_attribute("data-state"))


def screenshot(drv: Any, name: str, element_id: str | None = None) -> Path:
    """A PNG under bench/results/browser/ (ignored by git; CI keeps it as an artifact), scrolled to an element."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    if element_id:
        drv.execute_script(f"document.getElementById({element_id!r}).scrollIntoView()")
    path = SCREENSHOTS / f"{name}.png"
    drv.save_screenshot(str(path))
    return path
