"""`semwatch inspect`: the real command on real vendor TIFFs and NCM JPEGs, and on hostile names."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from semwatch.config import Settings
from semwatch.safefs import path_from_text
from semwatch.views.inspection import inspect_files

SEMWATCH = Path(sys.executable).parent / "semwatch"
FIELDS = {"path", "format", "width", "height", "bit_depth", "vendor", "instrument", "pixel_size_nm",
          "magnification", "voltage_kv", "detector", "acquired_at", "databar_rows", "quality"}


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEMWATCH_") or k == "SEMWATCH_DATA"}
    return subprocess.run([str(SEMWATCH), *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=env, stdin=subprocess.DEVNULL)


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_inspect_json_vendor_tiffs(vendor_dir: Path, tmp_path: Path) -> None:
    paths = sorted(vendor_dir.glob("*/*.tif"))
    proc = _run("inspect", "--json", *map(str, paths), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {Path(r["path"]).name: r for r in _json_lines(proc.stdout)}
    assert len(rows) == len(paths)
    for r in rows.values():
        assert set(r) >= FIELDS
        assert set(r["quality"]) == {"focus", "saturated_fraction", "dynamic_range", "ok", "reasons"}
        assert r["quality"]["ok"] and r["quality"]["reasons"] == []
    fei16 = rows["Untreated_ME_5KV_1200x_ETD_16bit.tif"]
    assert fei16["pixel_size_nm"] == pytest.approx(112.413)
    assert (fei16["bit_depth"], fei16["databar_rows"], fei16["voltage_kv"]) == (16, 79, 5.0)
    assert fei16["magnification"] == pytest.approx(1200, rel=1e-3)
    assert fei16["acquired_at"] == "2020-02-13T18:32:25"
    assert fei16["vendor"] == "Thermo Fisher (FEI)" and fei16["instrument"] == "Versa 3D"
    zeiss = rows["FeMoOx_AntiA_04_1k5x_CN.tif"]
    assert zeiss["pixel_size_nm"] == pytest.approx(74.43)
    assert (zeiss["magnification"], zeiss["voltage_kv"], zeiss["databar_rows"]) == (1500, 5.0, 78)
    assert zeiss["acquired_at"] == "2021-07-13T18:23:36" and zeiss["detector"] == "InLens"
    assert (zeiss["width"], zeiss["height"], zeiss["format"]) == (1024, 768, "tiff")


def test_inspect_json_ncm_jpegs(ncm_dir: Path, tmp_path: Path) -> None:
    paths = [sorted((ncm_dir / c).glob("*.jpg"))[0] for c in ("333", "523_formation", "811_cycled")]
    proc = _run("inspect", "--json", *map(str, paths), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for r, path in zip(_json_lines(proc.stdout), paths, strict=True):
        assert r["path"] == str(path)
        assert (r["format"], r["width"], r["height"], r["bit_depth"]) == ("jpeg", 1280, 960, 8)
        assert r["databar_rows"] == 64
        assert r["magnification"] == 500 and r["voltage_kv"] == 20
        assert r["instrument"] == "SNE-4500M Plus" and r["detector"] == "SED"
        assert datetime.fromisoformat(r["acquired_at"]).year in (2019, 2020, 2021, 2022)
        assert r["pixel_size_nm"] is None
        assert r["quality"]["ok"]


def test_inspect_table_and_failures(vendor_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("hello", encoding="utf-8")
    good = vendor_dir / "fei" / "CS_DC_5KV_1000x_ETD_8bit.tif"
    proc = _run("inspect", str(good), str(text), cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    for word in ("Thermo Fisher (FEI) Versa 3D", "134.896 nm", "1000×", "5 kV", "79 rows", "not an image"):
        assert word in proc.stdout, (word, proc.stdout)


def test_inspect_files_in_process(vendor_dir: Path, settings: Settings, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    good = sorted(vendor_dir.glob("zeiss/*.tif"))
    assert inspect_files(good, settings, as_json=True) == 0
    assert [Path(r["path"]) for r in _json_lines(capsys.readouterr().out)] == good
    assert inspect_files([*good, tmp_path / "missing.tif"], settings, as_json=True) == 1
    last = _json_lines(capsys.readouterr().out)[-1]
    assert last == {"path": str(tmp_path / "missing.tif"), "error": "no such file"}


def _hostile_copies(ncm_dir: Path, folder: Path) -> tuple[Path, Path]:
    """A real JPEG under a name that is not UTF-8, and one whose name holds terminal escapes and
    rich markup."""
    source = sorted((ncm_dir / "333").glob("*.jpg"))[0]
    bad = folder / os.fsdecode(b"bad_\xff.jpg")
    evil = folder / "evil\x1b]0;pwned\x07\x1b[31m[red]x[bold]\u202e.jpg"
    for target in (bad, evil):
        shutil.copy(source, target)
    return bad, evil


def test_inspect_json_non_utf8_name(ncm_dir: Path, tmp_path: Path) -> None:
    bad, evil = _hostile_copies(ncm_dir, tmp_path)
    proc = subprocess.run([str(SEMWATCH), "inspect", "--json", os.fsencode(bad), os.fsencode(evil),
                           os.fsencode(tmp_path / os.fsdecode(b"gone_\xfe.jpg"))],
                          capture_output=True, timeout=120, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    rows = _json_lines(proc.stdout.decode("utf-8"))  # strictly valid UTF-8
    assert [r["path"] for r in rows] == [str(tmp_path / "bad_\\xff.jpg"), str(evil),
                                         str(tmp_path / "gone_\\xfe.jpg")]
    assert path_from_text(rows[0]["path"]) == str(bad)  # lossless: it opens the same file
    assert rows[0]["width"] == 1280 and rows[2]["error"] == "no such file"


def test_inspect_table_shows_names_never_interprets_them(ncm_dir: Path, tmp_path: Path) -> None:
    bad, evil = _hostile_copies(ncm_dir, tmp_path)
    env = {**os.environ, "COLUMNS": "200", "FORCE_COLOR": "1", "TERM": "xterm-256color"}
    proc = subprocess.run([str(SEMWATCH), "inspect", os.fsencode(bad), os.fsencode(evil)],
                          capture_output=True, timeout=120, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode("utf-8")
    assert "bad_\\xff.jpg" in out
    assert "evil\\x1b]0;pwned\\x07\\x1b[31m[red]x[bold]\\u202e.jpg" in out  # visible, markup kept as text
    for sequence in ("\x1b]", "\x07", "\x1b[31m", "\u202e"):
        assert sequence not in out, repr(sequence)
    assert "\x1b[" in out  # the test's terminal is a colour one: rich's own styling is there
