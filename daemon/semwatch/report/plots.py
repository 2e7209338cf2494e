"""The report's three plots, as base64 PNG for embedding in the page.

matplotlib is imported here only (the report imports this module when it writes, so `semwatch
--help` never loads it), and figures are made without pyplot: no global state, the Agg canvas,
safe in the daemon's scheduler thread.
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

STATUS_COLOURS = {"ok": "#2e7d32", "unknown": "#f9a825", "rejected": "#8e24aa", "failed": "#c62828"}


class Plotted(Protocol):
    """What the plots need of an image of the day."""

    @property
    def status(self) -> str: ...

    @property
    def predicted_class(self) -> str | None: ...

    @property
    def confidence(self) -> float | None: ...

    @property
    def processed_local(self) -> str: ...


class TrendPoint(Protocol):
    """One day of the trend (`report.daily.TrendDay`)."""

    @property
    def day(self) -> str: ...

    @property
    def images(self) -> int: ...

    @property
    def failed(self) -> int: ...

    @property
    def unknown(self) -> int: ...


@dataclass(frozen=True)
class Plots:
    timeline: str
    classes: str
    confidence: str


def plot_day(images: Sequence[Plotted]) -> Plots:
    return Plots(plot_timeline(images), plot_classes(images), plot_confidence(images))


def plot_timeline(images: Sequence[Plotted]) -> str:
    """Verdicts per hour of the (local) day, stacked by status."""
    fig = Figure(figsize=(7.0, 3.2))
    ax = fig.add_subplot()
    hours = np.arange(24)
    bottom = np.zeros(24)
    for status, colour in STATUS_COLOURS.items():
        counts = np.zeros(24)
        for img in images:
            if img.status == status:
                counts[int(img.processed_local[11:13])] += 1
        if counts.any():
            ax.bar(hours, counts, bottom=bottom, color=colour, label=status, width=0.85)
            bottom += counts
    ax.set_xlabel("hour of day (report time zone)")
    ax.set_ylabel("images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xticks(range(0, 24, 2))
    ax.set_xlim(-0.6, 23.6)
    if bottom.any():
        ax.legend(loc="upper left", fontsize="small")
    ax.set_title("verdicts over the day")
    return _png(fig)


def plot_classes(images: Sequence[Plotted]) -> str:
    """Predicted classes of images with a verdict (`ok`), plus counts of the other statuses."""
    counts = Counter(str(img.predicted_class) for img in images if img.status == "ok")
    others = Counter(img.status for img in images if img.status != "ok")
    shown = [s for s in STATUS_COLOURS if others[s]]
    labels = sorted(counts) + [f"({s})" for s in shown]
    values = [counts[c] for c in sorted(counts)] + [others[s] for s in shown]
    colours = ["#1565c0"] * len(counts) + [STATUS_COLOURS[s] for s in shown]
    fig = Figure(figsize=(7.0, max(2.0, 0.35 * len(labels) + 1.0)))
    ax = fig.add_subplot()
    ax.barh(range(len(labels)), values, color=colours)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("images")
    ax.set_title("class distribution")
    return _png(fig)


def plot_confidence(images: Sequence[Plotted]) -> str:
    """Image confidence by status (images that have one)."""
    fig = Figure(figsize=(7.0, 3.2))
    ax = fig.add_subplot()
    bins = [i / 20 for i in range(21)]  # 0.05 wide
    by_status = {s: [img.confidence for img in images if img.status == s and img.confidence is not None]
                 for s in ("ok", "unknown", "rejected")}
    labels = [s for s, values in by_status.items() if values]
    if labels:
        ax.hist([by_status[s] for s in labels], bins=bins, stacked=True, label=labels,
                color=[STATUS_COLOURS[s] for s in labels])
        ax.legend(fontsize="small")
    ax.set_xlabel("image confidence")
    ax.set_ylabel("images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("confidence histogram")
    return _png(fig)


def plot_trend(days: Sequence[TrendPoint], title: str = "the last 30 days") -> str:
    """Images per day (bars: failed in red, the rest grey) and the unknown share (line, right axis):
    a drift (more unknowns, a failing reader) shows over days, not within one."""
    fig = Figure(figsize=(7.0, 3.0))
    ax = fig.add_subplot()
    x = np.arange(len(days))
    images = np.array([d.images for d in days], dtype=float)
    failed = np.array([d.failed for d in days], dtype=float)
    ax.bar(x, images - failed, color="#90a4ae", label="images", width=0.8)
    ax.bar(x, failed, bottom=images - failed, color=STATUS_COLOURS["failed"], label="failed", width=0.8)
    ax.set_ylabel("images")
    ax.set_ylim(0, max(1.0, float(images.max(initial=0))) * 1.3)  # room for the legend above the bars
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    step = max(1, len(days) // 8)
    ax.set_xticks(x[::step], [d.day[5:] for d in days][::step])
    share = ax.twinx()
    unknown = [d.unknown / d.images if d.images else np.nan for d in days]
    share.plot(x, unknown, color=STATUS_COLOURS["unknown"], marker=".", label="unknown share")
    share.set_ylim(0, 1)
    share.set_ylabel("unknown share")
    handles = ax.get_legend_handles_labels()[0] + share.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", fontsize="small")
    ax.set_title(title)
    return _png(fig)


def _png(fig: Figure) -> str:
    fig.set_layout_engine("constrained")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")
