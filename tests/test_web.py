"""`wfctl web` in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`) driven by Selenium, against a real `wfd` and a real `wfctl web`.

The browser tests are skipped only when Chromium is not installed (.ci/run installs it
with apt-get); the HTTP-level refusals and the import checks run everywhere.
With WFD_SCREENSHOTS=1 the screenshots (1280x800) go to docs/ (else to the sandbox).
"""

from __future__ import annotations

import http.client
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from helpers import (
    REPO,
    Daemon,
    base_env,
    run_json,
    wait_for_state,
    wait_until,
    write_workflow,
)
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

CHROMIUM = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-features=HttpsUpgrades", "--window-size=1280,800"]

needs_chromium = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(DRIVER, os.X_OK)),
    reason=f"no Chromium here ({CHROMIUM} and {DRIVER}: Debian's chromium and "
           "chromium-driver, which .ci/run installs with apt-get when it can)",
)


class Web:
    """A running `wfctl web` against `d`: its address (with token), port and token."""

    def __init__(self, d: Daemon) -> None:
        self.proc = d.popen("web")
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline().strip() if ready else ""
        if not line:
            self.proc.kill()
            raise AssertionError(f"wfctl web printed no address: {self.proc.stderr.read()}")
        self.url = line
        match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/\?token=([\w-]{40,})", line)
        assert match, line
        self.port, self.token = int(match[1]), match[2]
        self.base = f"http://127.0.0.1:{self.port}"

    def page(self, path: str) -> str:
        """`path` with the token, as a user would open it first."""
        return f"{self.base}{path}?token={self.token}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            assert self.proc.wait(15) == 0, self.proc.stderr.read()
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("wfctl web ignored SIGTERM") from None

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                cookie: bool = True) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        sent = dict(headers or {})
        if cookie:
            sent["Cookie"] = f"wfd_token_{self.port}={self.token}"
        conn.request(method, path, headers=sent)
        response = conn.getresponse()
        response.read()
        conn.close()
        return response


@pytest.fixture
def web(daemon: Callable[..., Daemon]) -> Iterator[tuple[Daemon, Web]]:
    d = daemon()
    server = Web(d)
    yield d, server
    server.stop()


def chrome(root: Path, *extra: str) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in [*FLAGS, f"--user-data-dir={tempfile.mkdtemp(dir=root, prefix='chrome-')}",
                *extra]:
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    return driver


@pytest.fixture
def browser(wfd_tmp: Path) -> Iterator[webdriver.Chrome]:
    driver = chrome(wfd_tmp)
    yield driver
    driver.quit()


def css(driver: webdriver.Chrome, selector: str) -> list:
    return driver.find_elements(By.CSS_SELECTOR, selector)


def node_class(driver: webdriver.Chrome, step: str) -> str | None:
    found = css(driver, f'#dag [data-step="{step}"]')
    return found[0].get_attribute("class") if found else None


def row_state(driver: webdriver.Chrome, step: str) -> str | None:
    found = css(driver, f'tr[data-step="{step}"] td.state')
    return found[0].text if found else None


def text_of(driver: webdriver.Chrome, selector: str) -> str:
    found = css(driver, selector)
    return found[0].get_attribute("textContent") if found else ""


def shot(driver: webdriver.Chrome, root: Path, name: str) -> Path:
    """A 1280x800 screenshot: into docs/ with WFD_SCREENSHOTS=1, else the sandbox."""
    target = (REPO / "docs" if os.environ.get("WFD_SCREENSHOTS") == "1" else root) / name
    assert driver.save_screenshot(str(target))
    assert target.read_bytes()[16:24] == (1280).to_bytes(4, "big") + (800).to_bytes(4, "big")
    return target


GATED = {"name": "gated", "steps": [
    {"id": "gate", "command": "while [ ! -e go ]; do sleep 0.05; done; echo gate passed"},
    {"id": "after", "command": "echo hello from after; echo second line",
     "depends_on": ["gate"]},
    # keeps the run RUNNING, so that what the page shows meanwhile came as live updates
    {"id": "hold", "command": "while [ ! -e done ]; do sleep 0.05; done"},
]}


