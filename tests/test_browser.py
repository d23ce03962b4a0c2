"""The web UI in a real headless Chromium (Playwright): what a person clicks and sees, end to end.

Start a tiny CPU run from the form (the controls in the first viewport), watch the curve and the
log, stop it (the message follows the run), reconstruct a batch with a bad file in it, read the
grouped parameter audit, and check the layout in dark mode and at 800 px. A screenshot of every
tab goes to ``test-artifacts/screenshots/``.

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

from helpers import cache_lock_held, free_port  # noqa: E402
from mae_core.config import ModelConfig, RunConfig, TrainConfig  # noqa: E402
from mae_core.data import sample_photo_paths  # noqa: E402
from mae_core.rundir import LIVE_STATES, create_run  # noqa: E402
from mae_core.runs import RunManager  # noqa: E402
from ui import train, trainactions, trainscripts  # noqa: E402
from ui.blocks import build_app  # noqa: E402
from ui.render import page_style  # noqa: E402

SCREENSHOTS = REPO_ROOT / "test-artifacts" / "screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
RUN_TIMEOUT_MS = 150_000  # two DDP ranks on a shared 2-core machine can take a while to start
UI_TIMEOUT_MS = 60_000
TINY_MODEL = ModelConfig(image_size=32, patch_size=8)


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
    demo.queue().launch(prevent_thread_lock=True, server_port=free_port(), quiet=True,
                        **page_style())  # the page's style, as app.py launches it
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
                manager.stop(live, force=True)
        demo.close()


@pytest.fixture(scope="module")
def page(server):
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        page.goto(server["url"])
        page.get_by_role("button", name="Start", exact=True).wait_for()
        try:
            yield page
        finally:
            context.close()
            browser.close()


@pytest.fixture(scope="module")
def browser_factory(page, server):
    """New pages with other viewports or colour schemes, in the module's browser."""
    contexts = []

    def open_page(width: int = 1440, height: int = 1000, scheme: str = "light"):
        context = page.context.browser.new_context(viewport={"width": width, "height": height},
                                                   color_scheme=scheme)
        contexts.append(context)
        other = context.new_page()
        other.set_default_timeout(UI_TIMEOUT_MS)
        other.goto(server["url"])
        other.get_by_role("button", name="Start", exact=True).wait_for()
        return other

    try:
        yield open_page
    finally:
        for context in contexts:
            context.close()


@pytest.fixture(autouse=True)
def screenshot_on_failure(request):
    """A failing test leaves ``FAILED-<test>.png`` (the page as it was) next to the screenshots."""
    failed_before = request.session.testsfailed
    yield
    page = request.node.funcargs.get("page")
    if page is not None and request.session.testsfailed > failed_before:  # the call just failed
        page.screenshot(path=str(SCREENSHOTS / f"FAILED-{request.node.name}.png"), full_page=True)


@pytest.fixture(autouse=True)
def no_server_tracebacks(capfd):
    """An event that fails on the server shows nothing on the page, only a traceback on the app's
    console (the Reconstruct picker's change logged one at every pick, unseen): none may."""
    yield
    captured = capfd.readouterr()
    sys.stdout.write(captured.out)  # still shown for a failure, or with -s
    sys.stderr.write(captured.err)
    assert "Traceback" not in captured.out + captured.err


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
    page.locator("#run-status").wait_for()
    return page.eval_on_selector("#run-status", "el => ({...el.dataset})")


def _set_number(page, elem_id: str, value: int) -> None:
    field = page.locator(f"#{elem_id} input")
    field.fill(str(value))
    field.press("Tab")


def _boxes(page, *selectors: str) -> list[dict]:
    """The elements' page boxes (top, bottom, width), read in one go: a layout that changes
    between two reads (a chart drawn) cannot make them disagree."""
    return page.evaluate("(sels) => sels.map((s) => { const r = document.querySelector(s)"
                         ".getBoundingClientRect(); return {top: r.top + scrollY,"
                         " bottom: r.bottom + scrollY, width: r.width}; })", list(selectors))


def _in_first_viewport(page, selector: str) -> bool:
    box = page.locator(selector).bounding_box()
    # (1 px either way: an element scrolled to lies at fractions of a pixel)
    return box is not None and box["y"] >= -1 and \
        box["y"] + box["height"] <= page.viewport_size["height"] + 1


def _chart_drawn(page) -> bool:
    """Whether the Vega chart's canvas holds a drawing (lines, axes), not a blank box."""
    return page.evaluate(
        "() => { const c = document.querySelector('#loss-plot canvas'); if (!c || c.width < 100)"
        " return false; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let inked = 0; for (let i = 0; i < d.length; i += 16) if (d[i+3] > 0 && (d[i] < 200 ||"
        " d[i+1] < 200 || d[i+2] < 200)) inked++; return inked > 500; }")


