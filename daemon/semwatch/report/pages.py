"""What every report page shares: the template environment (autoescaped, with the filters that make
user data safe to show) and publishing a report folder so that a reader never sees half of it."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from semwatch.safefs import printable, text_safe, write_atomic

if TYPE_CHECKING:
    from jinja2 import Environment


def show(value: object) -> str:
    """User data (file names, sample ids, errors) for the page: valid UTF-8 with control and bidi
    characters made visible (a name must not reorder or hide the text around it); autoescaping
    then makes it text, never markup."""
    return printable(text_safe(str(value)))


def environment() -> Environment:
    """The templates in `report/templates/`, autoescaped, strict about undefined names, with the
    `show` and `conf` filters."""
    from jinja2 import Environment, PackageLoader, StrictUndefined  # only where a page is written

    env = Environment(loader=PackageLoader("semwatch.report", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["conf"] = lambda v: "–" if v is None else f"{v:.2f}"
    env.filters["show"] = show
    return env


def publish(target: Path, files: dict[str, bytes]) -> None:
    """A new folder appears complete (built under a temporary name, then renamed); an existing one has
    each file replaced atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            tmp.chmod(0o755)
            tmp.rename(target)
            return
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not target.is_dir():
                raise
    for name, data in files.items():
        write_atomic(target / name, data)
