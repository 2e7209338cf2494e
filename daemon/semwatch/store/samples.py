"""Sample verdicts: a sample's verdict recomputed from the current rows of its images.

A sample's verdict is recomputed from the current rows of its images each time one of them gets
a result, so it never drifts from the ledger. Only `ok` images count towards the composition;
`unknown`, `rejected` and `failed` images are counted in `n_images` but never vote.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections import defaultdict
from dataclasses import dataclass, field

from semwatch.config import SampleSettings
from semwatch.values import SampleVerdict, SampleVerdictKind, parse_class, utc_now


def matches_expected(expected: str, predicted_class: str, composition: str | None, state: str | None) -> bool:
    """Whether a prediction meets an expectation: a full class compares composition and state;
    a composition alone ("622") or "622_*" compares the composition only."""
    if expected == predicted_class:
        return True
    exp_comp, _, exp_state = expected.partition("_")
    pred_comp, pred_state = (composition, state) if composition else _parts(predicted_class)
    if not exp_state or exp_state == "*":
        return exp_comp == pred_comp
    return (exp_comp, exp_state) == (pred_comp, pred_state or "pristine")


@dataclass(frozen=True)
class ImageRow:
    """What a sample verdict needs from one image."""

    status: str
    predicted_class: str | None
    composition: str | None
    state: str | None
    confidence: float
    tile_agreement: float
    probabilities: dict[str, float]


def aggregate(images: list[ImageRow]) -> tuple[str, float, float] | None:
    """(class, confidence, uniformity) over the `ok` images; None when no image counts."""
    counted = [im for im in images if im.status == "ok" and im.predicted_class]
    if not counted:
        return None
    scores: dict[str, float] = defaultdict(float)
    for im in counted:
        probs = im.probabilities or {str(im.predicted_class): im.confidence}
        for cls, p in probs.items():
            scores[cls] += float(p) / len(counted)
    best = max(sorted(scores), key=lambda c: scores[c])
    confidence = min(1.0, scores[best])
    agreeing = sum(im.tile_agreement if im.predicted_class == best else 0.0 for im in counted)
    uniformity = agreeing / len(counted)
    return best, confidence, uniformity


def sample_verdict(sample_id: str, images: list[ImageRow], expected: str | None,
                   settings: SampleSettings) -> SampleVerdict:
    """Aggregate a sample's images.

    class: the highest mean probability over the `ok` images (each image one vote, weighted by
    its probabilities); confidence: that mean probability; uniformity: the fraction of the
    sample's evidence that agrees with it, i.e. the mean over `ok` images of the image's tile
    agreement where the image has the sample's class and 0 where it has another class
    (1.0 = every image and every tile agree). Verdict: unknown when no image counts; uncertain
    when confidence < pass_confidence or uniformity < min_uniformity (and, where an expected
    class is known, the sample is not confidently another class); with an expected class
    pass / fail; without one, unknown (nothing to check against).
    """
    agg = aggregate(images)
    if agg is None:
        return SampleVerdict(sample_id, len(images), None, None, 0.0, 0.0, expected, "unknown")
    best, confidence, uniformity = agg
    counted = [im for im in images if im.status == "ok" and im.predicted_class]
    votes = [im for im in counted if im.predicted_class == best]
    composition = votes[0].composition if votes and votes[0].composition else _parts(best)[0]
    state = votes[0].state if votes and votes[0].state else _parts(best)[1]
    confident = confidence >= settings.pass_confidence
    uniform = uniformity >= settings.min_uniformity
    verdict: SampleVerdictKind
    if expected is None:
        verdict = "unknown"
    elif matches_expected(expected, best, composition, state):
        verdict = "pass" if confident and uniform else "uncertain"
    else:
        verdict = "fail" if confident else "uncertain"
    return SampleVerdict(sample_id, len(images), composition, state, round(confidence, 6),
                         round(uniformity, 6), expected, verdict)


@dataclass
class TouchedSamples:
    """The samples whose verdicts a batch changed. A result brings its sample's expected class (or
    None: nothing expected); a failure brings none, so its sample keeps the one stored."""

    expected: dict[str, str | None] = field(default_factory=dict)
    keep: set[str] = field(default_factory=set)

    def result(self, sample_id: str, expected: str | None) -> None:
        self.expected[sample_id] = expected
        self.keep.discard(sample_id)

    def failure(self, sample_id: str) -> None:
        if sample_id not in self.expected:
            self.keep.add(sample_id)

    def __bool__(self) -> bool:
        return bool(self.expected or self.keep)


def update_samples(conn: sqlite3.Connection, touched: TouchedSamples, settings: SampleSettings) -> None:
    """Recompute the `samples` rows of `touched` from the current rows of their images. Runs inside
    the writer's transaction."""
    for sample_id in touched.keep:
        row = conn.execute("SELECT expected FROM samples WHERE sample_id = ?", (sample_id,)).fetchone()
        _update_sample(conn, sample_id, row["expected"] if row is not None else None, settings)
    for sample_id, expected in touched.expected.items():
        _update_sample(conn, sample_id, expected, settings)


def _update_sample(conn: sqlite3.Connection, sample_id: str, expected: str | None,
                   settings: SampleSettings) -> None:
    # Only `ok` images vote: fetch (and parse) those; the others are only counted, in SQL, so
    # a folder flooded with thousands of broken files costs a count, not a parse per row.
    images = [
        ImageRow(r["status"], r["predicted_class"], r["composition"], r["state"],
                 float(r["confidence"] or 0.0), float(r["tile_agreement"] or 0.0),
                 json.loads(r["probabilities"]) if r["probabilities"] else {})
        for r in conn.execute(
            "SELECT status, predicted_class, composition, state, confidence, tile_agreement, "
            "probabilities FROM images WHERE sample_id = ? AND current = 1 AND status = 'ok'",
            (sample_id,),
        )
    ]
    not_voting = int(conn.execute(
        "SELECT count(*) FROM images WHERE sample_id = ? AND current = 1 "
        "AND status NOT IN ('ok', 'pending')", (sample_id,)).fetchone()[0])
    v = sample_verdict(sample_id, images, expected, settings)
    v = dataclasses.replace(v, n_images=v.n_images + not_voting)
    n_counted = len(images)
    agg = aggregate(images)
    best = agg[0] if agg else None
    conn.execute(
        "INSERT INTO samples (sample_id, n_images, n_counted, composition, state, predicted_class, "
        "confidence, uniformity, expected, verdict, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (sample_id) DO UPDATE SET n_images = excluded.n_images, "
        "n_counted = excluded.n_counted, "
        "composition = excluded.composition, state = excluded.state, "
        "predicted_class = excluded.predicted_class, confidence = excluded.confidence, "
        "uniformity = excluded.uniformity, expected = excluded.expected, verdict = excluded.verdict, "
        "updated_at = excluded.updated_at",
        (sample_id, v.n_images, n_counted, v.composition, v.state, best, v.confidence, v.uniformity,
         v.expected, v.verdict, utc_now()),
    )


def _parts(name: str) -> tuple[str | None, str | None]:
    try:
        info = parse_class(name)
    except ValueError:  # a class of a model trained before the naming rule was enforced
        return None, None
    return info.composition, info.state
