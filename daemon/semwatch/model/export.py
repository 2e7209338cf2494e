"""The model's export: its backbone as an ONNX graph, for the runtimes that run it faster than eager
torch on a CPU (`model/runtimes.py`).

Only the backbone is exported (tiles → pooled features and the novelty detector's channel means,
float32): the head and the detector are a few small matrix products and stay torch, in float32,
whatever runs the backbone. The graph is made here, from the model's own verified weights, never
from anything read from the watched folder; its sha256 goes into the manifest (`export.onnx`) and
is checked before any runtime builds from it. At export the graph is run in ONNX Runtime on probe
tiles and compared with torch in float32: the largest difference is recorded, and an export that
differs by more than `MAX_RELATIVE_DIFFERENCE` is refused.
"""

from __future__ import annotations

import hashlib
import io
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from semwatch.config import Settings
from semwatch.errors import UserError
from semwatch.model.artifact import Json, Manifest, add_export, load_artifact
from semwatch.model.backbone import Backbone, TileNet
from semwatch.output import Output
from semwatch.safefs import path_text, write_atomic

ONNX_FILE = "backbone.onnx"
OPSET = 17
INPUT = "tiles"
OUTPUTS = ("pooled", "stats")
# Largest difference against torch float32, relative to the largest output, that an export may
# have (float32 graphs differ by summation order: about 1e-6 measured).
MAX_RELATIVE_DIFFERENCE = 1e-3
PROBE_TILES = 4


class _Features(nn.Module):
    """What the graph computes: `Backbone.features` in float32 (pooled, statistics)."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, stats = self.backbone.features(x)
        return pooled.float(), stats.float()


def probe_tiles(n: int, tile_px: int, seed: int = 0) -> np.ndarray:
    """`n` seeded grey tiles as the network sees them (the same value on 3 channels, about unit
    variance): textures at several scales, so every layer has something to describe."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, tile_px, tile_px), np.float32)
    for i in range(n):
        base = rng.standard_normal((tile_px // 8 + 1, tile_px // 8 + 1)).astype(np.float32)
        coarse = np.kron(base, np.ones((8, 8), np.float32))[:tile_px, :tile_px]
        fine = rng.standard_normal((tile_px, tile_px)).astype(np.float32)
        out[i] = (0.8 * coarse + 0.6 * fine)[None]
    return out


def onnx_graph(backbone: Backbone, tile_px: int) -> bytes:
    """The backbone (float32, CPU, eval mode) as ONNX bytes with a dynamic batch."""
    wrapper = _Features(backbone).to("cpu").float().eval()
    example = torch.from_numpy(probe_tiles(2, tile_px))
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes fixed at export (batch stays free)
        torch.onnx.export(
            wrapper, (example,), buf,  # type: ignore[arg-type]  # a file-like object works too
            input_names=[INPUT], output_names=list(OUTPUTS),
            dynamic_axes={INPUT: {0: "n"}, OUTPUTS[0]: {0: "n"}, OUTPUTS[1]: {0: "n"}},
            opset_version=OPSET, dynamo=False,
        )
    return buf.getvalue()


def compare_with_torch(backbone: Backbone, graph: bytes, tile_px: int) -> dict[str, Json]:
    """The largest absolute difference of each output between the graph (ONNX Runtime, CPU) and
    torch in float32 on probe tiles, and the largest relative to the output's range."""
    import onnxruntime as ort

    x = probe_tiles(PROBE_TILES, tile_px, seed=1)
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT: x})
    with torch.no_grad():
        want = _Features(backbone).to("cpu").float().eval()(torch.from_numpy(x))
    out: dict[str, Json] = {}
    relative = 0.0
    for name, g, w in zip(OUTPUTS, got, want, strict=True):
        ref = w.numpy()
        diff = float(np.abs(np.asarray(g) - ref).max())
        out[name] = float(f"{diff:.3g}")
        relative = max(relative, diff / max(float(np.abs(ref).max()), 1e-12))
    out["relative"] = float(f"{relative:.3g}")
    return out


def export_backbone(backbone: Backbone, tile_px: int, out_dir: Path) -> dict[str, Json]:
    """Write the backbone's ONNX graph into `out_dir` (atomically) and return the manifest's
    `export` record; `UserError` if the graph does not compute what torch does."""
    started = time.monotonic()
    backbone = backbone.to("cpu").float().eval()
    graph = onnx_graph(backbone, tile_px)
    difference = compare_with_torch(backbone, graph, tile_px)
    relative = difference["relative"]
    if not isinstance(relative, float) or relative > MAX_RELATIVE_DIFFERENCE:
        raise UserError(f"the ONNX export differs from torch by {relative} (relative; at most "
                        f"{MAX_RELATIVE_DIFFERENCE} allowed): not written")
    write_atomic(out_dir / ONNX_FILE, graph)
    import onnxruntime as ort

    return {"onnx": {
        "file": ONNX_FILE,
        "sha256": hashlib.sha256(graph).hexdigest(),
        "bytes": len(graph),
        "opset": OPSET,
        "input": f"{INPUT} (N, 3, {tile_px}, {tile_px}) float32",
        "outputs": list[Json](OUTPUTS),
        "precision": "float32",
        "max_difference_vs_torch_float32": difference,
        "probe": f"{PROBE_TILES} seeded synthetic tiles",
        "torch": torch.__version__,
        "checked_with": f"onnxruntime {ort.__version__}",
        "seconds": round(time.monotonic() - started, 1),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }}


def export_model(model_dir: Path, settings: Settings, *, out: Output) -> Manifest:
    """`semwatch models export MODEL_DIR`: give an existing model its ONNX export (again, if it has
    one). The model id and its results stay as they are; only the manifest's export record and the
    graph file are written."""
    del settings  # the export depends on the artifact only
    state, manifest = load_artifact(model_dir)
    net = TileNet(manifest.architecture, manifest.tile_px, len(manifest.classes), hidden=manifest.head_hidden,
                  novelty_k=manifest.novelty_k, pretrained=False, detector=manifest.detector)
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{model_dir}: weights do not match the manifest ({first})") from None
    record = export_backbone(net.backbone, manifest.tile_px, model_dir)
    updated = add_export(model_dir, manifest, record)
    onnx = record["onnx"]
    assert isinstance(onnx, dict)
    if out.json:
        out.emit({"model_dir": path_text(model_dir), "model_id": updated.model_id, "export": record})
    else:
        diff = onnx["max_difference_vs_torch_float32"]
        assert isinstance(diff, dict)
        out.line(f"model {updated.model_id}: backbone exported to {path_text(model_dir / ONNX_FILE)} "
                 f"(ONNX opset {OPSET}, sha256 {str(onnx['sha256'])[:16]}, largest difference against "
                 f"torch float32 {diff['relative']} relative); [model] runtime = \"auto\" measures it at "
                 f"the next load")
    return updated
