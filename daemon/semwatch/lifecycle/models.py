"""`semwatch models list | show | register | compare | promote | rollback`: the registry's aliases
and their history.

Every alias move goes through `move_alias`: under the database's write lock and in one
transaction (`store.labels.writing`), the move is inserted into `model_events`, then the aliases
file is replaced atomically, then the transaction commits. A kill before the rename leaves the old
aliases and no record (the transaction rolls back); a kill between the rename and the commit leaves
the new aliases whose record is missing: the file carries the move (with its token), and the next
move records it first (`action` `recovered`). The daemon serves whatever the file says.

`promote` runs the gate (`lifecycle.gate`) and refuses a challenger it finds worse, or cannot judge
(no evaluation images), unless `--force` with a `--reason`, both recorded with the evidence.
`rollback` makes the champion that the current one replaced champion again (from `model_events`).
"""

from __future__ import annotations

import getpass
import logging
import os
import time
import uuid
from pathlib import Path

from semwatch.config import Settings
from semwatch.errors import ExitStatus, UserError
from semwatch.lifecycle.gate import Comparison, GateImage, compare_models, folder_images
from semwatch.model.registry import Aliases, Move, Registry, registry_of
from semwatch.output import Output
from semwatch.safefs import path_text
from semwatch.store import db
from semwatch.store import model_events as ev
from semwatch.store.access import open_readonly, open_writer
from semwatch.store.labels import writing
from semwatch.store.ledger import Store
from semwatch.values import utc_now

log = logging.getLogger("semwatch.lifecycle")

PAUSE_ENV = "SEMWATCH_TEST_PAUSE_MOVE"  # tests: "before" / "after" the aliases file, a kill -9 there


def require_registry(settings: Settings) -> Registry:
    registry = registry_of(settings.model)
    if registry is None:
        raise UserError("no model registry: set [model] registry in config.toml", ExitStatus.CONFIG)
    return registry


def default_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


# --- the one way an alias moves ------------------------------------------------------------------


def move_alias(store: Store, registry: Registry, alias: str, model_id: str | None, *, action: str, by: str,
               reason: str | None = None, evidence: dict[str, object] | None = None) -> ev.ModelEvent:
    """Move `alias` to `model_id`, recorded (see the module docstring)."""
    with writing(store) as conn:
        aliases = registry.read_aliases()
        _record_lost_move(conn, aliases)
        previous = aliases.get(alias)
        token = uuid.uuid4().hex
        at = utc_now()
        row_id = ev.insert_event(conn, alias=alias, model_id=model_id, previous_model_id=previous,
                                 action=action, by=by, reason=reason, evidence=evidence, token=token, at=at)
        pause = os.environ.get(PAUSE_ENV)
        if pause == "before":  # fault injection: a kill -9 here leaves the old aliases, no record
            _test_pause()
        registry.write_aliases(aliases.moved(Move(token, alias, model_id, previous, action, by, at, reason)))
        if pause == "after":  # a kill -9 here leaves the new aliases, recorded by the next move
            _test_pause()
    log.info("%s: %s -> %s (%s by %s)", alias, previous, model_id, action, by)
    return ev.ModelEvent(row_id, at, alias, model_id, previous, action, by, reason, evidence, token)


def _test_pause() -> None:
    os.write(2, b"semwatch: test pause\n")
    time.sleep(60)


def _record_lost_move(conn: db.sqlite3.Connection, aliases: Aliases) -> None:
    """The aliases file names a move the database never recorded (killed before the commit)."""
    m = aliases.last_move
    if m is None or ev.has_token(conn, m.token):
        return
    ev.insert_event(conn, alias=m.alias, model_id=m.model_id, previous_model_id=m.previous_model_id,
                    action="recovered", by=m.by, at=m.at, evidence=None, token=m.token,
                    reason=f"{m.action} recorded after an interrupted move"
                    + (f": {m.reason}" if m.reason else ""))


def ensure_champion(store: Store, registry: Registry, settings: Settings, by: str) -> str:
    """The champion's id; with none yet, `[model] path` is added and becomes the first champion."""
    champion = registry.read_aliases().champion
    if champion is not None:
        return champion
    path = settings.model.path
    try:
        model_id = registry.add(path)
    except UserError as exc:
        raise UserError(f"the registry has no champion and [model] path has no model: {exc}") from None
    move_alias(store, registry, "champion", model_id, action="initial", by=by,
               reason=f"[model] path {path_text(path)}")
    return model_id


# --- commands ---------------------------------------------------------------------------------


