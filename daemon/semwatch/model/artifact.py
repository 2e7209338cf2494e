"""The model artifact: `model.safetensors` (weights, never pickled) + `manifest.json` (a `Manifest`).

The manifest carries the sha256 of the weights file and of its own content, so a corrupt or
edited artifact is refused before anything is built from it. The model id is a hash of the
manifest's content, which includes the weights' hash: same weights and same manifest, same id.

Schema versions: 1 had no `schema_version` key (every model trained before the key existed);
2 adds it and nothing else; 3 adds `novelty` (which detector scores novelty and how it was fitted:
`{"detector": "layers", ...}`; a manifest without it uses the old PCA score, `"pca"`). A manifest
is read back exactly as it was written (unknown keys kept in `extra`), so its checksum and its
model id survive the round trip.

The export (`export`: the backbone as an ONNX graph for the faster runtimes, `model/export.py`) is
signed apart (`export_sha256`, over the record and the manifest's checksum) and is no part of
`manifest_sha256` nor of the model id: adding an export to an existing model (`semwatch models
export`) changes neither, so its results stay current. The graph file's own sha256 is in the record
and is checked before any runtime builds from it (`export_bytes`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from semwatch.errors import UserError
from semwatch.safefs import write_atomic
from semwatch.values import ClassInfo

if TYPE_CHECKING:  # torch only for annotations: reading a manifest stays JSON-only (fast)
    import torch

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
FORMAT = "semwatch-model/1"
SCHEMA_VERSION = 3
EXPORT_KEYS = ("export", "export_sha256")
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

Json: TypeAlias = "bool | int | float | str | list[Json] | dict[str, Json] | None"
Record: TypeAlias = "Mapping[str, Json]"


@dataclass(frozen=True)
class Manifest:
    """Everything a model needs besides its weights: how to tile for it, what its outputs mean,
    how it was trained and on which images. One attribute per manifest.json key."""

    classes: tuple[str, ...]
    class_info: tuple[ClassInfo, ...]
    architecture: str
    tile_px: int
    tile_physical_px: int
    intensity: str
    head_hidden: int
    novelty_k: int
    unknown_threshold: float
    name: str = ""
    overlap: float | None = None
    normalisation: Record = field(default_factory=dict)
    reference_pixel_size_nm: float | None = None
    reference_magnification: float | None = None
    unknown_calibration: Record = field(default_factory=dict)
    novelty: Record = field(default_factory=dict)  # schema 3: the novelty detector; {} = the old PCA score
    temperature: float | None = None
    training: Record = field(default_factory=dict)
    validation: Record = field(default_factory=dict)
    metrics: Record = field(default_factory=dict)
    split: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    semwatch_version: str = ""
    created_at: str = ""
    format: str = FORMAT
    weights_sha256: str = ""  # set by `save_artifact`
    manifest_sha256: str = ""  # set by `save_artifact`
    schema_version: int = SCHEMA_VERSION
    export: Record = field(default_factory=dict)  # {"onnx": {...}}: the verified runtime graph, if any
    export_sha256: str = ""  # set by `save_artifact` / `add_export` when there is an export
    extra: Record = field(default_factory=dict)  # keys this version does not know, kept as read

    @property
    def detector(self) -> str:
        """The novelty detector the weights hold: "layers" (schema 3) or "pca" (older models)."""
        value = self.novelty.get("detector", "pca")
        return value if isinstance(value, str) else "pca"

    @property
    def model_id(self) -> str:
        """Short content hash of the manifest (which holds the weights' hash), without the export."""
        return canonical_sha256({k: v for k, v in self.to_json().items() if k not in EXPORT_KEYS})[:16]

    def to_json(self) -> dict[str, Json]:
        out: dict[str, Json] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "schema_version"):
                continue
            if f.name == "novelty" and not self.novelty:  # absent before schema 3: keep ids stable
                continue
            if f.name in EXPORT_KEYS and not self.export:  # a model without an export
                continue
            out[f.name] = _plain(getattr(self, f.name))
        if self.schema_version >= 2:  # version 1 is the absence of the key
            out["schema_version"] = self.schema_version
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Json]) -> Manifest:
        """A manifest read from disk; `ValueError` naming the first key that is not as expected."""
        missing = [k for k in REQUIRED_KEYS if k not in raw]
        if missing:
            raise ValueError(f"manifest lacks {', '.join(missing)}")
        version = raw.get("schema_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"schema_version {version!r} is not a version")
        if version > SCHEMA_VERSION:
            raise ValueError(f"schema_version {version} is newer than this semwatch reads ({SCHEMA_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        r = _Reader(raw)
        return cls(
            classes=tuple(r.strings("classes")),
            class_info=tuple(r.class_info("class_info")),
            architecture=r.text("architecture"),
            tile_px=r.integer("tile_px"),
            tile_physical_px=r.integer("tile_physical_px"),
            intensity=r.text("intensity"),
            head_hidden=r.integer("head_hidden"),
            novelty_k=r.integer("novelty_k"),
            unknown_threshold=r.number("unknown_threshold"),
            name=r.text("name", ""),
            overlap=r.optional_number("overlap"),
            normalisation=r.record("normalisation"),
            reference_pixel_size_nm=r.optional_number("reference_pixel_size_nm"),
            reference_magnification=r.optional_number("reference_magnification"),
            unknown_calibration=r.record("unknown_calibration"),
            novelty=r.record("novelty"),
            temperature=r.optional_number("temperature"),
            training=r.record("training"),
            validation=r.record("validation"),
            metrics=r.record("metrics"),
            split={k: tuple(v) for k, v in r.split("split").items()},
            semwatch_version=r.text("semwatch_version", ""),
            created_at=r.text("created_at", ""),
            format=r.text("format"),
            weights_sha256=r.text("weights_sha256"),
            manifest_sha256=r.text("manifest_sha256", ""),
            schema_version=version,
            export=r.record("export"),
            export_sha256=r.text("export_sha256", ""),
            extra={k: v for k, v in raw.items() if k not in known},
        )


def _plain(value: object) -> Json:
    """A field's JSON form (tuples as lists, `ClassInfo` as an object)."""
    if isinstance(value, ClassInfo):
        return {"name": value.name, "composition": value.composition, "state": value.state}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"{type(value).__name__} has no JSON form")  # pragma: no cover - fields are typed


class _Reader:
    """Typed access to the keys of a manifest read from disk. Numbers keep their JSON type (an int
    stays an int) so that the manifest writes back byte for byte the same."""

    def __init__(self, raw: Mapping[str, Json]) -> None:
        self.raw = raw

    def _get(self, key: str, default: Json) -> Json:
        return self.raw.get(key, default)

    def text(self, key: str, default: str | None = None) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise ValueError(f"{key} is not a string")
        return value

    def integer(self, key: str) -> int:
        value = self._get(key, None)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{key} is not a whole number")
        return value

    def number(self, key: str) -> float:
        value = self.optional_number(key)
        if value is None:
            raise ValueError(f"{key} is not a number")
        return value

    def optional_number(self, key: str) -> float | None:
        value = self._get(key, None)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"{key} is not a number")
        return value

    def strings(self, key: str) -> list[str]:
        value = self._get(key, None)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{key} is not a list of names")
        return [str(v) for v in value]

    def record(self, key: str) -> dict[str, Json]:
        value = self._get(key, {})
        if not isinstance(value, dict):
            raise ValueError(f"{key} is not an object")
        return value

    def split(self, key: str) -> dict[str, list[str]]:
        value = self.record(key)
        out: dict[str, list[str]] = {}
        for name, files in value.items():
            if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                raise ValueError(f"{key}.{name} is not a list of files")
            out[name] = [str(f) for f in files]
        return out

    def class_info(self, key: str) -> list[ClassInfo]:
        value = self._get(key, None)
        if not isinstance(value, list):
            raise ValueError(f"{key} is not a list")
        out: list[ClassInfo] = []
        for item in value:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise ValueError(f"{key} holds an entry without a name")
            composition, state = item.get("composition"), item.get("state")
            if not (composition is None or isinstance(composition, str)) or not (
                state is None or isinstance(state, str)
            ):
                raise ValueError(f"{key}: composition and state must be strings or null")
            out.append(ClassInfo(str(item["name"]), composition, state))
        return out