@needs_chromium
def test_a_live_run_updates_without_a_reload(web: tuple[Daemon, Web], browser: webdriver.Chrome,
                                             wfd_tmp: Path) -> None:
    d, server = web
    run_id = d.submit(write_workflow(wfd_tmp, GATED))
    browser.get(server.url)  # the runs page; the token moves into a cookie
    assert "token" not in browser.current_url
    link = wait_until(lambda: css(browser, f'tr[data-run="{run_id}"] a'), 15,
                      message="the run in the list")
    link[0].click()
    wait_until(lambda: node_class(browser, "gate") == "n s-RUNNING", 15,
               message="gate RUNNING in the DAG")
    assert row_state(browser, "gate") == "RUNNING"
    assert node_class(browser, "after") == "n s-PENDING"
    browser.execute_script("window.samePage = 'yes'")  # gone if the page reloads

    (wfd_tmp / "go").touch()
    wait_until(lambda: node_class(browser, "after") == "n s-SUCCEEDED", 15,
               message="after SUCCEEDED in the DAG")
    assert node_class(browser, "gate") == "n s-SUCCEEDED"
    assert row_state(browser, "gate") == "SUCCEEDED"
    assert text_of(browser, "#run-state") == "RUNNING"  # still going: these were updates
    assert node_class(browser, "hold") == "n s-RUNNING"
    (wfd_tmp / "done").touch()
    wait_until(lambda: text_of(browser, "#run-state") == "SUCCEEDED", 10)
    assert browser.execute_script("return window.samePage") == "yes"
    assert len(css(browser, "#gantt rect.attempt")) == 3

    css(browser, 'tr[data-step="after"]')[0].click()  # its log
    wait_until(lambda: text_of(browser, "#log") == "hello from after\nsecond line\n", 10,
               message="the log of after")
    wait_until(lambda: text_of(browser, "#log-state") == "SUCCEEDED", 10)
    assert text_of(browser, "#log-attempt") == "attempt 1"
    assert browser.get_log("browser") == []  # no script error, no refused asset


@needs_chromium
def test_the_page_rides_out_a_daemon_restart(web: tuple[Daemon, Web],
                                             browser: webdriver.Chrome, wfd_tmp: Path) -> None:
    d, server = web
    run_id = d.submit(write_workflow(wfd_tmp, GATED))
    browser.get(server.page(f"/run/{run_id}"))
    wait_until(lambda: node_class(browser, "gate") == "n s-RUNNING", 15)
    d.restart()  # the page's stream breaks; the interrupted steps run again
    (wfd_tmp / "go").touch()
    (wfd_tmp / "done").touch()
    wait_until(lambda: text_of(browser, "#run-state") == "SUCCEEDED", 30,
               message="the run SUCCEEDED on the page after the restart")
    assert node_class(browser, "after") == "n s-SUCCEEDED"
    assert text_of(browser, "#error") == ""  # the failure shown meanwhile is gone


@needs_chromium
def test_cancel_through_the_button(web: tuple[Daemon, Web], browser: webdriver.Chrome,
                                   wfd_tmp: Path) -> None:
    d, server = web
    wf = {"name": "long", "steps": [
        {"id": "long", "command": "sleep 600", "kill_grace": 1},
        {"id": "next", "command": "true", "depends_on": ["long"]}]}
    run_id = d.submit(write_workflow(wfd_tmp, wf))
    browser.get(server.page(f"/run/{run_id}"))
    wait_until(lambda: node_class(browser, "long") == "n s-RUNNING", 15)
    button = css(browser, "#action-cancel")[0]
    assert button.is_enabled() and not css(browser, "#action-resume")[0].is_enabled()

    button.click()  # asks first: "no" leaves the run alone
    wait_until(lambda: _alert(browser), 5, message="the confirmation").dismiss()
    assert run_json(d, run_id)["state"] == "RUNNING"

    button.click()
    alert = wait_until(lambda: _alert(browser), 5, message="the confirmation")
    assert f"Cancel run {run_id}?" in alert.text
    alert.accept()
    wait_until(lambda: text_of(browser, "#run-state") == "CANCELLED", 30)
    assert node_class(browser, "long") == "n s-CANCELLED"
    assert node_class(browser, "next") == "n s-CANCELLED"
    assert wait_for_state(d, run_id, "CANCELLED")["steps"]["long"]["error"] == "cancelled"
    wait_until(lambda: css(browser, "#action-resume")[0].is_enabled(), 5)


