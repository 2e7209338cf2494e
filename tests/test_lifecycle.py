"""The model lifecycle: the registry's aliases, the promotion gate, promotion and rollback while the
daemon runs, shadow runs, and a registry that survives kill -9 half-way through a move."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Cli
from dbfixture import model_events
from semwatch.config import load_settings
from semwatch.errors import UserError
from semwatch.lifecycle.gate import GateImage, ModelScore, decide, mcnemar_one_sided, unseen
from semwatch.model.artifact import Manifest, load_artifact, read_manifest, save_artifact
from semwatch.model.export import ONNX_FILE
from semwatch.model.registry import Aliases, Move, Registry, live_model_dir
from semwatch.store import schema
from test_daemon import Daemon, copy_image, daemon_factory, ncm_images

__all__ = ["daemon_factory"]

pytestmark = pytest.mark.slow

FAST = {"max_tiles": 6}  # the tiny model's tiling: a few tiles per image keep the CPU tests short


def _untrained_on(manifest: Manifest) -> Manifest:
    """Without the record of its training images: the tiny model's own training images then make
    an evaluation folder on which it is mostly right (the gate otherwise leaves them out)."""
    training = {k: v for k, v in manifest.training.items() if k != "trained_on"}
    return dataclasses.replace(manifest, training=training)


@pytest.fixture(scope="session")
def champion_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    state, manifest = load_artifact(tiny_model)
    out = tmp_path_factory.mktemp("champion_model") / "model"
    save_artifact(out, state, dataclasses.replace(_untrained_on(manifest), name=f"{manifest.name}-a"))
    return _with_export(tiny_model, out)


@pytest.fixture(scope="session")
def worse_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its class names reversed: the same network, every class called by
    another's name (12 classes, no fixed point), so it is wrong wherever the tiny model is right."""
    state, manifest = load_artifact(tiny_model)
    out = tmp_path_factory.mktemp("worse_model") / "model"
    save_artifact(out, state, dataclasses.replace(
        _untrained_on(manifest), name=f"{manifest.name}-reversed", classes=tuple(reversed(manifest.classes)),
        class_info=tuple(reversed(manifest.class_info))))
    return _with_export(tiny_model, out)


def _with_export(source: Path, out: Path) -> Path:
    """The same backbone, so the source's verified ONNX export (its record kept in the manifest)
    serves the derived model too: the daemons here run ONNX Runtime like every test daemon."""
    shutil.copyfile(source / ONNX_FILE, out / ONNX_FILE)
    return out


def write_config(root: Path, model: Path, *, eval_folder: Path | None = None) -> Path:
    config = root / "config.toml"
    config.write_text(
        f'[watch]\nfolder = "{root / "incoming"}"\n'
        f'[store]\ndatabase = "{root / "db" / "semwatch.db"}"\n'
        f'results_csv = "{root / "db" / "results.csv"}"\n'
        f'[model]\npath = "{model}"\ndevice = "cpu"\nregistry = "{root / "registry"}"\n'
        "min_confidence = 0.0\nunknown_threshold = 1e9\ntest_time_views = 1\n"
        f"[tiling]\nmax_tiles = {FAST['max_tiles']}\n"
        f'[lifecycle]\neval_folder = "{eval_folder or ""}"\nmin_class_images = 100\n', encoding="utf-8")
    return config


def eval_folder_of(model: Path, ncm_dir: Path, root: Path) -> Path:
    """A frozen evaluation folder: links to the images the tiny model was trained on (it gets
    most of them right, so a reversed copy of it is significantly worse)."""
    folder = root / "eval"
    for rel in read_manifest(model).split["train"]:
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(ncm_dir / rel)
    return folder


# --- the gate's statistics -----------------------------------------------------------------------


def test_exact_mcnemar_one_sided() -> None:
    assert mcnemar_one_sided(0, 5) == pytest.approx(1 / 32)
    assert mcnemar_one_sided(5, 0) == 1.0
    assert mcnemar_one_sided(0, 0) == 1.0
    # 2 wins, 8 losses: P(X >= 8 | n=10) = (45 + 10 + 1) / 1024
    assert mcnemar_one_sided(2, 8) == pytest.approx(56 / 1024)


def score(model_id: str, right: list[bool]) -> ModelScore:
    return ModelScore(model_id, right=right, status=["ok"] * len(right), confidence=[0.9] * len(right),
                      closed_right=right)