def canonical_sha256(value: object) -> str:
    """sha256 of `value`'s canonical JSON (sorted keys; what JSON cannot hold, as text): one
    identity for a manifest, and for what a cache entry was made from."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _digest(body: Mapping[str, Json]) -> str:
    """sha256 of a manifest's canonical JSON without its own checksum and the export (edits are
    detected)."""
    rest = {k: v for k, v in body.items() if k != "manifest_sha256" and k not in EXPORT_KEYS}
    return canonical_sha256(rest)


def _export_digest(body: Mapping[str, Json]) -> str:
    """sha256 of the export record bound to the manifest it belongs to."""
    return canonical_sha256({"export": body.get("export"), "manifest_sha256": body.get("manifest_sha256")})


def _signed(manifest: Manifest) -> Manifest:
    """`manifest` with its checksums (and the export's, if it has one) computed."""
    manifest = dataclasses.replace(manifest, format=FORMAT, manifest_sha256="", export_sha256="")
    manifest = dataclasses.replace(manifest, manifest_sha256=_digest(manifest.to_json()))
    if manifest.export:
        manifest = dataclasses.replace(manifest, export_sha256=_export_digest(manifest.to_json()))
    return manifest


def _write_manifest(out_dir: Path, manifest: Manifest) -> None:
    text = json.dumps(manifest.to_json(), indent=2, sort_keys=True, default=str) + "\n"
    write_atomic(out_dir / MANIFEST, text.encode("utf-8"))


def save_artifact(out_dir: Path, state: dict[str, torch.Tensor], manifest: Manifest) -> Manifest:
    """Write weights then manifest (with the weights' and its own sha256); return what was written."""
    from safetensors.torch import save

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    blob = save(tensors)
    write_atomic(out_dir / WEIGHTS, blob)
    manifest = _signed(dataclasses.replace(manifest, weights_sha256=hashlib.sha256(blob).hexdigest()))
    _write_manifest(out_dir, manifest)
    return manifest


def add_export(model_dir: Path, manifest: Manifest, export: Mapping[str, Json]) -> Manifest:
    """Rewrite `model_dir`'s manifest with `export` (the graph files are already written beside it);
    the model id and `manifest_sha256` do not change."""
    updated = _signed(dataclasses.replace(manifest, export=dict(export)))
    if updated.model_id != manifest.model_id:  # pragma: no cover - the id excludes the export
        raise RuntimeError("adding an export changed the model id")
    _write_manifest(model_dir, updated)
    return updated


def export_bytes(model_dir: Path, manifest: Manifest, kind: str = "onnx") -> bytes | None:
    """The verified bytes of the model's `kind` export (None when it has none, or its file is not
    there); `UserError` when the file cannot be read or is not the one the manifest names
    (tampered, truncated, replaced)."""
    record = manifest.export.get(kind)
    if not isinstance(record, dict):
        return None
    name, digest = record.get("file"), record.get("sha256")
    if not isinstance(name, str) or not isinstance(digest, str) or "/" in name or name.startswith("."):
        raise UserError(f"{model_dir / MANIFEST}: the {kind} export record is malformed")
    path = model_dir / name
    if not path.exists() and not path.is_symlink():
        return None  # named but gone (a copy of the manifest alone): torch runs it, and says so
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read the model's {kind} export ({exc.strerror or exc}); "
                        f"make it again with `semwatch models export {model_dir}`") from None
    if hashlib.sha256(blob).hexdigest() != digest:
        raise UserError(f"{path}: checksum mismatch with the manifest; the {kind} export is corrupt or "
                        f"was altered (refused; `semwatch models export {model_dir}` makes it again)")
    return blob


