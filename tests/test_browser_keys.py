"""The page by keyboard and on a phone, in a real headless Chromium, beside ``test_browser.py``
(its app, pages and helpers): the tabs show which one the keyboard is on, the phone's "More tabs"
menu closes as the keyboard leaves it, and the Runs tab's evaluation fits a phone's width.
"""

from __future__ import annotations

import json

from test_browser import (  # noqa: F401 - fixtures: the app, its pages, the failure screenshot
    _wait_text, browser_factory, no_server_tracebacks, page, screenshot_on_failure, server)

from mae_core.config import ModelConfig, RunConfig, TrainConfig
from mae_core.rundir import create_run

FOCUSED = """() => { const e = document.activeElement; const style = getComputedStyle(e);
  return {label: e.getAttribute('aria-label') || e.innerText.trim(), role: e.getAttribute('role'),
          outline: style.outlineStyle, width: style.outlineWidth,
          offset: parseFloat(style.outlineOffset)}; }"""
MENU_OPEN = "() => !!document.querySelector('#tabs .overflow-dropdown:not(.hide)')"


def _tab_until(tab_page, label: str, limit: int = 12) -> dict:
    for _ in range(limit):
        tab_page.keyboard.press("Tab")
        focused = tab_page.evaluate(FOCUSED)
        if focused["label"] == label:
            return focused
    raise AssertionError(f"Tab never reached {label!r} (last: {focused})")


def test_a_tab_reached_by_the_keyboard_is_marked_in_dark_mode(browser_factory):  # noqa: F811
    """The tab bar clips what lies outside a tab: of the browser's ring only its two ends showed,
    near-black on the dark page, and Tab moved along the tabs with nothing marking where."""
    dark = browser_factory(1440, 900, "dark")
    dark.locator("#header").click()  # the keyboard starts from the page's top
    for label in ("Train", "Reconstruct"):
        focused = _tab_until(dark, label, limit=3)
        assert focused["role"] == "tab"
        # Drawn, and inside the tab (a negative offset), where the bar does not clip it.
        assert (focused["outline"], focused["width"]) == ("solid", "2px"), focused
        assert focused["offset"] < 0, focused


def test_the_phone_tab_menu_closes_as_the_keyboard_leaves_it(browser_factory):  # noqa: F811
    """On a phone Parameters and Runs sit behind "More tabs": Tab past its entries left the menu
    open over the Queue and Stop buttons, and Escape did nothing. It closes as the focus leaves
    it, and on Escape (back on its button); its entries open their tabs."""
    phone = browser_factory(375, 800, "dark")
    phone.locator("#header").click()
    _tab_until(phone, "More tabs")
    phone.keyboard.press("Enter")
    phone.wait_for_function(MENU_OPEN)
    assert _tab_until(phone, "Parameters", limit=1) and _tab_until(phone, "Runs", limit=1)
    phone.keyboard.press("Tab")  # on past the menu: to the Train tab's first button
    phone.wait_for_function(f"() => !({MENU_OPEN})()")
    phone.keyboard.press("Shift+Tab")  # back into it: the menu's button, the menu shut
    assert phone.evaluate(FOCUSED)["label"] == "More tabs"
    phone.keyboard.press("Enter")
    phone.wait_for_function(MENU_OPEN)
    phone.keyboard.press("Escape")
    phone.wait_for_function(f"() => !({MENU_OPEN})()")
    assert phone.evaluate(FOCUSED)["label"] == "More tabs"
    phone.keyboard.press("Enter")
    _tab_until(phone, "Runs", limit=2)
    phone.keyboard.press("Enter")
    phone.wait_for_function("() => document.querySelector('#tab-runs')?.offsetParent !== null")
    assert phone.locator("#runs-pick").is_visible()


def test_the_evaluation_table_fits_a_phone(server, browser_factory):  # noqa: F811
    """At 375 px "delta (points)" and the end of the run id in the table's caption lay past the
    page's edge (headers kept on one line made the table wider than the phone)."""
    manager = server["manager"]
    cfg = RunConfig(model=ModelConfig(image_size=32, patch_size=8),
                    train=TrainConfig(accelerator="cpu", devices=1, num_workers=0))
    paths = create_run(cfg.resolved(), runs_dir=manager.runs_dir, state="finished")
    scores = lambda top1, top5: {"knn_top1": top1, "knn_top5": top5, "linear_top1": None}  # noqa: E731
    paths.evaluation.write_text(json.dumps({
        "run_id": paths.run_id, "step": 60, "data": "/data/labelled", "classes": ["a", "b"],
        "train_images": 400, "val_images": 500, "folds": 5, "split": None, "k": 20,
        "feature": "mean_patch", "trained": scores(57.8, 98.6), "random_init": scores(65.6, 98.4),
        "paired": {"test": "mcnemar", "trained_only": 54, "random_init_only": 93,
                   "p_value": 0.0016}, "seconds": 58.3, "evaluated_at": 1.0}))
    try:
        phone = browser_factory(375, 800, "dark")
        phone.locator("button[aria-label='More tabs']").click()
        phone.locator("#tabs .overflow-dropdown button", has_text="Runs").click()
        _wait_text(phone, "#runs-evaluation", "delta")
        box = phone.evaluate("""() => { const wrap = document.querySelector('#evaluation-result');
          return [wrap.scrollWidth, wrap.clientWidth]; }""")
        assert box[0] <= box[1], f"the table is {box[0]} px wide in a {box[1]} px box"
    finally:
        manager.delete(paths.run_id)
