"""The model artifact: `model.safetensors` (weights, never pickled) + `manifest.json`.

The manifest carries the sha256 of the weights file and of its own content, so a corrupt or
edited artifact is refused before anything is built from it. The model id is a hash of both files' content.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from semwatch.errors import UserError

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
FORMAT = "semwatch-model/1"
REQUIRED_KEYS = (
    "format",
    "classes",
    "class_info",
    "architecture",
    "tile_px",
    "tile_physical_px",
    "intensity",
    "weights_sha256",
    "head_hidden",
    "novelty_k",
    "unknown_threshold",
)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_artifact(out_dir: Path, state: dict[str, torch.Tensor], manifest: dict[str, Any]) -> str:
    """Write weights then manifest (with the weights' sha256); return the model id."""
    from safetensors.torch import save

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    blob = save(tensors)
    _atomic_write(out_dir / WEIGHTS, blob)
    manifest = dict(manifest, format=FORMAT, weights_sha256=hashlib.sha256(blob).hexdigest())
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    text = json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n"
    _atomic_write(out_dir / MANIFEST, text.encode("utf-8"))
    return model_id(manifest)


def _manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own checksum (edits are detected)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def model_id(manifest: dict[str, Any]) -> str:
    """Short content hash: same weights and same manifest, same id."""
    text = json.dumps(manifest, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def read_manifest(model_dir: Path) -> dict[str, Any]:
    path = model_dir / MANIFEST
    if not model_dir.is_dir():
        raise UserError(f"model folder not found: {model_dir} (train one with `semwatch train`)")
    if not path.is_file():
        raise UserError(f"{model_dir}: no {MANIFEST}; not a semwatch model")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: corrupt manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: corrupt manifest (not an object)")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise UserError(f"{path}: manifest lacks {', '.join(missing)}")
    if manifest["format"] != FORMAT:
        raise UserError(f"{path}: unsupported model format {manifest['format']!r} (expected {FORMAT})")
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise UserError(f"{path}: manifest checksum mismatch; the model is corrupt or was altered")
    return manifest


def load_artifact(model_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Verified weights and manifest; `UserError` for anything missing, corrupt or tampered."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    manifest = read_manifest(model_dir)
    weights = model_dir / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{model_dir}: no {WEIGHTS}")
    try:
        blob = weights.read_bytes()
    except OSError as exc:
        raise UserError(f"{weights}: cannot read ({exc.strerror})") from None
    if hashlib.sha256(blob).hexdigest() != manifest["weights_sha256"]:
        raise UserError(
            f"{weights}: checksum mismatch with the manifest; the model is corrupt or was altered"
        )
    try:
        state = load(blob)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise UserError(f"{weights}: not a valid safetensors file ({exc})") from None
    return state, manifest
