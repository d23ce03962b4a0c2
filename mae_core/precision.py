"""Which precision this machine trains in: bf16 where the hardware computes it natively (a GPU
that supports it; a CPU with AMX or AVX-512 BF16), 32-true elsewhere, and what is refused (fp16
autocast on a CPU, bf16 on a CPU that would emulate it). Detected, never assumed: CPUs differ."""

from __future__ import annotations

import functools

from mae_core.checks import ConfigError

# /proc/cpuinfo flags of the x86 instructions that compute bf16 natively (AVX-512 BF16 dot
# products; AMX tiles). Without them bf16 is emulated and slower than fp32.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def _bf16_ok() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo``; None where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            return frozenset(word for line in file if line.startswith("flags")
                             for word in line.partition(":")[2].split())
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def cpu_bf16_feature() -> str | None:
    """The instruction set with which this CPU computes bf16 natively (``amx_bf16`` or
    ``avx512_bf16``), or None where bf16 would be emulated.

    Read from the ``flags`` of ``/proc/cpuinfo`` (Linux); elsewhere from the CPU probes torch
    ships (``torch.cpu._is_amx_tile_supported``, ``_is_avx512_bf16_supported``, private, so
    looked up defensively). ``torch.backends.cpu.get_cpu_capability()`` cannot tell: it says
    ``AVX512`` with or without bf16.
    """
    flags = cpu_flags()
    if flags is not None:
        return next((name for name in CPU_BF16_FLAGS if name in flags), None)
    import torch  # not Linux: ask torch

    probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    for name, probe in probes.items():
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return name
    return None


def auto_precision(accelerator: str) -> str:
    """What ``precision=None`` means here: bf16-mixed where the hardware computes bf16 natively
    (a GPU that supports it, a CPU with AMX or AVX-512 BF16), 32-true elsewhere."""
    native = _bf16_ok() if accelerator == "gpu" else cpu_bf16_feature() is not None
    return "bf16-mixed" if native else "32-true"


def check_precision_for(precision: str, accelerator: str) -> None:
    """Refuse a precision the CPU cannot run well: fp16 autocast, or bf16 without native bf16."""
    if accelerator != "cpu":
        return
    bf16 = cpu_bf16_feature()
    if precision == "16-mixed":
        other = "32-true or bf16-mixed" if bf16 else "32-true"
        raise ConfigError("precision", f"16-mixed (fp16 autocast) is for GPUs; use {other} on "
                          "this CPU")
    if precision == "bf16-mixed" and bf16 is None:
        raise ConfigError("precision", "bf16-mixed needs a CPU that computes bf16 natively "
                          f"(AMX or AVX-512 BF16: /proc/cpuinfo flags {' or '.join(CPU_BF16_FLAGS)}); "
                          "this one would emulate it, slower than 32-true: use 32-true (or auto)")
