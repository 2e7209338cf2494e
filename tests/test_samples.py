"""Sample keys and sample verdicts."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from semwatch.config import ExpectRule, SampleSettings
from semwatch.reading.sample import expected_class, sample_key
from semwatch.safefs import Confinement
from semwatch.store.samples import ImageRow, matches_expected, sample_verdict
from semwatch.values import Metadata
from test_safefs import call_within


def row(cls: str | None, conf: float = 0.9, agree: float = 1.0, status: str = "ok") -> ImageRow:
    comp, _, state = (cls or "").partition("_")
    probs = {cls: conf} if cls else {}
    return ImageRow(status, cls, comp or None, state or None, conf, agree, probs)


def test_sample_keys(tmp_path: Path) -> None:
    watch = tmp_path / "in"
    img = watch / "lotA" / "s1" / "NCM622_E1 x500.jpg"
    assert sample_key(img, watch, SampleSettings()) == "lotA/s1"
    assert sample_key(watch / "a.jpg", watch, SampleSettings()) == "."
    assert sample_key(img, watch, SampleSettings(key="regex")) == "NCM622"
    rx = SampleSettings(key="regex", regex=r"(?P<sample>E\d+)")
    assert sample_key(img, watch, rx) == "E1"
    assert sample_key(watch / "s2" / "none.jpg", watch, rx) == "s2"  # no match: parent folder
    md = SampleSettings(key="metadata")
    session = "191203_ncm622_E1_100cycles"
    assert sample_key(img, watch, md, Metadata(session=session)) == session
    assert sample_key(img, watch, md, Metadata()) == "lotA/s1"
    assert sample_key(img, watch, SampleSettings(key="metadata", metadata_field="op"),
                      Metadata(extra={"op": "kim"})) == "kim"


def test_expected_from_rules_and_file(tmp_path: Path) -> None:
    s = SampleSettings(expect=(ExpectRule("^lot-622", "622_pristine"),))
    assert expected_class("lot-622-a", tmp_path / "x.jpg", s) == "622_pristine"
    assert expected_class("other", tmp_path / "x.jpg", s) is None
    (tmp_path / "expected.txt").write_text("# comment\n811_cycled\n", encoding="utf-8")
    assert expected_class("other", tmp_path / "x.jpg", s) == "811_cycled"
    assert matches_expected("622", "622_cycled", "622", "cycled")
    assert matches_expected("622", "622", None, None)
    assert matches_expected("622_pristine", "622", None, None)
    assert not matches_expected("622_cycled", "622_formation", "622", "formation")


@pytest.mark.parametrize("kind", ["fifo", "zero", "huge", "directory", "binary"])
def test_hostile_expected_txt_means_no_expectation(tmp_path: Path, kind: str) -> None:
    """expected.txt that is a FIFO, a link to /dev/zero, 10 MB, a folder or not text: None, at once."""
    expected = tmp_path / "expected.txt"
    if kind == "fifo":
        os.mkfifo(expected)
    elif kind == "zero":
        expected.symlink_to("/dev/zero")
    elif kind == "huge":
        expected.write_bytes(b"622_cycled\n" + b"#" * 10_000_000)
    elif kind == "directory":
        expected.mkdir()
    else:
        expected.write_bytes(b"\xff\xfe\x00garbage")
    t0 = time.perf_counter()
    found = call_within(lambda: expected_class("s", tmp_path / "x.jpg", SampleSettings()),
                        fifos=(expected,) if kind == "fifo" else ())
    assert found is None
    assert time.perf_counter() - t0 < 1.0


def test_expected_txt_symlink_policy(tmp_path: Path) -> None:
    watch, elsewhere = tmp_path / "watch", tmp_path / "elsewhere"
    (watch / "lot").mkdir(parents=True)
    elsewhere.mkdir()
    (elsewhere / "expected.txt").write_text("811_cycled\n", encoding="utf-8")
    (watch / "lot" / "expected.txt").symlink_to(elsewhere / "expected.txt")
    image, s = watch / "lot" / "x.jpg", SampleSettings()
    assert expected_class("lot", image, s, confine=Confinement(watch)) is None
    assert expected_class("lot", image, s, confine=Confinement(watch, "never")) is None
    assert expected_class("lot", image, s, confine=Confinement(watch, "always")) == "811_cycled"
    assert expected_class("lot", image, s) == "811_cycled"  # unconfined (the default)
    (watch / "lot" / "expected.txt").unlink()
    (watch / "lot" / "expected.txt").write_text("\ufeff622\n", encoding="utf-8")  # BOM
    assert expected_class("lot", image, s, confine=Confinement(watch, "never")) == "622"


def test_sample_verdicts() -> None:
    s = SampleSettings()
    uniform = [row("622_cycled", 0.95) for _ in range(4)]
    v = sample_verdict("s", uniform, "622_cycled", s)
    assert (v.composition, v.state, v.verdict, v.n_images) == ("622", "cycled", "pass", 4)
    assert v.uniformity == 1.0 and v.confidence == 0.95
    assert sample_verdict("s", uniform, "811_cycled", s).verdict == "fail"
    assert sample_verdict("s", uniform, None, s).verdict == "unknown"
    mixed = [row("622_cycled", 0.95), row("622_cycled", 0.95), row("811_cycled", 0.95),
             row("333_cycled", 0.9)]
    v = sample_verdict("s", mixed, "622_cycled", s)
    assert v.verdict == "uncertain" and v.uniformity == 0.5
    # Unknown, rejected and failed images never count towards a composition.
    noisy = [row("622_cycled", 0.9), row("811_cycled", 0.3, status="unknown"),
             row(None, 0.0, status="failed")]
    v = sample_verdict("s", noisy, "622", s)
    assert v.composition == "622" and v.verdict == "pass" and v.n_images == 3
    only_unknown = [row("811_cycled", 0.3, status="unknown")]
    assert sample_verdict("s", only_unknown, "811", s).verdict == "unknown"
    # Tiles disagreeing inside images lower the uniformity.
    split = [row("622_cycled", 0.9, agree=0.6) for _ in range(3)]
    assert sample_verdict("s", split, "622_cycled", s).verdict == "uncertain"


def test_metadata_key_from_real_sne_sidecar(ncm_dir: Path, tmp_path: Path) -> None:
    """key = "metadata": the SNE sidecar's acquisition folder names the sample."""
    from semwatch.config import load_settings
    from semwatch.reading.micrograph import read_micrograph

    image = sorted((ncm_dir / "622_cycled").glob("*.jpg"))[0]
    micrograph = read_micrograph(image, load_settings(None, environ={}))
    session = micrograph.metadata.session
    assert session and "622" in session
    assert sample_key(image, ncm_dir, SampleSettings(key="metadata"), micrograph.metadata) == session