def test_train_tab_starts_a_run_and_follows_it(page, server):
    assert _status(page)["state"] == "none"
    # Stacked (narrow) with no run yet, the form comes first: there is nothing to watch, and
    # the status panel says to fill it in (with a run, the live view comes first: 800 px test).
    page.set_viewport_size({"width": 800, "height": 1000})
    form, live = _boxes(page, "#train-form", "#train-live")
    assert form["bottom"] <= live["top"] + 1 and live["width"] > 500
    page.set_viewport_size({"width": 1440, "height": 1000})
    # issue 9.2: the run controls and their message are visible without scrolling at 1440×1000
    for selector in ("#start-btn", "#stop-btn", "#resume-btn", "#train-message"):
        assert _in_first_viewport(page, selector), selector
    for elem_id, value in (("field-image-size", 32), ("field-patch-size", 8),
                           ("field-batch-size", 8), ("field-max-steps", 5000)):
        _set_number(page, elem_id, value)
    _button(page, "Start").click()
    _wait_text(page, "#train-message", "Started run")
    # issue 9.6: the log shows the trainer's output while it starts and runs
    _wait_text(page, "#log-view", "run directory")
    page.wait_for_function(
        "() => { const s = document.querySelector('#run-status');"
        " return s && s.dataset.state === 'running' && +s.dataset.step >= 3; }",
        timeout=RUN_TIMEOUT_MS)
    page.wait_for_function("() => true")
    assert _poll_until(lambda: _chart_drawn(page)), "the loss chart stayed blank"
    info = page.locator("#plot-info").inner_text()
    assert "points" in info and "images_per_s" not in info  # no internal keys in the text
    run_id = server["manager"].live_run()
    assert run_id and page.locator("#run-status").inner_text().startswith(run_id)
    assert "plain DDP" in page.locator("#run-status").inner_text()  # issue 9.11
    _wait_buttons(page, start=False, stop=True, resume=False)
    assert _in_first_viewport(page, "#train-message")
    _settle(page)
    page.screenshot(path=str(SCREENSHOTS / "train.png"), full_page=True)

    # issue 9.11: Delete is disabled for the live run
    page.get_by_role("tab", name="Runs").click()
    _wait_text(page, "#runs-table", run_id)
    page.wait_for_function("() => document.querySelector('#delete-btn')?.disabled === true")
    # ... and greyed as the other disabled buttons are (Sooner: the run is not queued): its red
    # read as usable
    page.wait_for_function("() => document.querySelector('#sooner-btn')?.disabled === true")
    colours = page.evaluate("() => ['#delete-btn', '#sooner-btn'].map(s => getComputedStyle("
                            "document.querySelector(s)).backgroundColor)")
    assert colours[0] == colours[1], colours
    _wait_text(page, "#runs-table", "(live)")  # issue 9.11: a live run's loss is not "final"
    page.get_by_role("tab", name="Train").click()

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
    # issue 9.3: the message follows the run: no stale "Stop requested" once it has stopped
    _wait_text(page, "#train-message", "stopped at step")
    assert "Stop requested" not in page.locator("#train-message").inner_text()
    _settle(page)
    page.screenshot(path=str(SCREENSHOTS / "train-stopped.png"), full_page=True)

    # Resume from the page: on from the checkpoint, to the step typed, which was for that resume
    # alone (it stayed in the box for the next Resume of any run).
    stopped_at = int(_status(page)["step"])
    _set_number(page, "resume-steps", stopped_at + 1000)
    _button(page, "Resume").click()
    _wait_text(page, "#train-message", f"Resumed {run_id} from its checkpoint at step {stopped_at}")
    page.wait_for_function("() => document.querySelector('#resume-steps input')?.value === '0'")
    page.wait_for_function(
        "(at) => { const s = document.querySelector('#run-status');"
        " return s.dataset.state === 'running' && +s.dataset.step > at; }", arg=stopped_at,
        timeout=RUN_TIMEOUT_MS)
    assert server["manager"].status(run_id)["total_steps"] == stopped_at + 1000
    _button(page, "Stop").click()
    page.wait_for_function("() => document.querySelector('#run-status').dataset.state === 'stopped'",
                           timeout=RUN_TIMEOUT_MS)


def test_picking_another_run_empties_the_resume_step(page, server):
    """A step typed to resume one run to stayed in the box, for the next Resume of any run."""

    manager = server["manager"]
    paths = stopped_tiny_run(manager)
    try:
        page.get_by_role("tab", name="Train").click()
        _set_number(page, "resume-steps", 7)
        page.locator("#run-pick input").click()
        page.get_by_role("option", name=f"{paths.run_id} · stopped").click()
        page.wait_for_function(
            "() => document.querySelector('#resume-steps input')?.value === '0'")
    finally:
        manager.delete(paths.run_id)


def test_the_smoothing_box_shows_the_value_the_chart_uses(page):
    """A number typed past the EMA slider's end is used clamped (ui.train.smoothing_of); the box
    says so once it is left, instead of showing a value nothing uses."""
    page.get_by_role("tab", name="Train").click()
    box = page.locator("#smoothing input[type=number]")
    box.fill("5")
    box.press("Tab")
    page.wait_for_function("() => document.querySelector('#smoothing input[type=number]').value"
                           f" === '{train.MAX_SMOOTHING}'")
    box.fill(str(train.SMOOTHING))
    box.press("Tab")


def test_a_switch_reached_by_the_keyboard_shows_it_has_the_focus(page):
    """The "metric" radios and the "log scale" checkbox showed nothing as Tab reached them."""
    page.get_by_role("tab", name="Train").click()
    page.locator("#smoothing input[type=number]").focus()
    focused = []
    for _ in range(4):  # back from the smoothing box: log scale, then the metric's choices
        page.keyboard.press("Shift+Tab")
        focused.append(page.evaluate(
            "() => { const e = document.activeElement, style = getComputedStyle(e);"
            " return [e.type, e.closest('[id]')?.id, style.outlineStyle,"
            " parseFloat(style.outlineWidth)]; }"))
    assert focused[0][:2] == ["checkbox", "log-scale"], focused
    assert any(kind == "radio" for kind, *_ in focused), focused
    for kind, where, style, width in focused:
        if kind in ("checkbox", "radio"):
            assert style not in ("none", "hidden") and width >= 2, (kind, where, style, width)
    # The EMA slider (and every slider: mask ratio, weights history), after its box and its
    # reset button: its arrow keys moved a knob that nothing marked as focused.
    page.locator("#smoothing input[type=number]").focus()
    for _ in range(3):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.type") == "range":
            break
    ring = page.evaluate("() => { const e = document.activeElement, s = getComputedStyle(e);"
                         " return [e.type, !!e.closest('#smoothing'), e.matches(':focus-visible'),"
                         " s.outlineStyle, parseFloat(s.outlineWidth)]; }")
    assert ring[:3] == ["range", True, True] and ring[3] not in ("none", "hidden") \
        and ring[4] >= 2, ring
    # An accordion's header: the browser's 1 px ring ran through its label's descenders.
    header = page.locator("#more-settings > button.label-wrap")
    header.focus()  # from a switch the keyboard focused: the browser shows this focus too
    ring = header.evaluate("e => { const s = getComputedStyle(e); return [e.matches("
                           "':focus-visible'), s.outlineStyle, parseFloat(s.outlineWidth),"
                           " parseFloat(s.outlineOffset)]; }")
    assert ring[0] and ring[1] not in ("none", "hidden") and ring[2] >= 2 and ring[3] >= 2, ring


def test_the_page_scripts_decide_as_the_tests_say(page):
    """What runs in the browser alone: the form kept on each change, a refusal taken away by an
    edit, the resume box after Resume."""
    from ui import configfile
    from ui.common import DEFAULTS, FIELD_NAMES, form_by_name, form_values

    shown = form_values(DEFAULTS)
    kept = page.evaluate(f"(values) => ({configfile.REMEMBER_FORM_JS})(...values)",
                         [shown[name] for name in FIELD_NAMES])
    assert kept == form_by_name([shown[name] for name in FIELD_NAMES])
    restore = f"([saved, shown]) => ({configfile.RESTORE_FORM_JS})(saved, ...shown)"
    assert page.evaluate(restore, [kept, [shown[name] for name in FIELD_NAMES]]) == [
        shown[name] for name in FIELD_NAMES]
    clear = f"(action) => ({trainscripts.CLEAR_REFUSAL_JS})(action)"
    for refused in (trainactions.failed_action("start", "Invalid setting, image size: 36"),
                    trainactions.failed_action("queue", "Invalid setting, seed: too big")):
        assert page.evaluate(clear, refused) is None
    started = {"action": "start", "run_id": "r1", "kind": "ok", "text": "Started run r1."}
    for kept_action in (trainactions.failed_action("stop", "no run is live"), started, None,
                        "junk", {"kind": "error"}):
        assert page.evaluate(clear, kept_action) == kept_action
    resumed = f"([action, until]) => ({trainscripts.RESUMED_JS})(action, until)"
    ok = {"action": "resume", "run_id": "r1", "kind": "ok", "text": "Resumed r1."}
    assert page.evaluate(resumed, [ok, 40]) == 0
    for other in (trainactions.failed_action("resume", "step 40 is behind"), started, None):
        assert page.evaluate(resumed, [other, 40]) == 40


