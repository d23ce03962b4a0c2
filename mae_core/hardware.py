"""The hardware's peak FLOP/s, the denominator of MFU (model FLOPs utilisation).

On the CPU the peak is *measured*: a short probe of square matmuls (1024², best of a few) with the
thread count of the calling process, per precision: fp32 always, bf16 only where the CPU has native
bf16 (AVX-512 BF16 or AMX; emulated bf16 has no meaningful peak). A probe's result is cached on
disk per machine (CPU model, torch version, threads, precision) in
``~/.cache/mae_studio/peak.json`` (``$MAE_STUDIO_CACHE_DIR`` moves it), so it runs once per machine.

On a GPU the datasheet's dense figure is used where the model is known (A100, H100, H200), and a
measured matmul peak (cached the same way) where it is not; both are reported.

``python -m mae_core.hardware`` prints this machine's peaks.

Example:
    >>> peak = device_peak("cpu", "32-true")
    >>> peak.flops > 0
    True
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mae_core.precision import cpu_bf16_feature, cpu_flags
from mae_core.fileio import atomic_write_json, cache_home, read_json

CACHE_ENV = "MAE_STUDIO_CACHE_DIR"
CACHE_VERSION = 1
TERA = 1e12
# Dense (no sparsity) datasheet peaks in FLOP/s by matmul type; the first matching name wins, so
# the PCIe and NVL variants of the H100 come before the SXM part.
GPU_SPECS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756 * TERA, "fp16": 756 * TERA, "tf32": 378 * TERA, "fp32": 51 * TERA}),
    ("H100 NVL", {"bf16": 835 * TERA, "fp16": 835 * TERA, "tf32": 418 * TERA, "fp32": 60 * TERA}),
    ("H100", {"bf16": 989 * TERA, "fp16": 989 * TERA, "tf32": 495 * TERA, "fp32": 67 * TERA}),
    ("H200", {"bf16": 989 * TERA, "fp16": 989 * TERA, "tf32": 495 * TERA, "fp32": 67 * TERA}),
    ("A100", {"bf16": 312 * TERA, "fp16": 312 * TERA, "tf32": 156 * TERA, "fp32": 19.5 * TERA}),
)
_TORCH_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
                 "fp16": torch.float16}
# Lightning precision names → the matmul type they run (mixed precision: the autocast type).
_PRECISION_TYPES = {"32-true": "fp32", "32": "fp32", "bf16-mixed": "bf16", "bf16-true": "bf16",
                    "bf16": "bf16", "16-mixed": "fp16", "16-true": "fp16", "16": "fp16"}
# CPU flags of native 16-bit matmul units; without them torch emulates and there is no peak.
_NATIVE_FLAGS = {"fp16": {"avx512_fp16", "amx_fp16"}}


@dataclass(frozen=True)
class Peak:
    """One device's peak FLOP/s for one matmul type, and where the figure came from.

    ``flops`` is the figure MFU divides by (None where there is none: bf16 on a CPU without
    native bf16); ``source`` is ``measured`` (probed now), ``cached`` (probed earlier on this
    machine), ``spec`` (datasheet) or ``unsupported``.
    """

    flops: float | None
    dtype: str
    device: str  # "cpu" or "cuda"
    name: str  # CPU model or GPU name
    source: str
    measured: float | None = None
    spec: float | None = None
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def matmul_type(precision: str | None, device: str) -> str:
    """The matmul type a Lightning ``precision`` runs on ``device`` (fp32 on a GPU may be tf32)."""
    kind = _PRECISION_TYPES.get(str(precision or "32-true"))
    if kind is None:
        raise ValueError(f"precision: unknown {precision!r}; choose one of "
                         f"{', '.join(_PRECISION_TYPES)}")
    if kind == "fp32" and device == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return kind


def mfu(images_per_s: float | None, flops_per_image: float | None, peak_flops: float | None,
        world_size: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of every device (None if unknown)."""
    if not images_per_s or not flops_per_image or not peak_flops or world_size < 1:
        return None
    value = images_per_s * flops_per_image / (peak_flops * world_size)
    return value if math.isfinite(value) else None


