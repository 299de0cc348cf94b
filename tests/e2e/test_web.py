"""The training page in a real headless Chromium (Debian's `chromium`, driven by Playwright): start a
tiny training from the form, see the bar reach 100% and the loss chart drawn, generate from the new
version in the Try it card, stop another with the Stop button, and toggle the theme (remembered
across a reload). Screenshot: test-artifacts/web.png."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
# The page shows each version's knowledge figures: keep the evaluation after training on.
EVALUATE_AFTER_TRAINING = True
SCREENSHOT = REPO / "test-artifacts" / "web.png"

# Pixels of the canvas drawn in a CSS colour variable (the curves), counted in the page.
COUNT_PIXELS = """([canvasId, variable]) => {
  const canvas = document.getElementById(canvasId);
  const probe = document.createElement("canvas").getContext("2d");
  probe.fillStyle = getComputedStyle(document.documentElement).getPropertyValue(variable).trim();
  probe.fillRect(0, 0, 1, 1);
  const [r, g, b] = probe.getImageData(0, 0, 1, 1).data;
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 3] > 200 && Math.abs(data[i] - r) + Math.abs(data[i + 1] - g) + Math.abs(data[i + 2] - b) < 30) n++;
  }
  return n;
}"""


@pytest.fixture(scope="module")
def browser():
    problem = None
    if not CHROMIUM.exists():
        problem = f"{CHROMIUM} is missing (apt-get install chromium)"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            problem = "playwright is not installed (pip install -e '.[dev]')"
    if problem:
        if os.environ.get("KBTUNE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"KBTUNE_REQUIRE_BROWSER=1 but {problem}")
        pytest.skip(problem)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def _fill_form(page, values: dict[str, str]) -> None:
    for name, value in values.items():
        if name == "model":
            page.select_option("select[name=model]", value)
        else:
            page.fill(f"input[name={name}]", value)


def test_start_watch_stop_and_theme_from_the_page(server, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    outside = []
    page.on(
        "request", lambda request: None if request.url.startswith(server.url) else outside.append(request.url)
    )
    page.goto(server.url + "/")
    page.wait_for_selector("#status-badge")

    # The API's validation messages appear beside the field: its type checks, then the config's.
    _fill_form(page, {"model": "tiny", "batch_size": "eight"})
    page.click("#start-button")
    page.wait_for_function(
        "document.querySelector('.field-error[data-for=batch_size]').textContent.length > 0"
    )
    assert "valid integer" in page.text_content(".field-error[data-for=batch_size]")
    _fill_form(page, {"batch_size": "8", "max_steps": "0"})
    page.click("#start-button")
    page.wait_for_function(
        "document.querySelector('.field-error[data-for=max_steps]').textContent.length > 0"
    )
    assert "trainer.max_steps: must be >= 1" in page.text_content(".field-error[data-for=max_steps]")
    assert page.text_content(".field-error[data-for=batch_size]") == ""

    # An advanced override is validated like the command line's, its error shown on the field.
    page.click("details.advanced summary")
    page.fill("textarea[name=overrides]", "trainer.gradient_clip_val=-1")
    _fill_form(page, {"max_steps": "40"})
    page.click("#start-button")
    page.wait_for_function("document.querySelector('.field-error[data-for=overrides]').textContent.length > 0")
    assert "trainer.gradient_clip_val" in page.text_content(".field-error[data-for=overrides]")

    # A tiny training from the form, watched to the end.
    page.fill("textarea[name=overrides]", "trainer.log_every_n_steps=5")
    _fill_form(page, {"max_steps": "40", "batch_size": "8", "block_size": "64", "val_check_interval": "10"})
    page.click("#start-button")
    page.wait_for_function(
        "['pending', 'running'].includes(document.getElementById('status-badge').dataset.status)",
        timeout=30_000,
    )
    page.wait_for_function(
        "document.getElementById('progress').getAttribute('aria-valuenow') === '100'", timeout=600_000
    )
    page.wait_for_function(
        "document.getElementById('status-badge').dataset.status === 'completed'", timeout=120_000
    )
    assert page.text_content("#progress-label") == "100%"
    assert int(page.get_attribute("#loss-chart", "data-train-points")) == 40
    assert int(page.get_attribute("#loss-chart", "data-val-points")) >= 3
    assert page.evaluate(COUNT_PIXELS, ["loss-chart", "--train"]) > 100
    assert page.evaluate(COUNT_PIXELS, ["loss-chart", "--val"]) > 20
    completed_id = page.text_content("#session-line").split()[1]
    page.wait_for_function(
        f"document.getElementById('versions-table').textContent.includes('{completed_id[:8]}')",
        timeout=30_000,
    )
    # Its knowledge, evaluated after training: recall in the table, the worst-learned documents in Details.
    page.wait_for_function("document.querySelector('#versions-table tbody tr td:nth-child(5)').textContent.includes('%')",
                           timeout=120_000)  # fmt: skip
    page.click("#versions-table button.details")
    page.wait_for_function("document.querySelectorAll('#worst-table tbody tr').length > 0", timeout=30_000)
    assert page.is_visible("#promote-button")

    # Try it: the new version continues a prompt, streamed into the output area.
    page.wait_for_function("document.getElementById('try-version').options.length > 0 && "
                           "!document.getElementById('try-button').disabled")  # fmt: skip
    page.fill("#try-prompt", "The on-call engineer")
    page.fill("#try-max-tokens", "32")
    page.click("#try-button")
    page.wait_for_function("document.getElementById('try-output').textContent.length > 0", timeout=60_000)
    page.wait_for_function("document.getElementById('try-stats').textContent.includes('tokens in')", timeout=60_000)

    # Another, stopped with the button.
    _fill_form(page, {"max_steps": "", "max_epochs": "50"})
    page.click("#start-button")
    page.wait_for_function(
        "document.getElementById('status-badge').dataset.status === 'running' && "
        "Number(document.getElementById('progress').getAttribute('aria-valuenow')) > 0",
        timeout=300_000,
    )
    assert page.text_content("#session-line").split()[1] != completed_id
    clicked = time.monotonic()
    page.click("#stop-button")
    page.wait_for_function(
        "document.getElementById('status-badge').dataset.status === 'stopped'", timeout=120_000
    )
    print(f"\nStop button -> page shows stopped: {time.monotonic() - clicked:.2f} s")
    assert page.is_visible("#resume-button")
    assert page.is_disabled("#stop-button")

    # The theme toggles and is remembered.
    assert page.evaluate("document.documentElement.dataset.theme") == "light"
    page.click("#theme-toggle")
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    page.reload()
    page.wait_for_selector("#status-badge")
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(15, 19, 24)"

    # The completed session, picked from the list, for the screenshot.
    page.click(f"#sessions-table tr[data-id='{completed_id}']")
    page.wait_for_function(
        "document.getElementById('status-badge').dataset.status === 'completed'", timeout=30_000
    )
    page.wait_for_function("Number(document.getElementById('loss-chart').dataset.trainPoints) === 40")
    assert page.is_hidden("#token-box")  # no token asked of a loopback server without one
    page.wait_for_timeout(600)  # the bar's width transition
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000
    assert outside == []  # nothing was fetched from anywhere but the server


# A page on another site (here: another loopback port) that submits forms to the server as soon as it
# loads: the classic cross-site request. `text/plain` lets a form send a body shaped like JSON.
ATTACK_PAGE = """<!doctype html><title>elsewhere</title>
<form id="stop" method="post" action="{url}/training/stop?session_id={session_id}"></form>
<form id="start" method="post" action="{url}/training/start" enctype="text/plain" target="second">
  <input name='{{"model": "tiny", "x": "' value='"}}'></form>
