"""The `semwatch` command line: parse arguments, load settings, call one library function.

This is the only module that knows argparse. A handler turns the parsed arguments into typed
keyword arguments of one library function, which prints through an `Output` and returns an
`ExitStatus`. User errors are one line on stderr, never a traceback: argument errors too (numbers
and output paths are checked while parsing, so a bad one never reaches a command, minutes into
training); `UserError` and `ConfigError` (status CONFIG, 78, so systemd does not restart into the
same error) are printed here. Heavy imports (torch, cv2) happen inside the handler that needs them,
so `--help` and `--version` stay instant. `main(argv)` returns the status instead of exiting, so
tests run commands in-process.
"""

from __future__ import annotations

import argparse
import math
import sqlite3
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import NoReturn

from semwatch import __version__
from semwatch.config import Settings, default_config_path, load_settings
from semwatch.errors import ConfigError, ExitStatus, UserError
from semwatch.output import Output
from semwatch.safefs import path_text, printable, text_safe

Handler = Callable[[argparse.Namespace, Settings, Output], int]


# --- command handlers: each parses nothing and calls one library function with typed arguments.
# The imports are inside the handlers: `--help` and `--version` must not pay for torch or cv2.


def cmd_inspect(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from semwatch.views.inspection import inspect_files

    return inspect_files([Path(p) for p in args.files], settings, out=out)


def cmd_train(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    if args.labels or settings.train.labels:  # the flag, or `[train] labels = true`
        from semwatch.lifecycle.training import train_with_labels

        return train_with_labels(settings, data_dir=args.data_dir, out_dir=args.out, epochs=args.epochs,
                                 max_images_per_class=args.max_images_per_class, split_out=args.split_out,
                                 out=out)
    if args.data_dir is None:
        raise UserError("give DATA_DIR (one folder per class), --labels (the ledger's labels), or both",
                        ExitStatus.USAGE)
    from semwatch.model.train import train_folder

    return train_folder(args.data_dir, settings, out_dir=args.out, epochs=args.epochs,
                        max_images_per_class=args.max_images_per_class, split_out=args.split_out, out=out)


def cmd_evaluate(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from semwatch.model.evaluate import evaluate_folder

    return evaluate_folder(args.data_dir, settings, model_dir=args.model, out_dir=args.out,
                           intensity_jitter=args.intensity_jitter, split=args.split, seed=args.seed, out=out)


def cmd_models_export(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from semwatch.model.export import export_model

    export_model(args.model_dir, settings, out=out)
    return ExitStatus.OK


def cmd_classify(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from semwatch.model.classify import classify_files

    return classify_files([Path(p) for p in args.files], settings, model_dir=args.model,
                          explain_dir=args.explain, out=out)


def cmd_bench(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from semwatch.views.bench import bench_folder

    return bench_folder(args.data_dir, settings, model_dir=args.model, max_images=args.max_images,
                        rounds=args.rounds, out=out)


def cmd_watch(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from semwatch.service.daemon import ViewFactory, run_daemon

    view: ViewFactory | None = None
    if not args.plain and out.is_terminal:
        from semwatch.views.live import LiveView

        view = LiveView
    return run_daemon(settings, folder=args.folder, view=view,  # --folder replaces [watch] folder
                      rename_instrument=args.rename_instrument)


def cmd_top(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from semwatch.views.console_top import top

    return top(settings, once=args.once, out=out)


def cmd_report(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from semwatch.report.daily import report_day

    return report_day(settings, day=args.date, out=out)


def cmd_notify(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from semwatch.service.notify import send_test

    return send_test(settings, out=out)  # --test is required: the only thing `notify` does so far


def cmd_reprocess(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from semwatch.reprocess.run import ReprocessRequest, reprocess
    from semwatch.store.selection import Selection

    narrowed = args.all or args.outdated or args.since or args.until or args.sample or args.path
    if args.folders and narrowed:
        raise UserError("archive FOLDERs take no --outdated/--all/--since/--until/--sample/--path "
                        "(those select results already in the database)", ExitStatus.USAGE)
    selection = Selection("all" if args.all else "outdated", since=args.since, until=args.until,
                          sample=args.sample, path_glob=args.path)
    request = ReprocessRequest(tuple(args.folders), selection, engine=args.engine, dry_run=args.dry_run)
    return reprocess(settings, request, out=out)


def cmd_label(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from semwatch.lifecycle.labelling import Action, import_labels, label_files

    if args.import_csv is not None:
        if args.targets:
            raise UserError("--import takes no PATH (the file names the images)", ExitStatus.USAGE)
        return import_labels(settings, args.import_csv, by=args.by, note=args.note, out=out)
    if not args.targets:
        raise UserError("give at least one PATH or sha256 (or --import FILE.csv)", ExitStatus.USAGE)
    action: Action = ("class" if args.class_name else "confirm" if args.confirm else
                      "foreign" if args.foreign else "undo")
    return label_files(settings, args.targets, action, class_name=args.class_name, by=args.by,
                       note=args.note, out=out)


def cmd_export(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from semwatch.service.fleet_export import export_now

    return export_now(settings, to=args.to, out=out)


def cmd_fleet(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    if args.fleet_command == "top":
        from semwatch.views.fleet_top import fleet_top

        return fleet_top(settings, sources=tuple(args.sources), once=args.once, out=out)
    from semwatch.report.fleet import fleet_report

    return fleet_report(settings, sources=tuple(args.sources), day=args.date, out=out)


def cmd_demo(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from semwatch.views.demo import run_demo

    return run_demo(settings, data=args.data, workdir=args.workdir, images=args.images,
                    interval=args.interval, retrain=args.retrain, plain=args.plain, out=out)


def cmd_models(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from semwatch.lifecycle import models as m

    action = args.models_action
    if action == "export":
        return cmd_models_export(args, settings, out)
    if action == "list":
        return m.models_list(settings, out=out)
    if action == "show":
        return m.models_show(settings, args.model, out=out)
    if action == "register":
        return m.models_register(settings, args.model_dir, alias=None if args.no_alias else args.alias,
                                 by=args.by, reason=args.reason, out=out)
    if action == "compare":
        return m.models_compare(settings, args.challenger, args.against, folder=args.folder, out=out)
    if action == "promote":
        if args.force and not args.reason:
            raise UserError("--force needs --reason TEXT (it is recorded with the promotion)",
                            ExitStatus.USAGE)
        return m.models_promote(settings, args.model, force=args.force, reason=args.reason, by=args.by,
                                folder=args.folder, out=out)
    if action == "retrain":
        from semwatch.lifecycle.retrain import retrain

        return retrain(settings, min_labels=args.min_labels, promote=True if args.promote_if_better else None,
                       by=args.by, epochs=args.epochs, max_images_per_class=args.max_images_per_class,
                       out=out)
    return m.models_rollback(settings, reason=args.reason, by=args.by, out=out)


# --- parser ------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `semwatch report: error: ... (see --help)`, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitStatus.USAGE, f"{self.prog}: error: {printable(text_safe(message))} "
                              f"(see '{self.prog} --help')\n")


def _count(text: str) -> int:
    """A whole number >= 1 (image counts, epochs, rounds)."""
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def _seed(text: str) -> int:
    """A random seed: 0 .. 2**32 - 1 (numpy refuses others deep inside a run)."""
    value = _whole(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be between 0 and {2**32 - 1}, got {value}")
    return value


def _seconds(text: str) -> float:
    """A finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _date(text: str) -> date:
    """A calendar day, YYYY-MM-DD."""
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _out_dir(text: str) -> Path:
    """A folder to write into: it, or the nearest part of it that exists, must be a folder (else
    mkdir fails deep inside the command, after minutes of training or evaluating)."""
    path = Path(text)
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise argparse.ArgumentTypeError(f"{path_text(p)} exists and is not a folder")
            break
    return path


def _out_file(text: str) -> Path:
    """A file to write: not a folder, and inside one that exists or can be made."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path_text(path)} is a folder, not a file")
    _out_dir(str(path.parent))
    return path


def _common(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    p.add_argument("--config", type=Path, help="config file (default: ./config.toml if present)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="one JSON object per line")
    else:
        p.set_defaults(json=False)
    p.add_argument("--version", action="version", version=f"semwatch {__version__}")


def _after_action(p: argparse.ArgumentParser) -> None:
    """--config and --json after a group's action (`semwatch models list --json`); not given, they
    leave what was given before the action (`semwatch models --config X list`)."""
    p.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                   help="config file (default: ./config.toml if present)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="one JSON object per line")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="semwatch",
        description="Watch an SEM export folder and classify NCM cathode micrographs.",
    )
    parser.add_argument("--version", action="version", version=f"semwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("inspect", help="read micrographs and print metadata and quality")
    p.add_argument("files", nargs="+", metavar="FILE")
    _common(p)
    p.set_defaults(handler=cmd_inspect)

    p = sub.add_parser("train", help="train a model from one folder per class and/or the ledger's labels")
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR", nargs="?")
    p.add_argument("--labels", action="store_true",
                   help="also (or, without DATA_DIR, only) the images operators labelled (semwatch label); "
                   "[train] labels = true does the same")
    p.add_argument("--out", type=_out_dir, required=True, metavar="MODEL_DIR")
    p.add_argument("--epochs", type=_count, help="override [train] epochs")
    p.add_argument("--max-images-per-class", type=_count, help="use at most N images per class")
    p.add_argument("--split-out", type=_out_file, help="write the train/val/test split as JSON here")
    _common(p)
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a model on a labelled folder")
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    p.add_argument("--model", type=Path, required=True, metavar="MODEL_DIR")
    p.add_argument("--out", type=_out_dir, help="write confusion matrix and reliability PNGs here")
    p.add_argument("--intensity-jitter", action="store_true",
                   help="apply random brightness/contrast/gamma changes to every image")
    p.add_argument("--split", choices=["all", "test", "val", "train"], default="all",
                   help="evaluate only images of this split recorded in the model (default: all)")
    p.add_argument("--seed", type=_seed, default=0, help="seed for --intensity-jitter")
    _common(p)
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser("classify", help="classify micrographs")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--model", type=Path, metavar="MODEL_DIR", help="default: [model] path")
    p.add_argument("--explain", type=_out_dir, metavar="OUT_DIR", help="write Grad-CAM overlays here")
    _common(p)
    p.set_defaults(handler=cmd_classify)

    p = sub.add_parser("bench", help="measure throughput against the bare model")
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    p.add_argument("--model", type=Path, metavar="MODEL_DIR", help="default: [model] path")
    p.add_argument("--max-images", type=_count, default=120)
    p.add_argument("--rounds", type=_count, default=None,
                   help="alternating pipeline / bare-network rounds (default: one per 15 images)")
    _common(p)
    p.set_defaults(handler=cmd_bench)

    p = sub.add_parser("watch", help="run the daemon in the foreground (systemd runs this)")
    p.add_argument("--folder", type=Path, help="override [watch] folder")
    p.add_argument("--plain", action="store_true", help="plain log lines even on a terminal")
    p.add_argument("--rename-instrument", action="store_true",
                   help="take over a database written under another [instrument] name (a deliberate rename)")
    _common(p, json_flag=False)
    p.set_defaults(handler=cmd_watch)

    p = sub.add_parser("top", help="interactive console of a running daemon, read from its database")
    p.add_argument("--once", action="store_true",
                   help="print one plain frame and exit (also what a non-terminal stdout gets)")
    _common(p, json_flag=False)
    p.set_defaults(handler=cmd_top)

    p = sub.add_parser("report", help="write the day's report and print its paths")
    p.add_argument("--date", help="YYYY-MM-DD in the report time zone (default: today)")
    _common(p)
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser("notify", help="alerts ([notify] urls): send a test message to each URL")
    p.add_argument("--test", action="store_true", required=True,
                   help="send a test message to every configured URL and say whether it arrived")
    _common(p)
    p.set_defaults(handler=cmd_notify)

    p = sub.add_parser("reprocess", help="classify again with the configured model: outdated results "
                       "(default), all results, or every micrograph of archive folders")
    p.add_argument("folders", nargs="*", type=Path, metavar="FOLDER",
                   help="archive folders to ingest (default: results already in the database)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--outdated", action="store_true",
                       help="current results made by another model (the default)")
    scope.add_argument("--all", action="store_true", help="every current result")
    p.add_argument("--since", type=_date, metavar="DATE", help="processed on or after this UTC day")
    p.add_argument("--until", type=_date, metavar="DATE", help="processed on or before this UTC day")
    p.add_argument("--sample", metavar="ID", help="only this sample's images")
    p.add_argument("--path", metavar="GLOB", help="only paths matching this glob (* also matches /)")
    p.add_argument("--engine", choices=["local", "ray"], help="override [scale] engine")
    p.add_argument("--dry-run", action="store_true", help="say how many files would be classified")
    _common(p)
    p.set_defaults(handler=cmd_reprocess)

    p = sub.add_parser("label", help="say what an image is: confirm its verdict, name its class, "
                       "mark it foreign, undo (the labels the next model learns from)")
    p.add_argument("targets", nargs="*", metavar="PATH",
                   help="a file the database knows, or its sha256 (the label follows the content)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--class", dest="class_name", metavar="NAME",
                      help="it is this class: <composition>_<state> (a new one is allowed)")
    what.add_argument("--confirm", action="store_true", help="its verdict is right")
    what.add_argument("--foreign", action="store_true", help="not a specimen the model should know")
    what.add_argument("--undo", action="store_true", help="take back its newest label")
    what.add_argument("--import", dest="import_csv", type=Path, metavar="FILE.csv",
                      help="labels from a CSV (path or sha256, label, optional by, note): all or none")
    p.add_argument("--by", metavar="NAME", help="who says so (default: the login name)")
    p.add_argument("--note", metavar="TEXT", help="a note kept with the label")
    _common(p)
    p.set_defaults(handler=cmd_label)

    p = sub.add_parser("models", help="the model registry: list, show, register, compare, promote, "
                       "rollback, retrain; export")
    _common(p)
    msub = p.add_subparsers(dest="models_action", metavar="ACTION")
    msub.required = True
    q = msub.add_parser("list", help="models in [model] registry with their aliases")
    _after_action(q)
    q = msub.add_parser("show", help="one model: manifest and every alias move recorded")
    q.add_argument("model", metavar="MODEL", help="champion, challenger, or a model id (prefix)")
    _after_action(q)
    q = msub.add_parser("register", help="copy a trained model folder into the registry")
    q.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    q.add_argument("--alias", choices=["challenger", "champion"], default="challenger",
                   help="the alias it takes (default: challenger; champion skips the gate: only the "
                   "first champion, or with --reason)")
    q.add_argument("--no-alias", action="store_true", help="only add it")
    q.add_argument("--reason", metavar="TEXT", help="why (recorded)")
    q.add_argument("--by", metavar="NAME", help="who (default: the login name)")
    _after_action(q)
    q = msub.add_parser("compare", help="the promotion gate: challenger vs champion on the same images")
    q.add_argument("challenger", nargs="?", default="challenger", metavar="MODEL")
    q.add_argument("--against", default="champion", metavar="MODEL", help="default: the champion")
    q.add_argument("--folder", type=Path, metavar="DIR", help="override [lifecycle] eval_folder")
    _after_action(q)
    q = msub.add_parser("promote", help="make a model champion if the gate allows (the daemon follows)")
    q.add_argument("model", nargs="?", default="challenger", metavar="MODEL")
    q.add_argument("--force", action="store_true", help="promote even if the gate refuses (needs --reason)")
    q.add_argument("--reason", metavar="TEXT", help="why (recorded)")
    q.add_argument("--by", metavar="NAME", help="who (default: the login name)")
    q.add_argument("--folder", type=Path, metavar="DIR", help="override [lifecycle] eval_folder")
    _after_action(q)
    q = msub.add_parser("rollback", help="make the previous champion champion again")
    q.add_argument("--reason", metavar="TEXT", help="why (recorded)")
    q.add_argument("--by", metavar="NAME", help="who (default: the login name)")
    _after_action(q)
    q = msub.add_parser("retrain", help="train a challenger from the labels when enough are new, gate it, "
                        "register it (the daemon's nightly step when [lifecycle] retrain_after_labels > 0)")
    q.add_argument("--min-labels", type=_count, metavar="N",
                   help="new labels needed (default: [lifecycle] retrain_after_labels, at least 1)")
    q.add_argument("--promote-if-better", action="store_true",
                   help="promote it when the gate says better (default: [lifecycle] auto_promote)")
    q.add_argument("--by", metavar="NAME", help="who (default: the login name)")
    q.add_argument("--epochs", type=_count, help="override [train] epochs")
    q.add_argument("--max-images-per-class", type=_count, metavar="N", help="subsample (for a quick check)")
    _after_action(q)
    q = msub.add_parser("export", help="add the ONNX export (faster runtimes) to an existing model")
    q.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    _after_action(q)
    p.set_defaults(handler=cmd_models)

    p = sub.add_parser("export", help="write a snapshot of the database for `semwatch fleet` (safe to share)")
    p.add_argument("--to", type=_out_dir, metavar="FOLDER", help="default: [fleet] export_folder")
    _common(p)
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("fleet", help="several instruments' snapshots in one view (read-only)")
    # --config before or after the sub-command: SUPPRESS keeps one from resetting the other.
    config_help = "config file (default: ./config.toml if present)"
    p.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=config_help)
    p.add_argument("--version", action="version", version=f"semwatch {__version__}")
    p.set_defaults(config=None, json=False)
    fleet = p.add_subparsers(dest="fleet_command", metavar="FLEET_COMMAND")
    fleet.required = True
    for name, text in (("top", "one row per instrument; Enter opens its images and samples"),
                       ("report", "the day's report across instruments")):
        f = fleet.add_parser(name, help=text)
        f.add_argument("sources", nargs="*", type=Path, metavar="SNAPSHOT_OR_FOLDER",
                       help="snapshot files or folders of them (default: [fleet] export_folder)")
        if name == "top":
            f.add_argument("--once", action="store_true", help="print the table once and exit")
        else:
            f.add_argument("--date", help="YYYY-MM-DD in the report time zone (default: today)")
            f.add_argument("--json", action="store_true", help="one JSON object per line")
        f.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=config_help)
        f.add_argument("--version", action="version", version=f"semwatch {__version__}")
        f.set_defaults(handler=cmd_fleet)

    p = sub.add_parser("demo", help="the whole thing end to end for a first-time user")
    p.add_argument("--data", type=Path, help="labelled folder (default: [data] ncm_dir)")
    p.add_argument("--workdir", type=_out_dir, default=Path("demo"), help="where the demo writes")
    p.add_argument("--images", type=_count, default=24, help="held-out images to drop in")
    p.add_argument("--interval", type=_seconds, default=1.0, help="seconds between images")
    p.add_argument("--retrain", action="store_true", help="train even if a model exists")
    p.add_argument("--plain", action="store_true", help="plain log lines even on a terminal")
    _common(p, json_flag=False)
    p.set_defaults(handler=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status (the console script exits with it).

    Everything a user can act on ends here as one line on stderr: `UserError` and `ConfigError`
    from any command, an interrupt, a folder or file the command could not use."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help and --version (0), argument errors (2): argparse has printed them
        return _status(exc.code)
    out = Output(json=args.json)
    try:
        settings = load_settings(args.config if args.config is not None else default_config_path())
        handler: Handler = args.handler
        return handler(args, settings, out)
    except ConfigError as exc:
        out.say(f"configuration error: {exc}")
        return ExitStatus.CONFIG
    except UserError as exc:
        out.say(str(exc))
        return exc.exit_status
    except KeyboardInterrupt:
        out.say("interrupted")
        return ExitStatus.INTERRUPTED
    except BrokenPipeError:  # `semwatch inspect --json ... | head`: the reader has all it wanted
        return ExitStatus.OK
    except sqlite3.Error as exc:  # a database error no command turned into words: still one line
        out.say(f"database error: {exc}")
        return ExitStatus.DATABASE
    except OSError as exc:  # a folder or file the command could not use: one line, not a traceback
        where = f": {path_text(exc.filename)}" if isinstance(exc.filename, str) else ""
        out.say(f"{exc.strerror or exc}{where}")
        return ExitStatus.INPUT_FAILED


def _status(code: str | int | None) -> int:
    """The exit status argparse asked for (it only ever passes a number or nothing)."""
    if code is None:
        return ExitStatus.OK
    return code if isinstance(code, int) else ExitStatus.USAGE