def test_decide_better_not_worse_and_worse_on_one_class() -> None:
    images = [GateImage(Path(f"a{i}"), "333", "folder") for i in range(20)]
    images += [GateImage(Path(f"b{i}"), "NCA_pristine", "labels") for i in range(10)]
    champion = score("A", [True] * 20 + [False] * 10)
    better = score("B", [True] * 20 + [True] * 10)
    result = decide(champion, better, images, alpha=0.05, min_class_images=10)
    assert result.decision == "better" and result.paired["challenger_only_right"] == 10
    assert result.challenger["per_class"]["NCA_pristine"]["accuracy"] == 1.0  # type: ignore[index]
    # Six images of 333 lost, eight of the new class won: overall not significant either way,
    # but 333 (20 images >= min_class_images) is significantly worse: refused.
    mixed = score("C", [True] * 14 + [False] * 6 + [True] * 8 + [False] * 2)
    result = decide(champion, mixed, images, alpha=0.05, min_class_images=10)
    assert result.decision == "worse" and result.worse_classes == ["333"]
    # The same with too few images of a class to gate on it alone.
    result = decide(champion, mixed, images, alpha=0.05, min_class_images=21)
    assert result.decision == "not significantly worse" and result.worse_classes == []


def test_images_a_model_trained_on_are_left_out(champion_model: Path) -> None:
    manifest = read_manifest(champion_model)
    seen = dataclasses.replace(manifest, training={**manifest.training, "trained_on": ["aa" * 32]})
    images = [GateImage(Path("x"), "333", "labels", "aa" * 32),
              GateImage(Path("y"), "333", "labels", "bb" * 32)]
    kept, dropped = unseen(images, manifest, seen)
    assert [im.path for im in kept] == [Path("y")] and dropped == 1


# --- the registry ----------------------------------------------------------------------------------


def test_registry_adds_resolves_and_falls_back_to_path(tmp_path: Path, champion_model: Path,
                                                       worse_model: Path) -> None:
    settings = load_settings(write_config(tmp_path, champion_model), environ={})
    registry = Registry(tmp_path / "registry")
    assert live_model_dir(settings.model) == champion_model  # no champion yet: [model] path
    a = registry.add(champion_model)
    assert registry.add(champion_model) == a  # already there: not copied again
    b = registry.add(worse_model)
    assert set(registry.ids()) == {a, b} and not list(registry.root.glob(".incoming-*"))
    assert registry.resolve(b[:10]) == b
    move = Move("t1", "champion", b, None, "test", "me", "2026-01-01T00:00:00.000+00:00")
    registry.write_aliases(Aliases().moved(move))
    assert registry.read_aliases() == Aliases(b, None, move)
    assert registry.resolve("champion") == b
    assert live_model_dir(settings.model) == registry.model_dir(b)
    (registry.root / "aliases.json").write_text("{broken", encoding="utf-8")
    assert live_model_dir(settings.model, strict=False) == champion_model


def test_registry_copies_the_onnx_export_checked(tmp_path: Path, tiny_model: Path) -> None:
    """A registered model keeps its ONNX export: the daemon serving the registry's copy builds its
    runtime from it (`semwatch train` writes one; without the copy the daemon refused to start).
    An export that is not the one its manifest records is refused, and nothing is added."""
    from semwatch.model.classify import Classifier

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    assert read_manifest(model).export.get("onnx"), "the tiny model has no export to copy"
    registry = Registry(tmp_path / "registry")
    model_id = registry.add(model)
    copied = registry.model_dir(model_id)
    assert (copied / "backbone.onnx").read_bytes() == (model / "backbone.onnx").read_bytes()
    settings = load_settings(None, environ={},
                             overrides={"model": {"device": "cpu", "runtime": "onnxruntime"}})
    assert Classifier.load(copied, settings).runtime == "onnxruntime"

    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_model, tampered)
    (tampered / "backbone.onnx").write_bytes((tampered / "backbone.onnx").read_bytes() + b"\0")
    with pytest.raises(UserError, match="not the export its manifest records"):
        Registry(tmp_path / "registry2").add(tampered)
    assert not list((tmp_path / "registry2").iterdir())


# --- the gate at work: refusing a worse model, --force with its reason, rollback ------------------


