"""Which runtime runs the backbone: torch (eager, bfloat16 autocast on a CPU that does it natively),
ONNX Runtime or OpenVINO (float32, from the model's verified ONNX export), chosen by `[model]
runtime` or, with "auto", by measurement on this device.

A runner maps a batch of tiles (float32 torch tensor, N x 3 x H x W) to the backbone's pooled
features and the novelty detector's statistics (float32); the head and the detector run after it
in torch, float32, the same for every runtime. `auto` runs one batch of `[model] batch_size`
probe tiles through each candidate in interleaved rounds and keeps the fastest; the measurement is
cached beside the model (`runtime.json`) with what it depends on: the model id and graph, the
device, the CPU (name, vector flags, `ONEDNN_MAX_CPU_ISA`, usable cores), the runtimes' versions,
the batch, threads and CPU precision. Anything different is measured again. The cache only picks
among verified runtimes, so a cache file edited by hand can make inference slower, never different.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from semwatch.config import Settings
from semwatch.errors import ConfigError
from semwatch.model.artifact import Json
from semwatch.model.backbone import Backbone
from semwatch.model.export import INPUT, probe_tiles
from semwatch.model.runtime import autocast_for, cpu_bfloat16
from semwatch.safefs import write_atomic

RUNTIMES = ("torch", "onnxruntime", "openvino")
CACHE_FILE = "runtime.json"
CALIBRATION_ROUNDS = 3
NO_EXPORT = "the model has no ONNX export"
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


class Runner(Protocol):
    """The backbone's forward pass in some runtime."""

    @property
    def name(self) -> str: ...

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class TorchRunner:
    """Eager torch, with the device's autocast (bfloat16 on a capable CPU, float16 on CUDA)."""

    name = "torch"

    def __init__(self, backbone: Backbone, device: torch.device, settings: Settings) -> None:
        self.backbone = backbone
        self.device = device
        self.settings = settings

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast_for(self.device, self.settings):
            pooled, stats = self.backbone.features(x)
        return pooled.float(), stats.float()


class OnnxRuntimeRunner:
    """ONNX Runtime, float32 (CPU provider; CUDA's where the install has it and the device is CUDA)."""

    name = "onnxruntime"

    def __init__(self, graph: bytes, device: torch.device, settings: Settings) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.inter_op_num_threads = 1
        if settings.model.cpu_threads > 0:
            opts.intra_op_num_threads = settings.model.cpu_threads
        # No busy-waiting between batches: the reader threads need those cores for decoding.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(graph, opts, providers=providers)
        self.device = device

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        pooled, stats = self.session.run(None, {INPUT: arr})
        return torch.from_numpy(pooled).to(self.device), torch.from_numpy(stats).to(self.device)


class OpenVinoRunner:
    """OpenVINO on the CPU, float32 inference precision (it would pick bfloat16 on AMX CPUs)."""

    name = "openvino"

    def __init__(self, graph: bytes, settings: Settings) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(graph, b"")  # ONNX from memory: the verified bytes, no second read
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if settings.model.cpu_threads > 0:
            config["INFERENCE_NUM_THREADS"] = settings.model.cpu_threads
        self.compiled = core.compile_model(model, "CPU", config)
        self._local = threading.local()

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        request = getattr(self._local, "request", None)
        if request is None:  # one infer request per thread: a request is not thread-safe
            request = self._local.request = self.compiled.create_infer_request()
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        result = request.infer({0: arr})
        pooled, stats = (result[self.compiled.output(i)] for i in range(2))
        return torch.from_numpy(pooled.copy()), torch.from_numpy(stats.copy())


def available(kind: str) -> bool:
    """Whether `kind` is installed (found, not imported: importing OpenVINO has side effects)."""
    import importlib.util

    return kind == "torch" or importlib.util.find_spec(kind) is not None


def build(kind: str, backbone: Backbone, graph: bytes | None, device: torch.device,
          settings: Settings) -> Runner:
    """A runner of `kind`; `ConfigError` when it needs an export the model lacks or is not installed."""
    if kind == "torch":
        return TorchRunner(backbone, device, settings)
    if graph is None:
        raise ConfigError(f"[model] runtime = \"{kind}\" needs the model's ONNX export, which this model "
                          f"does not have: add it with `semwatch models export MODEL_DIR`")
    if not available(kind):
        raise ConfigError(f"[model] runtime = \"{kind}\" but {kind} is not installed")
    if kind == "onnxruntime":
        return OnnxRuntimeRunner(graph, device, settings)
    if kind == "openvino":
        if device.type != "cpu":
            raise ConfigError("[model] runtime = \"openvino\" runs on the CPU; [model] device is CUDA")
        return OpenVinoRunner(graph, settings)
    raise ConfigError(f"[model] runtime: unknown runtime {kind!r} (known: auto, {', '.join(RUNTIMES)})")


def cpu_model() -> tuple[str, set[str]]:
    """The CPU's model name and flags as /proc/cpuinfo has them (empty where it cannot be read)."""
    name, flags = "", set[str]()
    try:
        with Path("/proc/cpuinfo").open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name, flags


