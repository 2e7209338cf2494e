"""Where and how the network runs: the device, its precision (float16 autocast on CUDA, bfloat16 on a
CPU that does it natively) and its name for logs and reports."""

from __future__ import annotations

import contextlib

import torch

from semwatch.config import Settings
from semwatch.errors import ConfigError


def select_device(requested: str) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("[model] device = cuda but no CUDA device is available")
        return torch.device("cuda", 0)
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def native_bfloat16() -> bool:
    """Whether this CPU does bfloat16 natively (oneDNN: AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def cpu_bfloat16(settings: Settings) -> bool:
    """bfloat16 on CPU: asked for, or "auto" and the CPU does it natively."""
    choice = settings.model.cpu_precision
    return native_bfloat16() if choice == "auto" else choice == "bfloat16"


def autocast_for(device: torch.device, settings: Settings) -> contextlib.AbstractContextManager[object]:
    """float16 autocast on CUDA (if mixed_precision), bfloat16 on a capable CPU, else nothing."""
    if device.type == "cuda":
        if settings.model.mixed_precision:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()
    if cpu_bfloat16(settings):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index or 0} ({torch.cuda.get_device_name(device)})"
    return "cpu"
