"""`semwatch demo`: its parts on real files, and one end-to-end run with the tiny model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from semwatch.config import Settings, load_settings
from semwatch.errors import ExitStatus
from semwatch.model.artifact import Manifest, save_artifact
from semwatch.views.demo import (
    Drop,
    Verdict,
    choose_images,
    held_out,
    read_model,
    summarise,
    trained_on,
    write_config,
    write_like_an_instrument,
)


def _split(ncm_dir: Path) -> dict[str, list[str]]:
    files = {c: sorted(p.name for p in (ncm_dir / c).glob("*.jpg"))[:6] for c in ("622", "811_cycled")}
    return {"train": [f"{c}/{f}" for c, fs in files.items() for f in fs[:3]],
            "val": [f"{c}/{f}" for c, fs in files.items() for f in fs[3:5]],
            "test": [f"{c}/{f}" for c, fs in files.items() for f in fs[5:6]]}


def test_held_out_images_are_never_training_images(ncm_dir: Path, tmp_path: Path) -> None:
    split = _split(ncm_dir)
    images = held_out(split, ncm_dir)
    rels = [f"{p.parent.name}/{p.name}" for p in images]
    assert rels[:2] == split["test"]  # the recorded test split comes first
    assert not set(rels) & set(split["train"] + split["val"])
    drops = choose_images(split, ncm_dir, {"622": "622_pristine"}, tmp_path / "in", 6)
    assert len(drops) == 6
    classes = [d.true_class for d in drops]
    assert len(set(classes)) == 6 and {"622_pristine", "811_cycled"} <= set(classes)  # map applied
    assert len({d.target for d in drops}) == 6  # names repeat across class folders: targets must not
    assert all(d.target.parent.name == f"sample-{d.true_class}" for d in drops)
    # test-split images are preferred over merely unseen ones
    picked = {f"{d.source.parent.name}/{d.source.name}" for d in drops}
    assert set(split["test"]) <= picked


def test_instrument_style_write(ncm_dir: Path, tmp_path: Path) -> None:
    source = next(p for p in sorted((ncm_dir / "622").glob("*.jpg")) if Path(f"{p}.txt").is_file())
    drop = Drop(source, "622", tmp_path / "in" / "sample-622" / f"000_{source.name}")
    write_like_an_instrument(drop)
    assert drop.target.read_bytes() == source.read_bytes()
    assert Path(f"{drop.target}.txt").read_bytes() == Path(f"{source}.txt").read_bytes()
    assert (drop.target.parent / "expected.txt").read_text(encoding="utf-8").strip() == "622"
    assert not list(drop.target.parent.glob(".*"))  # no temporary files left behind


def test_generated_config_loads_and_stays_in_the_workdir(settings: Settings, tmp_path: Path) -> None:
    work = tmp_path / "work [demo] \"quoted\""
    work.mkdir()
    config = write_config(settings, work, tmp_path / "model")
    loaded = load_settings(config, environ={})
    for path in (loaded.watch.folder, loaded.store.database, loaded.store.results_csv, loaded.report.folder):
        assert path.is_relative_to(work)
    assert loaded.model.path == (tmp_path / "model").resolve() and not loaded.report.enabled


def test_summary_against_true_labels(tmp_path: Path) -> None:
    drops = [Drop(tmp_path / f"{i}.jpg", c, tmp_path / f"t{i}.jpg")
             for i, c in enumerate(["622", "622", "811_cycled", "333_formation"])]
    verdicts = {
        str(drops[0].target): Verdict("ok", predicted_class="622", composition="622", state="pristine"),
        str(drops[1].target): Verdict("ok", predicted_class="811", composition="811", state="pristine"),
        str(drops[2].target): Verdict("unknown"),
    }
    s = summarise(drops, verdicts, ["pass", "fail"])
    assert s.n_dropped == 4 and s.n_done == 3
    assert s.status == {"ok": 2, "unknown": 1, "not processed": 1}
    assert s.accuracy == 0.25 and s.accuracy_ok == 0.5
    assert s.composition_accuracy == 0.5 and s.state_accuracy == 1.0
    assert s.sample_verdicts == {"pass": 1, "fail": 1}


def _manifest(split: dict[str, list[str]], data_dir: str) -> Manifest:
    return Manifest(classes=("622", "811_cycled"), class_info=(), architecture="test", tile_px=224,
                    tile_physical_px=224, intensity="equalize", head_hidden=8, novelty_k=4,
                    unknown_threshold=1.0, training={"data_dir": data_dir, "n_images": 12},
                    split={k: tuple(v) for k, v in split.items()})


def test_trained_on(ncm_dir: Path, tmp_path: Path) -> None:
    """A model is reused for the demo's data when it was trained on that folder, or when every image
    its split names is there (the manifest may hold a path relative to where training ran)."""
    split = _split(ncm_dir)
    assert trained_on(_manifest(split, "relative/ncm"), ncm_dir)
    assert not trained_on(_manifest(split, "relative/ncm"), tmp_path)
    assert trained_on(_manifest({}, str(ncm_dir)), ncm_dir)
    assert not trained_on(_manifest({}, str(tmp_path)), ncm_dir)


def test_unusable_model_folders_are_no_model(tmp_path: Path) -> None:
    model = tmp_path / "model"
    assert read_model(model) is None
    model.mkdir()
    assert read_model(model) is None
    (model / "manifest.json").write_text("[]", encoding="utf-8")
    assert read_model(model) is None
    save_artifact(model, {}, _manifest({"test": ["622/a.jpg"]}, "/data/ncm"))
    manifest = read_model(model)
    assert manifest is not None and manifest.split == {"test": ("622/a.jpg",)}
    path = model / "manifest.json"
    path.write_text(path.read_text(encoding="utf-8").replace("/data/ncm", "/data/ncm2"), encoding="utf-8")
    assert read_model(model) is None  # edited: its checksum no longer matches


@pytest.mark.slow
def test_demo_end_to_end(tiny_model: Path, ncm_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "user.toml"
    config.write_text(f'[model]\npath = {json.dumps(str(tiny_model))}\ndevice = "cpu"\n'
                      f'[data]\nncm_dir = {json.dumps(str(ncm_dir))}\n', encoding="utf-8")
    work = tmp_path / "demo"
    cmd = [sys.executable, "-m", "semwatch", "demo", "--config", str(config), "--workdir", str(work),
           "--images", "3", "--interval", "0.2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "COLUMNS": "150"})
    # INPUT_FAILED only if an image had no verdict
    assert out.returncode in (ExitStatus.OK, ExitStatus.INPUT_FAILED), out.stdout + out.stderr
    text = out.stdout
    assert "Traceback" not in out.stderr
    assert "reusing" in text and "SIGTERM (exit 0)" in text
    assert re.search(r"images\s+3 of 3 processed", text), text
    assert "accuracy" in text
    report = work / "reports"
    htmls = list(report.glob("*/report.html"))
    assert len(htmls) == 1 and (htmls[0].parent / "images.csv").read_text(encoding="utf-8").count("\n") == 4
    assert (work / "var" / "semwatch.db").is_file() and (work / "var" / "results.csv").is_file()
    assert out.returncode == ExitStatus.OK
