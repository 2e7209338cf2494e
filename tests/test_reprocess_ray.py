"""`semwatch reprocess --engine ray`: the same verdicts as the local engine, a killed model actor that
Ray restarts with every file still recorded exactly once, and the install hint without Ray.

One local Ray (2 CPUs, no dashboard) serves the whole module: `RayEngine` uses a Ray this process is
already connected to and leaves it running, so the tests do not pay Ray's start-up each time. Its
two driver threads start with the module fixture, before conftest's leak check takes its snapshot,
and Ray Data's own threads end with each run: the leak check applies unchanged.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Cli
from semwatch.config import Settings, load_settings
from semwatch.output import Output
from semwatch.reprocess import ray_engine
from semwatch.reprocess.run import ReprocessRequest, reprocess
from semwatch.store.selection import Selection

ray = pytest.importorskip("ray", reason="ray[data] is not installed (pip install 'semwatch[ray]')")

@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import logging

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        yield
    finally:
        ray.shutdown()


def archive(root: Path, ncm_dir: Path, per_class: int) -> Path:
    """Real NCM micrographs (with their sidecars) in two sample folders, and one broken file."""
    folder = root / "archive"
    for sample, cls in (("sA", "333"), ("sB", "811_cycled")):
        (folder / sample).mkdir(parents=True)
        for image in sorted((ncm_dir / cls).glob("*.jpg"))[:per_class]:
            shutil.copy(image, folder / sample / image.name)
            shutil.copy(image.with_name(image.name + ".txt"), folder / sample / (image.name + ".txt"))
    (folder / "sA" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def settings_for(tmp: Path, model: Path, name: str, **model_keys: object) -> Settings:
    return load_settings(None, environ={}, overrides={
        "watch": {"folder": str(tmp / "incoming")},
        "store": {"database": str(tmp / f"{name}.db"), "results_csv": str(tmp / f"{name}.csv")},
        "report": {"folder": str(tmp / "reports")},
        "model": {"path": str(model), "device": "cpu", **model_keys},
        "tiling": {"max_tiles": 4},
    })


def current_rows(settings: Settings) -> dict[str, sqlite3.Row]:
    conn = sqlite3.connect(settings.store.database)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute("SELECT * FROM images WHERE current = 1").fetchall()
        total = conn.execute("SELECT count(*) FROM images").fetchone()[0]
    finally:
        conn.close()
    by_path = {r["path"]: r for r in rows}
    assert len(by_path) == len(rows), "two current rows for one file"
    assert total >= len(rows)
    return by_path


def csv_rows(settings: Settings) -> list[dict[str, str]]:
    with settings.store.results_csv.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def run(settings: Settings, request: ReprocessRequest) -> tuple[int, list[dict[str, object]]]:
    import io

    stdout = io.StringIO()
    code = reprocess(settings, request, out=Output(json=True, stdout=stdout, stderr=io.StringIO()))
    return code, [json.loads(line) for line in stdout.getvalue().splitlines()]


@pytest.mark.usefixtures("local_ray")
def test_local_and_ray_give_the_same_verdicts(tmp_path: Path, tiny_model: Path, ncm_dir: Path) -> None:
    folder = archive(tmp_path, ncm_dir, per_class=4)
    results = {}
    for engine in ("local", "ray"):
        settings = settings_for(tmp_path, tiny_model, engine, test_time_views=2, test_time_below=1.0)
        code, lines = run(settings, ReprocessRequest(folders=(folder,), engine=engine))  # type: ignore[arg-type]
        assert code == 1  # the broken file is recorded failed, the others classified
        summary = lines[-1]
        assert (summary["engine"], summary["classified"], summary["failed"]) == (engine, 8, 1)
        results[engine] = current_rows(settings)
    local, on_ray = results["local"], results["ray"]
    assert set(local) == set(on_ray) and len(local) == 9
    for path, a in local.items():
        b = on_ray[path]
        for column in ("status", "predicted_class", "composition", "state", "sample_id", "sha256",
                       "n_tiles", "model_id", "error", "reasons"):
            assert a[column] == b[column], (path, column)
        if a["status"] == "failed":
            assert "broken" in path
            continue
        assert b["confidence"] == pytest.approx(a["confidence"], abs=1e-5)
        pa, pb = json.loads(a["probabilities"]), json.loads(b["probabilities"])
        assert pa.keys() == pb.keys()
        assert [pb[k] for k in pa] == pytest.approx([pa[k] for k in pa], abs=1e-5)


@pytest.mark.usefixtures("local_ray")
def test_a_killed_model_actor_is_restarted_and_every_file_recorded_once(
        tmp_path: Path, tiny_model: Path, ncm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = archive(tmp_path, ncm_dir, per_class=4)
    settings = settings_for(tmp_path, tiny_model, "kill", test_time_views=1)
    monkeypatch.setattr(ray_engine, "IMAGES_PER_CALL", 1)  # many actor calls: the kill is mid-run
    for round_, request in enumerate((ReprocessRequest(folders=(folder,), engine="ray"),
                                      ReprocessRequest(selection=Selection(scope="all"), engine="ray"))):
        marker = tmp_path / f"killed-{round_}"
        monkeypatch.setenv(ray_engine.KILL_ENV, f"1:{marker}")
        code, lines = run(settings, request)
        assert marker.exists(), "the fault was not injected: no actor died"
        assert code == 1  # round 1: the broken file failed; round 2: it still cannot be read
        summary = lines[-1]
        assert summary["classified"] == 8 and summary["stale"] == 0, summary
        rows = current_rows(settings)
        assert len(rows) == 9 and sum(r["status"] == "failed" for r in rows.values()) == 1
        written = csv_rows(settings)
        assert len({(r["id"]) for r in written}) == len(written), "a CSV line was written twice"
        assert {r["path"] for r in written} == set(rows)
    # Round 2 re-classified each of the 8 images exactly once (a new revision superseding round 1's).
    assert sorted(int(r["revision"]) for r in rows.values() if r["status"] != "failed") == [1] * 8
    assert len(written) == 9 + 8
    _, lines = run(settings, ReprocessRequest(folders=(folder,), engine="ray"))
    assert lines[-1]["classified"] == 0  # nothing left to do


@pytest.mark.usefixtures("local_ray")
def test_a_model_actor_refuses_weights_that_are_not_what_the_driver_sent(
        tmp_path: Path, tiny_model: Path, ncm_dir: Path) -> None:
    from semwatch.errors import UserError
    from semwatch.reprocess.work import WorkItem

    folder = archive(tmp_path, ncm_dir, per_class=1)
    engine = ray_engine.RayEngine(settings_for(tmp_path, tiny_model, "tampered"), tiny_model)
    try:
        assert engine.device == "ray: 2 CPU model actors on 1 node (2 CPUs)"
        engine._digests["model.safetensors"] = "0" * 64  # as if the bytes changed on their way
        image = next(folder.glob("sA/*.jpg"))
        with pytest.raises(UserError, match=r"model\.safetensors arrived with sha256 .*refusing"):
            list(engine.run([WorkItem(str(image), str(folder))]))
    finally:
        engine.close()
    assert ray.is_initialized()  # the module's Ray: the engine leaves a caller's connection alone


def test_engine_ray_without_ray_says_how_to_install_it(
        cli: Cli, tmp_path: Path, tiny_model: Path, ncm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = archive(tmp_path, ncm_dir, per_class=1)
    (tmp_path / "config.toml").write_text(
        f'[model]\npath = "{tiny_model}"\ndevice = "cpu"\n[store]\ndatabase = "db/s.db"\n'
        'results_csv = "db/results.csv"\n', encoding="utf-8")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = cli("reprocess", folder, "--engine", "ray")
    assert result.code == 78, result
    assert "pip install 'semwatch[ray]'" in result.err
    assert cli("reprocess", folder, "--engine", "local", "--dry-run").code == 0  # the rest works


@pytest.mark.usefixtures("local_ray")
def test_a_read_hung_under_ray_is_recorded_failed_and_the_run_goes_on(
        tmp_path: Path, tiny_model: Path, ncm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader task's read blocked in the kernel for good (injected: a read from a pipe nobody
    writes) is given up after `[watch] read_timeout_seconds`: recorded failed with the reason, and
    every other file classified, in this chunk of the work list and the next."""
    folder = archive(tmp_path, ncm_dir, per_class=2)
    hung = sorted(folder.glob("sB/*.jpg"))[0]
    settings = settings_for(tmp_path, tiny_model, "hang", test_time_views=1)
    # 10 s: far beyond a real read of these files even on a loaded machine, so only the hung one fails.
    settings = settings.replace(watch=dataclasses.replace(settings.watch, read_timeout_seconds=10.0))
    monkeypatch.setenv(ray_engine.HANG_ENV, hung.name)
    monkeypatch.setattr(ray_engine, "CHUNK_ITEMS", 3)  # the 5 files in two chunks: the stream goes on
    code, lines = run(settings, ReprocessRequest(folders=(folder,), engine="ray"))
    assert code == 1
    summary = lines[-1]
    assert (summary["classified"], summary["failed"], summary["kept"]) == (3, 2, 0), summary
    rows = current_rows(settings)
    assert len(rows) == 5
    error = rows[str(hung)]["error"]
    assert rows[str(hung)]["status"] == "failed" and "timed out" in error and "read_timeout_seconds" in error
    assert any(line.get("event") == "error" and line["path"] == str(hung) for line in lines)
    assert {r["path"] for r in csv_rows(settings)} == set(rows)