<iframe name="second"></iframe>
<script>document.getElementById("start").submit(); setTimeout(() => document.getElementById("stop").submit(), 500);</script>"""


@pytest.fixture
def other_site(tmp_path):
    """A static web server on another loopback port, serving files written to `tmp_path`."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_page_on_another_site_cannot_stop_or_start_a_training(server, browser, other_site):
    folder, site = other_site
    settings = {"model": "tiny", "max_epochs": 50, "batch_size": 8, "block_size": 64}
    response = server.post("/training/start", json=settings)
    assert response.status_code == 201, response.text
    session_id = response.json()["id"]
    server.wait_for(session_id, lambda s: s["status"] == "running", timeout=300)
    sessions_before = [s["id"] for s in server.get("/training/sessions").json()]
    (folder / "attack.html").write_text(ATTACK_PAGE.format(url=server.url, session_id=session_id))

    page = browser.new_page()
    page.goto(f"{site}/attack.html")
    page.wait_for_url(f"{server.url}/training/stop*", timeout=30_000)
    assert "cross-origin request refused" in page.text_content("body")
    page.close()

    status = server.status(session_id)
    assert status["status"] == "running" and status["stop_requested"] is False
    assert [s["id"] for s in server.get("/training/sessions").json()] == sessions_before  # nothing started
    # The server's own page (and a script without an Origin) still stops it.
    assert server.post("/training/stop", params={"session_id": session_id}).status_code == 200
    assert server.wait_terminal(session_id, timeout=180)["status"] == "stopped"