def cpu_signature() -> dict[str, Json]:
    """What the CPU's speed per runtime depends on: its name, vector flags, usable cores, the oneDNN
    instruction-set cap (which changes torch's speed, not the others') and the instruction set torch's
    kernels dispatch to (from CPUID as this process sees it: ATEN_CPU_CAPABILITY or a masked CPUID
    changes it, /proc/cpuinfo does not)."""
    name, flags = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"name": name, "flags": [f for f in _CPU_FLAGS if f in flags], "cores": cores,
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
            "kernel_isa": torch.backends.cpu.get_cpu_capability()}


def versions() -> dict[str, Json]:
    """The installed runtimes' versions (absent ones as null)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Json] = {"torch": torch.__version__}
    for kind in ("onnxruntime", "openvino"):
        try:
            out[kind] = version(kind)  # the distribution's metadata: OpenVINO is not imported
        except PackageNotFoundError:
            out[kind] = None
    return out


def measure(runners: Mapping[str, Runner], batch: int, tile_px: int,
            rounds: int = CALIBRATION_ROUNDS) -> dict[str, float]:
    """Tiles/s of each runner on one batch of probe tiles, best of `rounds` interleaved rounds
    (after one warm-up pass each), so a load that comes and goes hits every runner alike."""
    x = torch.from_numpy(probe_tiles(batch, tile_px, seed=2))
    for runner in runners.values():
        runner.features(x)
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(rounds):
        for name, runner in runners.items():
            started = time.perf_counter()
            runner.features(x)
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: round(batch / max(t, 1e-9), 2) for name, t in best.items()}


@dataclass(frozen=True)
class Choice:
    """The runtime `auto` took, and why (the measurement, or a reason when nothing was measured)."""

    runtime: str
    rates: dict[str, float]  # tiles/s per candidate; empty when nothing was measured
    cached: bool
    reason: str


def cache_key(model_id: str, graph_sha256: str | None, device: torch.device, settings: Settings,
              tile_px: int) -> dict[str, Json]:
    m = settings.model
    return {"model_id": model_id, "graph_sha256": graph_sha256, "device": str(device),
            "cpu": cpu_signature(), "versions": versions(), "batch": m.batch_size, "tile_px": tile_px,
            "cpu_threads": m.cpu_threads,
            "cpu_precision": "bfloat16" if device.type == "cpu" and cpu_bfloat16(settings) else "float32"}


def read_cache(model_dir: Path | None, key: Mapping[str, Json]) -> dict[str, Json] | None:
    """The cached measurement for exactly `key`, if any."""
    if model_dir is None:
        return None
    try:
        raw = json.loads((model_dir / CACHE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("key") != dict(key) or raw.get("runtime") not in RUNTIMES:
        return None
    return raw


def write_cache(model_dir: Path | None, key: Mapping[str, Json], runtime: str,
                rates: Mapping[str, float]) -> None:
    """Remember a measurement beside the model; a model folder that cannot be written (installed
    read-only) only means measuring again at the next load."""
    if model_dir is None:
        return
    body = {"key": dict(key), "runtime": runtime, "tiles_per_s": dict(rates),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        write_atomic(model_dir / CACHE_FILE, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())
    except OSError:
        pass


def candidates(graph: bytes | None, device: torch.device) -> list[str]:
    """The runtimes `auto` measures: torch always; ONNX Runtime where there is a graph (on CUDA only
    with its CUDA provider). Not OpenVINO: importing it (2026.4) starts its telemetry sender (a
    thread that posts an "import" event where consent is given), which a daemon reading lab data
    must not do unasked; it runs only when `[model] runtime = "openvino"` names it, and it was not
    faster than ONNX Runtime here (benchmarks/results/*-runtime-cpu.md)."""
    out = ["torch"]
    if graph is None:
        return out
    if available("onnxruntime"):
        import onnxruntime as ort

        if device.type == "cpu" or "CUDAExecutionProvider" in ort.get_available_providers():
            out.append("onnxruntime")
    return out


def choose(backbone: Backbone, graph: bytes | None, device: torch.device, settings: Settings, *,
           model_id: str, graph_sha256: str | None, tile_px: int,
           model_dir: Path | None) -> tuple[Runner, Choice]:
    """The runner `[model] runtime` asks for; for "auto", the fastest measured here (cached)."""
    kind = settings.model.runtime
    if kind != "auto":
        return build(kind, backbone, graph, device, settings), Choice(kind, {}, False, "[model] runtime")
    names = candidates(graph, device)
    if len(names) == 1:
        reason = NO_EXPORT if graph is None else "no other runtime installed"
        return build("torch", backbone, graph, device, settings), Choice("torch", {}, False, reason)
    key = cache_key(model_id, graph_sha256, device, settings, tile_px)
    cached = read_cache(model_dir, key)
    if cached is not None:
        runtime = str(cached["runtime"])
        seen = cached.get("tiles_per_s")
        known = ({str(k): float(v) for k, v in seen.items() if isinstance(v, int | float)}
                 if isinstance(seen, dict) else {})
        return (build(runtime, backbone, graph, device, settings),
                Choice(runtime, known, True, "measured fastest here (cached)"))
    runners = {name: build(name, backbone, graph, device, settings) for name in names}
    rates = measure(runners, settings.model.batch_size, tile_px)
    runtime = max(rates, key=lambda n: rates[n])
    write_cache(model_dir, key, runtime, rates)
    return runners[runtime], Choice(runtime, rates, False, "measured fastest here")
