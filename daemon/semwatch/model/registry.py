"""The model registry (`[model] registry`): one sub-folder per model id, and the aliases file.

    <registry>/<model id>/model.safetensors + manifest.json   (a model never changes once added)
    <registry>/aliases.json   {"champion": id, "challenger": id, "last_move": {...}}

Why a file of aliases and not links: one small JSON file replaced atomically (a temporary file,
fsync, rename, fsync of the folder) is the whole state, so a process killed half-way through a
promotion (kill -9, power loss) leaves the old aliases or the new ones, never a mix or a dangling
link. The daemon notices a move by the file's identity (inode, size, mtime) and content. The
history of moves is in the database (`model_events`, written by `semwatch.lifecycle`); the file
carries the last move's `token`, so a move whose database record was lost (a kill between the
rename and the commit) is recognised and recorded by the next move.

A model is added by copying its two files (and its ONNX export, `backbone.onnx`, when the manifest
records one: the runtimes build from it) into a temporary sub-folder, checking them (the manifest's
checksums, the export's sha256), then renaming the folder to the model id: a half-copied model is
never visible.
Without a registry, `[model] path` is the model, as before; with one but no champion yet, `path`
is still the one served (`live_model_dir`) until the first move records it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from semwatch.config import ModelSettings
from semwatch.errors import ExitStatus, UserError
from semwatch.model.artifact import MANIFEST, WEIGHTS, Manifest, read_manifest
from semwatch.safefs import path_text, write_atomic

ALIASES = "aliases.json"
ALIAS_NAMES = ("champion", "challenger")
FORMAT = "semwatch-aliases/1"
PAUSE_ENV = "SEMWATCH_TEST_PAUSE_ALIASES"  # tests: seconds to wait between the temporary file and the rename


@dataclass(frozen=True)
class Move:
    """One alias move as the aliases file remembers it (the last one only)."""

    token: str
    alias: str
    model_id: str | None
    previous_model_id: str | None
    action: str
    by: str
    at: str
    reason: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {"token": self.token, "alias": self.alias, "model_id": self.model_id,
                "previous_model_id": self.previous_model_id, "action": self.action, "by": self.by,
                "at": self.at, "reason": self.reason}


@dataclass(frozen=True)
class Aliases:
    champion: str | None = None
    challenger: str | None = None
    last_move: Move | None = None

    def get(self, alias: str) -> str | None:
        return self.champion if alias == "champion" else self.challenger

    def moved(self, move: Move) -> Aliases:
        values = {"champion": self.champion, "challenger": self.challenger, move.alias: move.model_id}
        return Aliases(values["champion"], values["challenger"], move)

    def to_json(self) -> dict[str, object]:
        return {"format": FORMAT, "champion": self.champion, "challenger": self.challenger,
                "last_move": self.last_move.to_json() if self.last_move else None}


@dataclass
class Registry:
    root: Path
    _ids: list[str] = field(default_factory=list, repr=False)

    @property
    def aliases_path(self) -> Path:
        return self.root / ALIASES

    def model_dir(self, model_id: str) -> Path:
        return self.root / model_id

    def ids(self) -> list[str]:
        """Model ids in the registry (sub-folders holding a manifest), oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir()
                 if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()]
        return [p.name for p in sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))]

    def manifest(self, model_id: str) -> Manifest:
        return read_manifest(self.model_dir(model_id))

    def read_aliases(self) -> Aliases:
        """The aliases; none when the file does not exist yet. A file that is not ours is refused
        (it can only be a hand edit: our writes are atomic)."""
        try:
            raw = json.loads(self.aliases_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return Aliases()
        except (OSError, ValueError) as exc:
            raise UserError(f"{path_text(self.aliases_path)}: unreadable aliases file ({exc})",
                            ExitStatus.CONFIG) from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise UserError(f"{path_text(self.aliases_path)}: not a semwatch aliases file", ExitStatus.CONFIG)
        last = raw.get("last_move")
        move = None
        if isinstance(last, dict) and all(isinstance(last.get(k), str) for k in ("token", "alias", "action",
                                                                                  "by", "at")):
            move = Move(last["token"], last["alias"], _text_or_none(last.get("model_id")),
                        _text_or_none(last.get("previous_model_id")), last["action"], last["by"], last["at"],
                        _text_or_none(last.get("reason")))
        return Aliases(_text_or_none(raw.get("champion")), _text_or_none(raw.get("challenger")), move)

    def write_aliases(self, aliases: Aliases) -> None:
        """Replace the aliases file atomically and durably (see the module docstring)."""
        self.root.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(aliases.to_json(), indent=2) + "\n").encode("utf-8")
        pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
        if pause > 0:  # fault injection: a kill -9 here must leave the old aliases
            fd, tmp = tempfile.mkstemp(prefix=f".{ALIASES}.", suffix=".tmp", dir=self.root)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.write(2, b"semwatch: test pause\n")
            time.sleep(pause)
            Path(tmp).replace(self.aliases_path)
        else:
            write_atomic(self.aliases_path, data)
        _fsync_folder(self.root)

    def signature(self) -> tuple[int, int, int] | None:
        """What changes whenever the aliases file is replaced (the daemon polls this)."""
        try:
            st = self.aliases_path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def resolve(self, name: str) -> str:
        """An alias, a model id or a unique prefix of one → the model id in the registry."""
        if name in ALIAS_NAMES:
            model_id = self.read_aliases().get(name)
            if model_id is None:
                raise UserError(f"the registry has no {name} yet ({path_text(self.root)})")
            return model_id
        ids = self.ids()
        if name in ids:
            return name
        matches = [i for i in ids if i.startswith(name)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise UserError(f"{name!r} matches {len(matches)} models; give more of the id")
        raise UserError(f"no model {name!r} in the registry {path_text(self.root)}")

    def add(self, model_dir: Path) -> str:
        """Copy the model at `model_dir` into the registry (checked, then renamed into place);
        its id. A model already there is not copied again."""
        manifest = read_manifest(model_dir)
        model_id = manifest.model_id
        target = self.model_dir(model_id)
        if (target / MANIFEST).is_file():
            return model_id
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.root))
        try:
            for name in (WEIGHTS, MANIFEST):
                shutil.copyfile(model_dir / name, staging / name)
                with open(staging / name, "rb") as fh:
                    os.fsync(fh.fileno())
            copied = read_manifest(staging)
            weights = hashlib.sha256((staging / WEIGHTS).read_bytes()).hexdigest()
            if copied.model_id != model_id or weights != copied.weights_sha256:
                raise UserError(f"{path_text(model_dir)}: the model changed while it was copied")
            _copy_export(model_dir, staging, copied)
            staging.chmod(0o755)
            staging.replace(target)
            _fsync_folder(self.root)
        except FileNotFoundError as exc:
            raise UserError(f"{path_text(model_dir)}: not a model folder ({exc.strerror})") from None
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return model_id


