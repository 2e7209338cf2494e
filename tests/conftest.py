"""Shared fixtures: real data, leak checks (threads, databases), a tiny trained model."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple, Protocol

import pytest

from semwatch.config import Settings, load_settings
from semwatch.store import db

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """`$SEMWATCH_DATA`, else ../shared/data beside the repository."""
    env = os.environ.get("SEMWATCH_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_data_dir()
    if not (path / "ncm-sem").is_dir():
        pytest.fail(f"shared data not found at {path} (set SEMWATCH_DATA)")
    return path


@pytest.fixture(scope="session")
def ncm_dir(data_dir: Path) -> Path:
    return data_dir / "ncm-sem"


@pytest.fixture(scope="session")
def vendor_dir(data_dir: Path) -> Path:
    return data_dir / "vendor-tiff"


class CliRun(NamedTuple):
    """What one in-process `semwatch` command did: its exit status and what it printed."""

    code: int
    out: str
    err: str


class Cli(Protocol):
    def __call__(self, *args: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> CliRun: ...


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Cli:
    """`semwatch ARGS...` in-process, through `semwatch.cli.main(argv)` as the console script runs it:
    in tmp_path (so a ./config.toml there is picked up), without the caller's `SEMWATCH_*` settings
    (`SEMWATCH_DATA` stays), `env` added for the one call. Path arguments may hold surrogate escapes
    (a name that is not UTF-8), as `sys.argv` does."""
    from semwatch.cli import main

    for key in list(os.environ):
        if key.startswith("SEMWATCH_") and key != "SEMWATCH_DATA":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)

    def run(*args: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> CliRun:
        capsys.readouterr()  # what the test printed before is not the command's
        with monkeypatch.context() as patch:
            for key, value in (env or {}).items():
                patch.setenv(key, value)
            code = main([os.fspath(a) for a in args])
        captured = capsys.readouterr()
        return CliRun(code, captured.out, captured.err)

    return run


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Defaults with every writable path inside tmp_path."""
    return load_settings(
        None,
        environ={},
        overrides={
            "watch": {"folder": str(tmp_path / "incoming")},
            "store": {"database": str(tmp_path / "semwatch.db"),
                      "results_csv": str(tmp_path / "results.csv")},
            "report": {"folder": str(tmp_path / "reports")},
            "model": {"path": str(tmp_path / "model"), "device": "cpu"},
        },
    )


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads running (a daemon that does not stop cleanly)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"test leaked threads: {[t.name for t in leaked]}"


@pytest.fixture(autouse=True)
def no_unclosed_databases() -> Iterator[None]:
    """Fail a test that leaves a SQLite connection open."""
    before = set(map(id, db.open_connections()))
    yield
    leaked = [c for c in db.open_connections() if id(c) not in before]
    for conn in leaked:
        conn.close()
    assert not leaked, f"test left {len(leaked)} database connection(s) open"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, ncm_dir: Path) -> Path:
    """A real model artifact trained in seconds: 2 images per class (1 train, 1 validation), few tiles,
    2 epochs (poor accuracy; it exercises train → artifact → classify, not quality)."""
    from semwatch.model.train import train_model

    out = tmp_path_factory.mktemp("tiny_model") / "model"
    tiny = load_settings(None, environ={}, overrides={
        # ONNX Runtime: the fastest here, without `auto`'s measurement in every test session.
        "model": {"device": "cpu", "runtime": "onnxruntime"},
        "train": {"tiles_per_image": 4, "augment_copies": 1},
        "tiling": {"max_tiles": 6},
    })
    train_model(ncm_dir, out, tiny, max_images_per_class=2, epochs=2, progress=False)
    return out


@pytest.fixture(scope="session")
def tiles_per_ncm_image(tiny_model: Path) -> int:
    """Grid tiles that `tiny_model` cuts from one shared NCM micrograph: its 1280 x 895 specimen area
    (below the 64-row data bar) at the reference scale, with the default grid settings."""
    import json

    from semwatch.reading.tiles import grid_positions

    tiling = load_settings(None, environ={}).tiling
    manifest = json.loads((tiny_model / "manifest.json").read_text(encoding="utf-8"))
    return len(grid_positions(895, 1280, manifest["tile_physical_px"], tiling.overlap, tiling.max_tiles))
