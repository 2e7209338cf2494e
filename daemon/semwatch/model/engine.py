"""The batching engine: the tiles of several images → the network in batches → each image's outputs.

`predict_images` is the one path from prepared images to tile outputs; `semwatch classify`,
`evaluate`, `bench` and the daemon's inference thread all call it, so a benchmark measures what the
daemon runs. The tiles of all images are concatenated and cut into batches of `[model] batch_size`
(the last one smaller), then the outputs are split back per image. Fixed batches, not balanced ones:
on the CPU the cost per tile grows with the batch, so 32 + 4 tiles run faster than 36 at once, and
cutting a group into balanced chunks (36, or 33 + 33 + 30) made the daemon slower (measured in
benchmarks/results/HISTORY.md).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from semwatch.reading.tiles import Scale
from semwatch.values import Quality


@dataclass(frozen=True)
class PreparedImage:
    """One micrograph cut into network-ready tiles at the model's scale (`Classifier.prepare`)."""

    path: Path
    tiles: np.ndarray  # (N, 3, tile_px, tile_px) float32
    positions: list[tuple[int, int]]
    n_candidates: int
    scale: Scale
    scale_ok: bool
    resampled_shape: tuple[int, int]
    quality: Quality | None = None


@dataclass(frozen=True)
class TileOutput:
    """What the network says about N tiles; concatenates and slices like the tiles themselves."""

    probabilities: np.ndarray  # (N, C) calibrated per-tile class probabilities
    novelty: np.ndarray  # (N,) distance to the training features (higher = more foreign)

    @classmethod
    def empty(cls, n_classes: int) -> TileOutput:
        return cls(np.zeros((0, n_classes), np.float32), np.zeros((0,), np.float32))

    @classmethod
    def concat(cls, outputs: Sequence[TileOutput]) -> TileOutput:
        """The outputs one after the other (at least one: an empty list has no class count)."""
        if len(outputs) == 1:
            return outputs[0]
        return cls(
            np.concatenate([o.probabilities for o in outputs]), np.concatenate([o.novelty for o in outputs])
        )

    def __len__(self) -> int:
        return len(self.probabilities)

    def __getitem__(self, rows: slice) -> TileOutput:
        return TileOutput(self.probabilities[rows], self.novelty[rows])


class Predictor(Protocol):
    """What the engine needs of a classifier: its batch size, its classes and the network."""

    @property
    def batch_size(self) -> int: ...

    @property
    def classes(self) -> list[str]: ...

    def predict(self, tiles: np.ndarray) -> TileOutput: ...


def chunks(n_tiles: int, batch_size: int) -> list[slice]:
    """Slices of `n_tiles` rows, `batch_size` each, the last one the rest (none for no rows)."""
    return [slice(i, min(i + batch_size, n_tiles)) for i in range(0, n_tiles, batch_size)]


def predict_images(predictor: Predictor, images: Sequence[PreparedImage]) -> list[TileOutput]:
    """One `TileOutput` per image, in order (an empty one for an image without usable tiles)."""
    parts = [im.tiles for im in images if len(im.tiles)]
    if not parts:
        return [TileOutput.empty(len(predictor.classes)) for _ in images]
    tiles = np.concatenate(parts) if len(parts) > 1 else parts[0]
    whole = TileOutput.concat(
        [predictor.predict(tiles[rows]) for rows in chunks(len(tiles), predictor.batch_size)]
    )
    outputs: list[TileOutput] = []
    start = 0
    for im in images:
        outputs.append(whole[start : start + len(im.tiles)])
        start += len(im.tiles)
    return outputs


T = TypeVar("T")


def batch_groups(items: Iterable[T], tiles_of: Callable[[T], int], batch_size: int) -> Iterator[list[T]]:
    """`items` in order, grouped until their tiles fill a batch (at least one item per group), each
    group yielded as soon as it is full: how `classify.outcomes` and `bench` cut a stream of images
    into `predict_images` calls (the daemon's inference thread groups the same way, with a latency
    cap)."""
    group: list[T] = []
    tiles = 0
    for item in items:
        group.append(item)
        tiles += tiles_of(item)
        if tiles >= batch_size:
            yield group
            group, tiles = [], 0
    if group:
        yield group



R = TypeVar("R")


def prefetched(fn: Callable[[T], R], items: Iterable[T], *, workers: int, prefetch: int,
               timeout: float | None = None, on_timeout: Callable[[T], R] | None = None,
               name: str = "semwatch-prepare") -> Iterator[tuple[T, R]]:
    """`(item, fn(item))` in input order, `fn` running on `workers` threads at most `prefetch` items
    ahead of the consumer: images are read and tiled while the network runs on the ones before.

    With `timeout`, an item whose `fn` has not returned that many seconds after the consumer began
    to wait for it yields `on_timeout(item)` instead; its thread cannot be killed (Python cannot
    interrupt a read blocked in the kernel) and is left behind, which is why the pool is not
    joined on exit then. The items not yet started move to a fresh pool, so they do not wait
    behind the stuck thread (with one worker, every later item would time out too)."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    pending: deque[tuple[T, Future[R]]] = deque()
    it = iter(items)
    abandoned = False
    try:
        while True:
            while len(pending) < prefetch:
                try:
                    item = next(it)
                except StopIteration:
                    break
                pending.append((item, pool.submit(fn, item)))
            if not pending:
                return
            item, fut = pending.popleft()
            try:
                result = fut.result(timeout=timeout)
            except FutureTimeout:
                if on_timeout is None:
                    raise
                abandoned = True
                result = on_timeout(item)
                stuck, pool = pool, ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
                pending = deque((i, pool.submit(fn, i) if f.cancel() else f) for i, f in pending)
                stuck.shutdown(wait=False)
            yield item, result
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=not abandoned, cancel_futures=True)
