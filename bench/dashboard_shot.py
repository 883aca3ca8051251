"""A screenshot of the dashboard's job page while a short fleet runs (the picture in docs/api.md, "Dashboard").

    python bench/dashboard_shot.py [OUT.png] [--clients 6] [--rounds 20] [--after 8]

starts a fleet on this machine (broker, server on SQLite, edge clients on the shipped MNIST subset), opens
``http://127.0.0.1:<port>/#/jobs/<job>`` in headless Chromium once ``--after`` rounds have closed, writes a
full-page PNG to OUT.png (default docs/dashboard.png) and stops everything. Needs Debian's ``chromium`` and
``chromium-driver`` (/usr/bin/chromium, /usr/bin/chromedriver) and the ``selenium`` package (the dev extra).
"""

from __future__ import annotations

import argparse
import base64
import math
import sys
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server_api.devfleet.fleet import Fleet, FleetConfig  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BROWSER_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")
WIDTH = 1400


def browser(profile: Path) -> webdriver.Chrome:
    options = Options()
    options.binary_location = CHROMIUM
    for arg in (*BROWSER_ARGS, f"--user-data-dir={profile}", f"--window-size={WIDTH},1000"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def closed_rounds(fleet: Fleet) -> int:
    try:
        return sum(1 for r in fleet.rounds() if r["status"] == "closed")
    except OSError:
        return 0


def wait_rounds(fleet: Fleet, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while closed_rounds(fleet) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} rounds did not close within {timeout:.0f} s (workdir {fleet.workdir})")
        time.sleep(1.0)


def shoot(url: str, out: Path, profile: Path) -> None:
    """Open `url`, wait for the page to show data, and save a full-page screenshot to `out`."""
    driver = browser(profile)
    try:
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(
            "return document.body.dataset.state === 'ready' && "
            "Number(document.getElementById('chart-accuracy').dataset.points) > 0"))
        time.sleep(1.0)  # let the progress bar's transition finish
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(full_page_png(driver))
    finally:
        driver.quit()


def full_page_png(driver: webdriver.Chrome) -> bytes:
    """The whole page (not only the window) as PNG, through the DevTools protocol."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    width, height = WIDTH, math.ceil(size["height"])
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    return base64.b64decode(shot["data"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=REPO / "docs" / "dashboard.png")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--after", type=int, default=8, help="closed rounds before the screenshot")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fedgen-dashboard-shot-"))
    fleet = Fleet(FleetConfig(clients=args.clients, active=max(2, args.clients - 2), rounds=args.rounds,
                              algorithm="fedgen", alpha=0.3, samples_per_class=200, local_steps=10, seed=7,
                              round_timeout_s=60, progress=False, workdir=work / "fleet"))
    try:
        fleet.start_broker()
        fleet.start_server()
        fleet.request("POST", "/jobs", fleet.cfg.job_config())
        for index in range(args.clients):
            fleet.start_client(index)
        wait_rounds(fleet, args.after, args.timeout)
        shoot(f"{fleet.api}/#/jobs/{fleet.job_id}", args.out, work / "chromium-profile")
    finally:
        fleet.stop()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
