"""The Runs tab's Evaluate: a run's encoder against its random init (kNN / linear probe), run as
a background job of :mod:`mae_core.evaljobs`: its progress in the message line (a reloaded or
second page too), then its outcome and the result table with the paired test's verdict."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from typing import Any

from mae_core.checks import shown
from mae_core.evaljobs import EvaluationBusy, EvaluationJob, Evaluations
from ui import render
from ui.common import AppContext, UserError, as_bool, as_run_id, describe

# What a finished job's message line said, rendered once per job: an unexpected error is logged
# (by describe) when it is first shown, not at every refresh.
_outcomes: weakref.WeakKeyDictionary[EvaluationJob, str] = weakref.WeakKeyDictionary()


def job_message(job: EvaluationJob) -> str:
    """The message line for an evaluation: its progress while it runs (with the Evaluate refused
    meanwhile, so that answer is not overwritten by the next progress), then how it ended."""
    if not job.done.is_set():
        text = f"Evaluating `{job.run_id}`: {job.text} ({job.fraction:.0%})."
        if job.refused:
            return render.notice("warn", f"{text} `{job.refused}` waits: one evaluation at "
                                         "a time, press Evaluate for it again once this one "
                                         "ends.")
        return render.notice("info", text)
    outcome = _outcomes.get(job)
    if outcome is None:
        if job.error is not None:
            outcome = render.notice("error", describe(job.error, "evaluate"))
        else:
            result = job.result or {}
            knn = {name: result[name]["knn_top1"] for name in ("trained", "random_init")}
            paired = result.get("paired")
            tested = (f"; p = {paired['p_value']:.2g}, {_significance(paired)}" if paired
                      else "")
            outcome = render.notice(
                "ok", f"Evaluated `{job.run_id}` in {result['seconds']} s: kNN top-1 "
                      f"{knn['trained']:.1f}% pretrained against {knn['random_init']:.1f}% at "
                      f"random init ({result['delta']['knn_top1']:+.1f} points{tested}).")
        _outcomes[job] = outcome
    return outcome


def evaluation_updates(ctx: AppContext, evaluations: Evaluations, run_id: str | None,
                       data: str | None, linear_probe: bool, poll_s: float = 0.5
                       ) -> Iterator[dict[str, Any]]:
    """Start evaluating ``run_id`` on ``data`` (empty: the demo set); yield its progress as it
    goes, then its result table. Refusals and failures are raised (the caller shows them)."""
    run_id = as_run_id(run_id)
    if not run_id:
        raise UserError("Choose a run to evaluate.")
    paths = ctx.manager.paths(run_id)  # refuses a run id that names no run
    if data is not None and not isinstance(data, str):
        raise UserError(f"the data folder is a path, not {shown(data)}")
    folder = (data or "").strip() or None
    try:
        job = evaluations.start(run_id, paths.root, folder, as_bool(linear_probe, "linear probe"))
    except EvaluationBusy as err:  # one at a time: the page's own refusal
        raise UserError(str(err)) from None
    while not job.done.wait(poll_s):
        yield {"message": job_message(job)}
    if job.error is not None:
        raise job.error
    yield {"message": job_message(job), "evaluation": evaluation_html(job.result, run_id)}


def evaluation_progress(evaluations: Evaluations | None, sig: dict[str, Any]
                        ) -> dict[str, Any]:
    """The message line's update from the slow refresh: the running evaluation's progress (a page
    opened or reloaded meanwhile shows it too; the Evaluate press that started it went with the
    old page), then once how it ended; ``sig`` (updated) remembers what this page was shown."""
    job = evaluations.current if evaluations is not None else None
    if job is None:
        return {}
    if not job.done.is_set():
        message = job_message(job)
        on_page = sig.get("evaluating")
        sig["evaluating"] = (job.run_id, message)
        return {} if on_page == (job.run_id, message) else {"message": message}
    if (sig.get("evaluating") or (None,))[0] == job.run_id:  # it ended since this page showed it
        sig["evaluating"] = None
        return {"message": job_message(job)}
    return {}


def _significance(paired: Mapping[str, Any]) -> str:
    from mae_core.evaluate import SIGNIFICANCE

    return ("more than chance" if paired["p_value"] < SIGNIFICANCE
            else "within chance on these images")


def evaluation_html(result: Mapping[str, Any] | None, run_id: str | None) -> str:
    """Run ``run_id``'s saved evaluation as a table: pretrained vs random init, delta in points,
    headed by the run it scores (the picker beside it can name another run by then); "" for none,
    or a damaged one (it reads as not evaluated)."""
    if not result:
        return ""
    from mae_core.evaluate import METRICS, images_said, valid_result

    result = valid_result(dict(result))
    if result is None:
        return ""
    names = {"knn_top1": f"kNN top-1 (k={render.esc(result.get('k'))})", "knn_top5": "kNN top-5",
             "linear_top1": "linear probe top-1"}
    cell = lambda v, sign="": "–" if v is None else f"{v:{sign}.1f}"  # noqa: E731
    rows = "".join(
        f"<tr><td>{names[m]}</td><td>{cell(result['trained'][m])}</td>"
        f"<td>{cell(result['random_init'][m])}</td><td>{cell(result['delta'][m], '+')}</td></tr>"
        for m in METRICS)
    about = (f"step {result.get('step')}, {len(result.get('classes', []))} classes, "
             f"{images_said(result)}, of {result.get('data')}, feature {result.get('feature')}")
    if result["paired"]:
        from mae_core.evaluate import verdict

        about += f". kNN top-1, image by image: {verdict(result['paired'])}"
    caption = f"Evaluation of run {run_id}" if run_id else "Evaluation"
    return (f'<div class="mae-table-wrap" id="evaluation-result"><table class="mae-table">'
            f"<caption>{render.esc(caption)}</caption><thead>"
            "<tr><th>metric (%)</th><th>pretrained</th><th>random init</th>"
            f"<th>delta (points)</th></tr></thead><tbody>{rows}</tbody></table>"
            f"<small>{render.esc(about)}</small></div>")
