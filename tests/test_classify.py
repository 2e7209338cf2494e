"""Classifier contract, the batching engine, aggregation rules and `semwatch classify` on real and
broken files; the daemon's pipeline gives the verdicts `classify` gives."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import Cli
from semwatch.config import Settings, load_settings
from semwatch.model.classify import Classifier, aggregate, classify_files
from semwatch.model.engine import PreparedImage, TileOutput, batch_groups, chunks, predict_images
from semwatch.output import Output
from semwatch.reading.tiles import Scale
from semwatch.values import ClassInfo, ImageVerdict, MicrographError, parse_class

CLASSES = ["333", "333_cycled", "811", "811_cycled"]
INFO = [parse_class(c) for c in CLASSES]


def prepared(n: int, *, scale_ok: bool = True, candidates: int = 4) -> PreparedImage:
    return PreparedImage(
        Path("x.jpg"),
        np.zeros((n, 3, 8, 8), np.float32),
        [(0, 0)] * n,
        candidates,
        Scale(1.0, "none"),
        scale_ok,
        (8, 8),
    )


def verdict(
    probs: list[list[float]], novelty: float | list[float] = 0.1, *, scale_ok: bool = True
) -> ImageVerdict:
    p = np.array(probs, np.float32)
    out = TileOutput(p, np.broadcast_to(np.asarray(novelty, np.float32), (len(p),)).copy())
    return aggregate(
        prepared(len(p), scale_ok=scale_ok),
        out,
        CLASSES,
        INFO,
        unknown_threshold=1.0,
        min_confidence=0.5,
        min_tiles=2,
        model_id="m",
    )


def test_parse_class_defaults_to_pristine() -> None:
    assert parse_class("622") == ClassInfo("622", "622", "pristine")
    assert parse_class("811_formation") == ClassInfo("811_formation", "811", "formation")


def test_aggregation_marginals_and_agreement() -> None:
    v = verdict([[0.05, 0.05, 0.1, 0.8], [0.05, 0.05, 0.2, 0.7], [0.1, 0.1, 0.6, 0.2]])
    assert v.status == "ok" and v.predicted_class == "811_cycled"
    assert v.composition == "811" and v.state == "cycled"
    assert v.tile_agreement == pytest.approx(2 / 3, abs=1e-4)
    assert sum(v.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert v.n_tiles == 3 and v.model_id == "m"


def test_tiles_unlike_the_training_images_do_not_vote() -> None:
    """A damaged image (a burnt scan window) whose foreign tiles are sure of the wrong class: the
    familiar ones decide; too few familiar tiles make the image unknown."""
    right, wrong = [0.02, 0.94, 0.02, 0.02], [1e-5, 1e-5, 0.99997, 1e-5]
    damaged = verdict([right, right, right, right, wrong, wrong], novelty=[0.2, 0.3, 0.4, 0.5, 3.0, 9.0])
    assert damaged.status == "ok" and damaged.predicted_class == "333_cycled"
    assert damaged.tile_agreement == 1.0 and damaged.n_tiles == 6
    # every tile voting, the two sure wrong tiles would have won
    assert verdict([right] * 4 + [wrong] * 2).predicted_class == "811"
    mostly_foreign = verdict([right, wrong, wrong], novelty=[0.2, 0.9, 5.0])
    assert mostly_foreign.status == "ok"  # median 0.9: two familiar tiles are enough (min_tiles 2)
    lone = verdict([right, wrong, wrong, wrong], novelty=[0.2, 0.9, 5.0, 6.0])
    assert lone.status == "unknown" and "2 of 4 tiles" in lone.reasons[0]
    one_familiar = verdict([right, wrong], novelty=[0.2, 1.5])
    assert one_familiar.status == "unknown" and "only 1 of 2 tiles look like" in one_familiar.reasons[0]


def test_foreign_low_confidence_few_tiles_and_scale() -> None:
    confident = [[0.97, 0.01, 0.01, 0.01]] * 4
    far = verdict(confident, novelty=5.0)
    assert far.status == "unknown" and far.predicted_class is None and "unlike the training" in far.reasons[0]
    unsure = verdict([[0.3, 0.3, 0.2, 0.2]] * 4)
    assert unsure.status == "unknown" and any("low confidence" in r for r in unsure.reasons)
    few = verdict([[0.97, 0.01, 0.01, 0.01]])
    assert few.status == "rejected" and "usable tile" in few.reasons[0]
    none = verdict(np.zeros((0, 4)).tolist())
    assert none.status == "rejected" and none.n_tiles == 0
    empty = TileOutput(np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
    small = aggregate(
        prepared(0, candidates=1),
        empty,
        CLASSES,
        INFO,
        unknown_threshold=1.0,
        min_confidence=0.5,
        min_tiles=2,
        model_id=None,
    )
    assert small.status == "unknown" and "fit at the model's scale" in small.reasons[0]
    odd_scale = verdict(confident, scale_ok=False)
    assert odd_scale.status == "unknown" and "outside the model's range" in odd_scale.reasons[0]


def test_contract_prepare_predict_verdict(tiny_model: Path, ncm_dir: Path, settings: Settings,
                                          tiles_per_ncm_image: int) -> None:
    from semwatch.reading.micrograph import read_micrograph

    clf = Classifier.load(tiny_model, settings)
    image = next(iter(sorted((ncm_dir / "523").glob("*.jpg"))))
    prep = clf.prepare(read_micrograph(image, settings))
    px = clf.manifest.tile_px
    assert prep.tiles.dtype == np.float32 and prep.tiles.shape[1:] == (3, px, px)
    n = tiles_per_ncm_image  # the specimen area at the reference scale, covered by an overlapping grid
    assert len(prep.tiles) == n >= 2
    out = clf.predict(prep.tiles)
    assert out.probabilities.shape == (n, 12) and out.novelty.shape == (n,)
    assert np.allclose(out.probabilities.sum(axis=1), 1.0, atol=1e-4)
    v = clf.verdict(prep, out)
    assert v.n_tiles == n and v.model_id == clf.model_id and v.status in ("ok", "unknown")
    empty = clf.predict(np.zeros((0, 3, px, px), np.float32))
    assert empty.probabilities.shape == (0, 12)
    # The same tiles in a bigger batch give the same answer.
    both = clf.predict(np.concatenate([prep.tiles, prep.tiles]))
    assert np.allclose(both.probabilities[:n], out.probabilities, atol=1e-4)


def test_classify_cli_real_vendor_and_broken_files(
    cli: Cli, tiny_model: Path, ncm_dir: Path, vendor_dir: Path, tmp_path: Path, tiles_per_ncm_image: int
) -> None:
    ncm = sorted((ncm_dir / "811_cycled").glob("*.jpg"))[0]
    fei = vendor_dir / "fei" / "Untreated_ME_5KV_1200x_ETD_16bit.tif"
    zeiss = vendor_dir / "zeiss" / "FeMoOx_AntiA_04_1k5x_CN.tif"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((960, 1280), 128, np.uint8))
    missing = tmp_path / "missing.tif"
    files = (ncm, fei, zeiss, broken, blank, missing)
    run = cli("classify", *files, "--model", tiny_model, "--json")
    assert run.code == 1, run.err
    assert run.err == ""  # with --json the errors are records on stdout
    lines = [json.loads(line) for line in run.out.splitlines()]
    by_path = {Path(line["path"]).name: line for line in lines}
    assert list(by_path) == [p.name for p in files]
    for name in (ncm.name, fei.name, zeiss.name):
        line = by_path[name]
        for key in (
            "status",
            "predicted_class",
            "composition",
            "state",
            "confidence",
            "tile_agreement",
            "n_tiles",
            "probabilities",
            "reasons",
        ):
            assert key in line, key
        assert line["status"] in ("ok", "unknown", "rejected")
    assert by_path[ncm.name]["n_tiles"] == tiles_per_ncm_image
    assert set(by_path[broken.name]) == {"path", "error"} and set(by_path[missing.name]) == {"path", "error"}
    assert by_path[blank.name]["status"] == "rejected" and by_path[blank.name]["n_tiles"] == 0

    plain = cli("classify", ncm, missing, "--model", tiny_model)
    assert plain.code == 1
    assert plain.out.startswith(f"{ncm}: ") and f"tiles {tiles_per_ncm_image}" in plain.out
    assert plain.err.startswith(f"semwatch: {missing}: ") and len(plain.err.splitlines()) == 1


def test_classify_paths_and_explain(
    cli: Cli, tiny_model: Path, ncm_dir: Path, settings: Settings, tmp_path: Path
) -> None:
    from semwatch.reading.micrograph import read_micrograph

    clf = Classifier.load(tiny_model, settings)
    image = sorted((ncm_dir / "622_formation").glob("*.jpg"))[0]
    results = clf.classify_paths([image, tmp_path / "nope.jpg"])
    assert isinstance(results[0], ImageVerdict) and isinstance(results[1], MicrographError)
    micrograph = read_micrograph(image, settings)
    overlay = clf.explain(micrograph)
    assert overlay.dtype == np.uint8 and overlay.shape == (*micrograph.pixels.shape, 3)
    assert float(overlay.std()) > 0
    (tmp_path / "config.toml").write_text('[model]\ndevice = "cpu"\n')  # as `settings`: the same overlay
    run = cli("classify", image, "--model", tiny_model, "--explain", tmp_path / "cams", "--json")
    assert run.code == 0, run.err
    written = Path(json.loads(run.out)["explanation"])
    assert written.is_file() and cv2.imread(str(written)).shape[:2] == micrograph.pixels.shape
    assert np.array_equal(cv2.cvtColor(cv2.imread(str(written)), cv2.COLOR_BGR2RGB), overlay)


def _viewing(model: Path, views: int, below: float) -> Classifier:
    """The model on the CPU in float32 (so views can be compared exactly) with these view settings."""
    s = load_settings(None, environ={}, overrides={
        "model": {"device": "cpu", "cpu_precision": "float32", "test_time_views": views,
                  "test_time_below": below}})
    return Classifier.load(model, s)


def _first_tiles(model: Path, folder: Path) -> np.ndarray:
    """The network-ready tiles of the first micrograph in `folder`."""
    from semwatch.reading.micrograph import read_micrograph

    s = load_settings(None, environ={}, overrides={"model": {"device": "cpu"}})
    image = next(iter(sorted(folder.glob("*.jpg"))))
    return Classifier.load(model, s).prepare(read_micrograph(image, s)).tiles


@pytest.mark.parametrize(("views", "turn"), [
    (2, lambda t: t[..., ::-1]),  # mirror image
    (4, lambda t: t[..., ::-1, ::-1]),  # turned 180 degrees
    (8, lambda t: np.rot90(t, 1, axes=(2, 3))),  # turned 90 degrees
])
def test_test_time_views_make_predictions_invariant(tiny_model: Path, ncm_dir: Path, views: int,
                                                    turn: Callable[[np.ndarray], np.ndarray]) -> None:
    """Averaged over a group of flips/rotations, a tile and its turned copy get the same answer
    (a single view does not: the network itself is not rotation-invariant)."""

    def predict(n_views: int, tiles: np.ndarray) -> np.ndarray:
        clf = _viewing(tiny_model, n_views, 1.0)
        return clf.predict(np.ascontiguousarray(tiles)).probabilities

    tiles = _first_tiles(tiny_model, ncm_dir / "622_cycled")[:3]
    assert np.allclose(predict(views, tiles), predict(views, turn(tiles)), atol=1e-4)
    assert not np.allclose(predict(1, tiles), predict(1, turn(tiles)), atol=1e-4)
    assert np.allclose(predict(views, tiles).sum(axis=1), 1.0, atol=1e-4)


def test_only_unsure_tiles_get_more_views(tiny_model: Path, ncm_dir: Path) -> None:
    """Tiles at or above `test_time_below` keep their single-view answer; the others get the 8-view one."""
    tiles = _first_tiles(tiny_model, ncm_dir / "333_formation")

    def predict(views: int, below: float) -> np.ndarray:
        return _viewing(tiny_model, views, below).predict(tiles).probabilities

    one, every = predict(1, 1.0), predict(8, 1.0)
    assert np.allclose(predict(8, 0.0), one, atol=1e-5)  # nobody is unsure of anything below 0
    below = float(np.median(one.max(axis=1)))  # half of the tiles are unsure
    mixed = predict(8, below)
    unsure = one.max(axis=1) < below
    assert 0 < unsure.sum() < len(unsure)
    assert np.allclose(mixed[~unsure], one[~unsure], atol=1e-5)
    assert np.allclose(mixed[unsure], every[unsure], atol=1e-5)


# --- the batching engine --------------------------------------------------------------------------


def test_tile_outputs_concatenate_and_slice() -> None:
    a = TileOutput(np.full((2, 4), 0.25, np.float32), np.array([1.0, 2.0], np.float32))
    b = TileOutput(np.eye(4, dtype=np.float32)[:3], np.array([3.0, 4.0, 5.0], np.float32))
    both = TileOutput.concat([a, b])
    assert len(both) == 5 and both.probabilities.shape == (5, 4)
    assert both.novelty.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert np.array_equal(both[2:5].probabilities, b.probabilities)
    assert np.array_equal(both[0:2].novelty, a.novelty)
    assert both[3:3].probabilities.shape == (0, 4) and len(both[3:3]) == 0
    assert TileOutput.empty(4).probabilities.shape == (0, 4)


def test_chunks_are_full_batches_and_cover_every_tile() -> None:
    assert chunks(0, 32) == []
    assert chunks(10, 32) == [slice(0, 10)]
    assert chunks(36, 32) == [slice(0, 32), slice(32, 36)]  # never a batch over batch_size
    for n, size in ((300, 32), (33, 32), (1000, 7), (5, 1)):
        parts = chunks(n, size)
        covered = [i for p in parts for i in range(p.start, p.stop)]
        assert covered == list(range(n))
        lengths = [p.stop - p.start for p in parts]
        assert all(k == size for k in lengths[:-1]) and 0 < lengths[-1] <= size


class Recording:
    """A predictor that records the batches it is given (its answer: the tile's first pixel)."""

    batch_size = 3

    def __init__(self) -> None:
        self.classes = ["a", "b"]
        self.batches: list[int] = []

    def predict(self, tiles: np.ndarray) -> TileOutput:
        self.batches.append(len(tiles))
        first = tiles[:, 0, 0, 0]
        return TileOutput(np.stack([first, 1 - first], axis=1), first.copy())


def test_predict_images_batches_across_images_and_splits_back() -> None:
    sizes = [3, 0, 5, 2, 0]
    images = [dataclasses.replace(prepared(n), tiles=np.full((n, 3, 8, 8), i / 10, np.float32))
              for i, n in enumerate(sizes)]
    engine = Recording()
    outputs = predict_images(engine, images)
    assert [len(o) for o in outputs] == sizes
    assert engine.batches == [3, 3, 3, 1]  # 10 tiles in batches of 3, across image boundaries
    for i, out in enumerate(outputs):
        assert out.probabilities.shape == (sizes[i], 2)
        assert np.allclose(out.novelty, i / 10)  # each image gets its own tiles' outputs back
    engine.batches.clear()
    none = predict_images(engine, [prepared(0), prepared(0)])
    assert engine.batches == [] and [o.probabilities.shape for o in none] == [(0, 2), (0, 2)]


def test_the_daemon_pipeline_and_classify_give_the_same_verdicts(
    tiny_model: Path, ncm_dir: Path, vendor_dir: Path, settings: Settings, tmp_path: Path
) -> None:
    """The same images through `semwatch classify` and through the daemon's pipeline (readers,
    dynamic batches, the SQLite ledger): the same verdicts, because both run the same engine. On
    the CPU in float32 the network's answer barely depends on which tiles share its batch."""
    from semwatch.liveness import Liveness
    from semwatch.reading.micrograph import read_micrograph
    from semwatch.service.inbox import Finished, Inbox
    from semwatch.service.pipeline import Pipeline
    from semwatch.service.stability import Candidate
    from semwatch.store import db
    from semwatch.store.ledger import Store
    from semwatch.store.writer import Writer
    from semwatch.values import FileKey

    model = dataclasses.replace(settings.model, cpu_precision="float32", batch_size=16)
    settings = settings.replace(model=model)
    folder = settings.watch.folder
    folder.mkdir(parents=True)
    sources = [sorted((ncm_dir / c).glob("*.jpg"))[0] for c in ("333", "523_cycled", "622_formation", "811")]
    sources.append(vendor_dir / "fei" / "Untreated_ME_5KV_1200x_ETD_16bit.tif")
    paths = [folder / f"{i}{src.suffix}" for i, src in enumerate(sources)]
    for src, dst in zip(sources, paths, strict=True):
        shutil.copyfile(src, dst)
    blank = folder / "blank.png"  # no usable tiles: an empty output in the middle of a batch
    cv2.imwrite(str(blank), np.full((960, 1280), 128, np.uint8))
    paths.insert(2, blank)

    buf = io.StringIO()
    assert classify_files(paths, settings, model_dir=tiny_model, explain_dir=None,
                          out=Output(json=True, stdout=buf)) == 0
    by_classify = {line["path"]: line for line in map(json.loads, buf.getvalue().splitlines())}

    classifier = Classifier.load(tiny_model, settings)
    store = Store(settings.store.database, settings.store.results_csv)
    liveness = Liveness()
    writer = Writer(store, stage=liveness.stage("writer"))
    writer.start()
    inbox = Inbox()
    pipeline = Pipeline(settings, classifier, writer, folder, inbox=inbox, read=read_micrograph,
                        database=settings.store.database, liveness=liveness)
    pipeline.start()
    try:
        keys = set()
        for p in paths:
            key = FileKey.of(str(p), p.stat())
            keys.add(key)
            pipeline.submit(Candidate(key, time.time(), time.monotonic(), time.monotonic()))
        finished = set()
        deadline = time.monotonic() + 120
        while finished != keys:
            message = inbox.get(timeout=max(0.1, deadline - time.monotonic()))
            assert isinstance(message, Finished), message  # nothing failed, changed or retried
            finished.add(message.key)
    finally:
        assert pipeline.stop(30)
        writer.stop()
        writer.join(10)
        store.close()
    conn = db.connect(settings.store.database, readonly=True)
    try:
        rows = {r["path"]: dict(r) for r in conn.execute("SELECT * FROM images")}
    finally:
        conn.close()
    assert set(rows) == set(by_classify) == {str(p) for p in paths}
    for path, mine in by_classify.items():
        row = rows[path]
        for key in ("status", "predicted_class", "composition", "state", "n_tiles", "model_id"):
            assert row[key] == mine[key], (path, key)
        assert row["confidence"] == pytest.approx(mine["confidence"], abs=1e-5)
        assert row["tile_agreement"] == pytest.approx(mine["tile_agreement"], abs=1e-6)
        probs = json.loads(row["probabilities"])
        assert probs == pytest.approx(mine["probabilities"], abs=1e-5)
        assert (json.loads(row["reasons"]) if row["reasons"] else []) == mine["reasons"]


def test_batch_groups_fill_a_batch_with_at_least_one_item_each() -> None:
    groups = list(batch_groups([6] * 15, lambda n: n, 32))
    assert groups == [[6] * 6, [6] * 6, [6] * 3]  # each group closes once its tiles reach 32
    assert list(batch_groups([40, 0, 3], lambda n: n, 32)) == [[40], [0, 3]]
    assert list(batch_groups([], lambda n: n, 32)) == []
