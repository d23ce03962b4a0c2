"""The Train tab in a real headless Chromium, beside ``test_browser.py`` (its app, page and
helpers): the live view holds still while a run's curve streams in, and the data field's Prepare
follows what the field says of its folder.

A run's curve is written here line by line, as the trainer writes ``metrics.jsonl``, to reach
on purpose the moments that moved the page under a real run: a tick label at the axis's top end,
and the end of the first epoch.
"""

from __future__ import annotations

import json

from test_browser import (  # noqa: F401 - fixtures: the app, its page, the failure screenshot
    _boxes, _chart_drawn, _poll_until, _wait_text, no_server_tracebacks, page,
    screenshot_on_failure, server, stopped_tiny_run)



def _append(path, *rows: dict) -> None:
    with open(path, "a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def _loss(step: int, loss: float) -> dict:
    return {"step": step, "epoch": 0, "loss": loss, "lr": 1e-4, "images_per_s": 30.0,
            "elapsed_s": step * 0.5}


def test_the_live_view_holds_still_as_the_curve_streams(page, server):  # noqa: F811
    """Under a streaming run the chart's height flipped between 391 and 394 px on some polls (a
    log-axis label on a tick at the axis's top end reached past the plot), the text under it
    gained a line at the end of the first epoch ("last epoch mean", 23 px), and the empty chart
    box grew 153 px at the first step: the log under them jumped each time. The chart and the
    log stay where they are, poll after poll, from before the first step."""
    manager = server["manager"]
    paths = stopped_tiny_run(manager)
    try:
        page.get_by_role("tab", name="Train").click()
        _wait_text(page, "#status-panel", paths.run_id)
        layouts = []
        # No step yet (the chart's box empty), the first steps, a new top (its padded end lands
        # on the tick "2"), the first epoch's mean, a top past 2.
        stages = [(), (_loss(1, 1.5), _loss(2, 0.9), _loss(3, 0.5)), (_loss(4, 1.8724),),
                  (_loss(5, 0.6), {"step": 5, "epoch": 0, "epoch_loss": 1.07}),
                  (_loss(6, 2.05), _loss(7, 0.55))]
        points = 0
        for rows in stages:
            _append(paths.metrics, *rows)
            points += sum("loss" in row for row in rows)
            _wait_text(page, "#plot-info", f"{points} points")
            page.wait_for_timeout(1500)  # Vega draws after the poll's reply; a poll comes and goes
            if points:
                assert _poll_until(lambda: _chart_drawn(page)), "the loss chart stayed blank"
            plot, log = _boxes(page, "#loss-plot", "#log-accordion")
            layouts.append((round(plot["bottom"] - plot["top"], 1), round(log["top"], 1)))
        assert "last epoch mean 1.07" in page.locator("#plot-info").inner_text()
        assert len(set(layouts)) == 1, layouts
    finally:
        manager.delete(paths.run_id)


def test_prepare_is_greyed_while_the_data_field_refuses_its_folder(page, tmp_path):  # noqa: F811
    """Prepare stayed enabled beside a note refusing the folder; pressing it only said it again."""
    page.get_by_role("tab", name="Train").click()
    field = page.locator("#field-data textarea, #field-data input").first
    prepare = page.locator("#prepare-btn")
    field.fill(str(tmp_path / "no-such-folder"))
    field.press("Tab")
    _wait_text(page, "#data-info", "no-such-folder")
    page.wait_for_function("() => document.querySelector('#prepare-btn')?.disabled === true")
    assert page.locator("#data-info [data-kind=error]").is_visible()  # the reason, beside it
    (tmp_path / "no-such-folder").mkdir()
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "no-such-folder" / "a.png")
    field.press("Tab")  # the same folder, made meanwhile: left again, checked again, found
    _wait_text(page, "#data-info", "1 image file(s) found")
    page.wait_for_function("() => document.querySelector('#prepare-btn')?.disabled === false")
    field.fill("")
    field.press("Tab")
    _wait_text(page, "#data-info", "the sample photos")
    assert prepare.is_enabled()
