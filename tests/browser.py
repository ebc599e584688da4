"""A real headless browser for page tests: Debian's Chromium, installed with apt-get on a
machine (such as CI, which runs as root) that does not have it yet."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL = "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium"
NO_INSTALL_ENV = "TDATUNE_NO_BROWSER_INSTALL"


def find_browser() -> str | None:
    """The first Chromium-like browser on PATH."""
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def browser_or_skip() -> str:
    """A headless-capable Chromium, installed when missing and possible; else a skip that says
    why no browser could be had."""
    found = find_browser()
    if found:
        return found
    if os.environ.get(NO_INSTALL_ENV):
        pytest.skip(f"no Chromium on PATH and ${NO_INSTALL_ENV} forbids installing it")
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("no Chromium on PATH, and it cannot be installed here (needs apt-get as "
                    f"root): run `{INSTALL}` as root to run this test")
    run = subprocess.run(["bash", "-c", INSTALL], capture_output=True, text=True, timeout=1200)
    found = find_browser()
    if not found:
        pytest.skip(f"Chromium could not be installed (apt-get exit {run.returncode}): "
                    f"{run.stderr.strip()[-300:]}")
    return found


def headless(browser: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run the browser headless (no sandbox: tests may run as root) with ``args``."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--hide-scrollbars", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def dump_dom(browser: str, page: Path) -> str:
    """The page's DOM after its load handlers ran."""
    run = headless(browser, "--virtual-time-budget=5000", "--dump-dom", page.as_uri())
    if run.returncode != 0:
        raise AssertionError(f"{browser} --dump-dom failed: {run.stderr[-500:]}")
    return run.stdout


def screenshot(browser: str, page: Path, png: Path, size: str = "1400,1800") -> Path:
    """A PNG screenshot of the page."""
    run = headless(browser, f"--window-size={size}", f"--screenshot={png}", page.as_uri())
    if not png.exists():
        raise AssertionError(f"{browser} --screenshot wrote nothing: {run.stderr[-500:]}")
    return png
