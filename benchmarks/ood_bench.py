"""Out-of-distribution benchmark: does the classifier refuse what is not an NCM cathode at x500?

    nice -n 10 .venv/bin/python benchmarks/ood_bench.py [--model /tmp/bench/ncm] [--label before]

Not a test (about 3 min on 2 CPU cores). Every image is generated at the model's own scale, so
scale cannot refuse it: 1280 x 960 grey JPEGs whose bottom 65 rows are a real SNE data bar, with a
real SNE sidecar (x500) beside them. Families:

- synthetic: Gaussian noise at several blurs, Perlin-like (multi-octave value) noise, checkerboards,
  sine gratings, smooth gradients, salt and pepper, blocky JPEG noise, a featureless stub; and two
  look-alikes added after the detector was chosen (never tuned against): shaded spheres (a powder
  that is not NCM) and flat Voronoi flakes (a graphite-like electrode);
- damaged NCM, made from held-out images of the model's `test` split: charging (bright horizontal
  bands), drift (row shifts), heavy defocus, half the field saturated; added later, beam damage
  (dark scan windows) and half the field out of focus; and later still (they found the failures that
  the gate's noise and compression checks and `min_confidence` 0.9 answer) low dose, heavy JPEG,
  motion blur, vignetting, a black border, dust discs and low contrast;
- foreign specimens: the shared vendor TIFFs (lung cells, alloys), their specimen area resized to
  the SNE frame (`vendor_x500`, as if imaged at x500), and resampled to the model's physical pixel
  size (266 nm, from the 100 um scale bar of the SNE data bar) with no metadata (`vendor_physical`).

Reports per family the share refused (status unknown or rejected); for damaged NCM also how many are
refused or right and how many are confidently wrong (status ok, wrong class); for the held-out NCM
images the unknown/refused rate and image accuracy at the same threshold. Writes
benchmarks/results/<date>-ood-<label>.json and .md. Generated images live in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

import host  # benchmarks/host.py: the machine, for the results file

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SEMWATCH_DATA", ROOT.parent / "shared" / "data"))
WIDTH, HEIGHT, BAR = 1280, 960, 65
SPECIMEN = HEIGHT - BAR
# 100 um scale bar of the SNE x500 data bar: 376 px (measured on the shared images) -> 266 nm/px.
NCM_PIXEL_NM = 100_000 / 376
PER_FAMILY = 8

Maker = Callable[[np.random.Generator], np.ndarray]  # -> (SPECIMEN, WIDTH) float32 in [0, 1]


@dataclass(frozen=True)
class Item:
    path: Path
    family: str
    kind: str  # "synthetic", "damaged", "foreign", "ncm"
    truth: str | None = None  # the class of damaged and held-out NCM images


def _norm(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / max(hi - lo, 1e-6)


def _noise(sigma: float) -> Maker:
    def make(rng: np.random.Generator) -> np.ndarray:
        a = rng.normal(0.5, 0.2, (SPECIMEN, WIDTH)).astype(np.float32)
        if sigma > 0:
            a = cv2.GaussianBlur(a, (0, 0), sigma)
        return np.clip((a - a.mean()) / max(float(a.std()), 1e-6) * 0.18 + 0.5, 0, 1)

    return make


def _perlin(rng: np.random.Generator) -> np.ndarray:
    """Multi-octave value noise (smoothly interpolated random grids), the usual stand-in for Perlin."""
    out = np.zeros((SPECIMEN, WIDTH), np.float32)
    base = int(rng.integers(4, 12))
    for octave in range(5):
        cells = base * 2**octave
        grid = rng.random((cells + 1, cells * WIDTH // SPECIMEN + 1)).astype(np.float32)
        out += cv2.resize(grid, (WIDTH, SPECIMEN), interpolation=cv2.INTER_CUBIC) * 0.55**octave
    return _norm(out)


def _checker(rng: np.random.Generator) -> np.ndarray:
    period = int(rng.integers(16, 160))
    angle = float(rng.uniform(0, np.pi))
    y, x = np.mgrid[0:SPECIMEN, 0:WIDTH].astype(np.float32)
    u, v = x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)
    board = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    return np.clip(board * 0.6 + 0.2 + rng.normal(0, 0.02, board.shape).astype(np.float32), 0, 1)


def _grating(rng: np.random.Generator) -> np.ndarray:
    period = float(rng.uniform(8, 120))
    angle = float(rng.uniform(0, np.pi))
    y, x = np.mgrid[0:SPECIMEN, 0:WIDTH].astype(np.float32)
    wave = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
    return (0.5 + 0.3 * wave + rng.normal(0, 0.02, wave.shape)).clip(0, 1).astype(np.float32)


def _gradient(rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:SPECIMEN, 0:WIDTH].astype(np.float32)
    if rng.random() < 0.5:
        angle = float(rng.uniform(0, 2 * np.pi))
        ramp = x * np.cos(angle) + y * np.sin(angle)
    else:
        cy, cx = rng.uniform(0, SPECIMEN), rng.uniform(0, WIDTH)
        ramp = np.hypot(y - cy, x - cx)
    return (_norm(ramp) * 0.8 + 0.1 + rng.normal(0, 0.01, ramp.shape)).clip(0, 1).astype(np.float32)


def _salt_pepper(rng: np.random.Generator) -> np.ndarray:
    a = np.full((SPECIMEN, WIDTH), float(rng.uniform(0.3, 0.7)), np.float32)
    a += rng.normal(0, 0.03, a.shape).astype(np.float32)
    hit = rng.random(a.shape)
    share = float(rng.uniform(0.02, 0.2))
    a[hit < share / 2] = 0.0
    a[hit > 1 - share / 2] = 1.0
    return np.clip(a, 0, 1)


def _as_jpeg(a: np.ndarray, quality: int) -> np.ndarray:
    """`a` saved as a JPEG of this quality and read back."""
    ok, buf = cv2.imencode(".jpg", (a * 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255


def _jpeg_blocks(rng: np.random.Generator) -> np.ndarray:
    a = _noise(float(rng.uniform(0, 2)))(rng)
    return _as_jpeg(a, int(rng.integers(2, 8)))


def _stub(rng: np.random.Generator) -> np.ndarray:
    """An empty aluminium stub: one grey level, faint shading, detector noise."""
    y, x = np.mgrid[0:SPECIMEN, 0:WIDTH].astype(np.float32)
    shade = 0.05 * np.cos((x / WIDTH - 0.5) * 2) * np.cos((y / SPECIMEN - 0.5) * 2)
    a = float(rng.uniform(0.3, 0.6)) + shade + rng.normal(0, 0.03, shade.shape)
    return cv2.GaussianBlur(a.astype(np.float32), (0, 0), 0.7).clip(0, 1)


def _spheres(rng: np.random.Generator) -> np.ndarray:
    """A powder look-alike that is not NCM: smooth shaded balls (no primary-particle facets) of one
    size range on a dark background, as a spherical LCO or carbon-black agglomerate might look."""
    a = np.full((SPECIMEN, WIDTH), float(rng.uniform(0.05, 0.2)), np.float32)
    y, x = np.mgrid[0:SPECIMEN, 0:WIDTH].astype(np.float32)
    r_lo = float(rng.uniform(8, 30))
    for _ in range(int(rng.integers(150, 500))):
        cy, cx, r = rng.uniform(0, SPECIMEN), rng.uniform(0, WIDTH), rng.uniform(r_lo, r_lo * 2.5)
        y0, y1 = max(0, int(cy - r)), min(SPECIMEN, int(cy + r) + 1)
        x0, x1 = max(0, int(cx - r)), min(WIDTH, int(cx + r) + 1)
        d2 = ((y[y0:y1, x0:x1] - cy) ** 2 + (x[y0:y1, x0:x1] - cx) ** 2) / (r * r)
        ball = np.sqrt(np.clip(1 - d2, 0, 1)) * 0.6 + 0.25 + 0.15 * (x[y0:y1, x0:x1] - cx) / r
        a[y0:y1, x0:x1] = np.where(d2 < 1, ball, a[y0:y1, x0:x1])
    return np.clip(a + rng.normal(0, 0.02, a.shape).astype(np.float32), 0, 1)


def _flakes(rng: np.random.Generator) -> np.ndarray:
    """A graphite-electrode look-alike: flat facets (Voronoi cells, one grey level each) with bright
    edges, as large flakes lying flat look in secondary electrons."""
    n = int(rng.integers(40, 300))
    seeds = np.stack([rng.uniform(0, SPECIMEN, n), rng.uniform(0, WIDTH, n)], 1).astype(np.float32)
    small = 4  # Voronoi labels on a quarter-size grid, then upscaled (cheap and blocky enough)
    y, x = np.mgrid[0 : SPECIMEN // small, 0 : WIDTH // small].astype(np.float32) * small
    d = (y[..., None] - seeds[:, 0]) ** 2 + (x[..., None] - seeds[:, 1]) ** 2
    label = d.argmin(-1)
    shade = rng.uniform(0.2, 0.7, n).astype(np.float32)[label]
    a = cv2.resize(shade, (WIDTH, SPECIMEN), interpolation=cv2.INTER_NEAREST)
    edges = cv2.morphologyEx(a, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0.01
    a = np.where(edges, 0.9, a).astype(np.float32)
    return np.clip(cv2.GaussianBlur(a, (0, 0), 1.0) + rng.normal(0, 0.02, a.shape).astype(np.float32), 0, 1)


SYNTHETIC: dict[str, Maker] = {
    "noise_blur0": _noise(0),
    "noise_blur1": _noise(1),
    "noise_blur2": _noise(2),
    "noise_blur4": _noise(4),
    "noise_blur8": _noise(8),
    "perlin": _perlin,
    "checkerboard": _checker,
    "grating": _grating,
    "gradient": _gradient,
    "salt_pepper": _salt_pepper,
    "jpeg_blocks": _jpeg_blocks,
    "stub": _stub,
    "spheres": _spheres,
    "flakes": _flakes,
}


# --- damage done to real NCM images ----------------------------------------------------------------


def _charging(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = a.copy()
    for _ in range(int(rng.integers(3, 8))):
        y = int(rng.integers(0, SPECIMEN - 10))
        h = int(rng.integers(4, 40))
        out[y : y + h] = np.clip(out[y : y + h] * 0.4 + float(rng.uniform(0.6, 0.9)), 0, 1)
    # and a bright smear to the right of bright features (charge build-up along the scan)
    return cv2.blur(out, (int(rng.integers(9, 40)), 1))


def _drift(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = a.copy()
    shift = 0
    for y in range(0, SPECIMEN, int(rng.integers(8, 40))):
        shift += int(rng.integers(-25, 26))
        out[y:] = np.roll(a[y:], shift, axis=1)
    return out


def _defocus(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return cv2.GaussianBlur(a, (0, 0), float(rng.uniform(6, 12)))


def _half_saturated(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = a.copy()
    side = int(rng.integers(4))
    if side == 0:
        out[:, : WIDTH // 2] = 1.0
    elif side == 1:
        out[:, WIDTH // 2 :] = 1.0
    elif side == 2:
        out[: SPECIMEN // 2] = 1.0
    else:
        out[SPECIMEN // 2 :] = 1.0
    return out


def _beam_damage(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dark scan windows burnt in by earlier imaging at higher magnification (contamination)."""
    out = a.copy()
    for _ in range(int(rng.integers(1, 4))):
        h, w = int(rng.integers(120, 400)), int(rng.integers(160, 530))
        y, x = int(rng.integers(0, SPECIMEN - h)), int(rng.integers(0, WIDTH - w))
        out[y : y + h, x : x + w] *= float(rng.uniform(0.35, 0.7))
    return out


