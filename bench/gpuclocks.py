"""What the GPUs did while the GPU check trained: ``nvidia-smi`` sampled beside the run.

A throughput figure means little without the clock it ran at. One H200 sitting measured the
trainer at half an earlier sitting's pace on the same kind of machine while the model step alone
ran as fast as before; whether its GPU was held back (a power cap, heat) could not be told
afterwards. The check now records each GPU's SM clock, power, temperature, load and the reasons
the driver gives for any slowdown, and reports them over the samples in which the GPU was busy
(compilation and start-up excluded), with how busy it was: a GPU the host holds back reads a
full clock and a low load.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SAMPLE_MS = 250
# Samples below this load are start-up, compilation or the end, not training. Low on purpose:
# a trainer the host holds back keeps its GPU only partly busy, and those samples count.
BUSY_PERCENT = 10
FIELDS = ("index", "clocks.sm", "clocks.max.sm", "power.draw", "power.limit", "temperature.gpu",
          "utilization.gpu")
# Drivers before 535 name the reasons' field by its older name.
REASON_FIELDS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")
# NVML's clock event reasons; 0x1 (idle) is no slowdown.
REASONS = {0x2: "applications clocks setting", 0x4: "software power cap",
           0x8: "hardware slowdown", 0x10: "sync boost", 0x20: "software thermal slowdown",
           0x40: "hardware thermal slowdown", 0x80: "hardware power brake",
           0x100: "display clock setting"}


@dataclass(frozen=True)
class Sample:
    gpu: int
    sm_mhz: float | None
    max_sm_mhz: float | None
    power_w: float | None
    power_limit_w: float | None
    temperature_c: float | None
    busy_percent: float | None
    reasons: int

    @classmethod
    def from_csv(cls, line: str) -> Sample | None:
        """A sample from one ``--format=csv,noheader,nounits`` line, or None for anything else
        (a warning, a cut line)."""
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != len(FIELDS) + 1:
            return None
        try:
            gpu = int(parts[0])
        except ValueError:
            return None
        try:
            reasons = int(parts[-1], 16)
        except ValueError:  # "[N/A]": a GPU that does not say
            reasons = 0
        return cls(gpu, *(_number(part) for part in parts[1:-1]), reasons)  # type: ignore[arg-type]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def reason_names(mask: int) -> list[str]:
    """The slowdown reasons set in ``mask``; an unknown bit is named by its value."""
    names = [name for bit, name in REASONS.items() if mask & bit]
    unknown = mask & ~(sum(REASONS) | 0x1)
    return names + ([f"reason bits {unknown:#x}"] if unknown else [])


def summarise(samples: list[Sample]) -> list[dict[str, Any]]:
    """Per GPU, over its busy samples: the SM clock (median, lowest, the GPU's maximum), power,
    temperature and the share of samples each slowdown reason was active in."""
    out = []
    for gpu in sorted({s.gpu for s in samples}):
        mine = [s for s in samples if s.gpu == gpu]
        busy = [s for s in mine if (s.busy_percent or 0) >= BUSY_PERCENT]
        row: dict[str, Any] = {"gpu": gpu, "samples": len(mine), "busy_samples": len(busy)}
        if busy:
            row.update(
                busy_percent_median=_median(s.busy_percent for s in busy),
                sm_mhz_median=_median(s.sm_mhz for s in busy),
                sm_mhz_min=_least(s.sm_mhz for s in busy),
                max_sm_mhz=_least(s.max_sm_mhz for s in busy),
                power_w_median=_median(s.power_w for s in busy),
                power_limit_w=_least(s.power_limit_w for s in busy),
                temperature_c_max=max((s.temperature_c for s in busy
                                       if s.temperature_c is not None), default=None),
                reasons={name: sum(name in reason_names(s.reasons) for s in busy) / len(busy)
                         for name in sorted({n for s in busy for n in reason_names(s.reasons)})})
        out.append(row)
    return out


def _median(values: Any) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _least(values: Any) -> float | None:
    known = [v for v in values if v is not None]
    return min(known) if known else None


class ClockSampler:
    """``with ClockSampler() as clocks: ...`` samples every GPU every :data:`SAMPLE_MS` ms from a
    ``nvidia-smi`` process beside the work; :meth:`summary` afterwards. Where ``nvidia-smi`` is
    missing or refuses, it records nothing and :attr:`missing` says why."""

    def __init__(self, every_ms: int = SAMPLE_MS) -> None:
        self.every_ms = every_ms
        self.missing: str | None = None
        self.samples: list[Sample] = []
        self._process: subprocess.Popen | None = None
        self._output: Path | None = None

    def __enter__(self) -> ClockSampler:
        smi = shutil.which("nvidia-smi")
        if smi is None:
            self.missing = "nvidia-smi is not on the PATH"
            return self
        query = _working_query(smi)
        if query is None:
            self.missing = "nvidia-smi refused the clock query"
            return self
        handle, name = tempfile.mkstemp(prefix="mae-gpu-clocks-", suffix=".csv")
        self._output = Path(name)
        with open(handle, "wb", closefd=True) as out:
            self._process = subprocess.Popen(
                [smi, f"--query-gpu={query}", "--format=csv,noheader,nounits",
                 f"--loop-ms={self.every_ms}"], stdout=out, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._output is not None:
            text = self._output.read_text(errors="replace")
            self._output.unlink(missing_ok=True)
            self.samples = [s for s in map(Sample.from_csv, text.splitlines()) if s is not None]

    def summary(self) -> dict[str, Any]:
        return {"sample_ms": self.every_ms, "busy_percent": BUSY_PERCENT, "missing": self.missing,
                "gpus": summarise(self.samples)}


def _working_query(smi: str) -> str | None:
    for reasons in REASON_FIELDS:
        query = ",".join((*FIELDS, reasons))
        try:
            done = subprocess.run([smi, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                                  capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if done.returncode == 0:
            return query
    return None


def clock_lines(name: str, clocks: dict[str, Any]) -> list[str]:
    """The report's lines for one measurement's clocks."""
    head = (f"GPU clocks during **{name}** (nvidia-smi every {clocks['sample_ms']} ms; samples with "
            f"the GPU at least {clocks['busy_percent']}% busy):")
    if clocks.get("missing"):
        return [f"{head} not recorded ({clocks['missing']})."]
    lines = [head, ""]
    for row in clocks["gpus"]:
        if not row["busy_samples"]:
            lines.append(f"- GPU {row['gpu']}: never busy in {row['samples']} samples")
            continue
        slowdowns = ", ".join(f"{name} in {share:.0%}" for name, share in row["reasons"].items())
        lines.append(
            f"- GPU {row['gpu']}: {_percent(row['busy_percent_median'])} busy (median), "
            f"SM {_mhz(row['sm_mhz_median'])} median (lowest "
            f"{_mhz(row['sm_mhz_min'])}, the GPU's maximum {_mhz(row['max_sm_mhz'])}), "
            f"power {_watts(row['power_w_median'])} median of a {_watts(row['power_limit_w'])} "
            f"limit, {_celsius(row['temperature_c_max'])} at most, over {row['busy_samples']} "
            f"samples; slowdown reasons: {slowdowns or 'none'}")
    if not clocks["gpus"]:
        lines.append("- no sample was read")
    return lines


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


def _mhz(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} MHz"


def _watts(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} W"


def _celsius(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} °C"
