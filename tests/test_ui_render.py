"""ui.render: the HTML is readable in dark mode (theme variables, no light fills) and escapes
every string that came from a user or a file."""

from __future__ import annotations

import dataclasses
import re

import pytest
from PIL import Image

from mae_core.audit import group_rows
from mae_core.config import ModelConfig, RunConfig, TrainConfig
from mae_core.reconstruct import UploadView
from ui import render
from ui.common import cached_audit

TINY = ModelConfig(image_size=32, patch_size=8)
EVIL = '<script>alert("x")</script>'

_HEX = re.compile(r"#([0-9a-fA-F]{3}|[0-9a-fA-F]{6})\b")
_RGBA = re.compile(r"rgba?\(\s*([\d.]+)\s*,\s*([\d.]+)\s*,\s*([\d.]+)\s*(?:,\s*([\d.]+)\s*)?\)")


def luminance(r: float, g: float, b: float) -> float:
    """WCAG relative luminance of an sRGB colour given as 0-255 channels."""
    def lin(c: float) -> float:
        c /= 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    return 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b)


def opaque_colours(value: str) -> list[tuple[str, float]]:
    """(colour, luminance) of every hard-coded, mostly opaque colour in a CSS value."""
    found = []
    for match in _HEX.finditer(value):
        digits = match.group(1)
        if len(digits) == 3:
            digits = "".join(c * 2 for c in digits)
        found.append((match.group(0), luminance(*(int(digits[i:i + 2], 16) for i in (0, 2, 4)))))
    for match in _RGBA.finditer(value):
        alpha = float(match.group(4)) if match.group(4) is not None else 1.0
        if alpha > 0.35:  # a faint tint over the theme's own background reads in both modes
            found.append((match.group(0), luminance(*map(float, match.group(1, 2, 3)))))
    for name, lum in (("white", 1.0), ("whitesmoke", 0.91), ("ivory", 0.99), ("snow", 0.97),
                      ("black", 0.0)):
        if re.search(rf"(^|[\s:,]){name}\b", value):
            found.append((name, lum))
    return found


def declarations(text: str) -> list[tuple[str, str]]:
    """(property, value) of every CSS declaration in inline styles and in style sheets."""
    bodies = re.findall(r'style="([^"]*)"', text) + re.findall(r"\{([^{}]*)\}", text)
    out = []
    for body in bodies:
        for decl in body.split(";"):
            prop, sep, value = decl.partition(":")
            if sep:
                out.append((prop.strip().lower(), value.strip()))
    return out


def assert_dark_mode_safe(text: str) -> None:
    for prop, value in declarations(text):
        if prop in ("background", "background-color"):
            for colour, lum in opaque_colours(value):
                assert lum < 0.45, (f"light background {colour} ({prop}: {value}) reads white on "
                                    "white in dark mode")
        if prop == "color":
            for colour, lum in opaque_colours(value):
                # Dark text on the dark theme is unreadable; light text is only for saturated pills.
                assert lum > 0.9, f"hard-coded text colour {colour}: use a theme variable"


def full_status() -> dict:
    return {"run_id": "20261126-141502-vit-tiny-ddp-clean", "state": "running", "step": 40,
            "total_steps": 200, "epoch": 3, "images_per_s": 123.4, "elapsed_s": 80, "loss": 0.8123,
            "stop_requested": True, "error": "a note", "images": 17}


def test_css_styles_boxes_with_theme_variables():
    assert_dark_mode_safe(render.CSS)
    rules = dict(re.findall(r"([^{}]+)\{([^{}]*)\}", render.CSS))
    rules = {selector.strip(): body for selector, body in rules.items()}
    for selector in (".mae-box", ".mae-log", ".mae-table", ".mae-table th", ".mae-notice"):
        assert "color: var(--body-text-color" in rules[selector], selector
    for selector in (".mae-box", ".mae-log", ".mae-table th"):
        assert "background: var(--background-fill" in rules[selector], selector


@pytest.mark.parametrize("state", ["starting", "running", "stopping", "stopped", "finished", "failed"])
def test_status_panel_uses_no_light_fills(state):
    cfg = RunConfig(model=TINY, train=TrainConfig(devices=2, find_unused_parameters=False))
    html = render.status_html({**full_status(), "state": state}, cfg)
    assert_dark_mode_safe(html)
    assert 'class="mae-box"' in html and f'data-state="{state}"' in html
    pill = re.search(r'class="mae-pill" style="background:(#[0-9a-f]{6})"', html)
    colour = pill.group(1)
    lum = luminance(*(int(colour[i:i + 2], 16) for i in (1, 3, 5)))
    assert (1.05) / (lum + 0.05) >= 3.0, f"white on {colour} is too faint"