def _half_focus(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Half the field out of focus (a tilted or uneven specimen): one half heavily blurred."""
    out = a.copy()
    blurred = cv2.GaussianBlur(a, (0, 0), float(rng.uniform(5, 10)))
    if rng.random() < 0.5:
        out[:, WIDTH // 2 :] = blurred[:, WIDTH // 2 :]
    else:
        out[SPECIMEN // 2 :] = blurred[SPECIMEN // 2 :]
    return out


def _low_dose(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A low-dose or fast scan: strong pixel noise."""
    return np.clip(a + rng.normal(0, float(rng.uniform(0.08, 0.2)), a.shape).astype(np.float32), 0, 1)


def _jpeg_heavy(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Saved again at a JPEG quality of 3-10 (a thumbnail mailed round, a careless export)."""
    return _as_jpeg(a, int(rng.integers(3, 10)))


def _motion(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Vibration during the scan: a 9-25 px line blur, horizontal or vertical."""
    k = int(rng.integers(9, 25))
    kernel = np.zeros((k, k), np.float32)
    if rng.random() < 0.5:
        kernel[k // 2] = 1 / k
    else:
        kernel[:, k // 2] = 1 / k
    return cv2.filter2D(a, -1, kernel)


def _vignette(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uneven illumination: the corners darker than the centre."""
    y, x = np.mgrid[0 : a.shape[0], 0 : a.shape[1]].astype(np.float32)
    r = np.hypot((y - a.shape[0] / 2) / a.shape[0], (x - a.shape[1] / 2) / a.shape[1])
    return np.clip(a * (1 - float(rng.uniform(0.8, 1.5)) * r**2), 0, 1)


def _border(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A quarter to nearly half of the field black (the stub's edge, a shadowed region)."""
    out = a.copy()
    out[:, : int(a.shape[1] * rng.uniform(0.25, 0.45))] = 0
    return out


def _dust(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Large bright discs over the specimen (dust, a charging particle out of focus)."""
    out = a.copy()
    for _ in range(int(rng.integers(1, 4))):
        centre = (int(rng.integers(0, a.shape[1])), int(rng.integers(0, a.shape[0])))
        cv2.circle(out, centre, int(rng.integers(60, 200)), float(rng.uniform(0.7, 1.0)), -1)
    return out


def _low_contrast(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Contrast turned down to 15-30 %."""
    return np.clip(0.5 + (a - 0.5) * float(rng.uniform(0.15, 0.3)), 0, 1)


DAMAGE: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "charging": _charging,
    "drift": _drift,
    "defocus": _defocus,
    "half_saturated": _half_saturated,
    "beam_damage": _beam_damage,
    "half_focus": _half_focus,
    "low_dose": _low_dose,
    "jpeg_heavy": _jpeg_heavy,
    "motion": _motion,
    "vignette": _vignette,
    "border": _border,
    "dust": _dust,
    "low_contrast": _low_contrast,
}


# --- writing ----------------------------------------------------------------------------------------


def _write(path: Path, specimen: np.ndarray, bar: np.ndarray, sidecar: str | None) -> Path:
    img = np.vstack([(np.clip(specimen, 0, 1) * 255 + 0.5).astype(np.uint8), bar])
    if not cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 92]):
        raise OSError(f"cannot write {path}")
    if sidecar is not None:
        path.with_name(path.name + ".txt").write_text(sidecar, encoding="utf-8", newline="")
    return path


def _grey(path: Path) -> np.ndarray:
    from semwatch.config import load_settings
    from semwatch.reading.micrograph import read_micrograph

    return read_micrograph(path, load_settings(None, environ={})).pixels


def generate(out: Path, test_images: list[Path], seed: int = 0, per_family: int = PER_FAMILY) -> list[Item]:
    """Write every family's images under `out`; the held-out NCM images are used where they are."""
    rng = np.random.default_rng(seed)
    ref = test_images[0]
    bar = cv2.imread(str(ref), cv2.IMREAD_GRAYSCALE)[-BAR:]
    sidecar = ref.with_name(ref.name + ".txt").read_bytes().decode("utf-8-sig")
    items: list[Item] = []
    for family, make in SYNTHETIC.items():
        for i in range(per_family):
            path = _write(out / f"{family}_{i:02d}.jpg", make(rng), bar, sidecar)
            items.append(Item(path, family, "synthetic"))
    # damaged: the same spread of held-out images (every class in turn) for each damage
    step = max(1, len(test_images) // per_family)
    chosen = test_images[::step][:per_family]
    for family, damage in DAMAGE.items():
        for i, src in enumerate(chosen):
            pixels = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
            side = src.with_name(src.name + ".txt")
            text = side.read_bytes().decode("utf-8-sig") if side.exists() else sidecar
            damaged = damage(pixels[:SPECIMEN], rng)
            path = _write(out / f"{family}_{i:02d}.jpg", damaged, pixels_bar(pixels), text)
            items.append(Item(path, family, "damaged", src.parent.name))
    items += _vendor(out, bar, sidecar)
    items += [Item(p, "ncm_heldout", "ncm", p.parent.name) for p in test_images]
    return items


def pixels_bar(pixels: np.ndarray) -> np.ndarray:
    return (pixels[SPECIMEN:] * 255 + 0.5).astype(np.uint8)


def _vendor(out: Path, bar: np.ndarray, sidecar: str) -> list[Item]:
    from semwatch.config import load_settings
    from semwatch.reading.micrograph import read_micrograph

    settings = load_settings(None, environ={})
    items: list[Item] = []
    for i, tif in enumerate(sorted((DATA / "vendor-tiff").rglob("*.tif"))):
        m = read_micrograph(tif, settings)
        a = m.pixels
        # as if imaged at x500 by the SNE: the specimen area fills the frame
        shrink = a.shape[1] > WIDTH
        framed = cv2.resize(a, (WIDTH, SPECIMEN), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
        path = _write(out / f"vendor_x500_{i:02d}.jpg", framed, bar, sidecar)
        items.append(Item(path, "vendor_x500", "foreign"))
        # at the model's true pixel size, no metadata (a bare PNG): the reader cannot scale it
        nm = m.metadata.pixel_size_nm or NCM_PIXEL_NM
        f = nm / NCM_PIXEL_NM
        size = (max(1, round(a.shape[1] * f)), max(1, round(a.shape[0] * f)))
        physical = cv2.resize(a, size, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC)
        path = out / f"vendor_physical_{i:02d}.png"
        cv2.imwrite(str(path), (np.clip(physical, 0, 1) * 255 + 0.5).astype(np.uint8))
        items.append(Item(path, "vendor_physical", "foreign"))
    return items


def held_out(model_dir: Path, split: str = "test") -> list[Path]:
    from semwatch.model.artifact import read_manifest

    manifest = read_manifest(model_dir)
    return [DATA / "ncm-sem" / rel for rel in manifest.split.get(split, ())]


# --- scoring ----------------------------------------------------------------------------------------


def score(
    items: list[Item], verdicts: dict[Path, object], confident: float = 0.5
) -> dict[str, dict[str, object]]:
    """Per family: images, share refused; damaged/ncm: right, refused-or-right, confidently wrong."""
    from semwatch.values import ImageVerdict

    table: dict[str, dict[str, object]] = {}
    for family in dict.fromkeys(i.family for i in items):
        mine = [i for i in items if i.family == family]
        refused = right = wrong = 0
        reasons: dict[str, int] = {}
        for it in mine:
            v = verdicts[it.path]
            if not isinstance(v, ImageVerdict):  # unreadable counts as refused
                refused += 1
                reasons["error"] = reasons.get("error", 0) + 1
                continue
            if v.status != "ok":
                refused += 1
                for r in v.reasons:
                    key = re.split(r"[(:\d]", r, maxsplit=1)[0].strip()
                    reasons[key] = reasons.get(key, 0) + 1
            elif it.truth is not None and v.predicted_class == it.truth:
                right += 1
            elif v.confidence >= confident:
                wrong += 1
        row: dict[str, object] = {"kind": mine[0].kind, "n": len(mine),
                                  "refused": round(refused / len(mine), 4)}
        if mine[0].truth is not None:
            correct = sum(
                1 for it in mine
                if isinstance(verdicts[it.path], ImageVerdict)
                and max(verdicts[it.path].probabilities, key=verdicts[it.path].probabilities.get)  # type: ignore[union-attr]
                == it.truth
            )
            row.update(ok_right=right, refused_or_right=round((refused + right) / len(mine), 4),
                       confidently_wrong=wrong, image_accuracy=round(correct / len(mine), 4))
        row["reasons"] = reasons
        table[family] = row
    return table


def run(model_dir: Path, items: list[Item], settings_overrides: dict[str, dict[str, object]] | None = None,
        device: str = "auto") -> tuple[dict[str, dict[str, object]], str, float]:
    from semwatch.config import load_settings
    from semwatch.model.classify import Classifier, outcomes

    overrides = {"model": {"device": device}, **(settings_overrides or {})}
    settings = load_settings(None, environ={}, overrides=overrides)
    classifier = Classifier.load(model_dir, settings)
    started = time.monotonic()
    verdicts = {o.path: o.result for o in outcomes(classifier, [i.path for i in items])}
    return score(items, verdicts), classifier.model_id, time.monotonic() - started


def markdown(label: str, model_id: str, table: dict[str, dict[str, object]]) -> str:
    lines = [f"# OOD benchmark ({label}), model {model_id}", "",
             "| family | kind | n | refused | refused or right | confidently wrong | image acc. |",
             "|---|---|---|---|---|---|---|"]
    for family, r in table.items():
        lines.append(
            f"| {family} | {r['kind']} | {r['n']} | {float(r['refused']):.0%} | "  # type: ignore[arg-type]
            f"{_pct(r.get('refused_or_right'))} | {r.get('confidently_wrong', '')} | "
            f"{_pct(r.get('image_accuracy'))} |"
        )
    return "\n".join(lines) + "\n"


def _pct(v: object) -> str:
    return f"{float(v):.0%}" if isinstance(v, int | float) else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/bench/ncm"))
    parser.add_argument("--label", default="run")
    parser.add_argument("--per-family", type=int, default=PER_FAMILY)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--seed", type=int, default=0,
                        help="another seed draws other images of every family (a check on tuning to a draw)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--unknown-threshold", type=float, default=None,
                        help="[model] unknown_threshold (default: the model's own, from its manifest)")
    args = parser.parse_args(argv)
    overrides: dict[str, dict[str, object]] = {}
    if args.unknown_threshold is not None:
        overrides["model"] = {"unknown_threshold": args.unknown_threshold}
    with tempfile.TemporaryDirectory(prefix="semwatch-ood-") as tmp:
        items = generate(Path(tmp), held_out(args.model), seed=args.seed, per_family=args.per_family)
        table, model_id, wall = run(args.model, items, overrides, device=args.device)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    record = {"label": args.label, "model_id": model_id, "seed": args.seed,
              "unknown_threshold": args.unknown_threshold,
              "commit": host.commit(),
              "machine": host.summary(), "machine_detail": host.describe(),
              "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
              "classify_wall_s": round(wall, 1), "families": table}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stamp}-ood-{args.label}.json").write_text(json.dumps(record, indent=2) + "\n")
    md = markdown(args.label, model_id, table)
    (args.results / f"{stamp}-ood-{args.label}.md").write_text(md)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