def _alert(driver: webdriver.Chrome):  # noqa: ANN202
    try:
        return driver.switch_to.alert
    except NoAlertPresentException:
        return None


@needs_chromium
def test_refused_in_the_browser_without_the_token_or_with_another_host(
        web: tuple[Daemon, Web], browser: webdriver.Chrome, wfd_tmp: Path) -> None:
    _, server = web
    # A browser that never saw the token gets nothing.
    browser.get(server.base + "/")
    assert "refused: no token" in browser.find_element(By.TAG_NAME, "body").text
    browser.get(server.base + "/?token=" + "x" * len(server.token))
    assert "refused: wrong token" in browser.find_element(By.TAG_NAME, "body").text
    # DNS rebinding: a name of another site pointed at 127.0.0.1, even with the token.
    rebound = chrome(wfd_tmp, "--host-resolver-rules=MAP rebind.test 127.0.0.1")
    try:
        rebound.get(f"http://rebind.test:{server.port}/?token={server.token}")
        body = rebound.find_element(By.TAG_NAME, "body").text
        assert "refused: wrong Host header 'rebind.test:" in body
    finally:
        rebound.quit()


def test_refused_without_the_token_another_host_or_origin(web: tuple[Daemon, Web]) -> None:
    _, server = web
    for method, path, headers, cookie in [
        ("GET", "/api/runs", {}, False),
        ("GET", "/api/runs", {"Host": f"rebind.test:{server.port}"}, True),
        ("POST", "/api/runs/x/cancel", {}, True),  # no X-Wfd
        ("POST", "/api/runs/x/cancel", {"X-Wfd": "1", "Origin": "http://rebind.test"}, True),
        ("OPTIONS", "/api/runs/x/cancel", {"Origin": "http://rebind.test",
                                           "Access-Control-Request-Method": "POST"}, True),
    ]:
        response = server.request(method, path, headers, cookie)
        assert response.status == 403, (method, path, headers, response.status)
        assert not any(h.lower().startswith("access-control-") for h in response.headers)
    ok = server.request("GET", "/api/runs")
    assert ok.status == 200
    assert "script-src 'self'" in ok.headers["Content-Security-Policy"]
    assert not any(h.lower().startswith("access-control-") for h in ok.headers)
    assert server.request("POST", "/api/runs/x/cancel", {"X-Wfd": "1"}).status == 400


DEMO = {"name": "demo-etl", "steps": [
    {"id": "prepare", "command": "echo preparing; sleep 0.3"},
    {"id": "fetch-sales", "command": "echo 1200 rows; sleep 1", "depends_on": ["prepare"]},
    {"id": "fetch-stock", "command": "echo 800 rows; sleep 0.7", "depends_on": ["prepare"]},
    {"id": "transform", "command": "echo joined; sleep 0.5",
     "depends_on": ["fetch-sales", "fetch-stock"]},
    {"id": "upload", "command": "if [ ! -e uploaded ]; then touch uploaded; sleep 0.4; "
                                "echo 'connection reset by peer'; exit 75; fi; "
                                "echo uploaded; sleep 0.6",
     "depends_on": ["transform"], "retries": 2, "backoff": {"initial": 0.8}},
    {"id": "report", "command": "echo report written", "depends_on": ["upload", "prepare"]},
]}