def test_status_panel_says_when_a_running_run_has_taken_no_step_for_long():
    import time

    from mae_core.display import STALL_MIN_S

    calm = {**full_status(), "stop_requested": False, "error": None, "step_at": time.time() - 5}
    assert "No step for" not in render.status_html(calm)
    hung = {**calm, "step_at": time.time() - STALL_MIN_S - 120}
    html = render.status_html(hung)
    assert "No step for 7 min" in html and "(a step took 2 s on average)" in html
    assert "Stop, then Force stop, ends it" in html
    assert_dark_mode_safe(html)
    assert "No step for" not in render.status_html({**hung, "state": "finished"})


def test_empty_status_panel_and_notices_use_no_light_fills():
    assert_dark_mode_safe(render.status_html(None))
    for kind in ("ok", "info", "warn", "error"):
        assert_dark_mode_safe(render.notice(kind, "text"))
    assert_dark_mode_safe(render.log_html("line 1\nline 2", "running"))


def test_audit_tables_use_no_light_fills():
    clean = cached_audit(TINY)
    reference = cached_audit(ModelConfig(image_size=32, patch_size=8, policy="reference"))
    for html in (render.audit_html(clean, group_rows(clean)),
                 render.audit_html(reference, group_rows(reference)),
                 render.audit_diff_html(clean, reference)):
        assert_dark_mode_safe(html)
        assert "mae-table" in html


def test_the_checker_itself_catches_light_fills():
    for bad in ('<div style="background:#fff">x</div>', '<div style="background: #f8fafc">x</div>',
                '<div style="background-color:white">x</div>', '<div style="color:#111">x</div>',
                ".x { background: rgb(250, 250, 250); }"):
        with pytest.raises(AssertionError):
            assert_dark_mode_safe(bad)


def test_status_panel_escapes_what_the_run_holds():
    status = {**full_status(), "run_id": EVIL, "state": '"><img src=x onerror=alert(1)>',
              "error": EVIL, "epoch": EVIL}
    cfg = RunConfig(model=TINY, train=TrainConfig(data=f"/data/{EVIL}"))
    html = render.status_html(status, cfg)
    assert "<script" not in html and "<img" not in html
    assert "&lt;script&gt;" in html


def test_a_log_divider_is_one_unwrapped_line_and_other_lines_are_untouched():
    """Lightning's model summary draws ~90-character divider lines; in a phone's log box each
    wrapped into a second line of dashes. A line of only rule characters is now its own block,
    cut at the box's edge (``.log-rule``, CSS), its newline taken with it."""
    text = "  | Name  | Type\n" + "-" * 88 + "\n0 | model | MAE\n" + "=" * 12 + "  \nlr=0.1 -- ok --------"
    html = render.log_html(text, "running")
    assert html.count('<span class="log-rule">') == 2
    assert f'<span class="log-rule">{"-" * 88}</span>0 | model | MAE\n' in html
    assert f'<span class="log-rule">{"=" * 12}</span>lr=0.1 -- ok --------</pre>' in html
    assert html.count("\n") == 2  # the two rules' newlines went with them, no blank line left
    assert "log-rule" not in render.log_html("-------", "running")  # too short to be a rule
    assert "<script" not in render.log_html("-" * 9 + "\n" + EVIL, "failed")


def test_messages_logs_and_refusals_are_escaped():
    assert "<script" not in render.notice("error", f"run `{EVIL}` failed: {EVIL}")
    assert "<code>&lt;script&gt;" in render.notice("error", f"run `{EVIL}`")
    assert "<script" not in render.log_html(EVIL, "failed")
    assert "&lt;script&gt;" in render.log_html(EVIL, "failed")
    refused = render.refused_html([(f"{EVIL}.png", f"reason {EVIL}")])
    assert "<script" not in refused and refused.count("&lt;script&gt;") == 2
    assert "&quot;" in render.refused_html([('a"b.png', "x")])


def test_reconstruction_names_are_escaped():
    pic = Image.new("RGB", (8, 8), (10, 20, 30))
    view = UploadView(name=f'{EVIL}" onload="x.png', panels=[pic] * 4, heatmap=pic, loss=0.5,
                      masked_patches=12)
    html = render.reconstruction_html([view], ["input", "masked", "rec", "rec+vis"],
                                      render.data_uri(pic), 2.0)
    assert "<script" not in html and 'onload="x' not in html
    assert "0.5000 on 12 masked patches" in html and 'id="heat-colorbar"' in html


