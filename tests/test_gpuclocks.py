"""The GPU check's clock record: nvidia-smi's lines read, summarised over the busy samples, and
what the report says where nvidia-smi is missing. nvidia-smi does not run on the CPU machines the
suite runs on: the sampler's plumbing is driven by a stand-in script that prints what nvidia-smi
prints (its csv,noheader,nounits lines), and the real tool is used where the GPU tests run."""

from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from bench.gpuclocks import ClockSampler, Sample, clock_lines, reason_names, summarise

BUSY = "0, 1980, 1980, 512.34, 700.00, 45, 98, 0x0000000000000000"
CAPPED = "0, 1410, 1980, 699.81, 700.00, 61, 100, 0x0000000000000004"
IDLE = "0, 345, 1980, 80.10, 700.00, 30, 0, 0x0000000000000001"
OTHER_GPU = "1, 1755, 1980, [N/A], 700.00, 52, 90, 0x0000000000000060"


def test_a_line_is_read_field_by_field_and_anything_else_is_no_sample():
    sample = Sample.from_csv(CAPPED)
    assert sample == Sample(0, 1410.0, 1980.0, 699.81, 700.0, 61.0, 100.0, 0x4)
    assert Sample.from_csv(OTHER_GPU).power_w is None  # [N/A] is unknown, not an error
    for junk in ("", "0, 1980", "No devices were found", "x, 1, 2, 3, 4, 5, 6, 0x0"):
        assert Sample.from_csv(junk) is None
    assert Sample.from_csv("0, 1980, 1980, 500, 700, 50, 90, [N/A]").reasons == 0  # not said


def test_the_slowdown_reasons_are_named_and_idle_is_none_of_them():
    assert reason_names(0x1) == []
    assert reason_names(0x4) == ["software power cap"]
    assert reason_names(0x60) == ["software thermal slowdown", "hardware thermal slowdown"]
    assert reason_names(0x1000) == ["reason bits 0x1000"]


def test_the_summary_covers_the_busy_samples_of_each_gpu():
    samples = [Sample.from_csv(line) for line in (IDLE, BUSY, CAPPED, BUSY, CAPPED, OTHER_GPU)]
    first, second = summarise(samples)
    assert first["gpu"] == 0 and first["samples"] == 5 and first["busy_samples"] == 4
    assert first["sm_mhz_median"] == pytest.approx((1410 + 1980) / 2)
    assert first["sm_mhz_min"] == 1410 and first["max_sm_mhz"] == 1980  # the idle 345 left out
    assert first["temperature_c_max"] == 61 and first["power_limit_w"] == 700
    assert first["reasons"] == {"software power cap": 0.5}
    assert second["gpu"] == 1 and second["power_w_median"] is None
    text = "\n".join(clock_lines("vit-base bf16-mixed", {"sample_ms": 250, "busy_percent": 50,
                                                         "missing": None,
                                                         "gpus": [first, second]}))
    assert ("GPU 0: 99% busy (median), SM 1,695 MHz median (lowest 1,410 MHz, the GPU's maximum "
            "1,980 MHz)") in text
    assert "software power cap in 50%" in text
    assert "GPU 1:" in text and "hardware thermal slowdown in 100%" in text


def test_a_gpu_that_never_got_busy_says_so():
    (row,) = summarise([Sample.from_csv(IDLE)])
    assert row["busy_samples"] == 0
    text = "\n".join(clock_lines("m", {"sample_ms": 250, "busy_percent": 50, "missing": None,
                                       "gpus": [row]}))
    assert "never busy in 1 samples" in text


def test_without_nvidia_smi_nothing_is_recorded_and_the_report_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no nvidia-smi, whatever the host
    with ClockSampler() as sampler:
        pass
    summary = sampler.summary()
    assert summary["missing"] == "nvidia-smi is not on the PATH" and summary["gpus"] == []
    (line,) = clock_lines("vit-base bf16-mixed", summary)
    assert line.endswith("not recorded (nvidia-smi is not on the PATH).")


def _stand_in(folder: Path, old_driver: bool = False) -> None:
    """An nvidia-smi that answers the clock query as the real one does: once, or every loop
    interval until it is stopped; an old driver refuses the newer reasons field."""
    refuse = 'case "$1" in *clocks_event_reasons*) echo "not a valid field" >&2; exit 2;; esac\n'
    script = folder / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n" + (refuse if old_driver else "")
        + f'case "$*" in *--loop-ms=*) while true; do echo "{BUSY}"; echo "{CAPPED}"; '
        "sleep 0.05; done;; esac\n"
        f'echo "{BUSY}"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize("old_driver", [False, True])
def test_the_sampler_records_while_the_work_runs_and_stops_with_it(monkeypatch, tmp_path,
                                                                     old_driver):
    if shutil.which("sh") is None:
        pytest.skip("needs a POSIX shell for the stand-in nvidia-smi")
    _stand_in(tmp_path, old_driver)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with ClockSampler(every_ms=50) as sampler:
        time.sleep(0.6)
    assert sampler.missing is None
    assert sampler._process is not None and sampler._process.poll() is not None  # stopped
    assert len(sampler.samples) >= 4
    (row,) = sampler.summary()["gpus"]
    assert row["reasons"] == {"software power cap": pytest.approx(0.5, abs=0.2)}
    assert sampler._output is not None and not sampler._output.exists()  # its file removed