def models_list(settings: Settings, *, out: Output) -> int:
    registry = require_registry(settings)
    aliases = registry.read_aliases()
    for model_id in registry.ids():
        m = registry.manifest(model_id)
        names = [a for a in ("champion", "challenger") if aliases.get(a) == model_id]
        record = {"model_id": model_id, "aliases": names, "name": m.name, "created_at": m.created_at,
                  "classes": list(m.classes)}
        if out.json:
            out.emit(record)
        else:
            tag = f" [{', '.join(names)}]" if names else ""
            out.line(f"{model_id}{tag}  {m.created_at or '-'}  {len(m.classes)} classes  {m.name}")
    if aliases.champion is None and not out.json:
        out.say(f"no champion yet: the daemon serves [model] path {path_text(settings.model.path)}")
    return ExitStatus.OK


def models_show(settings: Settings, name: str, *, out: Output) -> int:
    registry = require_registry(settings)
    model_id = registry.resolve(name)
    m = registry.manifest(model_id)
    aliases = registry.read_aliases()
    history = _history(settings, model_id)
    record: dict[str, object] = {
        "model_id": model_id, "path": path_text(registry.model_dir(model_id)),
        "aliases": [a for a in ("champion", "challenger") if aliases.get(a) == model_id],
        "name": m.name, "created_at": m.created_at, "classes": list(m.classes), "metrics": dict(m.metrics),
        "events": [e.to_json() for e in history],
    }
    if out.json:
        out.emit(record)
        return ExitStatus.OK
    out.line(f"model {model_id}  {', '.join(record['aliases']) or 'no alias'}")  # type: ignore[arg-type]
    out.line(f"  folder   {record['path']}")
    out.line(f"  created  {m.created_at or '-'}  classes {', '.join(m.classes)}")
    for e in history:
        out.line(f"  {e.at}  {e.alias}: {e.previous_model_id or '-'} -> {e.model_id or '-'}  "
                 f"{e.action} by {e.by}" + (f"  ({e.reason})" if e.reason else ""))
    return ExitStatus.OK


def models_register(settings: Settings, model_dir: Path, *, alias: str | None, by: str | None,
                    reason: str | None = None, out: Output) -> int:
    """Copy a trained model into the registry; by default it becomes the challenger. Made champion
    directly (no gate) only as the first champion, or with a reason (recorded)."""
    registry = require_registry(settings)
    champion = registry.read_aliases().champion
    if alias == "champion" and champion is not None and not reason:
        raise UserError("the registry has a champion: `semwatch models promote` runs the gate; "
                        "--alias champion replaces it without the gate only with --reason TEXT")
    model_id = registry.add(model_dir)
    if alias is not None:
        store = open_writer(settings)
        try:
            if alias == "challenger":
                ensure_champion(store, registry, settings, by or default_user())
            move_alias(store, registry, alias, model_id, action="register", by=by or default_user(),
                       reason=reason)
        finally:
            store.close()
    if out.json:
        out.emit({"model_id": model_id, "alias": alias})
    else:
        out.line(f"{model_id}" + (f" is now the {alias}" if alias else " added"))
    return ExitStatus.OK


def gate_images(settings: Settings, folder: Path | None) -> tuple[list[GateImage], dict[str, int]]:
    """The evaluation folder's images plus the labelled ledger images (see `lifecycle.gate`)."""
    from semwatch.lifecycle.labelled import ledger_images

    images: list[GateImage] = []
    folder = folder or settings.lifecycle.eval_folder
    if folder is not None:
        images.extend(folder_images(folder, settings))
    labelled, skipped = ledger_images(settings)
    return images + labelled, skipped


def run_gate(settings: Settings, registry: Registry, champion: str, challenger: str,
             folder: Path | None) -> Comparison:
    images, skipped = gate_images(settings, folder)
    return compare_models(settings, registry.model_dir(champion), registry.model_dir(challenger), images,
                          skipped=skipped)


def models_compare(settings: Settings, challenger: str, champion: str, *, folder: Path | None,
                   out: Output) -> int:
    registry = require_registry(settings)
    champion_id = _champion_or_path(settings, registry, champion)
    challenger_id = registry.resolve(challenger)
    result = run_gate(settings, registry, champion_id, challenger_id, folder) if champion_id else None
    if result is None:
        raise UserError("no champion to compare with: promote one first (or set [model] path)")
    _print_comparison(result, out)
    return ExitStatus.OK if result.decision != "worse" else ExitStatus.INPUT_FAILED