@pytest.mark.usefixtures("local_ray")
def test_only_what_reading_and_classifying_need_is_shipped_to_the_workers(
        tmp_path: Path, tiny_model: Path) -> None:
    """The reader tasks' function and the model actors' arguments, as Ray pickles them, hold no alert
    URL, token, metrics address or database path: a `WorkerSettings`, not the whole `Settings`."""
    from ray import cloudpickle

    from semwatch.config import MetricsSettings, NotifySettings
    from semwatch.reprocess.work import WorkerSettings

    secrets = ("json://hooks.example/api/webhooks/SECRET-TOKEN-1", "ntfys://user:PASSWORD-2@ntfy.example/topic-3")
    settings = settings_for(tmp_path, tiny_model, "shipped")
    settings = settings.replace(notify=NotifySettings(urls=secrets),
                                metrics=MetricsSettings(listen="127.0.0.1:19464"))
    engine = ray_engine.RayEngine(settings, tiny_model)
    try:
        read, actor = engine.stages()
        shipped = cloudpickle.dumps((read, actor))
    finally:
        engine.close()
    for needle in ("SECRET-TOKEN-1", "PASSWORD-2", "topic-3", "webhooks", "127.0.0.1:19464",
                   str(settings.store.database), str(settings.store.results_csv), str(tiny_model)):
        assert needle.encode() not in shipped, needle
    worker = actor["worker"]
    assert isinstance(worker, WorkerSettings) and read.keywords["worker"] is worker  # type: ignore[attr-defined]
    # What the workers rebuild from it reads and classifies as the driver's settings do.
    rebuilt = worker.settings()
    assert (rebuilt.reading, rebuilt.quality, rebuilt.tiling, rebuilt.samples) == (
        settings.reading, settings.quality, settings.tiling, settings.samples)
    assert rebuilt.watch.follow_symlinks == settings.watch.follow_symlinks
    assert rebuilt.model == dataclasses.replace(settings.model, path=Path())
    assert rebuilt.notify.urls == () and rebuilt.metrics.listen == ""