def test_promote_refuses_a_worse_model_force_records_why_and_rollback(
        cli: Cli, tmp_path: Path, champion_model: Path, worse_model: Path, ncm_dir: Path) -> None:
    write_config(tmp_path, champion_model, eval_folder=eval_folder_of(champion_model, ncm_dir, tmp_path))
    database = tmp_path / "db" / "semwatch.db"
    a, b = read_manifest(champion_model).model_id, read_manifest(worse_model).model_id
    r = cli("models", "register", worse_model, "--by", "ana")
    assert r.code == 0, r.err
    refused = cli("models", "promote", "--by", "ana")
    assert refused.code == 1 and "not promoted: the gate found it worse" in refused.err
    assert "decision: worse" in refused.out
    registry = Registry(tmp_path / "registry")
    assert registry.read_aliases().champion == a  # [model] path became the first champion
    assert cli("models", "promote", "--force").code == 2  # --force needs a reason
    forced = cli("models", "promote", "--force", "--reason", "line trial 7", "--by", "ben", "--json")
    assert forced.code == 0, forced.err
    assert registry.read_aliases() .champion == b
    rows = model_events(database)
    assert [(e["alias"], e["action"], e["model_id"]) for e in rows] == [
        ("champion", "initial", a), ("challenger", "register", b), ("champion", "force", b),
        ("challenger", "promoted", None)]
    force = rows[2]
    assert force["by"] == "ben" and force["reason"] == "line trial 7" and force["previous_model_id"] == a
    assert json.loads(str(force["evidence"]))["decision"] == "worse"
    back = cli("models", "rollback", "--reason", "worse on the line", "--by", "ana")
    assert back.code == 0, back.err
    assert registry.read_aliases().champion == a
    last = model_events(database)[-1]
    assert (last["action"], last["model_id"], last["previous_model_id"]) == ("rollback", a, b)
    shown = cli("models", "show", b[:12])
    assert "force by ben" in shown.out and "line trial 7" in shown.out and "rollback by ana" in shown.out
    assert schema.SCHEMA_VERSION >= 5


def test_the_gate_keeps_each_models_verdicts_by_content(cli: Cli, tmp_path: Path, champion_model: Path,
                                                       worse_model: Path, ncm_dir: Path) -> None:
    """`promote` after `compare` (and the champion against the next challenger) scores nothing
    again: the verdicts are kept per model, content and settings, and give the same decision. Other
    settings are another key; an entry that is not ours is scored again."""
    from semwatch.lifecycle.gate import SCORES_FOLDER

    config = write_config(tmp_path, champion_model,
                          eval_folder=eval_folder_of(champion_model, ncm_dir, tmp_path))
    assert cli("models", "register", worse_model, "--by", "ana").code == 0
    first = cli("models", "compare", "--json")
    kept = sorted((tmp_path / "registry" / SCORES_FOLDER).iterdir())
    assert len(kept) == 2  # one file per model
    stamps = [p.stat().st_mtime_ns for p in kept]
    again = cli("models", "compare", "--json")
    assert json.loads(again.out.splitlines()[-1]) == json.loads(first.out.splitlines()[-1])
    assert [p.stat().st_mtime_ns for p in kept] == stamps  # nothing new to keep: nothing scored
    kept[0].write_text("not json", encoding="utf-8")
    assert json.loads(cli("models", "compare", "--json").out.splitlines()[-1]) == json.loads(
        first.out.splitlines()[-1])
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace("min_confidence = 0.0", "min_confidence = 0.5"), encoding="utf-8")
    assert cli("models", "compare", "--json").code in (0, 1)
    assert len(list((tmp_path / "registry" / SCORES_FOLDER).iterdir())) == 4


# --- kill -9 half-way through a move ------------------------------------------------------------


def _killed_move(config: Path, model: Path, env: dict[str, str]) -> None:
    """`semwatch models register MODEL --alias champion` killed -9 at the injected pause."""
    proc = subprocess.Popen([sys.executable, "-m", "semwatch", "models", "register", str(model), "--alias",
                             "champion", "--reason", "test", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **env})
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    assert "test pause" in line, line + proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stderr.close()


@pytest.mark.parametrize("where", ["aliases", "before", "after"])
def test_registry_survives_kill_9_mid_move(cli: Cli, tmp_path: Path, champion_model: Path, worse_model: Path,
                                           where: str) -> None:
    config = write_config(tmp_path, champion_model)
    database = tmp_path / "db" / "semwatch.db"
    a, b = read_manifest(champion_model).model_id, read_manifest(worse_model).model_id
    assert cli("models", "register", champion_model, "--alias", "champion").code == 0
    env = ({"SEMWATCH_TEST_PAUSE_ALIASES": "60"} if where == "aliases"
           else {"SEMWATCH_TEST_PAUSE_MOVE": where})
    _killed_move(config, worse_model, env)
    registry = Registry(tmp_path / "registry")
    aliases = registry.read_aliases()  # parses: never a half-written file
    recorded = [e["model_id"] for e in model_events(database)]
    if where == "after":  # renamed, not committed: the new alias, its record missing for now
        assert aliases.champion == b and recorded == [a]
    else:  # the old alias, and no record of a move that did not happen
        assert aliases.champion == a and recorded == [a]
    listed = cli("models", "list")
    assert listed.code == 0 and a in listed.out and b in listed.out
    # The next move records a lost one first, then itself.
    assert cli("models", "register", champion_model, "--alias", "champion", "--reason", "back").code == 0
    rows = model_events(database)
    assert registry.read_aliases().champion == a
    actions = [(e["action"], e["model_id"]) for e in rows]
    if where == "after":
        assert actions == [("register", a), ("recovered", b), ("register", a)]
        assert rows[1]["token"] == aliases.last_move.token if aliases.last_move else False
    else:
        assert actions == [("register", a), ("register", a)]