def _poll_until(predicate, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def test_a_bad_start_shows_a_message_not_a_badge(page):
    """issue 9.3/9.4: a refusal is a message in the controls' area, replaced by the next action;
    no error badge covers an input."""
    _set_number(page, "field-image-size", 36)
    _button(page, "Start").click()
    _wait_text(page, "#train-message", "image_size")
    assert page.locator("#train-message [data-kind='error']").count() == 1
    badges = page.locator(".error:not(.mae-notice)")  # Gradio's red badge over a component
    assert all(not badge.is_visible() for badge in badges.all())
    _set_number(page, "field-image-size", 32)
    # Editing the form takes the refusal of the form as it was away.
    page.wait_for_function("() => !document.querySelector('#train-message [data-kind=\"error\"]')")
    # Out of range or blank, a mask ratio is refused by name (a slider moved it to 0.95 or 0.05
    # and started the run).
    for typed in ("2", ""):
        page.locator("#field-mask-ratio input").fill(typed)
        _button(page, "Start").click()
        _wait_text(page, "#train-message", "mask_ratio")
        _set_number(page, "field-mask-ratio", 0.75)
        page.wait_for_function("() => !document.querySelector('#train-message [data-kind=\"error\"]')")
    # A field under the closed "more settings" is shown: opened, scrolled to, focused, marked
    # with the reason; the next edit takes the mark away.
    more = page.locator("#more-settings > button.label-wrap")
    more.click()
    _set_number(page, "field-weight-decay", -1)
    more.click()
    page.locator("#field-weight-decay").wait_for(state="hidden")
    page.evaluate("() => scrollTo(0, 0)")
    _button(page, "Start").click()
    _wait_text(page, "#train-message", "weight_decay")
    marked = page.locator("#field-weight-decay[data-refusal]")
    marked.wait_for()
    assert marked.get_attribute("data-refusal").startswith("must be a finite number in [0, 1)")
    note = page.locator("#field-weight-decay-refusal")  # the reason, under the field's row
    assert note.is_visible() and note.inner_text().startswith("must be a finite number")
    assert _in_first_viewport(page, "#field-weight-decay input")  # (a page scrolled to it)
    assert page.evaluate("() => document.activeElement?.closest('#field-weight-decay') !== null")
    assert page.locator("#field-weight-decay input").get_attribute("aria-invalid") == "true"
    page.keyboard.press("Backspace")  # the person corrects it where the focus is
    page.wait_for_function("() => !document.querySelector('#train-form [data-refusal]')")
    _set_number(page, "field-weight-decay", 0.05)
    # A dropdown's reason is shown whole and its list stays shut; a refusal of the same field
    # again shows it again.
    accelerator = page.locator("#field-accelerator input")
    default = accelerator.input_value()
    for _ in range(2):
        accelerator.click()
        page.get_by_role("option", name="gpu", exact=True).click()
        _button(page, "Start").click()
        page.locator("#field-accelerator-refusal").wait_for()
        assert "no CUDA GPU" in page.locator("#field-accelerator-refusal").inner_text()
        assert page.locator("#field-accelerator ul.options").count() == 0
        accelerator.click()
        page.get_by_role("option", name=default, exact=True).click()
        page.wait_for_function("() => !document.querySelector('#train-form .mae-refusal')")
    more.click()
    # In a text box a deletion is an edit too (its input event missed deletions and pastes).
    data = page.locator("#field-data textarea, #field-data input").first
    data.fill("/nonexistent-mae-studio-folder")
    data.press("Tab")
    _button(page, "Start").click()
    page.locator("#field-data[data-refusal]").wait_for()
    data.click()
    data.press("End")
    data.press("Backspace")
    page.wait_for_function("() => !document.querySelector('#train-form [data-refusal]')")
    data.fill("")
    data.press("Tab")
    _wait_text(page, "#data-info", "the sample photos")
    page.evaluate("() => scrollTo(0, 0)")


def test_the_data_field_says_what_it_found_and_prepare_answers(page, tmp_path):
    """issue 12.5: leaving the data field describes it (files, unreadable ones, size on disk);
    Prepare now answers in its progress area (a small folder has nothing to prepare)."""
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (40, 30), (60 * i, 90, 30)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    field = page.locator("#field-data textarea, #field-data input").first
    field.fill(str(tmp_path))
    field.press("Tab")
    _wait_text(page, "#data-info", "3 image file(s) found")
    _wait_text(page, "#data-info", "1 of them not images")
    _button(page, "Prepare now (large folders)").click()
    _wait_text(page, "#prepare-progress", "nothing to prepare")
    assert page.locator("#cancel-prepare-btn").is_disabled()
    assert page.locator("#prepare-progress [data-kind=info]").count() == 1  # news, not an error
    # Another folder left while the first is still being checked is checked after it: its blur
    # was dropped, and the note went on describing the first folder. The first check is held.
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (40, 30)).save(other / "only.png")
    first, held = str(tmp_path / "first"), []
    (tmp_path / "first").mkdir()

    def hold_the_first_check(route):
        if not held and first in (route.request.post_data or ""):
            held.append(route)
        else:
            route.continue_()

    page.route("**/queue/join**", hold_the_first_check)
    try:
        field.fill(first)
        field.press("Tab")
        for _ in range(200):  # Playwright calls the route while the test waits through it
            if held:
                break
            page.wait_for_timeout(50)
        assert held, "the first folder's check was never sent"
        field.fill(str(other))
        field.press("Tab")
        page.wait_for_timeout(500)
        held[0].continue_()
        _wait_text(page, "#data-info", "1 image file(s) found")
    finally:
        page.unroute("**/queue/join**")
    field.fill("")  # the next tests train on the sample photos
    field.press("Tab")
    _wait_text(page, "#data-info", "the sample photos")


def _wait_prepare_buttons(page, prepare: bool, cancel: bool) -> None:
    page.wait_for_function(
        "([prepare, cancel]) => document.querySelector('#prepare-btn')?.disabled === !prepare"
        " && document.querySelector('#cancel-prepare-btn')?.disabled === !cancel",
        arg=[prepare, cancel])


