"""The dashboard in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by
selenium.

* Against a running fleet (real broker, server and edge clients): the job page's round counter advances while
  the job runs, the curves and the heatmap fill, the clients table lists the devices, the page is read-only
  without the token and pauses the job with it, and no request of the page leaves 127.0.0.1.
* Against a server on seeded hostile data: text from devices (client ids, reasons, device facts) is shown as
  text, never run as HTML; the jobs list links to the job page; a bad job id in the URL is refused.

Skipped when chromium, chromedriver or selenium are missing, unless ``FEDGEN_REQUIRE_BROWSER=1`` (CI).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from raw_fleet import start_job

from server_api.devfleet.fleet import Fleet, FleetConfig

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REQUIRE_ENV = "FEDGEN_REQUIRE_BROWSER"
BROWSER_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1600")
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install -e '.[dev]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (path.exists() and os.access(path, os.X_OK)):
            return f"{path} not found (apt-get install {package})"
    return None


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium with a throw-away profile; its performance log records every request."""
    reason = _missing()
    if reason is not None:
        if os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in (*BROWSER_ARGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


# ------------------------------------------------------------------------------------------------- helpers
def until(driver: Any, condition: Callable[[Any], Any], timeout: float, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition, message=f"{what} within {timeout} s")


def attr(driver: Any, css: str, name: str) -> str:
    return str(driver.execute_script("const e = document.querySelector(arguments[0]);"
                                     "return e ? e.getAttribute(arguments[1]) : null;", css, name))


def number(driver: Any, css: str, name: str) -> int:
    value = attr(driver, css, name)
    return int(value) if value.lstrip("-").isdigit() else -2


def requested_urls(driver: Any) -> list[str]:
    """Every URL the page asked for: the DevTools performance log and the page's resource timing."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    urls += driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return urls


def assert_all_local(urls: list[str]) -> None:
    """Every network request went to this machine; the rest are the browser's own (data:, about:, chrome:)."""
    network = [u for u in urls if urlsplit(u).scheme not in ("data", "about", "blob", "chrome")]
    assert any(urlsplit(u).path.endswith("/dashboard.js") for u in network), network  # the log saw the page
    foreign = [u for u in network
               if urlsplit(u).scheme not in ("http", "ws") or urlsplit(u).hostname not in LOCAL_HOSTS]
    assert not foreign, f"requests left localhost: {foreign}"


def open_page(driver: Any, url: str) -> None:
    """Load `url` on a fresh log: the browser's start page (chrome://new-tab-page) is not the dashboard's."""
    driver.get("about:blank")
    driver.get_log("performance")
    driver.get(url)


def console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def text_of(driver: Any, css: str) -> str:
    return str(driver.execute_script("return document.querySelector(arguments[0]).textContent", css))


def use_token(driver: Any, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "token-input")
    field.clear()
    field.send_keys(value)
    driver.find_element(By.ID, "token-save").click()


# ------------------------------------------------------------------------------------------------- the fleet
@pytest.mark.slow
def test_the_job_page_follows_a_running_fleet(fleet_maker: Callable[[FleetConfig], Fleet], browser: Any) -> None:
    from selenium.webdriver.common.by import By

    fleet = fleet_maker(FleetConfig(clients=2, active=2, rounds=40, alpha=1.0, samples_per_class=50, local_steps=2,
                                    seed=11, round_timeout_s=60, algorithm="fedgen", progress=False))
    config = fleet.cfg.job_config()
    config["algorithm"]["generator_steps"] = 2  # short rounds: the test watches several of them
    start_job(fleet, config)
    open_page(browser, f"{fleet.api}/#/jobs/{fleet.job_id}")
    until(browser, lambda d: number(d, "#round-counter", "data-round") >= 1, 240, "round 1 shown")
    first = number(browser, "#round-counter", "data-round")
    assert fleet.request("GET", f"/jobs/{fleet.job_id}")["status"] == "running"
    until(browser, lambda d: number(d, "#round-counter", "data-round") > first, 120, "the round counter advanced")
    until(browser, lambda d: number(d, "#chart-accuracy", "data-points") >= 2, 120, "accuracy points")
    assert fleet.request("GET", f"/jobs/{fleet.job_id}")["status"] == "running"  # it advanced while running
    for chart in ("loss", "bytes", "generator"):
        assert number(browser, f"#chart-{chart}", "data-points") >= 1, chart
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-accuracy path.series")
    until(browser, lambda d: number(d, "#heatmap", "data-cells") == 20, 60, "a heatmap row per client")
    rows = browser.find_elements(By.CSS_SELECTOR, "#clients-body tr")
    assert sorted(r.get_attribute("data-client") for r in rows) == ["c0", "c1"]
    assert all("torch" in r.text and "online" in r.text and "cnn" in r.text for r in rows), [r.text for r in rows]
    assert text_of(browser, "#job-status") == "running"

    # read-only without the token; a wrong one is refused; the right one pauses the job
    controls = browser.find_elements(By.CSS_SELECTOR, "button.control")
    assert controls and all(not b.is_enabled() for b in controls)
    use_token(browser, "not-the-token")
    browser.find_element(By.CSS_SELECTOR, "button[data-action=pause]").click()
    until(browser, lambda d: "refused" in text_of(d, "#control-msg"), 20, "the wrong token refused")
    assert fleet.request("GET", f"/jobs/{fleet.job_id}")["status"] == "running"
    use_token(browser, fleet.token)
    browser.find_element(By.CSS_SELECTOR, "button[data-action=pause]").click()
    until(browser, lambda d: text_of(d, "#job-status") == "paused", 20,
          f"the page shows the job paused ({text_of(browser, '#control-msg')!r})")
    assert fleet.request("GET", f"/jobs/{fleet.job_id}")["status"] == "paused"
    assert browser.find_element(By.CSS_SELECTOR, "button[data-action=resume]").is_enabled()
    assert fleet.token not in browser.current_url

    assert_all_local(requested_urls(browser))
    errors = [e for e in console_errors(browser) if "/pause" not in e]  # the refused pause logs its 401
    assert not errors, errors


# ------------------------------------------------------------------------------------------------- hostile text
HOSTILE_ID = '<img src=x onerror="window.__pwned=1">'
HOSTILE_REASON = "<script>window.__pwned=2</script>"
HOSTILE_RUNTIME = "<b onmouseover=window.__pwned=3>torch</b>"


@pytest.fixture
def seeded_server(tmp_path: Path) -> Iterator[str]:
    """A server (uvicorn, in this process) on a SQLite database with hostile strings in it; its base URL."""
    import uvicorn

    from server_api.api.app import create_app
    from server_api.db import (
        Client,
        ClientUpdate,
        Job,
        Round,
        make_engine,
        make_session_factory,
        upgrade_schema,
        utcnow,
    )
    from server_api.db.store import ArtifactStore
    from server_api.settings import ServerSettings
    from shared.protocol.codec import convert
    from shared.protocol.job import JobConfig

    url = f"sqlite:///{tmp_path / 'dash.db'}"
    upgrade_schema(url)
    engine = make_engine(url, sqlite_begin="DEFERRED")
    factory = make_session_factory(engine)
    now = utcnow()
    cfg = convert(JobConfig, {"id": "hostile-job", "dataset": "mnist-subset", "rounds": 3, "active": 2}, "job")
    with factory.begin() as s:
        s.add(Job(id="hostile-job", config=cfg.stored_config(), status="running", current_round=0))
        s.flush()
        rnd = Round(job_id="hostile-job", index=0, attempt=0, status="open", selected=[HOSTILE_ID, "c1"],
                    deadline=now + timedelta(seconds=90))
        s.add(rnd)
        s.add_all([Client(job_id="hostile-job", client_id=HOSTILE_ID, device_info={"runtime": HOSTILE_RUNTIME}),
                   Client(job_id="hostile-job", client_id="c1", device_info={"runtime": "lite", "lite": "1"})])
        s.flush()
        s.add_all([ClientUpdate(job_id="hostile-job", round_id=rnd.id, client_id=HOSTILE_ID, idempotency_key="k1",
                                base_version=0, num_samples=0, label_counts=[], metrics={}, status="rejected",
                                reason=HOSTILE_REASON),
                   ClientUpdate(job_id="hostile-job", round_id=rnd.id, client_id="c1", idempotency_key="k2",
                                base_version=0, num_samples=30, label_counts=[10, 0, 20], metrics={},
                                status="accepted")])
    settings = ServerSettings(database_url=url, admin_token="seeded-token", artifact_dir=tmp_path / "artifacts")
    app = create_app(settings, factory, ArtifactStore(settings.artifact_dir))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        engine.dispose()


def test_text_from_devices_is_shown_as_text(seeded_server: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, f"{seeded_server}/")
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#jobs-body a"), 30, "the jobs list")
    link = browser.find_element(By.CSS_SELECTOR, "#jobs-body a")
    assert link.text == "hostile-job" and link.get_attribute("href").endswith("#/jobs/hostile-job")
    link.click()
    until(browser, lambda d: number(d, "#round-counter", "data-round") == 0, 30, "the job page")
    until(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#clients-body tr")) == 2, 30, "the clients")
    cells = text_of(browser, "#clients-body")
    assert HOSTILE_ID in cells and HOSTILE_REASON in cells and HOSTILE_RUNTIME in cells  # shown, literally
    assert HOSTILE_REASON in text_of(browser, "#rejections-body")
    assert text_of(browser, "#count-received") == "2" and text_of(browser, "#count-rejected") == "1"
    assert "in 1 min" in text_of(browser, "#round-deadline")
    injected = browser.execute_script(
        "return [window.__pwned, document.querySelectorAll('main img, main b, main script').length]")
    assert injected == [None, 0]
    assert number(browser, "#heatmap", "data-cells") == 3  # c1's three classes; the hostile client has none

    browser.get(f"{seeded_server}/#/jobs/%3Cscript%3E")
    until(browser, lambda d: attr(d, "body", "data-view") == "jobs", 30, "the jobs list instead")
    # the view switches at once, the notice comes with the jobs list (after its request): wait for it
    until(browser, lambda d: "not a job id" in text_of(d, "#error"), 30, "the notice")
    assert_all_local(requested_urls(browser))
    assert not console_errors(browser)