# --- promotion and rollback while the daemon is busy; shadow verdicts stay apart ------------------


def _configure(d: Daemon, root: Path, *model_lines: str) -> None:
    text = d.config.read_text(encoding="utf-8")
    lines = text.splitlines()
    at = lines.index("[model]") + 1
    extra = [f'registry = "{root / "registry"}"', "min_confidence = 0.0", "unknown_threshold = 1e9",
             "test_time_views = 1", *model_lines]
    d.config.write_text("\n".join([*lines[:at], *extra, *lines[at:], "[tiling]",
                                   f"max_tiles = {FAST['max_tiles']}"]) + "\n", encoding="utf-8")


def _wait(cond: Callable[[], bool], what: str, d: Daemon, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert d.proc is not None and d.proc.poll() is None, f"daemon died:\n{d.log_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what}:\n{d.log_text()[-3000:]}"
        time.sleep(0.2)


def test_promotion_and_rollback_during_a_busy_daemon_with_a_shadow(
        daemon_factory: Callable[..., Daemon], champion_model: Path, worse_model: Path,
        ncm_dir: Path) -> None:
    d: Daemon = daemon_factory()
    _configure(d, d.root, 'shadow = "challenger"', "reprocess_outdated = true")
    a, b = read_manifest(champion_model).model_id, read_manifest(worse_model).model_id

    def semwatch(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "semwatch", *args, "--config", str(d.config)],
                              capture_output=True, text=True, timeout=300)

    assert semwatch("models", "register", str(champion_model), "--alias", "champion").returncode == 0
    assert semwatch("models", "register", str(worse_model)).returncode == 0  # the challenger
    first = [copy_image(src, d.folder / "s1" / src.name) for src in ncm_images(ncm_dir, "333", 3)]
    d.start()
    rows = d.wait_finished(first, timeout=300)
    assert {r["model_id"] for r in rows} == {a}
    # The shadow (the challenger) saw them too: its own table only.
    _wait(lambda: len(d.query("SELECT * FROM shadow_results")) == 3, "no shadow verdicts", d)
    shadow = d.query("SELECT * FROM shadow_results")
    assert {s["model_id"] for s in shadow} == {b} and {s["live_model_id"] for s in shadow} == {a}
    assert all(s["agrees"] == 0 for s in shadow if s["status"] == "ok")  # reversed names: never agree
    assert b not in d.csv.read_text(encoding="utf-8")
    assert {r["model_id"] for r in d.query("SELECT model_id FROM images")} == {a}
    samples = d.query("SELECT * FROM samples")
    # Promote while files arrive: no restart, each file classified once, by the model named on it.
    busy = [copy_image(src, d.folder / "s2" / src.name) for src in ncm_images(ncm_dir, "622", 3)]
    refused = semwatch("models", "register", str(worse_model), "--alias", "champion")
    assert refused.returncode == 2 and "--reason" in refused.stderr  # no gate without a reason
    moved = semwatch("models", "register", str(worse_model), "--alias", "champion", "--by", "ana",
                     "--reason", "line trial")
    assert moved.returncode == 0, moved.stderr
    _wait(lambda: "now serving model " + b in d.log_text(), "no switch", d)
    later = [copy_image(src, d.folder / "s3" / src.name) for src in ncm_images(ncm_dir, "811", 2)]
    d.wait_finished(first + busy + later, timeout=300)
    # reprocess_outdated: the champion's catch-up brings the old results to the new model.
    _wait(lambda: {r["model_id"] for r in d.rows("current = 1")} == {b}, "outdated results left", d)
    d.assert_exactly_once()
    assert d.query("SELECT model_id FROM daemon")[0]["model_id"] == b
    by_path = {r["path"]: r for r in d.rows("current = 1")}
    assert all(by_path[str(p)]["supersedes"] is None for p in later)  # new files: one result, by b
    assert [s["n_images"] for s in samples if s["sample_id"] == "s1"] == [3]  # no shadow row counted
    # Rollback: the daemon follows back; outdated (b) results are brought back to a.
    back = semwatch("models", "rollback", "--reason", "test", "--by", "ana")
    assert back.returncode == 0, back.stderr
    _wait(lambda: {r["model_id"] for r in d.rows("current = 1")} == {a}, "rollback not followed", d)
    rc, _ = d.stop()
    assert rc == 0
    d.assert_exactly_once()
    actions = [(e["alias"], e["action"]) for e in model_events(d.database)]
    assert actions[-1] == ("champion", "rollback")
    assert all(len(d.rows(f"path = '{p}' AND current = 1")) == 1 for p in first + busy + later)
