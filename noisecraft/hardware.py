"""What this CPU can do fast: model name, instruction-set flags, native bfloat16.

Read from ``/proc/cpuinfo`` (Linux); elsewhere the answers are conservative (no native bf16,
model from :func:`platform.processor`).  Nothing is cached in module globals: callers that ask
often keep the :class:`CPUInfo` they got.

"Native bf16" means the CPU has bfloat16 dot-product instructions (``avx512_bf16``, AVX-512
BF16 on Cooper Lake / Zen 4 and later) or matrix tiles (``amx_bf16``, Sapphire Rapids and
later).  Without them bfloat16 matmuls are emulated and usually *slower* than float32, so the
backends only reduce precision where :func:`native_bf16` is true.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CPUInfo:
    """``model``: the CPU's marketing name; ``flags``: its instruction-set flags;
    ``logical_cpus``: CPUs this process may run on."""

    model: str
    flags: frozenset[str]
    logical_cpus: int

    @property
    def native_bf16(self) -> bool:
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def amx(self) -> bool:
        return "amx_tile" in self.flags

    def as_dict(self) -> dict:
        return {
            "cpu_model": self.model,
            "logical_cpus": self.logical_cpus,
            "native_bf16": self.native_bf16,
            "amx": self.amx,
            "avx512f": "avx512f" in self.flags,
            "bf16_flags": sorted(f for f in BF16_FLAGS if f in self.flags),
        }


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor in a ``/proc/cpuinfo`` text."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if model and flags:
            break
    return model, flags


def cpu_info(cpuinfo_path: Path = CPUINFO) -> CPUInfo:
    """The CPU this process runs on (see the module docstring)."""
    try:
        model, flags = parse_cpuinfo(cpuinfo_path.read_text(errors="replace"))
    except OSError:
        model, flags = "", frozenset()
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return CPUInfo(model or platform.processor() or "unknown", flags, n)


def native_bf16(cpuinfo_path: Path = CPUINFO) -> bool:
    """True when the CPU computes bfloat16 dot products natively (avx512_bf16 or amx_bf16)."""
    return cpu_info(cpuinfo_path).native_bf16
