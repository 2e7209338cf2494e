"""The Ray engine's own start-up, as a user runs it: `semwatch reprocess --engine ray` in a process
of its own that starts a private local Ray and shuts it down (`[scale] ray_address` empty), joins a
running cluster (a real `ray start --head` on loopback, started and stopped here), and says in one
line, with exit 78, that an address nobody answers at cannot be joined.

Separate from test_reprocess_ray.py, whose in-process Ray would be reused by the engine instead of
started by it. Each Ray here is small (one CPU, one model actor). Its processes are found again by a
marker in their environment, which they inherit from the process that started them (never
`ray stop`, which would stop every Ray of this user on the machine): to check that the command
stopped its private Ray, and to end whatever is left after a test."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_reprocess_ray import archive

pytest.importorskip("ray", reason="ray[data] is not installed (pip install 'semwatch[ray]')")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")


MARKER = "SEMWATCH_TEST_RAY_MARKER"


def ray_processes(marker: str) -> list[psutil.Process]:
    """The processes started with `MARKER=marker` in their environment (inherited)."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get(MARKER) == marker:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def end(processes: list[psutil.Process]) -> None:
    for p in processes:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(processes, timeout=15)
    for p in alive:
        p.kill()


@pytest.fixture
def ray_temp() -> Iterator[str]:
    """A short temporary folder for one Ray (its socket paths have a length limit), also the marker
    of its processes: those left are ended after the test, whatever happened."""
    temp = tempfile.mkdtemp(prefix="swray", dir="/tmp")
    try:
        yield temp
    finally:
        end(ray_processes(temp))
        shutil.rmtree(temp, ignore_errors=True)


def config(tmp: Path, model: Path, **scale: object) -> Path:
    path = tmp / "config.toml"
    keys = "".join(f"{k} = {json.dumps(v)}\n" for k, v in scale.items())
    path.write_text(
        f'[watch]\nfolder = "{tmp / "incoming"}"\n'
        f'[store]\ndatabase = "{tmp / "db" / "s.db"}"\nresults_csv = "{tmp / "db" / "results.csv"}"\n'
        f'[model]\npath = "{model}"\ndevice = "cpu"\ntest_time_views = 1\n'
        f'[tiling]\nmax_tiles = 4\n[report]\nenabled = false\n[scale]\nworkers = 1\n{keys}',
        encoding="utf-8")
    return path


def reprocess(folder: Path, cfg: Path, env: dict[str, str],
              timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "semwatch", "reprocess", str(folder), "--engine", "ray",
                           "--config", str(cfg), "--json"], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cfg.parent)


def summary(stdout: str) -> dict[str, object]:
    lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    found: dict[str, object] = next(r for r in lines if r.get("event") == "summary")
    return found


def current(cfg: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(cfg.parent / "db" / "s.db")
    try:
        return conn.execute("SELECT path, status FROM images WHERE current = 1 ORDER BY path").fetchall()
    finally:
        conn.close()


def env_for(marker: str) -> dict[str, str]:
    """No cluster to find by itself; token authentication on where this user has a token (Ray >=
    2.5x turns it on for a head where ~/.ray/auth_token exists; a driver and a joining node agree
    only when told: docs/SCALE-OUT.md)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_DISABLE_USAGE_STATS": "1", MARKER: marker})
    if (Path.home() / ".ray" / "auth_token").exists():
        env["RAY_AUTH_MODE"] = "token"
    return env


def test_a_private_local_ray_is_started_and_shut_down_by_the_command(
        tmp_path: Path, tiny_model: Path, ncm_dir: Path, ray_temp: str) -> None:
    folder = archive(tmp_path, ncm_dir, per_class=1)
    cfg = config(tmp_path, tiny_model)
    done = reprocess(folder, cfg, env_for(ray_temp))
    assert done.returncode == 1, done.stderr  # the broken file is recorded failed
    result = summary(done.stdout)
    assert (result["engine"], result["classified"], result["failed"]) == ("ray", 2, 1)
    assert [status for _, status in current(cfg)].count("failed") == 1 and len(current(cfg)) == 3
    assert "Traceback" not in done.stderr
    # The command shut its Ray down: none of the processes it started outlive it (given time to exit).
    deadline = time.monotonic() + 60
    while left := ray_processes(ray_temp):
        assert time.monotonic() < deadline, [" ".join(p.cmdline()[:2]) for p in left]
        time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_command_joins_a_running_cluster_and_leaves_it_running(
        tmp_path: Path, tiny_model: Path, ncm_dir: Path, ray_temp: str) -> None:
    folder = archive(tmp_path, ncm_dir, per_class=1)
    port = free_port()
    head = subprocess.run([RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                           "--num-cpus=1", "--num-gpus=0", "--include-dashboard=false",
                           "--disable-usage-stats", f"--temp-dir={ray_temp}"],
                          capture_output=True, text=True, timeout=120, env=env_for(ray_temp))
    assert head.returncode == 0, head.stdout + head.stderr
    cfg = config(tmp_path, tiny_model, ray_address=f"127.0.0.1:{port}")
    done = reprocess(folder, cfg, env_for(ray_temp))
    assert done.returncode == 1, done.stderr
    result = summary(done.stdout)
    assert (result["engine"], result["classified"], result["failed"]) == ("ray", 2, 1)
    assert len(current(cfg)) == 3
    # The cluster is the operator's: still there after the command (its GCS answers).
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        pass
    assert ray_processes(ray_temp)


def test_an_address_nobody_answers_at_is_one_line_and_exit_78(tmp_path: Path, tiny_model: Path,
                                                               ncm_dir: Path) -> None:
    folder = archive(tmp_path, ncm_dir, per_class=1)
    with socket.socket() as s:  # a port that was free a moment ago and that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config(tmp_path, tiny_model, ray_address=f"127.0.0.1:{port}")
    done = reprocess(folder, cfg, env_for("unreachable"), timeout=120)
    assert done.returncode == 78, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("semwatch: cannot join the Ray cluster at '127.0.0.1:")
    assert "[scale] ray_address" in lines[0] and "Connection refused" in lines[0]
    assert not current(cfg), "nothing classified, nothing written"