def _copy_export(model_dir: Path, staging: Path, manifest: Manifest) -> None:
    """The manifest's ONNX export beside the weights, checked: without it the registry's copy would
    fall back to torch (or be refused where `[model] runtime` names ONNX Runtime or OpenVINO). A
    model folder that lacks it already is copied as it is."""
    onnx = manifest.export.get("onnx")
    if not isinstance(onnx, dict):
        return
    name, expected = str(onnx.get("file", "")), str(onnx.get("sha256", ""))
    if not name or Path(name).name != name:
        raise UserError(f"{path_text(model_dir)}: the manifest's export names {name!r}, not a file beside it")
    try:
        shutil.copyfile(model_dir / name, staging / name)
    except FileNotFoundError:
        return  # the folder lacks it already: its load says how to make it (`semwatch models export`)
    with open(staging / name, "rb") as fh:
        os.fsync(fh.fileno())
    if hashlib.sha256((staging / name).read_bytes()).hexdigest() != expected:
        raise UserError(f"{path_text(model_dir)}: {name} is not the export its manifest records "
                        f"(make it again with `semwatch models export {path_text(model_dir)}`)")


def registry_of(model: ModelSettings) -> Registry | None:
    return Registry(model.registry) if model.registry is not None else None


def live_model_dir(model: ModelSettings, *, strict: bool = True) -> Path:
    """The model the daemon serves: the registry's champion, else `[model] path`. Not `strict`
    (views, reports): an unreadable aliases file means `[model] path` instead of an error."""
    registry = registry_of(model)
    if registry is not None:
        try:
            champion = registry.read_aliases().champion
        except UserError:
            if strict:
                raise
            champion = None
        if champion is not None:
            return registry.model_dir(champion)
    return model.path


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _fsync_folder(folder: Path) -> None:
    """The rename itself is durable only once the folder is flushed."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
