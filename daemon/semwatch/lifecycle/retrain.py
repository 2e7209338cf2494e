"""`semwatch models retrain`: the loop's automatic step (`[lifecycle] retrain_after_labels`,
`auto_promote`; docs/LIFECYCLE.md), also an operator's one command for train → gate → register.

When at least N label rows were written since the last retraining (its watermark, the newest label
id it saw, is kept in the evidence of its `model_events` row), a challenger is trained from the
labels beside the class folders (`[lifecycle] train_folder`, else the folder the champion was
trained on), scored against the champion by the gate on the same images (`lifecycle.gate`), added
to the registry and made the challenger, with the gate's result and the label counts as the move's
evidence. With `--promote-if-better` (or `auto_promote`) it then becomes the champion, only when the
gate's decision is "better": "not significantly worse" is enough for an operator's promotion, not
for one nobody watched. A challenger the gate finds worse stays a challenger (the evidence says
why) and the next retraining waits for N more labels. Nothing is written while the model trains
(the database's write lock is held only for the moves), so the daemon keeps classifying meanwhile.

The daemon runs this command in a low-priority subprocess after the nightly report
(`service.retrainjob`): its memory, its threads and a hang stay out of the daemon's process.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

from semwatch.config import Settings
from semwatch.errors import ExitStatus, UserError
from semwatch.lifecycle.gate import Comparison, compare_models
from semwatch.lifecycle.models import default_user, ensure_champion, gate_images, move_alias, require_registry
from semwatch.model.registry import Registry
from semwatch.output import Output
from semwatch.safefs import path_text
from semwatch.store.access import open_readonly, open_writer

RETRAIN = "retrain"  # the `model_events.action` of a challenger made by this command
AUTO_PROMOTE = "auto-promote"  # ... and of its promotion when the gate found it better


@dataclass(frozen=True)
class LabelCount:
    newest: int  # the newest label row's id: the watermark this retraining records
    since: int  # the last retraining's watermark (0: none yet)
    new: int  # label rows written after it (undos not counted)


def count_new_labels(conn: sqlite3.Connection) -> LabelCount:
    """Label rows since the last retraining (see the module docstring)."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "labels" not in tables:
        return LabelCount(0, 0, 0)
    newest = int(conn.execute("SELECT coalesce(max(id), 0) FROM labels").fetchone()[0])
    since = 0
    if "model_events" in tables:
        row = conn.execute("SELECT evidence FROM model_events WHERE action = ? AND evidence IS NOT NULL "
                           "ORDER BY id DESC LIMIT 1", (RETRAIN,)).fetchone()
        try:
            since = int(json.loads(row[0]).get("labels_through", 0)) if row else 0
        except (ValueError, TypeError, AttributeError):  # evidence we did not write: start over
            since = 0
    new = int(conn.execute("SELECT count(*) FROM labels WHERE id > ? AND status != 'cleared'",
                           (since,)).fetchone()[0])
    return LabelCount(newest, since, new)


def training_folder(settings: Settings, registry: Registry, champion: str) -> Path | None:
    """The class folders trained beside the labels: `[lifecycle] train_folder`, else the folder the
    champion's manifest names (when it is still a folder), else none (the labels alone)."""
    configured = settings.lifecycle.train_folder
    if configured is not None:
        if not configured.is_dir():
            raise UserError(f"[lifecycle] train_folder is not a folder: {path_text(configured)}",
                            ExitStatus.CONFIG)
        return configured
    recorded = registry.manifest(champion).training.get("data_dir")
    if isinstance(recorded, str) and Path(recorded).is_dir():
        return Path(recorded)
    return None


def retrain(settings: Settings, *, min_labels: int | None, promote: bool | None, by: str | None,
            epochs: int | None = None, max_images_per_class: int | None = None, out: Output) -> int:
    """Train, gate and register a challenger when enough labels are new; promote it when asked and
    the gate says better. `min_labels` / `promote` None: `[lifecycle]`'s (at least one label)."""
    from semwatch.lifecycle.training import train_from_labels

    lc = settings.lifecycle
    need = max(1, lc.retrain_after_labels if min_labels is None else min_labels)
    promote = lc.auto_promote if promote is None else promote
    registry = require_registry(settings)
    who = by or default_user()
    database = settings.store.database
    if not database.is_file():
        raise UserError(f"no database at {path_text(database)}: there are no labels to train on",
                        ExitStatus.INPUT_FAILED)
    conn = open_readonly(database, busy_timeout_ms=settings.store.busy_timeout_ms)
    try:
        count = count_new_labels(conn)
    finally:
        conn.close()
    if count.new < need:
        _report(out, {"trained": False, "new_labels": count.new, "needed": need},
                f"{count.new} new label(s) since the last retraining, {need} needed: nothing trained")
        return ExitStatus.OK
    store = open_writer(settings)
    try:
        champion = ensure_champion(store, registry, settings, who)
    finally:
        store.close()  # not held while training: the daemon writes meanwhile
    folder = training_folder(settings, registry, champion)
    registry.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".retrain-", dir=registry.root) as tmp:
        model_dir = Path(tmp) / "model"
        trained = train_from_labels(settings, data_dir=folder, out_dir=model_dir, epochs=epochs,
                                    max_images_per_class=max_images_per_class, out=out)
        comparison: Comparison | None = None
        gate_error: str | None = None
        try:
            images, skipped = gate_images(settings, None)
            comparison = compare_models(settings, registry.model_dir(champion), model_dir, images,
                                        skipped=skipped)
        except UserError as exc:  # no evaluation images: registered, never promoted by itself
            gate_error = str(exc)
        model_id = registry.add(model_dir)
    gate: dict[str, object] = comparison.to_json() if comparison else {"decision": None, "error": gate_error}
    evidence: dict[str, object] = {
        "labels_through": count.newest, "new_labels": count.new, "labels": trained.found.counts(),
        "images_per_class": dict(trained.per_class), "train_folder": path_text(folder) if folder else None,
        "validation": dict(trained.result.validation), "gate": gate}
    decision = comparison.decision if comparison else None
    promoted = False
    why_not: str | None = None
    store = open_writer(settings)
    try:
        move_alias(store, registry, "challenger", model_id, action=RETRAIN, by=who,
                   reason=f"{count.new} new label(s) since the last retraining", evidence=evidence)
        if promote and decision == "better":
            if registry.read_aliases().champion != champion:
                why_not = "the champion changed while the challenger trained: promote it by hand"
            else:
                move_alias(store, registry, "champion", model_id, action=AUTO_PROMOTE, by=who,
                           reason="the gate found it better", evidence=gate)
                move_alias(store, registry, "challenger", None, action="promoted", by=who)
                promoted = True
        elif promote:
            why_not = f"the gate's decision is {decision or 'missing'} ({gate_error or 'not better'})"
    finally:
        store.close()
    record = {"trained": True, "model_id": model_id, "champion": champion, "new_labels": count.new,
              "decision": decision, "promoted": promoted, "not_promoted": why_not,
              "labels": trained.found.counts(), "wall_s": round(trained.result.wall_s, 1)}
    _report(out, record, f"challenger {model_id} trained from {count.new} new label(s) in "
            f"{trained.result.wall_s:.0f} s; gate: {decision or gate_error}; "
            + ("promoted to champion" if promoted else f"champion stays {champion}")
            + (f" ({why_not})" if why_not else ""))
    return ExitStatus.OK


def _report(out: Output, record: dict[str, object], line: str) -> None:
    if out.json:
        out.emit(record)
    else:
        out.line(line)