@needs_chromium
def test_screenshot_of_a_six_step_run(web: tuple[Daemon, Web], browser: webdriver.Chrome,
                                      wfd_tmp: Path) -> None:
    d, server = web
    run_id = d.submit(write_workflow(wfd_tmp, DEMO), "--wait")
    browser.get(server.page(f"/run/{run_id}"))
    wait_until(lambda: text_of(browser, "#run-state") == "SUCCEEDED", 15)
    wait_until(lambda: len(css(browser, "#gantt rect.attempt")) == 7, 10)
    css(browser, 'tr[data-step="upload"]')[0].click()
    wait_until(lambda: "uploaded" in text_of(browser, "#log"), 10)
    assert text_of(browser, "#log") == ("connection reset by peer\n\n--- attempt 2 ---\n"
                                        "uploaded\n")
    shot(browser, wfd_tmp, "web-run-6-steps.png")


def layered(n: int, width: int) -> dict:
    """`n` steps in layers of `width`, each depending on two steps of the layer before."""
    steps = []
    for i in range(n):
        layer, k = divmod(i, width)
        above = (layer - 1) * width
        deps = [] if layer == 0 else sorted(
            {f"s{above + k:03d}", f"s{above + (k * 7 + 3) % width:03d}"})
        steps.append({"id": f"s{i:03d}", "command": "true", "depends_on": deps})
    return {"name": "big-200", "steps": steps}


@needs_chromium
def test_a_two_hundred_step_run_is_readable(web: tuple[Daemon, Web],
                                            browser: webdriver.Chrome, wfd_tmp: Path) -> None:
    d, server = web
    run_id = d.submit(write_workflow(wfd_tmp, layered(200, 25)), "--wait")
    browser.get(server.page(f"/run/{run_id}"))
    wait_until(lambda: text_of(browser, "#run-state") == "SUCCEEDED", 30)
    wait_until(lambda: len(css(browser, "#gantt rect.attempt")) == 200, 30)
    boxes = browser.execute_script("""
        return [...document.querySelectorAll('#dag [data-step] rect')].map((r) => {
          const b = r.getBoundingClientRect();
          return [r.parentNode.dataset.step, b.left, b.top, b.right, b.bottom];
        });""")
    assert len(boxes) == 200
    assert {b[0] for b in boxes} == {f"s{i:03d}" for i in range(200)}
    by_top = sorted(boxes, key=lambda b: b[2])
    for i, a in enumerate(by_top):  # no two boxes overlap on the page
        for b in by_top[i + 1:]:
            if b[2] >= a[4]:
                break
            assert a[3] <= b[1] or b[3] <= a[1], f"{a[0]} overlaps {b[0]}"
    classes = browser.execute_script("return [...document.querySelectorAll("
                                     "'#dag [data-step]')].map((n) => n.getAttribute('class'))")
    assert set(classes) == {"n s-SUCCEEDED"}
    shot(browser, wfd_tmp, "web-run-200-steps.png")


@needs_chromium
def test_web_needs_no_internet_asset(web: tuple[Daemon, Web], browser: webdriver.Chrome) -> None:
    _, server = web
    browser.get(server.url)
    wait_until(lambda: css(browser, "#state-filters input"), 10)
    urls = browser.execute_script(
        "return performance.getEntriesByType('resource').map((e) => e.name)")
    assert urls and all(urlsplit(u).netloc == f"127.0.0.1:{server.port}" for u in urls), urls
    try:
        assert browser.get_log("browser") == []
    except WebDriverException:  # a driver without logs: nothing to check
        pass


def test_nothing_else_imports_the_web_extra(wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, GATED)
    script = ("import sys, wfd.daemon, wfctl.cli\n"
              f"assert wfctl.cli.main(['validate', {str(wf)!r}]) == 0\n"
              f"assert wfctl.cli.main(['graph', {str(wf)!r}]) == 0\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp' "
              "or m.startswith('wfctl.web')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=base_env("none"), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


def test_web_without_the_extra_says_how_to_get_it(daemon: Callable[..., Daemon],
                                                  wfd_tmp: Path) -> None:
    d = daemon()
    fake = wfd_tmp / "noweb" / "aiohttp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'aiohttp'\", name='aiohttp')\n")
    done = d.wfctl("web", env={"PYTHONPATH": f"{fake.parent}{os.pathsep}{REPO}"})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "wfctl: wfctl web needs the web extra: pip install 'wfd[web]'\n"
