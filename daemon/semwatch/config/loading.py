"""Loading: `config.toml`, then `SEMWATCH_<SECTION>_<KEY>` environment variables, then explicit
overrides, each value checked against its section's type hints and turned into one `Settings`.

Unknown keys, wrong types and impossible values raise `ConfigError` naming the key; the CLI turns that
into a one-line message and exit code 78.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from semwatch.config.sections import SECTION_TYPES, ExpectRule, Settings
from semwatch.errors import ConfigError

CONFIG_ENV = "SEMWATCH_CONFIG"
ENV_PREFIX = "SEMWATCH_"
DATA_ENV = "SEMWATCH_DATA"


def default_config_path(cwd: Path | None = None) -> Path | None:
    """`$SEMWATCH_CONFIG`, else `./config.toml` if present, else None (built-in defaults)."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    candidate = (cwd or Path.cwd()) / "config.toml"
    return candidate if candidate.is_file() else None


def load_settings(
    path: Path | None = None,
    *,
    environ: typing.Mapping[str, str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Settings:
    """Load settings from `path` (None: defaults only), environment, then explicit overrides.

    Relative paths resolve against the config file's folder (the current folder without a file).
    """
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file is a folder: {path}")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {' '.join(str(exc).split())}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        base = path.resolve().parent
    env = dict(os.environ if environ is None else environ)
    for section, values in _env_overrides(env).items():
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"[{section}] must be a table")
        raw[section].update(values)
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)

    unknown = set(raw) - set(SECTION_TYPES)
    if unknown:
        raise ConfigError(f"unknown section [{sorted(unknown)[0]}] (known: {', '.join(SECTION_TYPES)})")
    sections: dict[str, Any] = {}
    for name, cls in SECTION_TYPES.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] must be a table")
        sections[name] = _build_section(name, cls, table, base)
    data_env = env.get(DATA_ENV)
    if data_env:  # points the [data] folders that were not set explicitly at another copy
        root = Path(data_env).expanduser().absolute()
        given = raw.get("data", {})
        sections["data"] = dataclasses.replace(
            sections["data"],
            **{key: root / sub for key, sub in (("ncm_dir", "ncm-sem"), ("vendor_dir", "vendor-tiff"))
               if key not in given},
        )
    return Settings(**sections, source=path)


def _env_overrides(env: typing.Mapping[str, str]) -> dict[str, dict[str, object]]:
    """`SEMWATCH_WATCH_FOLDER=/x` → {"watch": {"folder": "/x"}} (values parsed as TOML if they can be)."""
    out: dict[str, dict[str, object]] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or key in (CONFIG_ENV, DATA_ENV):
            continue
        rest = key[len(ENV_PREFIX) :].lower()
        for section in SECTION_TYPES:
            if rest.startswith(section + "_"):
                out.setdefault(section, {})[rest[len(section) + 1 :]] = _parse_env_value(value)
                break
    return out


def _parse_env_value(value: str) -> object:
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def _build_section(name: str, cls: type, table: dict[str, object], base: Path) -> object:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in table:
        if key not in known:
            raise ConfigError(f"unknown key [{name}] {key}")
    kwargs = {key: _coerce(f"[{name}] {key}", hints[key], value, base) for key, value in table.items()}
    # Default paths resolve like written ones: against the config file's folder, not wherever the
    # process happens to start (systemd starts it in /).
    for f in dataclasses.fields(cls):
        default = f.default
        if hints[f.name] is Path and f.name not in kwargs and isinstance(default, Path):
            kwargs[f.name] = default if default.is_absolute() else base / default
    try:
        section = cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by the known-key check
        raise ConfigError(f"[{name}]: {exc}") from None
    validate = getattr(section, "validate", None)
    if validate is not None:
        validate()
    return section


def _coerce(name: str, hint: object, value: object, base: Path) -> object:
    origin = get_origin(hint)
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{name} must be a path string, got {value!r}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if origin is tuple:
        (item_hint, _ellipsis) = get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        if item_hint is ExpectRule:
            return tuple(_expect_rule(f"{name}[{i}]", v) for i, v in enumerate(value))
        return tuple(_coerce(f"{name}[{i}]", item_hint, v, base) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(f"{name} must be a table of strings, got {value!r}")
        return dict(value)
    if origin in (types.UnionType, typing.Union):  # an optional path: "" is None (off)
        args = [a for a in get_args(hint) if a is not type(None)]
        if value == "" and len(args) < len(get_args(hint)):
            return None
        return _coerce(name, args[0], value, base)
    raise ConfigError(f"{name}: unsupported setting type {hint}")  # pragma: no cover


def _expect_rule(name: str, value: object) -> ExpectRule:
    if not isinstance(value, dict) or set(value) != {"pattern", "class"}:
        raise ConfigError(f"{name} must be a table with exactly 'pattern' and 'class'")
    if not all(isinstance(v, str) and v for v in value.values()):
        raise ConfigError(f"{name}: 'pattern' and 'class' must be non-empty strings")
    import re

    try:
        re.compile(value["pattern"])
    except re.error as exc:
        raise ConfigError(f"{name}: pattern is not a valid regular expression: {exc}") from None
    return ExpectRule(pattern=value["pattern"], expected_class=value["class"])


def iter_setting_names(settings_cls: type = Settings) -> typing.Iterator[tuple[str, str]]:
    """(section, key) for every configurable field: the test that keeps config.toml complete uses it."""
    for section, cls in SECTION_TYPES.items():
        for f in dataclasses.fields(cls):
            yield section, f.name
