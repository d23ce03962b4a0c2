"""The report: ``results.md`` and ``results.json`` from the jobs a command ran, keeping the rest.

A command may run only some jobs (``python -m bench --job poll``). The sections of the jobs it did
not run are kept from the files it replaces, each marked with the command and the sitting it came
from, so measuring one job never erases the others' figures (``--fresh`` drops them instead).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import JOBS
from bench.procs import load_average
from bench.sections import HEADINGS, RSS_NOTE, not_run, one_line

JSON_KEYS = {"train": "training", "recon": "reconstruction", "app": "app", "poll": "poll"}
_KEPT_NOTE = "_Kept from an earlier sitting"
_PACKAGES = ("torch", "torchvision", "pytorch-lightning", "timm", "lightly", "gradio", "pillow")


@dataclass
class Section:
    """One job's part of the report: its Markdown lines (heading first) and its JSON value."""

    job: str
    lines: list[str]
    data: Any
    sitting: dict[str, Any]  # the command that measured it: command, run_at, load_average, hardware
    kept: bool = False  # carried over from the previous report


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    except (OSError, ValueError):
        pass
    return "unknown"


def machine_info() -> dict[str, str]:
    """The hardware, the library versions and the load when the command started."""
    import importlib.metadata as metadata

    import torch

    gpus = torch.cuda.device_count()
    gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(gpus)) if gpus else "none"
    info = {"CPU": _cpu_name(), "cores": str(os.cpu_count()), "RAM": _ram(), "GPU": gpu,
            "OS": platform.platform(), "python": platform.python_version()}
    for package in _PACKAGES:
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    load = load_average()
    if load:
        info["load average at start"] = load
    return info


def hardware(machine: dict[str, str]) -> str:
    cores, cpu, gpu = (machine.get(k, "?") for k in ("cores", "CPU", "GPU"))
    return f"{cores} cores of {cpu}, GPU {gpu}"


def sitting(command: str, run_at: str, machine: dict[str, str]) -> dict[str, Any]:
    return {"command": command, "run_at": run_at,
            "load_average": machine.get("load average at start"), "hardware": hardware(machine)}


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# --- keeping the sections of an earlier report ------------------------------------------------

def _split_sections(markdown: str) -> dict[str, list[str]]:
    """The lines of each job's section in ``markdown`` (heading first, earlier notes dropped)."""
    bodies: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in markdown.splitlines():
        if line.startswith("## "):
            job = next((j for j, h in HEADINGS.items() if line.startswith(h.split(" (")[0])), None)
            current = bodies.setdefault(job, []) if job else None
        if current is not None and not line.startswith(_KEPT_NOTE):
            current.append(line)
    for job, lines in bodies.items():
        if job != "train":  # older reports closed the App section with the training note
            lines[:] = [line for line in lines if line != RSS_NOTE]
        while lines and not lines[-1].strip():
            lines.pop()
    train = bodies.get("train")
    if train and RSS_NOTE in markdown and RSS_NOTE not in train:
        train += ["", RSS_NOTE]
    return bodies


def previous_sections(out: Path) -> dict[str, Section]:
    """The sections of the report at ``out`` that hold results, or none if it cannot be read."""
    try:
        markdown = out.read_text()
        data = json.loads(out.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    match = re.search(r"^Run (\d{4}-\d\d-\d\d \d\d:\d\d UTC)", markdown, re.MULTILINE)
    machine = data.get("machine") or {}
    # Reports written before sittings were recorded came from one command, the one they name.
    default = {"command": data.get("command"), "run_at": match and match.group(1),
               "load_average": machine.get("load average at start"), "hardware": hardware(machine)}
    sittings = data.get("sittings") or {}
    bodies = _split_sections(markdown)
    return {job: Section(job, bodies[job], data[key], sittings.get(job, default), kept=True)
            for job, key in JSON_KEYS.items() if data.get(key) and job in bodies}


def _kept_note(section: Section, machine: dict[str, str]) -> str:
    s = section.sitting
    same = s.get("hardware") == hardware(machine)
    other = "" if same else f"; on other hardware: {s.get('hardware')}"
    load = f", load average {s['load_average']} at its start" if s.get("load_average") else ""
    return (f"{_KEPT_NOTE} (this command did not run it): `{s.get('command')}`, run "
            f"{s.get('run_at') or 'at an unknown time'}{load}{other}._")


# --- the files --------------------------------------------------------------------------------

def render_markdown(command: str, machine: dict[str, str], sections: dict[str, Section],
                    run_at: str, total_s: float) -> str:
    ran = [job for job in JOBS if job in sections and not sections[job].kept]
    kept = [job for job in JOBS if job in sections and sections[job].kept]
    lines = ["# MAE Studio benchmark", "", f"Command: `{command}`", "",
             f"Run {run_at}; this command took {total_s:.0f} s and ran: "
             f"{', '.join(ran) or 'nothing'}."
             + (f" Kept from earlier sittings, as each says: {', '.join(kept)}." if kept else ""),
             "", "## Machine", "", "| Item | Value |", "|---|---|"]
    lines += [f"| {k} | {one_line(v)} |" for k, v in machine.items()]
    for job in JOBS:
        section = sections.get(job)
        body = section.lines if section else not_run(job)
        if section and section.kept:
            body = [body[0], "", _kept_note(section, machine), *body[1:]]
        lines += ["", *body]
    return "\n".join(lines) + "\n"


def results_json(command: str, machine: dict[str, str], sections: dict[str, Section],
                 run_at: str) -> dict[str, Any]:
    """The same results, machine-readable; ``sittings`` says which command measured each job."""
    empty: dict[str, Any] = {"train": {}, "recon": [], "app": None, "poll": None}
    out: dict[str, Any] = {"command": command, "run_at": run_at, "machine": machine,
                           "jobs_run": [j for j in JOBS if j in sections and not sections[j].kept]}
    for job, key in JSON_KEYS.items():
        out[key] = sections[job].data if job in sections else empty[job]
    out["sittings"] = {job: section.sitting for job, section in sections.items()}
    return out


def write_report(out: Path, command: str, machine: dict[str, str], fresh: dict[str, Section],
                 run_at: str, total_s: float, keep_previous: bool = True) -> str:
    """Write ``out`` and its ``.json`` twin atomically; the Markdown written."""
    from mae_core.fileio import atomic_write_json, atomic_write_text

    sections = {**(previous_sections(out) if keep_previous else {}), **fresh}
    markdown = render_markdown(command, machine, sections, run_at, total_s)
    atomic_write_text(out, markdown)
    atomic_write_json(out.with_suffix(".json"), results_json(command, machine, sections, run_at))
    return markdown
