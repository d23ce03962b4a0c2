"""The web UI in a real headless Chromium (Playwright): what a person clicks, end to end.

Start a tiny CPU run from the form, watch the loss curve gain points, stop it, reconstruct an
uploaded image from its weights, and find the classifier head marked ``removed`` in the parameter
audit. A screenshot of every tab goes to ``test-artifacts/screenshots/``.

Needs Debian's Chromium (``apt-get install chromium``); Playwright's own browser download is not
used (it cannot be fetched offline).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from app import build_app  # noqa: E402
from helpers import free_port  # noqa: E402
from mae_core.data import sample_photo_paths  # noqa: E402
from mae_core.rundir import LIVE_STATES  # noqa: E402
from mae_core.runs import RunManager  # noqa: E402

SCREENSHOTS = REPO_ROOT / "test-artifacts" / "screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
RUN_TIMEOUT_MS = 150_000  # two DDP ranks on a shared 2-core machine can take a while to start
UI_TIMEOUT_MS = 60_000


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("Chromium is not installed: the browser tests need Debian's chromium "
                    "(run `apt-get install chromium`); `playwright install` cannot download "
                    "browsers here.", pytrace=False)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    manager = RunManager(tmp_path_factory.mktemp("runs"))
    demo = build_app(manager)
    demo.queue().launch(prevent_thread_lock=True, server_port=free_port(), quiet=True)
    try:
        yield {"url": demo.local_url, "manager": manager}
    finally:
        live = manager.live_run()
        if live:
            manager.stop(live)
            deadline = time.monotonic() + 30
            while manager.status(live)["state"] in LIVE_STATES and time.monotonic() < deadline:
                time.sleep(0.5)
            if manager.status(live)["state"] in LIVE_STATES:
                manager.stop(live)  # the second stop ends the process group
        demo.close()


@pytest.fixture(scope="module")
def page(server):
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        page.goto(server["url"])
        page.get_by_role("button", name="Start", exact=True).wait_for()
        try:
            yield page
        finally:
            context.close()
            browser.close()


@pytest.fixture(autouse=True)
def screenshot_on_failure(request):
    """A failing test leaves ``FAILED-<test>.png`` (the page as it was) next to the screenshots."""
    failed_before = request.session.testsfailed
    yield
    page = request.node.funcargs.get("page")
    if page is not None and request.session.testsfailed > failed_before:  # the call just failed
        page.screenshot(path=str(SCREENSHOTS / f"FAILED-{request.node.name}.png"), full_page=True)


def _button(page, name: str):
    return page.get_by_role("button", name=name, exact=True)


def _settle(page) -> None:
    """Close error toasts and wait for pending outputs, so a screenshot shows the finished page."""
    for close in page.locator("[data-testid='toast-close']").all():
        close.click()
    page.wait_for_function("() => !document.querySelector('.pending, .generating')")
    page.wait_for_timeout(300)


def _wait_text(page, selector: str, text: str) -> None:
    """Wait until ``text`` is rendered (visible text, not hidden markup) inside ``selector``."""
    page.wait_for_function("([sel, text]) => document.querySelector(sel)?.innerText.includes(text)",
                           arg=[selector, text])


def _wait_uploaded(page, name: str) -> None:
    """Wait until the upload of ``name`` has finished: the file list shows it with its size."""
    page.wait_for_function(  # (the list shows a name's stem and extension in separate elements)
        "(name) => { const t = (document.querySelector('#uploads')?.innerText || '');"
        " return t.replace(/\\s+/g, '').includes(name) && /\\d\\s*(B|KB|MB)/.test(t); }",
        arg=name)


def _wait_buttons(page, **enabled: bool) -> None:
    """Wait until the Start / Stop / Resume buttons are enabled or disabled as given."""
    page.wait_for_function(
        "(want) => Object.entries(want).every(([name, on]) =>"
        " document.querySelector(`#${name}-btn`)?.disabled === !on)", arg=enabled)


def _status(page) -> dict:
    return page.eval_on_selector("#run-status", "el => ({...el.dataset})")


def _set_number(page, elem_id: str, value: int) -> None:
    field = page.locator(f"#{elem_id} input")
    field.fill(str(value))
    field.press("Tab")


def test_train_tab_starts_a_run_and_draws_its_curve(page, server):
    assert _status(page)["state"] == "none"
    for elem_id, value in (("image-size", 32), ("patch-size", 8), ("batch-size", 8),
                           ("max-steps", 5000)):
        _set_number(page, elem_id, value)
    _button(page, "Start").click()
    # the status panel follows the run, and the curve gains points while it is live
    page.wait_for_function(
        "() => { const s = document.querySelector('#run-status');"
        " return s && s.dataset.state === 'running' && +s.dataset.step >= 3; }",
        timeout=RUN_TIMEOUT_MS)
    page.wait_for_function(
        "() => { const lines = document.querySelectorAll("
        "'#loss-plot path[aria-roledescription=\"line mark\"]');"
        " return lines.length >= 2 && [...lines].every(p => (p.getAttribute('d') || '').includes('L')); }",
        timeout=UI_TIMEOUT_MS)
    assert "points" in page.locator("#plot-info").inner_text()
    run_id = server["manager"].live_run()
    assert run_id and page.locator("#run-status").inner_text().startswith(run_id)
    _wait_buttons(page, start=False, stop=True, resume=False)
    _settle(page)
    page.screenshot(path=str(SCREENSHOTS / "train.png"), full_page=True)

    # a second tab shows the same live run: the state lives on disk, not in the page
    other = page.context.new_page()
    other.goto(server["url"])
    other.wait_for_function(
        f"() => {{ const s = document.querySelector('#run-status');"
        f" return s && s.innerText.startsWith('{run_id}') && s.dataset.state === 'running'; }}",
        timeout=UI_TIMEOUT_MS)
    other.close()

    _button(page, "Stop").click()
    page.wait_for_function("() => document.querySelector('#run-status').dataset.state === 'stopped'",
                           timeout=RUN_TIMEOUT_MS)
    _wait_buttons(page, start=True, stop=False, resume=True)
    assert _button(page, "Stop").is_disabled()  # found by its label: "Force stop" only while stopping
    _settle(page)
    page.screenshot(path=str(SCREENSHOTS / "train-stopped.png"), full_page=True)


def test_reconstruct_tab_shows_four_panels_and_the_heat_map(page, server, tmp_path):
    [run] = server["manager"].list()
    page.get_by_role("tab", name="Reconstruct").click()
    page.wait_for_function("(id) => document.querySelector('#ckpt-pick input')?.value === id",
                           arg=run["run_id"])
    photo = sample_photo_paths()[0]
    page.locator("#uploads input[type=file]").set_input_files(str(photo))
    _wait_uploaded(page, photo.name)
    _button(page, "Reconstruct").click()
    page.wait_for_function("() => document.querySelectorAll('#recon-gallery img').length >= 5")
    _wait_text(page, "#recon-losses", photo.name)
    captions = page.locator("#recon-gallery").inner_text()
    for caption in ("masked", "reconstruction", "reconstruction + visible", "per-patch error"):
        assert caption in captions
    page.wait_for_function("() => document.querySelectorAll('#preview-gallery img').length >= 1")
    _settle(page)
    page.screenshot(path=str(SCREENSHOTS / "reconstruct.png"), full_page=True)

    # a corrupt upload: a readable error naming the file, and the page keeps working
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    page.locator("#uploads button[aria-label='Clear']").first.click()
    page.locator("#uploads input[type=file]").set_input_files(str(corrupt))
    _wait_uploaded(page, "broken.png")
    _button(page, "Reconstruct").click()
    page.wait_for_function(
        "() => [...document.querySelectorAll(\"[data-testid='toast-body']\")].some(t =>"
        " t.innerText.includes('broken.png') && /corrupt|not an image/.test(t.innerText))")


def test_parameters_tab_marks_the_head_removed(page):
    page.get_by_role("tab", name="Parameters").click()
    head = page.locator('#params-clean tr[data-name="backbone.vit.head.weight"]')
    head.wait_for()
    assert head.get_attribute("data-status") == "removed"
    assert "removed" in head.inner_text()
    reference = page.locator('#params-reference tr[data-name="backbone.vit.head.weight"]')
    assert reference.get_attribute("data-status") == "trainable"
    assert "plain DDP safe" in page.locator("#params-clean").inner_text()
    assert "backbone.mask_token" in page.locator("#params-reference .audit-verdict").inner_text()
    _settle(page)
    page.screenshot(path=str(SCREENSHOTS / "parameters.png"), full_page=False)


def test_runs_tab_lists_the_run(page, server):
    [run] = server["manager"].list()
    page.get_by_role("tab", name="Runs").click()
    _wait_text(page, "#runs-table", run["run_id"])
    _wait_text(page, "#runs-table", "stopped")
    page.wait_for_function("(id) => document.querySelector('#runs-pick input')?.value === id",
                           arg=run["run_id"])
    _button(page, "Export encoder").click()
    _wait_text(page, "#export-code", "timm.create_model")
    _wait_text(page, "#export-file", ".safetensors")
    _settle(page)
    page.screenshot(path=str(SCREENSHOTS / "runs.png"), full_page=True)
