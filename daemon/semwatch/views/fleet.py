"""The fleet table: one row per instrument, read from their snapshots (`store.fleet`), as rich
cells for both `semwatch fleet top --once` and the interactive console (`fleet_console`). Stale
instruments (no heartbeat, an old snapshot, a stopped daemon) and broken snapshots are shown as
such, in words and colour, never as a crash.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from rich.table import Table
from rich.text import Text

from semwatch.config import Settings
from semwatch.store.browse import day_bounds
from semwatch.store.fleet import Card, read_cards
from semwatch.views.live import age_text, shown

COLUMNS = ("instrument", "state", "snapshot", "heartbeat", "images", "failed", "unknown",
           "fails", "model", "outdated")  # today's images, failed images, unknown share, fail samples


def load_cards(settings: Settings, sources: Sequence[Path], now: datetime | None = None) -> list[Card]:
    now = now or datetime.now(UTC)
    zone = ZoneInfo(settings.report.timezone)
    today = day_bounds(now.astimezone(zone).date(), zone)
    return read_cards(sources, today=today, stale_seconds=settings.fleet.stale_seconds, now=now)


def state_cell(card: Card) -> Text:
    """What a reader must see first: broken, stale, or running."""
    if card.problem is not None:
        return shown(card.problem.upper() if card.problem == "missing" else card.problem, "bold red")
    if card.stale:
        d = card.daemon
        why = "stopped" if d is not None and d.state == "stopped" else "no heartbeat"
        return shown(f"STALE ({why})", "bold red")
    return shown(card.daemon.state if card.daemon else "–", "bold green")


def cells(card: Card) -> list[Text]:
    share = card.unknown_share
    outdated = card.outdated.total if card.outdated is not None else None
    return [
        shown(card.label, "bold"), state_cell(card),
        shown("–" if card.snapshot_age_s is None else age_text(card.snapshot_age_s)),
        shown(age_text(card.heartbeat_age_s) if card.problem is None else "–"),
        shown(card.images_today), shown(card.failed_today, "red" if card.failed_today else ""),
        shown("–" if share is None else f"{share:.0%}"),
        shown(card.fail_samples_today, "red" if card.fail_samples_today else ""),
        shown((card.model_id or "–")[:12]), shown("–" if outdated is None else outdated),
    ]


def table(cards: Sequence[Card]) -> Table:
    out = Table(title=f"semwatch fleet — {len(cards)} instrument(s); images, failed, unknown, fails "
                      "(samples): today", title_justify="left")
    for name in COLUMNS:  # the state may wrap (a broken snapshot's reason), never shrink to "…"
        out.add_column(name, no_wrap=name != "state", min_width=22 if name == "state" else None,
                       overflow="fold", justify="right" if name in (
                           "images", "failed", "unknown", "fails", "outdated") else "left")
    for card in cards:
        out.add_row(*cells(card))
    return out
