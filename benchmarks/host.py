"""The machine a benchmark ran on, for its results file: every figure names its CPU (machines of
this kind differ: one with AVX512-BF16 runs the network in bfloat16, one without in float32, about
2x slower) and the GPU where one ran it."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def describe() -> dict[str, Any]:
    """CPU model name, cores, whether it does bfloat16 natively, the GPU (or None), torch."""
    import torch

    from semwatch.model.runtime import native_bfloat16

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": name, "cores": os.cpu_count(), "cpu_bfloat16": native_bfloat16(), "gpu": gpu,
            "torch": torch.__version__}


def summary() -> str:
    """`describe` in one line, e.g. "AMD EPYC, 2 cores, native bfloat16"."""
    d = describe()
    bf16 = "native bfloat16" if d["cpu_bfloat16"] else "no native bfloat16"
    return f"{d['cpu']}, {d['cores']} cores, {bf16}" + (f", GPU {d['gpu']}" if d["gpu"] else "")