def read_manifest(model_dir: Path) -> Manifest:
    """The verified manifest of `model_dir`; `UserError` if it is missing, corrupt or was edited."""
    path = model_dir / MANIFEST
    if not model_dir.is_dir():
        raise UserError(f"model folder not found: {model_dir} (train one with `semwatch train`)")
    if not path.is_file():
        raise UserError(f"{model_dir}: no {MANIFEST}; not a semwatch model")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: corrupt manifest ({exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: corrupt manifest (not an object)")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise UserError(f"{path}: manifest lacks {', '.join(missing)}")
    if raw["format"] != FORMAT:
        raise UserError(f"{path}: unsupported model format {raw['format']!r} (expected {FORMAT})")
    if raw.get("manifest_sha256") != _digest(raw):
        raise UserError(f"{path}: manifest checksum mismatch; the model is corrupt or was altered")
    if any(k in raw for k in EXPORT_KEYS) and raw.get("export_sha256") != _export_digest(raw):
        raise UserError(f"{path}: export record checksum mismatch; the model is corrupt or was altered")
    try:
        return Manifest.from_json(raw)
    except ValueError as exc:
        raise UserError(f"{path}: corrupt manifest ({exc})") from None


def load_artifact(model_dir: Path) -> tuple[dict[str, torch.Tensor], Manifest]:
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
    # The weights are read whole anyway (safetensors loads from bytes), so they are hashed as bytes.
    if hashlib.sha256(blob).hexdigest() != manifest.weights_sha256:
        raise UserError(
            f"{weights}: checksum mismatch with the manifest; the model is corrupt or was altered"
        )
    try:
        state = load(blob)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise UserError(f"{weights}: not a valid safetensors file ({exc})") from None
    return state, manifest


def configured_model_id(model_dir: Path) -> str | None:
    """The id of the model at `model_dir` (its manifest only: no weights, no torch), the one results
    are compared with to call them outdated; None when there is no readable model there."""
    if not (model_dir / MANIFEST).is_file():
        return None
    try:
        return read_manifest(model_dir).model_id
    except (UserError, OSError):
        return None
