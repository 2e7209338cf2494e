"""`semwatch inspect`: the real command (in-process, through `main`) on real vendor TIFFs and NCM
JPEGs, and on hostile names."""

from __future__ import annotations

import io
import json
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from conftest import Cli
from semwatch.config import Settings
from semwatch.errors import ExitStatus
from semwatch.output import Output
from semwatch.safefs import path_from_text
from semwatch.views.inspection import inspect_files

FIELDS = {"path", "format", "width", "height", "bit_depth", "vendor", "instrument", "pixel_size_nm",
          "magnification", "voltage_kv", "detector", "acquired_at", "databar_rows", "quality"}


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_inspect_json_vendor_tiffs(cli: Cli, vendor_dir: Path) -> None:
    paths = sorted(vendor_dir.glob("*/*.tif"))
    run = cli("inspect", "--json", *paths)
    assert run.code == ExitStatus.OK, run.err
    rows = {Path(r["path"]).name: r for r in _json_lines(run.out)}
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


def test_inspect_json_ncm_jpegs(cli: Cli, ncm_dir: Path) -> None:
    paths = [sorted((ncm_dir / c).glob("*.jpg"))[0] for c in ("333", "523_formation", "811_cycled")]
    run = cli("inspect", "--json", *paths)
    assert run.code == ExitStatus.OK, run.err
    for r, path in zip(_json_lines(run.out), paths, strict=True):
        assert r["path"] == str(path)
        assert (r["format"], r["width"], r["height"], r["bit_depth"]) == ("jpeg", 1280, 960, 8)
        assert r["databar_rows"] == 64
        assert r["magnification"] == 500 and r["voltage_kv"] == 20
        assert r["instrument"] == "SNE-4500M Plus" and r["detector"] == "SED"
        assert datetime.fromisoformat(r["acquired_at"]).year in (2019, 2020, 2021, 2022)
        assert r["pixel_size_nm"] is None
        assert r["quality"]["ok"]


def test_inspect_table_and_failures(cli: Cli, vendor_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("hello", encoding="utf-8")
    good = vendor_dir / "fei" / "CS_DC_5KV_1000x_ETD_8bit.tif"
    run = cli("inspect", good, text)
    assert run.code == ExitStatus.INPUT_FAILED and run.err == ""
    for word in ("Thermo Fisher (FEI) Versa 3D", "134.896 nm", "1000×", "5 kV", "79 rows", "not an image"):
        assert word in run.out, (word, run.out)
    assert run.out.index("CS_DC_5KV") < run.out.index("79 rows") < run.out.index("notes.jpg")  # in order


def test_inspect_files_writes_to_its_output(vendor_dir: Path, settings: Settings, tmp_path: Path) -> None:
    """The library function prints only through the `Output` it is given."""
    good = sorted(vendor_dir.glob("zeiss/*.tif"))
    out = Output(json=True, stdout=io.StringIO(), stderr=io.StringIO())
    assert inspect_files(good, settings, out=out) == ExitStatus.OK
    assert isinstance(out.stdout, io.StringIO) and isinstance(out.stderr, io.StringIO)
    assert [Path(r["path"]) for r in _json_lines(out.stdout.getvalue())] == good
    out.stdout.truncate(0)
    out.stdout.seek(0)
    assert inspect_files([*good, tmp_path / "missing.tif"], settings, out=out) == ExitStatus.INPUT_FAILED
    last = _json_lines(out.stdout.getvalue())[-1]
    assert last == {"path": str(tmp_path / "missing.tif"), "error": "no such file"}
    assert out.stderr.getvalue() == ""


def _hostile_copies(ncm_dir: Path, folder: Path) -> tuple[Path, Path]:
    """A real JPEG under a name that is not UTF-8, and one whose name holds terminal escapes and
    rich markup."""
    source = sorted((ncm_dir / "333").glob("*.jpg"))[0]
    bad = folder / os.fsdecode(b"bad_\xff.jpg")
    evil = folder / "evil\x1b]0;pwned\x07\x1b[31m[red]x[bold]\u202e.jpg"
    for target in (bad, evil):
        shutil.copy(source, target)
    return bad, evil


def test_inspect_json_non_utf8_name(cli: Cli, ncm_dir: Path, tmp_path: Path) -> None:
    bad, evil = _hostile_copies(ncm_dir, tmp_path)
    run = cli("inspect", "--json", bad, evil, tmp_path / os.fsdecode(b"gone_\xfe.jpg"))
    assert run.code == ExitStatus.INPUT_FAILED, run.err
    run.out.encode("utf-8")  # strictly valid UTF-8: a surrogate escape (a raw byte) would raise here
    rows = _json_lines(run.out)
    assert [r["path"] for r in rows] == [str(tmp_path / "bad_\\xff.jpg"), str(evil),
                                         str(tmp_path / "gone_\\xfe.jpg")]
    assert path_from_text(rows[0]["path"]) == str(bad)  # lossless: it opens the same file
    assert rows[0]["width"] == 1280 and rows[2]["error"] == "no such file"


def test_inspect_table_shows_names_never_interprets_them(cli: Cli, ncm_dir: Path, tmp_path: Path) -> None:
    bad, evil = _hostile_copies(ncm_dir, tmp_path)
    run = cli("inspect", bad, evil, env={"COLUMNS": "200", "FORCE_COLOR": "1", "TERM": "xterm-256color"})
    assert run.code == ExitStatus.OK, run.err
    out = run.out
    assert "bad_\\xff.jpg" in out
    assert "evil\\x1b]0;pwned\\x07\\x1b[31m[red]x[bold]\\u202e.jpg" in out  # visible, markup kept as text
    for sequence in ("\x1b]", "\x07", "\x1b[31m", "\u202e"):
        assert sequence not in out, repr(sequence)
    assert "\x1b[" in out  # the test's terminal is a colour one: rich's own styling is there