# --- the CPU ----------------------------------------------------------------------------------

def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    import platform

    return _cpuinfo_field("model name") or platform.processor() or "unknown CPU"




def cpu_has_native(dtype: str) -> bool:
    """Whether the CPU computes ``dtype`` matmuls natively (fp32 always; bf16 with AVX-512 BF16 or
    AMX; fp16 with AVX-512 FP16 or AMX-FP16). Without /proc/cpuinfo, torch's own checks decide."""
    if dtype in ("fp32", "tf32"):
        return True
    if dtype == "bf16":  # the same answer as the precision the trainer picks
        return cpu_bf16_feature() is not None
    return bool((cpu_flags() or frozenset()) & _NATIVE_FLAGS.get(dtype, set()))


# --- measuring --------------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_matmul_flops(dtype: str, device: str = "cpu", size: int = 1024, repeats: int = 5,
                         min_repeat_s: float = 0.02) -> float:
    """The best FLOP/s of ``size``² ``dtype`` matmuls over ``repeats`` timed repeats.

    Each repeat runs enough matmuls to last ``min_repeat_s`` (a fast matmul timed alone is mostly
    timer noise); the best repeat is the peak, as the machine's other load only slows it.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator, device=device).to(_TORCH_DTYPES[dtype])
            for _ in range(2))
    torch.matmul(a, b)  # first call: allocation and kernel selection, not timed
    _sync(device)
    start = time.perf_counter()
    torch.matmul(a, b)
    _sync(device)
    inner = max(1, math.ceil(min_repeat_s / max(time.perf_counter() - start, 1e-9)))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b)
        _sync(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2.0 * size**3 / best


def cache_path() -> Path:
    """``$MAE_STUDIO_CACHE_DIR/peak.json``, else in :func:`mae_core.fileio.cache_home`."""
    return Path(os.environ.get(CACHE_ENV) or cache_home()) / "peak.json"


def _cached_measurement(key: str, measure: Any, cache: Path, refresh: bool, **record: Any
                        ) -> tuple[float, bool]:
    """The cached figure under ``key``, or ``measure()`` stored there; and whether it was cached.

    ``refresh`` measures again and keeps the higher figure: other load on the machine only ever
    slows a probe, so the best one seen is the closest to the peak. A cache that cannot be read
    is measured over; one that cannot be written still gives the measurement (the next process
    measures again). Two processes writing at once may lose one entry, never corrupt the file
    (it is replaced atomically).
    """
    data = read_json(cache) or {}
    entries = data.get("entries") if data.get("version") == CACHE_VERSION else None
    entries = entries if isinstance(entries, dict) else {}
    entry = entries.get(key) if isinstance(entries.get(key), dict) else {}
    known = float(entry["flops"]) if _positive(entry.get("flops")) else None
    if known is not None and not refresh:
        return known, True
    flops = max(float(measure()), known or 0.0)
    entries[key] = {"flops": flops, **record, "probes": int(entry.get("probes") or 0) + 1,
                    "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    try:
        atomic_write_json(cache, {"version": CACHE_VERSION, "entries": entries})
    except OSError:
        pass
    return flops, False


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def cpu_cache_key(dtype: str, threads: int, size: int = 1024) -> str:
    """The cache entry of a CPU probe: CPU model, torch version, threads, type and matrix size."""
    # The fp32 setting decides whether oneDNN may use a faster internal type: part of the key.
    setting = f"|matmul {torch.get_float32_matmul_precision()}" if dtype == "fp32" else ""
    return f"{cpu_model()}|torch {torch.__version__}|threads {threads}|{dtype}{setting}|{size}"


def cpu_peak(dtype: str = "fp32", threads: int | None = None, cache: Path | None = None,
             size: int = 1024, repeats: int = 5, refresh: bool = False) -> Peak:
    """The CPU's peak for ``dtype`` with ``threads`` torch threads (default: this process's).

    Measured once per CPU model, torch version, thread count and type, then read from the cache
    (``refresh`` probes again, keeping the best figure). bf16/fp16 without native support gives
    ``flops=None`` (``source="unsupported"``).
    """
    threads = threads or torch.get_num_threads()
    name = cpu_model()
    if not cpu_has_native(dtype):
        return Peak(None, dtype, "cpu", name, "unsupported", threads=threads)
    key = cpu_cache_key(dtype, threads, size)
    before = torch.get_num_threads()

    def measure() -> float:
        torch.set_num_threads(threads)
        try:
            return measure_matmul_flops(dtype, "cpu", size=size, repeats=repeats)
        finally:
            torch.set_num_threads(before)

    flops, cached = _cached_measurement(key, measure, cache or cache_path(), refresh,
                                        device=name, threads=threads, dtype=dtype, size=size)
    return Peak(flops, dtype, "cpu", name, "cached" if cached else "measured", measured=flops,
                threads=threads)


# --- the GPU ----------------------------------------------------------------------------------

def gpu_spec(name: str, dtype: str) -> float | None:
    """The datasheet's dense peak of the GPU called ``name`` for ``dtype``, or None if unknown."""
    for model, figures in GPU_SPECS:
        if model.lower() in name.lower():
            return figures.get(dtype)
    return None