def test_a_reload_during_prepare_still_shows_the_preparation(page, tmp_path, monkeypatch):
    """A reload (or another tab) during Prepare now showed an empty progress area, Cancel greyed
    and Prepare enabled, while another folder's Prepare was refused: the job was known only to the
    page that started it. A page load now follows it, its end included. The set's lock is held
    here (as by a run's start preparing the folder): the preparation waits, and says so."""
    from PIL import Image

    from mae_core import prepared

    monkeypatch.setenv(prepared.CACHE_ENV, str(tmp_path / "cache"))  # the job inherits it
    folder = tmp_path / "large"
    folder.mkdir()
    Image.new("RGB", (32, 24), (200, 30, 10)).save(folder / "0000.jpg")
    for i in range(1, prepared.AUTO_PREPARE_ABOVE + 1):
        shutil.copyfile(folder / "0000.jpg", folder / f"{i:04d}.jpg")
    field = page.locator("#field-data textarea, #field-data input").first
    waiting = "waiting for another process"
    with cache_lock_held(folder):
        field.fill(str(folder))
        field.press("Tab")
        _wait_text(page, "#data-info", "not prepared yet")
        _button(page, "Prepare now (large folders)").click()
        _wait_text(page, "#prepare-progress", waiting)  # not "0 of 1,001 files (0 %)"
        _wait_prepare_buttons(page, prepare=False, cancel=True)
        page.reload(wait_until="load")
        page.get_by_role("button", name="Start", exact=True).wait_for()
        _wait_text(page, "#prepare-progress", waiting)
        _wait_prepare_buttons(page, prepare=False, cancel=True)
        tab = _open_tab(page)  # a tab opened meanwhile follows it too
        try:
            _wait_text(tab, "#prepare-progress", waiting)
            _wait_prepare_buttons(tab, prepare=False, cancel=True)
        finally:
            tab.close()
    # Its end is shown by the reloaded page as by the one that started it.
    _wait_text(page, "#prepare-progress", "Preparation done")
    _wait_text(page, "#data-info", f"prepared: {prepared.AUTO_PREPARE_ABOVE + 1:,} images")
    _wait_prepare_buttons(page, prepare=True, cancel=False)
    # Nothing being prepared: a load leaves the page as built (and fails nowhere on the server).
    page.reload(wait_until="load")
    page.get_by_role("button", name="Start", exact=True).wait_for()
    _wait_text(page, "#data-info", f"prepared: {prepared.AUTO_PREPARE_ABOVE + 1:,} images")
    _settle(page)
    _wait_prepare_buttons(page, prepare=True, cancel=False)
    assert page.inner_text("#prepare-progress").strip() == ""
    field.fill("")  # the next tests train on the sample photos
    field.press("Tab")
    _wait_text(page, "#data-info", "the sample photos")


def test_reconstruct_tab_reconstructs_the_good_files_and_lists_the_bad(page, server, tmp_path):
    [run] = server["manager"].list()
    page.get_by_role("tab", name="Reconstruct").click()
    page.wait_for_function("(id) => document.querySelector('#ckpt-pick input')?.value === id",
                           arg=run["run_id"])
    photos = sample_photo_paths()[:4]
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    page.locator("#uploads input[type=file]").set_input_files([*map(str, photos), str(corrupt)])
    _wait_uploaded(page, "broken.png")
    assert not page.locator("#recon-losses").is_visible()  # no empty grid before any result
    _button(page, "Reconstruct").click()
    page.wait_for_function("() => document.querySelectorAll('#recon-results .recon-item').length === 4")
    _wait_text(page, "#recon-refused", "broken.png")
    _wait_text(page, "#recon-losses", photos[3].name)
    text = page.locator("#recon-results-box").inner_text()
    for caption in ("masked", "reconstruction", "reconstruction + visible", "per-patch error"):
        assert caption in text
    # issue 9.9: every result is on the page, none hidden in an inner scroll area
    last = page.locator("#recon-results .recon-item").nth(3)
    last.scroll_into_view_if_needed()
    assert last.is_visible()
    assert page.evaluate("() => { const b = document.querySelector('#recon-results');"
                         " return b.scrollHeight <= b.clientHeight + 1; }")
    # issue 9.10: one colour bar with its values
    assert page.locator("#heat-colorbar").count() == 1
    assert "≥2" in page.locator("#heat-colorbar").inner_text()
    page.wait_for_function("() => document.querySelectorAll('#preview-gallery img').length >= 1")
    _settle(page)
    page.screenshot(path=str(SCREENSHOTS / "reconstruct.png"), full_page=True)


def test_reconstruct_keeps_the_step_chosen_and_drops_another_runs_results(page, server):
    """The last browser review: the weights-history slider went back to the newest snapshot at
    every refresh; results stayed under another run's checkpoint; a refusal fell below the
    fold of a 900 px window, so Reconstruct seemed to do nothing."""
    from types import SimpleNamespace

    from mae_core.model import MaskedAutoencoder
    from mae_core.snapshots import WeightSnapshots
    from ui.blocks import SLOW_POLL_S

    manager = server["manager"]
    [trained] = manager.list()
    paths = stopped_tiny_run(manager)
    try:
        keeper = WeightSnapshots(paths.root, keep=3, every_n_steps=10)
        for step in (10, 20, 30):
            keeper.save(SimpleNamespace(global_step=step),
                        SimpleNamespace(mae=MaskedAutoencoder(TINY_MODEL)))
        paths.weights.write_bytes(paths.snapshot(30).read_bytes())
        page.set_viewport_size({"width": 1440, "height": 900})
        page.get_by_role("tab", name="Reconstruct").click()
        pick = page.locator("#ckpt-pick input")  # the newest run's weights, followed
        page.wait_for_function("(id) => document.querySelector('#ckpt-pick input')?.value === id",
                               arg=paths.run_id)
        page.locator("#history-step").wait_for()
        step_box = page.locator("#history-step input[type=number]")
        page.wait_for_function("() => document.querySelector('#history-step input[type=number]')"
                               "?.value === '30'")
        step_box.fill("10")
        step_box.press("Tab")
        _button(page, "Show this step").click()
        _wait_text(page, "#history-message", "snapshot of step 10")
        page.wait_for_timeout(int(2.5 * SLOW_POLL_S * 1000))  # two refreshes
        assert step_box.input_value() == "10"
        # A refusal is in view, above the results (it was under the button, past the fold).
        page.evaluate("() => scrollTo(0, 0)")
        _set_number(page, "recon-seed", -1)
        _button(page, "Reconstruct").click()
        _wait_text(page, "#recon-message", "mask seed")
        assert _in_first_viewport(page, "#recon-message")
        _set_number(page, "recon-seed", 0)
        page.locator("#use-samples input").check()
        _button(page, "Reconstruct").click()
        _wait_text(page, "#recon-message", f"Run {paths.run_id}")
        # Another run picked: what this one's weights made is taken away, and that is said.
        pick.click()
        page.get_by_role("option", name=trained["run_id"]).click()
        _wait_text(page, "#recon-message", f"The checkpoint is now run {trained['run_id']}")
        _wait_text(page, "#ckpt-pick", "picked by hand")
        assert page.locator("#recon-results .recon-item").count() == 0
        page.wait_for_function("() => !document.querySelector('#history-message')?.innerText.trim()")
        page.locator("#use-samples input").uncheck()
    finally:
        page.set_viewport_size({"width": 1440, "height": 1000})
        manager.delete(paths.run_id)