def models_promote(settings: Settings, name: str, *, force: bool, reason: str | None, by: str | None,
                   folder: Path | None, out: Output) -> int:
    registry = require_registry(settings)
    who = by or default_user()
    target = registry.resolve(name)
    store = open_writer(settings)
    try:
        champion = ensure_champion(store, registry, settings, who)
        if target == champion:
            raise UserError(f"{target} is already the champion")
        result: Comparison | None = None
        why: str | None = None
        try:
            result = run_gate(settings, registry, champion, target, folder)
        except UserError as exc:  # no evaluation images: no evidence
            why = str(exc)
        if result is not None and result.decision == "worse":
            where = f"on {', '.join(result.worse_classes)}" if result.worse_classes else "overall"
            why = f"the gate found it worse {where}"
        if result is not None:
            _print_comparison(result, out)
        if why is not None and not force:
            raise UserError(f"not promoted: {why} (--force --reason TEXT promotes anyway, recorded)",
                            ExitStatus.INPUT_FAILED)
        evidence: dict[str, object] = result.to_json() if result is not None else {"decision": None,
                                                                                      "error": why}
        event = move_alias(store, registry, "champion", target, action="force" if why else "promote",
                           by=who, reason=reason, evidence=evidence)
        if registry.read_aliases().challenger == target:
            move_alias(store, registry, "challenger", None, action="promoted", by=who)
    finally:
        store.close()
    _print_move(event, out)
    return ExitStatus.OK


def models_rollback(settings: Settings, *, reason: str | None, by: str | None, out: Output) -> int:
    registry = require_registry(settings)
    who = by or default_user()
    store = open_writer(settings)
    try:
        champion = registry.read_aliases().champion
        if champion is None:
            raise UserError("no champion to roll back")
        last = ev.last_move_to(store.conn, "champion", champion)  # the move a rollback undoes
        if last is None or last.previous_model_id is None:
            raise UserError(f"{champion} has no earlier champion recorded to roll back to")
        event = move_alias(store, registry, "champion", last.previous_model_id, action="rollback", by=who,
                           reason=reason, evidence={"undoes_event": last.id})
    finally:
        store.close()
    _print_move(event, out)
    return ExitStatus.OK


# --- helpers ------------------------------------------------------------------------------------


def _champion_or_path(settings: Settings, registry: Registry, champion: str) -> str | None:
    """The champion's id; without one yet, `[model] path` added to the registry (no alias moves)."""
    if champion != "champion" or registry.read_aliases().champion is not None:
        return registry.resolve(champion)
    try:
        return registry.add(settings.model.path)
    except UserError:
        return None


def _history(settings: Settings, model_id: str) -> list[ev.ModelEvent]:
    database = settings.store.database
    if not database.is_file():
        return []
    conn = open_readonly(database, busy_timeout_ms=settings.store.busy_timeout_ms, older="copy")
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'model_events'").fetchone():
            return []
        return ev.events(conn, model_id=model_id)
    finally:
        conn.close()


def _print_comparison(result: Comparison, out: Output) -> None:
    if out.json:
        out.emit(result.to_json())
        return
    a, b, p = result.champion, result.challenger, result.paired
    out.line(f"images: {', '.join(f'{n} from {s}' for s, n in result.sources.items())}"
             + "".join(f", {n} skipped ({why})" for why, n in result.skipped.items() if n))
    out.line(f"{'':24} {'champion':>10} {'challenger':>10}")
    for key in ("accuracy", "unknown_rate", "ece"):
        out.line(f"{key:24} {a[key]:>10} {b[key]:>10}")
    classes_a: dict[str, dict[str, object]] = a["per_class"]  # type: ignore[assignment]
    classes_b: dict[str, dict[str, object]] = b["per_class"]  # type: ignore[assignment]
    for cls, sa in classes_a.items():
        gated = "" if result.per_class_paired[cls]["gated"] else " (too few to gate)"
        out.line(f"  {cls:22} {sa['accuracy']:>10} {classes_b[cls]['accuracy']:>10}  n={sa['n']}{gated}")
    out.line(f"paired: challenger alone right {p['challenger_only_right']}, champion alone right "
             f"{p['champion_only_right']}; exact McNemar p(worse) {p['p_worse']}, p(better) {p['p_better']}")
    out.line(f"decision: {result.decision}")


def _print_move(event: ev.ModelEvent, out: Output) -> None:
    if out.json:
        out.emit(event.to_json())
    else:
        out.line(f"{event.alias}: {event.previous_model_id or '-'} -> {event.model_id or '-'} "
                 f"({event.action} by {event.by}, {event.at})")