def gpu_peak(dtype: str = "bf16", index: int = 0, cache: Path | None = None, size: int = 8192,
             repeats: int = 5, refresh: bool = False) -> Peak:
    """GPU ``index``'s peak for ``dtype``: the spec figure where known, else the measured one."""
    name = torch.cuda.get_device_name(index)
    key = f"{name}|torch {torch.__version__}|cuda {torch.version.cuda}|{dtype}|{size}"

    def measure() -> float:
        with torch.cuda.device(index):
            return measure_matmul_flops(dtype, "cuda", size=size, repeats=repeats)

    measured, cached = _cached_measurement(key, measure, cache or cache_path(), refresh,
                                           device=name, dtype=dtype, size=size)
    spec = gpu_spec(name, dtype)
    source = "spec" if spec else ("cached" if cached else "measured")
    return Peak(spec or measured, dtype, "cuda", name, source, measured=measured, spec=spec)


def device_peak(device: str, precision: str | None, cache: Path | None = None, index: int = 0,
                refresh: bool = False) -> Peak:
    """The peak one device (a GPU, or one CPU training process) reaches under ``precision``."""
    device = "cuda" if device in ("cuda", "gpu") else "cpu"
    dtype = matmul_type(precision, device)
    if device == "cuda":
        return gpu_peak(dtype, index=index, cache=cache, refresh=refresh)
    return cpu_peak(dtype, cache=cache, refresh=refresh)


def hardware_summary() -> str:
    """What the default config will train on, in words (shown by the UI)."""
    from mae_core.devices import default_cpu_processes, usable_cores

    gpus = torch.cuda.device_count()
    if gpus:
        name = torch.cuda.get_device_name(0)
        return f"{gpus} × {name} (DDP over NCCL, bf16-mixed)"
    cores = usable_cores()
    bf16 = cpu_bf16_feature()
    precision = f"bf16-mixed: {bf16}" if bf16 else "32-bit"
    return (f"no GPU: {default_cpu_processes()} CPU processes over gloo on {cores} cores "
            f"({precision})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mae_core.hardware",
                                     description="Print this machine's peak FLOP/s per precision.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU probe)")
    parser.add_argument("--refresh", action="store_true", help="measure again, ignoring the cache")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        peaks = [gpu_peak(dtype, index=i, refresh=args.refresh)
                 for i in range(torch.cuda.device_count()) for dtype in ("bf16", "tf32")]
    else:
        peaks = [cpu_peak(dtype, threads=args.threads, refresh=args.refresh)
                 for dtype in ("fp32", "bf16")]
    for peak in peaks:
        figure = ("n/a (no native support)" if peak.flops is None
                  else f"{peak.flops / 1e9:,.0f} GFLOP/s")
        threads = f", {peak.threads} threads" if peak.threads else ""
        print(f"{peak.name} ({peak.device}{threads}) {peak.dtype}: {figure} [{peak.source}]")
    print(f"cache: {cache_path()}")
    return 0


if __name__ == "__main__":
    from mae_core.process import exit_quickly

    exit_quickly(main())