def test_parameters_tab_groups_the_audit_and_marks_the_head_removed(page):
    page.get_by_role("tab", name="Parameters").click()
    head = page.locator('#params-clean tr[data-name="backbone.vit.head.weight"]')
    head.wait_for()
    assert head.get_attribute("data-status") == "removed"
    reference = page.locator('#params-reference tr[data-name="backbone.vit.head.weight"]')
    assert reference.get_attribute("data-status") == "trainable"
    assert "plain DDP safe" in page.locator("#params-clean").inner_text()
    # issue 9.13: grouped by part of the model, DDP-relevant groups first and open
    groups = page.locator("#params-clean details.mae-group")
    assert groups.count() > 5
    first = groups.first
    assert first.get_attribute("open") is not None and "DDP-relevant" in first.inner_text()
    assert page.locator('#params-clean details[data-group="encoder block 0"]').get_attribute("open") is None
    # A tensor name breaks after a dot only: at 1440 px "mask_token" broke as "m / ask_token".
    assert page.evaluate("""() => [...document.querySelectorAll(
            '#params-clean td.name, #params-reference td.name')]
        .flatMap(td => [...td.childNodes].filter(n => n.nodeType === Node.TEXT_NODE))
        .filter(n => { const r = document.createRange(); r.selectNodeContents(n);
                       return r.getClientRects().length > 1; })
        .map(n => n.textContent)""") == []
    # issue 9.12: a new audit shows progress on the tables only; the inputs stay usable
    page.locator("#param-preset input").fill("vit-small")
    page.locator("#param-preset input").press("Enter")
    _button(page, "Audit").click()
    assert page.evaluate("() => !document.querySelector('#param-preset').closest('.pending')"
                         " && !document.querySelector('#param-image .pending')")
    _wait_text(page, "#params-title", "vit-small")
    # An edited size says the tables are still the last audit's, until Audit.
    image = page.locator("#param-image input")
    image.fill("48")
    _wait_text(page, "#params-message", "for the settings audited last")
    dimmed = "() => getComputedStyle(document.querySelector('#params-clean')).opacity < 0.5"
    page.wait_for_function(dimmed)  # ... and the tables look it
    # A refused audit (a patch that does not divide the size) keeps them dimmed: still old.
    patch = page.locator("#param-patch input")
    old_patch = patch.input_value()
    patch.fill("7")
    _button(page, "Audit").click()
    _wait_text(page, "#params-message", "not divisible by the patch size")
    assert page.evaluate(dimmed)
    patch.fill(old_patch)
    _button(page, "Audit").click()
    _wait_text(page, "#params-title", "48px")
    page.wait_for_function("() => !document.querySelector('#params-message').innerText.trim()")
    assert page.evaluate("() => getComputedStyle(document.querySelector('#params-clean')).opacity")\
        == "1"
    image.fill("32")
    _button(page, "Audit").click()
    _wait_text(page, "#params-title", "32px")
    _settle(page)
    page.screenshot(path=str(SCREENSHOTS / "parameters.png"), full_page=False)


def test_runs_tab_lists_and_exports_the_run(page, server):
    [run] = server["manager"].list()
    page.get_by_role("tab", name="Runs").click()
    _wait_text(page, "#runs-table", run["run_id"])
    _wait_text(page, "#runs-table", "stopped")
    page.wait_for_function("(id) => document.querySelector('#runs-pick input')?.value === id",
                           arg=run["run_id"])
    page.wait_for_function("() => document.querySelector('#delete-btn')?.disabled === false")
    # Nothing exported, nothing made: no empty boxes (they took ~400 px above Compare).
    for empty in ("#export-file", "#export-code", "#csv-file"):
        assert not page.locator(empty).is_visible(), empty
    _button(page, "Export encoder").click()
    _wait_text(page, "#export-code", "timm.create_model")
    _wait_text(page, "#export-file", ".safetensors")
    _a_delete_tick_is_for_the_run_it_was_given_for(page, server["manager"], run)
    # The CSV is the picked run's, not the compare box's beside the button: said so.
    page.get_by_text("Compare runs and download metrics").click()  # closed at first
    _button(page, "Metrics CSV").click()
    _wait_text(page, "#compare-message", f"The metrics of {run['run_id']}, the run picked above")
    _wait_text(page, "#csv-file", f"metrics.csv of {run['run_id']}")
    _show_data_cache(page)
    _settle(page)
    page.screenshot(path=str(SCREENSHOTS / "runs.png"), full_page=True)


def _a_delete_tick_is_for_the_run_it_was_given_for(page, manager, run) -> None:
    """Ticked for one run, then another picked: Delete used to delete the other without asking."""
    other = create_run(manager.config(run["run_id"]), runs_dir=manager.runs_dir, state="stopped")
    try:
        _button(page, "Refresh").click()
        _wait_text(page, "#runs-table", other.run_id)
        page.locator("#confirm-delete input").check()
        page.locator("#runs-table").get_by_text(other.run_id).filter(visible=True).first.click()
        page.wait_for_function("(id) => document.querySelector('#runs-pick input')?.value === id",
                               arg=other.run_id)
        page.wait_for_function("() => !document.querySelector('#confirm-delete input').checked")
        # ... and the encoder exported for the first run is not offered under this one.
        page.wait_for_function("() => ['#export-file', '#export-code'].every(id => "
                               "!document.querySelector(id)?.offsetParent)")
        _button(page, "Delete run").click()
        _wait_text(page, "#runs-message", "Tick")
        assert other.root.is_dir()
    finally:
        manager.delete(other.run_id)
    page.locator("#runs-table").get_by_text(run["run_id"]).filter(visible=True).first.click()
    page.wait_for_function("(id) => document.querySelector('#runs-pick input')?.value === id",
                           arg=run["run_id"])
    # The refusal named the run picked then: it went on naming it beside this one, ticked.
    page.wait_for_function("() => !document.querySelector('#runs-message').innerText"
                           ".includes('Tick')")


