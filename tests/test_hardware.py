"""The peak FLOP/s (:mod:`mae_core.hardware`): a real matmul probe on this CPU, its on-disk cache,
native-bf16 detection, the GPU datasheet figures, and MFU. GPU tests carry the ``gpu`` marker.

Small matrices keep the probes short; no figure is compared with a time limit.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from mae_core import hardware
from mae_core.hardware import (cpu_has_native, cpu_peak, device_peak,
                               gpu_spec, matmul_type, measure_matmul_flops, mfu)
from mae_core.process import clean_env
from tests.helpers import REPO_ROOT

SMALL = {"size": 128, "repeats": 2}
skip_without_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                       reason="needs a CUDA GPU; none is visible")


def _finite_positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def test_the_probe_measures_a_real_matmul_rate():
    flops = measure_matmul_flops("fp32", size=128, repeats=2, min_repeat_s=0.005)
    assert _finite_positive(flops)


def test_a_peak_is_measured_once_then_read_from_the_cache(tmp_path):
    cache = tmp_path / "peak.json"
    first = cpu_peak("fp32", threads=1, cache=cache, **SMALL)
    assert first.source == "measured" and _finite_positive(first.flops)
    assert first.threads == 1 and first.name == hardware.cpu_model() and first.device == "cpu"

    again = cpu_peak("fp32", threads=1, cache=cache, **SMALL)
    assert again.source == "cached" and again.flops == first.flops

    [(key, entry)] = json.loads(cache.read_text())["entries"].items()
    for part in (hardware.cpu_model(), torch.__version__, "threads 1", "fp32"):
        assert part in key  # per machine, torch version, thread count and precision
    assert entry["flops"] == first.flops and entry["threads"] == 1

    other_threads = cpu_peak("fp32", threads=2, cache=cache, **SMALL)
    assert other_threads.source == "measured"
    assert len(json.loads(cache.read_text())["entries"]) == 2
    refreshed = cpu_peak("fp32", threads=1, cache=cache, refresh=True, **SMALL)
    assert refreshed.source == "measured" and refreshed.flops >= first.flops
    assert json.loads(cache.read_text())["entries"][key]["probes"] == 2


def test_a_probe_slowed_by_other_load_is_raised_by_a_later_one(tmp_path):
    """Load only slows a probe: a fresh probe replaces a lower cached figure, never a higher one."""
    cache = tmp_path / "peak.json"
    key = hardware.cpu_cache_key("fp32", 1, SMALL["size"])
    cache.write_text(json.dumps({"version": hardware.CACHE_VERSION,
                                 "entries": {key: {"flops": 1.0}}}))
    assert cpu_peak("fp32", threads=1, cache=cache, **SMALL).flops == 1.0  # read, not probed
    raised = cpu_peak("fp32", threads=1, cache=cache, refresh=True, **SMALL)
    assert raised.flops > 1.0
    cache.write_text(json.dumps({"version": hardware.CACHE_VERSION,
                                 "entries": {key: {"flops": 1e18}}}))
    assert cpu_peak("fp32", threads=1, cache=cache, refresh=True, **SMALL).flops == 1e18


def test_the_probe_leaves_the_processs_thread_count_alone(tmp_path):
    before = torch.get_num_threads()
    cpu_peak("fp32", threads=before + 1, cache=tmp_path / "peak.json", **SMALL)
    assert torch.get_num_threads() == before


def test_an_unreadable_cache_is_measured_over(tmp_path):
    cache = tmp_path / "peak.json"
    cache.write_text("{not json")
    peak = cpu_peak("fp32", threads=1, cache=cache, **SMALL)
    assert peak.source == "measured" and _finite_positive(peak.flops)
    assert json.loads(cache.read_text())["version"] == hardware.CACHE_VERSION


def test_bf16_has_a_peak_only_where_the_cpu_has_native_bf16(tmp_path):
    native = cpu_has_native("bf16")
    # Both readings of the hardware agree: /proc/cpuinfo's flags and torch's cpuinfo checks.
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported",
                                                           "_is_amx_tile_supported")]
    if all(checks):
        assert native == any(check() for check in checks)
    peak = cpu_peak("bf16", threads=1, cache=tmp_path / "peak.json", **SMALL)
    if native:
        assert peak.source == "measured" and _finite_positive(peak.flops)
    else:
        assert peak.source == "unsupported" and peak.flops is None
    assert cpu_has_native("fp32")


def test_precisions_map_to_the_matmul_type_they_run():
    assert matmul_type("32-true", "cpu") == "fp32"
    assert matmul_type(None, "cpu") == "fp32"
    assert matmul_type("bf16-mixed", "cpu") == "bf16"
    assert matmul_type("16-mixed", "cuda") == "fp16"
    with pytest.raises(ValueError, match="bf16-mixed"):  # the message lists the valid names
        matmul_type("8-bit", "cpu")


def test_device_peak_on_the_cpu_uses_this_processs_threads(tmp_path):
    peak = device_peak("cpu", "32-true", cache=tmp_path / "peak.json")
    assert peak.dtype == "fp32" and peak.threads == torch.get_num_threads()
    assert _finite_positive(peak.flops)


@pytest.mark.parametrize(("name", "dtype", "tflops"), [
    ("NVIDIA H100 80GB HBM3", "bf16", 989), ("NVIDIA H100 80GB HBM3", "tf32", 495),
    ("NVIDIA H100 PCIe", "bf16", 756), ("NVIDIA H200", "bf16", 989),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312), ("NVIDIA A100 80GB PCIe", "fp32", 19.5),
])
def test_known_gpus_have_their_datasheet_peak(name, dtype, tflops):
    assert gpu_spec(name, dtype) == pytest.approx(tflops * 1e12)


def test_an_unknown_gpu_has_no_datasheet_peak():
    assert gpu_spec("NVIDIA GeForce RTX 4090", "bf16") is None


def test_mfu_is_achieved_over_peak_flops_of_all_devices():
    assert mfu(100.0, 1e9, 1e12, world_size=2) == pytest.approx(0.05)
    for missing in ((None, 1e9, 1e12), (100.0, None, 1e12), (100.0, 1e9, None), (0.0, 1e9, 1e12)):
        assert mfu(*missing) is None


def test_the_command_prints_this_machines_peaks(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mae_core.hardware", "--threads", "1"],
                            cwd=REPO_ROOT, env=clean_env(MAE_STUDIO_CACHE_DIR=str(tmp_path)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fp32:" in result.stdout and "GFLOP/s [measured]" in result.stdout
    assert "bf16:" in result.stdout and (tmp_path / "peak.json").exists()


@pytest.mark.gpu
@skip_without_cuda
@pytest.mark.parametrize("dtype", ["bf16", "tf32"])
def test_a_gpu_peak_is_measured_and_the_spec_used_where_known(tmp_path, dtype):
    peak = hardware.gpu_peak(dtype, cache=tmp_path / "peak.json", size=4096, repeats=3)
    assert _finite_positive(peak.measured) and peak.device == "cuda"
    spec = gpu_spec(peak.name, dtype)
    assert peak.flops == (spec or peak.measured)
    assert peak.source == ("spec" if spec else "measured")

