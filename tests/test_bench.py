"""`semwatch bench`: the throughput figures, measured in one run, and consistent with each other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import Cli
from semwatch.views.bench import bench_images

pytestmark = pytest.mark.slow


def test_bench_images_round_robin(ncm_dir: Path) -> None:
    picked = bench_images(ncm_dir, 24)
    assert len(picked) == 24 and len({p.parent.name for p in picked}) == 12
    assert len(set(picked)) == 24


def test_bench_json(
    cli: Cli, tiny_model: Path, ncm_dir: Path, tmp_path: Path, tiles_per_ncm_image: int
) -> None:
    # One view per tile: the tiny model is unsure of every tile, and 8 views each only cost time here.
    # A named runtime (no `auto` measurement at load): bench times the others beside it anyway.
    (tmp_path / "config.toml").write_text(
        '[model]\ntest_time_views = 1\ndevice = "cpu"\nruntime = "onnxruntime"\n')
    run = cli("bench", ncm_dir, "--model", tiny_model, "--max-images", "4", "--rounds", "2", "--json")
    assert run.code == 0, run.err
    r = json.loads(run.out)
    assert set(r) == {
        "images", "failed", "tiles", "wall_s", "images_per_s", "tiles_per_s", "model_only_tiles_per_s",
        "pipeline_efficiency", "rounds", "round_efficiencies", "batch_size", "reader_threads", "device",
        "model_id", "runtime", "bare_tiles_per_s_by_runtime", "fastest_runtime", "efficiency_vs_fastest",
    }
    # Every image given was classified, with the tiles its size gives it.
    assert r["images"] == 4 and r["failed"] == 0 and r["tiles"] == 4 * tiles_per_ncm_image
    assert r["device"] == "cpu, onnxruntime" and r["batch_size"] == 32 and r["rounds"] == 2
    # Measured against the fastest runtime here, not only the one configured: every runtime `auto`
    # knows for a model with an export (torch and ONNX Runtime) has a bare rate.
    bare = r["bare_tiles_per_s_by_runtime"]
    assert {"torch", "onnxruntime"} <= set(bare) and all(v > 0 for v in bare.values())
    assert r["fastest_runtime"] == max(bare, key=bare.get)
    fastest = bare[r["fastest_runtime"]]
    assert r["efficiency_vs_fastest"] == pytest.approx(r["tiles_per_s"] / fastest, rel=1e-12)
    # The figures agree with each other: unrounded in the JSON, so up to float arithmetic only,
    # however slow the machine (rounded rates of a slow CPU made the recomputed ratio miss by 1e-3).
    assert r["wall_s"] > 0 and r["tiles_per_s"] > 0 and r["model_only_tiles_per_s"] > 0
    assert r["images_per_s"] == pytest.approx(r["images"] / r["wall_s"], rel=1e-12)
    assert r["tiles_per_s"] == pytest.approx(r["tiles"] / r["wall_s"], rel=1e-12)
    assert r["pipeline_efficiency"] == pytest.approx(
        r["tiles_per_s"] / r["model_only_tiles_per_s"], rel=1e-12)
    assert len(r["round_efficiencies"]) == 2 and all(e > 0 for e in r["round_efficiencies"])
    # The pipeline times reading and tiling on top of the network: it cannot be much faster than it.
    assert min(r["round_efficiencies"]) < 1.5

    plain = cli("bench", ncm_dir, "--model", tiny_model, "--max-images", "2", "--rounds", "1")
    assert plain.code == 0 and plain.err == ""
    assert plain.out.startswith(f"2 images, {2 * tiles_per_ncm_image} tiles in ")
    assert "pipeline efficiency" in plain.out and "bare model per runtime: " in plain.out


def test_bench_refuses_a_folder_without_images(cli: Cli, tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    run = cli("bench", tmp_path / "empty", "--model", tiny_model)
    assert run.code == 2 and run.out == "" and "no images found" in run.err
