"""The machine a benchmark ran on, for its results file: every figure names its CPU (machines of
this kind differ: one with AVX512-BF16 runs the network in bfloat16, one without in float32, about
2x slower) and the GPU where one ran it."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

# The instruction sets that set the network's speed on a CPU (the weakest machine has only AVX2).
SPEED_FLAGS = {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile"}


def describe() -> dict[str, Any]:
    """CPU model name, cores, whether it does bfloat16 natively, the GPU (or None), torch."""
    import torch

    from semwatch.model.runtime import native_bfloat16
    from semwatch.model.runtimes import cpu_model

    name, flags = cpu_model()
    name = name or platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    hardware = sorted(flags & SPEED_FLAGS)
    # Under benchmarks/avx2only/run (CPUID masked) the libraries see AVX2 only; /proc/cpuinfo does not
    # know, torch's dispatch does. The flags recorded are the ones the kernels could use.
    kernel_isa = torch.backends.cpu.get_cpu_capability()
    seen = [f for f in hardware if not f.startswith(("avx512", "amx"))] if kernel_isa == "AVX2" else hardware
    return {"cpu": name, "cores": os.cpu_count(), "cpu_bfloat16": native_bfloat16(), "gpu": gpu,
            "cpu_flags": seen, "cpu_flags_hardware": hardware, "kernel_isa": kernel_isa,
            "cpuid_mask": os.environ.get("SEMWATCH_CPUID_MASK", ""),
            "load_average": list(os.getloadavg()), "torch": torch.__version__}


def summary() -> str:
    """`describe` in one line, e.g. "AMD EPYC, 2 cores, native bfloat16"."""
    d = describe()
    bf16 = "native bfloat16" if d["cpu_bfloat16"] else "no native bfloat16"
    flags = "/".join(d["cpu_flags"]) or "flags unknown"
    if d["cpu_flags"] != d["cpu_flags_hardware"]:
        flags += f" (CPUID masked to {d['kernel_isa']}; the hardware has {'/'.join(d['cpu_flags_hardware'])})"
    return f"{d['cpu']}, {d['cores']} cores, {flags}, {bf16}" + (f", GPU {d['gpu']}" if d["gpu"] else "")


def commit() -> str:
    """The commit a result was measured on: HEAD (short), marked when tracked files differ from it."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=False).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if dirty else "")
