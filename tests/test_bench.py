"""`semwatch bench --json`: the throughput figures, measured in one run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from semwatch.views.bench import bench_images

pytestmark = pytest.mark.slow


def test_bench_images_round_robin(ncm_dir: Path) -> None:
    picked = bench_images(ncm_dir, 24)
    assert len(picked) == 24 and len({p.parent.name for p in picked}) == 12


def test_bench_json(tiny_model: Path, ncm_dir: Path, tmp_path: Path, tiles_per_ncm_image: int) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "semwatch",
            "bench",
            str(ncm_dir),
            "--model",
            str(tiny_model),
            "--max-images",
            "4",
            "--rounds",
            "2",
            "--json",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in (
        "images",
        "tiles",
        "wall_s",
        "images_per_s",
        "tiles_per_s",
        "model_only_tiles_per_s",
        "pipeline_efficiency",
        "batch_size",
        "device",
    ):
        assert key in result, key
    assert result["images"] == 4 and result["tiles"] == 4 * tiles_per_ncm_image and result["device"] == "cpu"
    assert 0 < result["pipeline_efficiency"] < 2
    assert result["rounds"] == 2 and len(result["round_efficiencies"]) == 2
