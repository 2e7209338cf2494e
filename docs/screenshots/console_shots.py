"""Screenshots of `semwatch top` (the console) for the README: SVG through Textual's pilot, then
PNG through headless Chromium when it is installed.

    .venv/bin/python docs/screenshots/console_shots.py --config demo/config.toml docs/screenshots

The PNGs here were taken of `semwatch demo`'s database (model /tmp/bench/ncm) with the daemon
running on it and a few more files dropped in (a truncated TIFF, two non-NCM micrographs, a sample
of mixed classes); the results of two samples were relabelled with an earlier model id by hand so
that the outdated counts show.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import tempfile
from pathlib import Path

from semwatch.config import load_settings
from semwatch.views.console import ConsoleApp
from semwatch.views.live import current_model_id


async def _shoot(config: Path, out: Path, size: tuple[int, int]) -> list[Path]:
    settings = load_settings(config)
    app = ConsoleApp(settings, current_model=current_model_id(settings))
    w, h = size
    shots: list[Path] = []

    def save(name: str) -> None:
        shots.append(out / f"console-{w}x{h}{name}.svg")
        app.save_screenshot(shots[-1].name, path=str(out))

    async with app.run_test(size=size) as pilot:
        await pilot.pause(0.5)
        if w >= 120:
            await pilot.press("down", "down")  # the side pane follows the cursor
            await pilot.pause(0.2)
        save("")
        await pilot.press("slash", *"lung", "enter")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await pilot.pause(0.2)
        save("-image")
        await pilot.press("escape", "c", "s")
        await pilot.pause(0.5)
        save("-samples")
        await pilot.press("enter")
        await pilot.pause(0.3)
        save("-sample")
        await pilot.press("escape", "q")
    return shots


def _png(svg: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return
    text = svg.read_text(encoding="utf-8")
    box = text.split('viewBox="', 1)[1].split('"', 1)[0].split()
    width, height = round(float(box[2])), round(float(box[3]))
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(f"<html><body style='margin:0'><img src='{svg.resolve().as_uri()}' "
                        f"width={width} height={height}></body></html>", encoding="utf-8")
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp}/profile", "--hide-scrollbars",
                        f"--screenshot={svg.with_suffix('.png')}", f"--window-size={width},{height}",
                        page.as_uri()], check=True, capture_output=True, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for size in ((80, 24), (160, 45)):
        for svg in asyncio.run(_shoot(args.config, args.out, size)):
            _png(svg)
            print(svg.with_suffix(".png"))


if __name__ == "__main__":
    main()