def _contrast(page, selector: str) -> float:
    """WCAG contrast ratio between an element's text colour and the background it sits on."""
    return page.evaluate("""(sel) => {
      const el = document.querySelector(sel);
      // "rgb(r, g, b)", "rgba(r, g, b, a)", or color-mix()'s "color(srgb r g b / a)" in 0-1.
      const rgba = (c) => { const v = (c.match(/[\\d.]+/g) || []).map(Number);
        return c.startsWith("color(srgb") ? v.map((x, i) => (i < 3 ? x * 255 : x)) : v; };
      const lum = ([r, g, b]) => { const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 :
        Math.pow((v + 0.055) / 1.055, 2.4); }; return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
      let layers = []; for (let n = el; n; n = n.parentElement) {
        const c = rgba(getComputedStyle(n).backgroundColor);
        if (c.length >= 3 && (c.length < 4 || c[3] > 0)) { layers.push(c); if (c.length < 4 || c[3] >= 1) break; } }
      let bg = [255, 255, 255]; for (const c of layers.reverse()) { const a = c.length < 4 ? 1 : c[3];
        bg = [0, 1, 2].map((i) => c[i] * a + bg[i] * (1 - a)); }
      let fg = rgba(getComputedStyle(el).color);  // a translucent text colour, over its background
      if (fg.length >= 4) fg = [0, 1, 2].map((i) => fg[i] * fg[3] + bg[i] * (1 - fg[3]));
      const [hi, lo] = [lum(fg), lum(bg)].sort((a, b) => b - a);
      return (hi + 0.05) / (lo + 0.05); }""", selector)


def test_dark_mode_is_readable(browser_factory, server):
    """issue 9.1: with the OS in dark mode, the status panel, tables and verdicts have contrast."""
    page = browser_factory(scheme="dark")
    page.wait_for_function("() => document.querySelector('#run-status')?.dataset.state === 'stopped'")
    assert page.evaluate("() => document.body.classList.contains('dark') ||"
                         " getComputedStyle(document.body).backgroundColor !== 'rgb(255, 255, 255)'")
    for selector in ("#run-status [data-field='step']", "#run-status .mae-muted", "#log-tail"):
        assert _contrast(page, selector) >= 4.5, selector
    page.get_by_role("tab", name="Parameters").click()
    page.locator('#params-clean tr[data-name="backbone.vit.head.weight"] td.name').wait_for()
    for selector in ('#params-clean tr[data-name="backbone.vit.head.weight"] td.name',
                     '#params-clean tr[data-name="backbone.mask_token"] td.reason',
                     "#params-clean .mae-notice", "#params-reference .mae-notice",
                     "#params-diff td.name"):
        assert _contrast(page, selector) >= 4.5, selector
    # The grid in the border colour, not Gradio's ".prose td" text colour.
    assert page.evaluate("""() => { const td = document.querySelector('#params-clean .mae-table td');
      const body = getComputedStyle(document.body).color, cs = getComputedStyle(td);
      return cs.borderLeftColor !== body && cs.borderLeftColor === cs.borderTopColor; }""")
    page.screenshot(path=str(SCREENSHOTS / "parameters-dark.png"), full_page=False)
    page.get_by_role("tab", name="Runs").click()
    _show_data_cache(page)
    assert _contrast(page, "#cache-listing p") >= 4.5


def _show_data_cache(page) -> None:
    page.get_by_text("Data cache (prepared folders)").click()  # the accordion, closed at first
    # Greyed until a listing shows something it would remove (it answered "Nothing removed").
    assert _button(page, "Remove superseded sets").is_disabled()
    _button(page, "Show the data cache").click()
    _wait_text(page, "#cache-listing", "prepared set")


def test_every_tab_is_usable_at_800_px(browser_factory, server):
    """issue 9.9: no page-wide horizontal scroll, columns stacked rather than crushed, dropdown
    text not cut under its arrow."""
    page = browser_factory(width=800, height=1000)
    page.wait_for_function("() => document.querySelector('#run-status')?.dataset.state === 'stopped'")
    no_scroll = "() => document.documentElement.scrollWidth <= window.innerWidth + 1"
    assert page.evaluate(no_scroll)
    form, live = _boxes(page, "#train-form", "#train-live")  # at once: the chart still grows
    assert live["width"] > 500 and form["width"] > 500  # stacked, not crushed
    # Stacked, the run the controls act on comes before the form (it sat a whole form below).
    assert live["bottom"] <= form["top"] + 1
    assert _in_first_viewport(page, "#status-panel")
    # Gradio's subdued text colour is #bbbbc2 in light mode too (1.8:1): the panel's labels.
    assert _contrast(page, "#run-status .mae-muted") >= 4.5
    assert _contrast(page, "#field-data .info-text") >= 4.5  # Gradio's own field hints (theme)
    page.screenshot(path=str(SCREENSHOTS / "train-800.png"), full_page=True)
    for tab in ("Reconstruct", "Parameters", "Runs"):
        page.get_by_role("tab", name=tab).click()
        page.wait_for_timeout(1500)
        if tab == "Runs":
            _show_data_cache(page)
        assert page.evaluate(no_scroll), tab
        page.screenshot(path=str(SCREENSHOTS / f"{tab.lower()}-800.png"), full_page=True)
    page.get_by_role("tab", name="Reconstruct").click()
    page.wait_for_function("() => document.querySelector('#ckpt-pick input')?.value")
    assert page.evaluate("() => { const i = document.querySelector('#ckpt-pick input');"
                         " return i.scrollWidth <= i.clientWidth + 1; }"), "checkpoint name cut off"
    page.get_by_role("tab", name="Runs").click()
    page.wait_for_function("() => document.querySelector('#runs-pick input')?.value")
    assert page.evaluate("() => { const i = document.querySelector('#runs-pick input');"
                         " return i.scrollWidth <= i.clientWidth + 1; }"), "run name cut off"
    # Whole words in the runs table: its fixed-width columns scroll sideways inside its frame.
    assert page.evaluate("() => { const t = document.querySelector('#runs-table table');"
                         " const v = t.closest('.virtual-table-viewport') || t.parentElement;"
                         " return v.scrollWidth > v.clientWidth + 1; }")
    page.get_by_text("Compare runs and download metrics").click()
    for button in ("#open-btn", "#sooner-btn", "#later-btn", "#refresh-btn", "#csv-btn"):
        assert page.locator(button).bounding_box()["height"] < 48, f"{button} wraps its label"
    page.get_by_role("tab", name="Parameters").click()
    page.locator("#params-reference .mae-table").first.wait_for()
    clean = page.locator("#params-clean").bounding_box()
    reference = page.locator("#params-reference").bounding_box()
    assert reference["y"] >= clean["y"] + clean["height"], "policy tables side by side at 800 px"


