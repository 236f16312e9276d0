"""Headless Chromium for the explain page: open it with no network, read the console, take a screenshot.

Needs the ``explain`` extra (Selenium) and Debian's ``chromium`` and ``chromium-driver`` packages (or any
Chromium with a matching chromedriver, named by ``CHROMIUM`` and ``CHROMEDRIVER``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def chromium_paths() -> tuple[str, str] | None:
    """``(chromium, chromedriver)`` when both are installed, else None."""
    browser = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not browser or not driver or not Path(browser).exists() or not Path(driver).exists():
        return None
    return browser, driver


@contextmanager
def chromium(width: int = 1400, height: int = 1800) -> Iterator[Any]:
    """A headless Chromium WebDriver with a fresh profile, browser console logs kept; quit on exit.

    Raises:
        RuntimeError: Chromium, chromedriver or Selenium is missing (the message says how to install).
    """
    paths = chromium_paths()
    if paths is None:
        raise RuntimeError(
            "headless Chromium not found: install Debian's chromium and chromium-driver "
            "(apt-get install -y chromium chromium-driver) or set CHROMIUM and CHROMEDRIVER"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        raise RuntimeError("screenshots need Selenium: pip install 'attn-rerank[explain]'") from exc
    profile = tempfile.mkdtemp(prefix="attn-rerank-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = paths[0]
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(paths[1]), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_ready(driver: Any, timeout: float = 20.0) -> None:
    """Wait until the page's script has built the page (``body[data-ready]``)."""
    from selenium.webdriver.support.ui import WebDriverWait

    ready = "return !!document.body.dataset.ready"
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(ready))


def screenshot(html_path: str | Path, png_path: str | Path, *, width: int = 1400, height: int = 1800) -> Path:
    """Open ``html_path`` in headless Chromium; save a ``width`` x ``height`` screenshot to ``png_path``."""
    png = Path(png_path)
    with chromium(width, height) as driver:
        driver.get(Path(html_path).resolve().as_uri())
        wait_ready(driver)
        driver.save_screenshot(str(png))
    return png