def test_model_output_panels_are_marked_escaped_and_explained():
    pic = Image.new("RGB", (8, 8), (10, 20, 30))
    view = UploadView(name="a.png", panels=[pic] * 4, heatmap=pic, loss=0.5, masked_patches=12,
                      model_panels=[pic] * 2)
    html = render.reconstruction_html([view], ["input", "masked", "rec", "rec+vis"],
                                      render.data_uri(pic), 2.0, [f"out {EVIL}", "target"])
    assert html.count('<figure class="model-output">') == 2 and "<script" not in html
    assert 'data-norm-pix="true"' in html and "not from the model" in html
    plain = render.reconstruction_html([dataclasses.replace(view, model_panels=[])],
                                       ["input", "masked", "rec", "rec+vis"], render.data_uri(pic), 2.0)
    assert 'data-norm-pix="false"' in plain and "model-output" not in plain
    assert 'id="recon-note"' not in render.reconstruction_html([], [], render.data_uri(pic), 2.0)


def test_ddp_mode_names_plain_ddp_or_find_unused():
    plain = RunConfig(train=TrainConfig(devices=2, find_unused_parameters=False))
    walking = RunConfig(model=ModelConfig(policy="reference"),
                        train=TrainConfig(devices=2, find_unused_parameters=True))
    single = RunConfig(train=TrainConfig(devices=1, find_unused_parameters=False))
    assert "plain DDP" in render.ddp_mode(plain)
    assert "find_unused_parameters=True" not in render.ddp_mode(plain)
    assert "find_unused_parameters=True" in render.ddp_mode(walking)
    assert "plain DDP" not in render.ddp_mode(walking)
    assert "single process" in render.ddp_mode(single)
    html = render.status_html(full_status(), walking)
    assert re.search(r'data-field="ddp">[^<]*find_unused_parameters=True', html)


def test_status_panel_shows_progress_eta_and_stop_request():
    html = render.status_html(full_status(), None)
    assert "40 / 200" in html and "width:20.0%" in html
    assert ">5 min 20 s<" in html  # ETA: 160 steps left at 2 s per step
    assert "Stop requested" in html
    stopped = render.status_html({**full_status(), "state": "stopped"}, None)
    assert "Stop requested" not in stopped  # a stop request is news only while the run is live
    assert 'data-field="ETA" style="font-weight:600">–<' in stopped


def test_status_panel_keeps_its_layout_from_start_to_streaming():
    """The bar and the MFU cell came with the first steps: the chart and log under the panel
    jumped 47 px as a run began to stream. Both stand from the start, the bar unseen."""
    starting = render.status_html({"run_id": "r", "state": "starting", "step": 0}, None)
    running = render.status_html(full_status(), None)
    for html in (starting, running):
        assert html.count('class="mae-bar"') == 1 and 'data-field="MFU"' in html
        assert html.count("data-field=") == running.count("data-field=")
    assert "visibility:hidden" in starting and "visibility:hidden" not in running


def test_status_panel_says_a_run_diverged_instead_of_no_loss():
    """status.json keeps a NaN loss (news, not damage); the panel showed it as "–", no loss yet."""
    html = render.status_html({**full_status(), "loss": float("nan")}, None)
    assert "nan (diverged: lower the learning rate)" in html


def test_every_run_state_has_its_own_colour():
    from mae_core.rundir import STATES

    assert set(render.STATE_COLOURS) == set(STATES)
    # A queued run waits to start: it used to show in the grey of a stopped one.
    assert render.STATE_COLOURS["queued"] != render.STATE_COLOURS["stopped"]


def css_rules() -> dict[str, str]:
    """Selector (without comments) -> declarations, for each rule in render.CSS."""
    text = re.sub(r"/\*.*?\*/", "", render.CSS, flags=re.S)
    return {" ".join(sel.split()): body for sel, body in re.findall(r"([^{}]+)\{([^{}]*)\}", text)}


def test_muted_text_reads_in_light_mode_too():
    """--body-text-color-subdued is #bbbbc2 in light mode as in dark: 1.8:1 on the light page."""
    rules = css_rules()
    assert not any("--body-text-color-subdued" in body for body in rules.values())
    for selector in (".mae-muted", ".mae-recon figcaption", ".mae-colorbar .ticks"):
        assert "color-mix(in srgb, var(--body-text-color)" in rules[selector], selector


def test_table_grid_outranks_gradios_prose_borders():
    """Gradio's ".gradio-container-X .prose td" (two classes and a tag) drew the grid in the text
    colour over ".mae-table td": the rule for the grid needs three classes."""
    rules = css_rules()
    selector = next(s for s in rules if ".prose .mae-table td" in s)
    assert ".gradio-container .prose .mae-table td" in selector
    assert ".gradio-container .prose .mae-table th" in selector
    assert "border-color: var(--border-color-primary)" in rules[selector]


def test_the_preview_gallery_is_not_capped_at_the_window_height():
    assert "max-height: none" in css_rules()["#preview-gallery .grid-wrap.fixed-height"]