def test_a_phone_sees_the_whole_chart_and_every_preview(browser_factory, server):
    """At 375 px the 500 px chart lost its y axis and half its legend, and the previews their
    fourth column. A chart is as wide as its box, so one drawn while its tab was hidden is
    drawn again when the tab shows."""
    import json

    from PIL import Image


    manager = server["manager"]
    paths = stopped_tiny_run(manager)
    try:
        with open(paths.metrics, "w") as handle:
            handle.writelines(json.dumps({"step": s, "epoch": 0, "loss": 2.0 / s}) + "\n"
                              for s in range(1, 41))
        paths.previews.mkdir()
        for step in range(0, 40, 10):
            Image.new("RGB", (256, 128), (90, 60 + step, 30)).save(
                paths.previews / f"step_{step:06d}.png")
        paths.weights.write_bytes(b"the newest run with weights: its previews are shown")
        rule = "-" * 88  # Lightning's model summary, ~90 characters wide
        paths.log.write_text(f"  | Name  | Type\n{rule}\n0 | model | MaskedAutoencoder\n{rule}\n")
        page = browser_factory(width=375, height=740)
        inside = ("([inner, outer, least]) => { const i = document.querySelector(inner);"
                  " const o = document.querySelector(outer); if (!i || !o) return false;"
                  " const a = i.getBoundingClientRect(), b = o.getBoundingClientRect();"
                  " return a.width > least && a.left >= b.left - 1 && a.right <= b.right + 1; }")
        chart_fits = ["#loss-plot canvas", "#loss-plot", 200]
        page.wait_for_function(inside, arg=chart_fits)
        # The run's name and state end before the dropdown's arrow (they ran under it).
        page.wait_for_function("() => document.querySelector('#run-pick input')?.value")
        assert page.evaluate(
            "() => { const i = document.querySelector('#run-pick input');"
            " const arrow = document.querySelector('#run-pick .icon-wrap').getBoundingClientRect();"
            " const text_end = i.getBoundingClientRect().right - parseFloat(getComputedStyle(i)"
            ".paddingRight); return text_end <= arrow.left + 1; }")
        # Its divider lines are cut at the log box's edge, one line each (each wrapped in two).
        page.wait_for_function("() => document.querySelectorAll('#log-tail .log-rule').length == 2")
        assert page.evaluate("() => [...document.querySelectorAll('#log-tail .log-rule')].every("
                             "r => r.getBoundingClientRect().height"
                             " < 2 * parseFloat(getComputedStyle(r).fontSize))")
        assert page.evaluate("() => { const p = document.querySelector('#log-tail');"
                             " return p.scrollWidth <= p.clientWidth + 1; }")
        # ... and no wider than the phone: a rule's 88 characters sized the whole Train column
        # (790 px at 390), the page cutting the status panel, the chart and the form off.
        columns = page.evaluate("() => ['#train-live', '#train-form', '#status-panel', '#log-tail']"
                                ".map(s => document.querySelector(s).getBoundingClientRect().right)")
        assert max(columns) <= 375, columns
        page.get_by_role("tab", name="Reconstruct").click()
        page.wait_for_function(
            "() => document.querySelectorAll('#preview-gallery img').length >= 4")
        for item in range(4):
            preview = f"#preview-gallery .grid-container > :nth-child({item + 1})"
            assert page.evaluate(inside, [preview, "#preview-gallery", 0]), f"preview {item + 1}"
        with open(paths.metrics, "a") as handle:  # the next poll redraws the hidden chart
            handle.write(json.dumps({"step": 41, "epoch": 0, "loss": 0.04}) + "\n")
        page.wait_for_function("() => document.querySelector('#loss-plot canvas').width < 100")
        page.get_by_role("tab", name="Train").click()
        page.wait_for_function(inside, arg=chart_fits)
        assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth + 1")
        # Every tensor's reason, the Parameters tab's point, is in view: no sideways scroll. (At
        # 375 px the tab bar folds that tab into its overflow menu: a 390 px phone shows it.)
        page = browser_factory(width=390, height=740)
        page.get_by_role("tab", name="Parameters").click()
        page.locator("#params-clean td.reason").first.wait_for()
        reasons = page.evaluate("() => [...document.querySelectorAll('#params-clean td.reason')]"
                                ".filter(td => td.getBoundingClientRect().width > 0)"
                                ".map(td => td.getBoundingClientRect().right)")
        assert reasons and max(reasons) <= 390, reasons
        # Each preset's name is read whole (the box read "vit-t…" at 390 px).
        preset = page.locator("#param-preset input")
        for name in ("vit-small", "vit-large"):
            preset.fill(name)
            assert preset.evaluate("e => e.scrollWidth <= e.clientWidth"), name
        # ... while a table whose columns are runs or policies keeps its headers (a phone showed
        # "frozen | trainable" under no policy's name, and a cell printed over the next one).
        heads = page.evaluate("() => [...document.querySelectorAll('.mae-diff th')]"
                              ".map(th => th.getBoundingClientRect().height)")
        assert heads and min(heads) > 0, heads
    finally:
        manager.delete(paths.run_id)


def test_the_form_kept_in_the_browser_comes_back_field_by_field(page):
    """A reload restores what the browser kept for each field; anything a field cannot hold (or
    a field this version of the form lacks) leaves that field as the page shows it."""
    from ui import configfile
    from ui.common import DEFAULTS, FIELD_NAMES, config_from_form, form_by_name, form_values

    shown = form_values(DEFAULTS)
    on_page = [shown[name] for name in FIELD_NAMES]
    restore = f"([saved, shown]) => ({configfile.RESTORE_FORM_JS})(saved, ...shown)"
    kept = form_by_name(on_page)
    page.evaluate("() => sessionStorage.clear()")  # no form of this tab's own: the browser's
    kept.update(batch_size=24, data="~/photos", compile=True, num_workers=None, retired_field=7,
                base_lr=float("nan"), weight_decay=[0.1], seed="x" * 5000,
                mask_ratio="0.75",  # text where a number goes: left at its default
                preset=3, max_steps=True, norm_pix_loss="yes", patch_size=None)
    restored = dict(zip(FIELD_NAMES, page.evaluate(restore, [kept, on_page])))
    assert (restored["batch_size"], restored["data"], restored["compile"]) == (24, "~/photos", True)
    assert restored["num_workers"] is None  # a blank number box: auto
    for name in ("base_lr", "weight_decay", "seed", "mask_ratio", "preset", "max_steps",
                 "norm_pix_loss", "patch_size"):  # patch_size: no auto, so no blank
        assert restored[name] == shown[name], name  # left as the page shows it
    for nothing in (None, [], "text", {"batch_size": None}, {"constructor": 5}):
        assert page.evaluate(restore, [nothing, on_page]) == on_page
    # What comes back is checked at Start like a typed value.
    assert config_from_form(restored).train.batch_size == 24
    # The tab's own form, where it kept one, before the browser's last (another tab's edit);
    # checked field by field the same way.
    key = configfile.FORM_STORAGE_KEY
    page.evaluate("([key, own]) => sessionStorage.setItem(key, JSON.stringify(own))",
                  [key, {**form_by_name(on_page), "batch_size": 40, "seed": "x"}])
    try:
        restored = dict(zip(FIELD_NAMES, page.evaluate(restore, [kept, on_page])))
        assert (restored["batch_size"], restored["data"], restored["seed"]) == (
            40, shown["data"], shown["seed"])
        page.evaluate("(key) => sessionStorage.setItem(key, '[1, 2')", key)  # damaged: ignored
        assert dict(zip(FIELD_NAMES, page.evaluate(restore, [kept, on_page])))["batch_size"] == 24
    finally:
        page.evaluate("() => sessionStorage.clear()")


