"""Configuration: config.toml documents every setting; bad files are refused with exit code 78."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from conftest import Cli
from semwatch import config
from semwatch.config import Settings, iter_setting_names, load_settings
from semwatch.errors import ConfigError, ExitStatus

REPO = Path(__file__).resolve().parents[1]
CONFIG_TOML = REPO / "config.toml"


def _load(text: str, tmp_path: Path, environ: dict[str, str] | None = None) -> Settings:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return load_settings(path, environ=environ or {})


# --- config.toml is complete and matches the defaults --------------------------------------------


def test_every_setting_is_documented_in_config_toml() -> None:
    doc = tomllib.loads(CONFIG_TOML.read_text(encoding="utf-8"))
    lines = CONFIG_TOML.read_text(encoding="utf-8").splitlines()
    names = list(iter_setting_names())
    assert len(names) > 50
    for section, key in names:
        assert key in doc.get(section, {}), f"[{section}] {key} is missing from config.toml"
    # ... each with a comment right above it (or above the block of keys it belongs to)
    section = ""
    for i, line in enumerate(lines):
        if line.startswith("["):
            section = line.strip("[] ")
            continue
        key = line.split("=", 1)[0].strip()
        if "=" in line and not line.startswith(("#", " ")) and (section, key) in names:
            assert lines[i - 1].startswith("#"), f"[{section}] {key} has no comment above it"
    # ... and no key that the settings do not know
    for section, table in doc.items():
        for key in table:
            assert (section, key) in names, f"config.toml has unknown key [{section}] {key}"


def test_config_toml_values_are_the_defaults() -> None:
    loaded = load_settings(CONFIG_TOML, environ={})
    defaults = load_settings(None, environ={})
    for section, key in iter_setting_names():
        value, default = getattr(getattr(loaded, section), key), getattr(getattr(defaults, section), key)
        if isinstance(value, Path):  # both relative to their base (the repository root here)
            assert value == (REPO / getattr(getattr(Settings(), section), key)), (section, key)
        else:
            assert value == default, f"[{section}] {key}: config.toml says {value!r}, default {default!r}"


# --- refused input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[watch]\nfolderr = 'x'\n", ["[watch]", "folderr", "unknown"]),
        ("[wach]\nfolder = 'x'\n", ["unknown section", "wach"]),
        ("watch = 3\n", ["[watch]", "table"]),
        ("[model]\nbatch_size = 'big'\n", ["[model] batch_size", "integer"]),
        ("[model]\nbatch_size = 32.0\n", ["[model] batch_size", "integer"]),
        ("[model]\nbatch_size = true\n", ["[model] batch_size", "integer"]),
        ("[watch]\nrecursive = 1\n", ["[watch] recursive", "true or false"]),
        ("[watch]\nsettle_seconds = '2'\n", ["[watch] settle_seconds", "number"]),
        ("[watch]\ninclude = '*.tif'\n", ["[watch] include", "list"]),
        ("[watch]\ninclude = ['*.tif', 3]\n", ["[watch] include[1]", "string"]),
        ("[watch]\nfolder = 5\n", ["[watch] folder", "path"]),
        ("[watch]\nmode = 'magic'\n", ["[watch] mode", "one of"]),
        ("[model]\nbatch_size = 0\n", ["[model] batch_size", "> 0"]),
        ("[watch]\nsettle_seconds = -1.0\n", ["[watch] settle_seconds", ">= 0"]),
        ("[quality]\nsaturated_max = 1.5\n", ["[quality] saturated_max", "between 0 and 1"]),
        ("[quality]\nfocus_min = nan\n", ["[quality] focus_min", "finite"]),
        ("[reading]\nmax_file_mb = inf\n", ["[reading] max_file_mb", "finite"]),
        ("[reading]\nmax_pixels = -5\n", ["[reading] max_pixels", "> 0"]),
        ("[reading]\ndatabar_rows = -2\n", ["[reading] databar_rows", "-1"]),
        ("[quality]\ndynamic_range_min = 2.0\n", ["[quality] dynamic_range_min"]),
        ("[quality]\nfocus_min = 1.5\n", ["[quality] focus_min", "between 0 and 1"]),
        ("[tiling]\noverlap = 0.95\n", ["[tiling] overlap"]),
        ("[train]\nval_fraction = 0.5\ntest_fraction = 0.5\n", ["[train]", "val_fraction + test_fraction"]),
        ("[report]\ntime = '25:00'\n", ["[report] time", "HH:MM"]),
        ("[report]\ntimezone = 'Mars/Olympus'\n", ["[report] timezone"]),
        ("[samples]\nkey = 'regex'\nregex = '('\n", ["[samples] regex"]),
        ("[samples]\nkey = 'regex'\nregex = '^x'\n", ["[samples] regex", "(?P<sample>"]),
        ("[samples]\nexpect = [{ pattern = 'a' }]\n", ["[samples] expect[0]", "class"]),
        ("[train]\nclass_map = { a = 1 }\n", ["[train] class_map", "strings"]),
        ("[model\ndevice = 'cpu'\n", ["not valid TOML"]),
        ("[metrics]\nlisten = '::9464'\n", ["[metrics] listen", "'::9464'"]),
        ("[metrics]\nlisten = 'host:'\n", ["[metrics] listen", "'host:'"]),
        ("[metrics]\nlisten = ':99999'\n", ["[metrics] listen", "':99999'"]),
        ("[metrics]\nlisten = '[::1'\n", ["[metrics] listen", "'[::1'"]),
        ("[metrics]\nlisten = '0.0.0.0:9464'\n", ["[metrics] listen", "not a loopback", "allow_remote"]),
        ("[metrics]\nlisten = '[::]:9464'\n", ["[metrics] listen", "not a loopback", "allow_remote"]),
        ("[metrics]\nlisten = '192.168.1.20:9464'\n", ["[metrics] listen", "allow_remote"]),
        ("[metrics]\nallow_remote = 'yes'\n", ["[metrics] allow_remote", "true or false"]),
    ],
)
def test_bad_values_are_refused_naming_the_key(text: str, words: list[str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _load(text, tmp_path)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_missing_and_unreadable_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml", environ={})
    with pytest.raises(ConfigError, match="config file is a folder"):
        load_settings(tmp_path, environ={})
    path = tmp_path / "c.toml"
    path.write_text("[model]\ndevice = 'cpu'\n", encoding="utf-8")

    def refuse(self: Path, *args: Any, **kwargs: Any) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(ConfigError, match="Permission denied"):
        load_settings(path, environ={})
    (tmp_path / "latin1.toml").write_bytes(b"[watch]\nfolder = '\xe9'\n")
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(tmp_path / "latin1.toml", environ={})


# --- what works ----------------------------------------------------------------------------------


def test_partial_config_keeps_other_defaults(tmp_path: Path) -> None:
    s = _load("[model]\ndevice = 'cpu'\n[quality]\nfocus_min = 0.01\n", tmp_path)
    assert s.model.device == "cpu" and s.quality.focus_min == 0.01
    assert s.model.batch_size == config.ModelSettings().batch_size
    assert s.reading == config.ReadingSettings()
    assert s.source == tmp_path / "config.toml"
    assert _load("", tmp_path).watch.mode == "auto"


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc dir"
    conf_dir.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = _load("[watch]\nfolder = 'incoming'\n[store]\ndatabase = '/abs/x.db'\n[model]\npath = '~/m'\n",
              conf_dir)
    assert s.watch.folder == conf_dir / "incoming"
    assert s.store.database == Path("/abs/x.db")
    assert s.model.path == Path("~/m").expanduser()
    # keys not written resolve the same way (not against the current folder)
    assert s.store.results_csv == conf_dir / "var" / "results.csv"
    # without a file: against the current folder
    assert load_settings(None, environ={}).watch.folder == elsewhere / "var" / "incoming"


def test_environment_overrides(tmp_path: Path) -> None:
    env = {
        "SEMWATCH_WATCH_FOLDER": "/data/export",
        "SEMWATCH_MODEL_BATCH_SIZE": "8",
        "SEMWATCH_MODEL_DEVICE": "cpu",
        "SEMWATCH_READING_DATABAR_ROWS": "64",
        "SEMWATCH_WATCH_INCLUDE": '["*.tif"]',
        "SEMWATCH_QUALITY_FOCUS_MIN": "0.5",
        "SEMWATCH_WATCH_RECURSIVE": "false",
        "OTHER_VARIABLE": "ignored",
    }
    s = _load("[model]\nbatch_size = 16\ndevice = 'cuda'\n", tmp_path, environ=env)
    assert s.watch.folder == Path("/data/export")
    assert s.model.batch_size == 8 and s.model.device == "cpu"  # env beats the file
    assert s.reading.databar_rows == 64 and s.watch.include == ("*.tif",)
    assert s.quality.focus_min == 0.5 and s.watch.recursive is False
    with pytest.raises(ConfigError, match=r"\[model\] batch_size"):
        _load("", tmp_path, environ={"SEMWATCH_MODEL_BATCH_SIZE": "lots"})
    with pytest.raises(ConfigError, match=r"unknown key \[watch\] foldr"):
        _load("", tmp_path, environ={"SEMWATCH_WATCH_FOLDR": "/x"})


def test_semwatch_data_env_and_config_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = _load("[data]\nvendor_dir = '/v'\n", tmp_path, environ={"SEMWATCH_DATA": "/copy"})
    assert s.data.ncm_dir == Path("/copy/ncm-sem") and s.data.vendor_dir == Path("/v")
    (tmp_path / "elsewhere.toml").write_text("[model]\ndevice = 'cpu'\n", encoding="utf-8")
    monkeypatch.setenv(config.CONFIG_ENV, str(tmp_path / "elsewhere.toml"))
    assert config.default_config_path() == tmp_path / "elsewhere.toml"


def test_settings_are_frozen_values() -> None:
    s = load_settings(None, environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.model.batch_size = 3  # type: ignore[misc]
    assert s.replace(model=config.ModelSettings(device="cpu")).model.device == "cpu"


# --- the command line ---------------------------------------------------------------------------

COMMANDS = [
    ["inspect", "x.tif"], ["train", "data", "--out", "m"], ["evaluate", "data", "--model", "m"],
    ["classify", "x.tif"], ["bench", "data"], ["watch"], ["top", "--once"], ["report"], ["demo"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_bad_config_exits_78_on_every_command(command: list[str], cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nbatch_size = -3\n", encoding="utf-8")
    run = cli(*command, "--config", bad)
    assert run.code == ExitStatus.CONFIG, (run.out, run.err)
    assert run.err.strip().count("\n") == 0 and "Traceback" not in run.err
    assert run.err.startswith("semwatch: configuration error: [model] batch_size")


def test_malformed_or_remote_metrics_listen_exits_78_at_load(cli: Cli, tmp_path: Path) -> None:
    """Refused when the settings are read, by any command, not when the daemon starts serving."""
    for listen in ("::9464", "0.0.0.0:9464"):
        (tmp_path / "config.toml").write_text(f"[metrics]\nlisten = {listen!r}\n", encoding="utf-8")
        run = cli("top", "--once")
        assert run.code == ExitStatus.CONFIG, (run.out, run.err)
        assert run.err.startswith("semwatch: configuration error: [metrics] listen")
        assert run.err.strip().count("\n") == 0 and "Traceback" not in run.err


def test_bad_config_from_env_and_missing_file_exit_78(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[reading]\nmax_pixelz = 5\n", encoding="utf-8")
    run = cli("inspect", "x.tif")  # ./config.toml is picked up
    assert run.code == ExitStatus.CONFIG and "max_pixelz" in run.err
    run = cli("inspect", "x.tif", "--config", tmp_path / "missing.toml")
    assert run.code == ExitStatus.CONFIG and "not found" in run.err
    run = cli("inspect", "x.tif", "--config", tmp_path / "config.toml",
              env={"SEMWATCH_CONFIG": "/nonexistent.toml"})
    assert run.code == ExitStatus.CONFIG and "max_pixelz" in run.err  # --config beats $SEMWATCH_CONFIG
    run = cli("inspect", "x.tif", env={"SEMWATCH_CONFIG": "/nonexistent.toml"})
    assert run.code == ExitStatus.CONFIG and "/nonexistent.toml" in run.err  # and beats ./config.toml
    good = tmp_path / "good.toml"
    good.write_text("", encoding="utf-8")
    run = cli("inspect", "x.tif", "--config", good, env={"SEMWATCH_QUALITY_FOCUS_MIN": "-1.0"})
    assert run.code == ExitStatus.CONFIG and "[quality] focus_min" in run.err