def test_an_edit_made_as_the_page_appears_is_not_taken_back_by_the_restore(page):
    """The form came back from the server a second or two after it was shown, so a value typed
    at once (a second page in the same browser) was put back to the kept one and a Start used
    that. The server's answers are held back here, as on a busy machine: the edit stays."""
    key = "mae-studio-train-form"
    box = page.locator("#field-batch-size input")
    page.get_by_role("tab", name="Train").click()
    stored = page.evaluate(f"() => localStorage.getItem('{key}')")
    _set_number(page, "field-batch-size", 24)
    page.wait_for_function(f"(before) => localStorage.getItem('{key}') !== before", arg=stored)

    held = []  # the server's answers, held back until the edit is made and checked
    page.route("**/queue/join**", lambda route: held.append(route))
    try:
        page.reload(wait_until="load")
        box.wait_for()
        # Put back with no answer from the server, as the page opens: the edit comes after it.
        # (The answers are held until the edit is checked, so no wait can let the server's restore
        # in: a loaded CI machine's Chromium took over 3 s here.)
        page.wait_for_function("() => document.querySelector('#field-batch-size input')"
                               "?.value === '24'", timeout=UI_TIMEOUT_MS)
        box.fill("40")
        box.press("Tab")
    finally:
        for route in held:  # (unroute first answers them itself)
            route.continue_()
        page.unroute("**/queue/join**")
    page.wait_for_timeout(2000)  # the held answers (the old restore was one of them) arrive
    assert held and box.input_value() == "40"
    stored = page.evaluate(f"() => localStorage.getItem('{key}')")
    _set_number(page, "field-batch-size", 32)  # the default, for the tests after
    page.wait_for_function(f"(before) => localStorage.getItem('{key}') !== before", arg=stored)


def stopped_tiny_run(manager):
    """A run of the app's runs folder that never trained (a tiny model), stopped: something to
    pick, resume or stream a curve into without a trainer."""
    cfg = RunConfig(model=TINY_MODEL, train=TrainConfig(accelerator="cpu", devices=1,
                                                        num_workers=0))
    return create_run(cfg.resolved(), runs_dir=manager.runs_dir, state="stopped")


def _open_tab(page):
    """Another tab of ``page``'s browser on the same page, loaded."""
    tab = page.context.new_page()
    tab.set_default_timeout(UI_TIMEOUT_MS)
    tab.goto(page.url, wait_until="load")
    tab.get_by_role("tab", name="Train").click()
    tab.get_by_role("button", name="Start", exact=True).wait_for()
    return tab


def test_the_form_survives_a_reload_until_reset(page, browser_factory, tmp_path):
    """The last browser review: a reload put every field back to its default. The browser keeps
    the form (and an app restart does not lose it); Reset brings the defaults back."""
    from PIL import Image

    key = "mae-studio-train-form"
    page.get_by_role("tab", name="Train").click()
    stored = page.evaluate(f"() => localStorage.getItem('{key}')")
    _set_number(page, "field-batch-size", 24)
    page.wait_for_function(f"(before) => localStorage.getItem('{key}') !== before", arg=stored)
    for i in range(2):
        Image.new("RGB", (40, 30), (60 * i, 90, 30)).save(tmp_path / f"{i}.png")
    stored = page.evaluate(f"() => localStorage.getItem('{key}')")
    # Typed and kept without leaving the field: what it holds is told at the reload.
    page.locator("#field-data textarea, #field-data input").first.fill(str(tmp_path))
    page.wait_for_function(f"(before) => localStorage.getItem('{key}') !== before", arg=stored)
    page.reload(wait_until="load")
    page.get_by_role("button", name="Start", exact=True).wait_for()
    page.wait_for_function("() => document.querySelector('#field-batch-size input')?.value === '24'")
    _wait_text(page, "#data-info", "2 image file(s) found")
    # Another browser has its own form, at the defaults.
    other = browser_factory()
    assert other.locator("#field-batch-size input").input_value() == "32"
    other.context.close()
    # A new tab starts from the last form edited in this browser; then each tab keeps its own
    # through a reload (the last edit in any tab won).
    stored = page.evaluate(f"() => localStorage.getItem('{key}')")
    second = _open_tab(page)
    try:
        second.wait_for_function("() => document.querySelector('#field-batch-size input')"
                                 "?.value === '24'")
        _set_number(second, "field-batch-size", 40)
        second.wait_for_function(f"(before) => localStorage.getItem('{key}') !== before && "
                                 f"JSON.parse(sessionStorage.getItem('{key}'))?.batch_size === 40",
                                 arg=stored)
        third = _open_tab(page)
        third.wait_for_function("() => document.querySelector('#field-batch-size input')"
                                "?.value === '40'")
        page.reload(wait_until="load")
        page.get_by_role("button", name="Start", exact=True).wait_for()
        page.wait_for_timeout(2000)  # the load's restore has run: this tab's own form stays
        assert page.locator("#field-batch-size input").input_value() == "24"
    finally:
        for tab in page.context.pages[1:]:
            tab.close()
    page.get_by_text("config file", exact=True).click()  # the accordion, closed at first
    stored = page.evaluate(f"() => localStorage.getItem('{key}')")
    _button(page, "Reset the form to the defaults").click()
    _wait_text(page, "#config-message", "defaults again")
    page.wait_for_function("() => document.querySelector('#field-batch-size input')?.value === '32'")
    _wait_text(page, "#data-info", "the sample photos")
    page.wait_for_function(f"(before) => localStorage.getItem('{key}') !== before", arg=stored)
    page.reload(wait_until="load")
    page.get_by_role("button", name="Start", exact=True).wait_for()
    page.wait_for_timeout(2000)  # the load's restore has run: the defaults stay
    assert page.locator("#field-batch-size input").input_value() == "32"
