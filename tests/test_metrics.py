"""Prometheus metrics (`[metrics] listen`): scraped over loopback from a real daemon, values checked
against its database; the settings; the systemd drop-in that opens loopback for them."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dbfixture import make_database
from semwatch.config import load_settings
from semwatch.errors import ConfigError
from test_daemon import Daemon, copy_image, ncm_images
from test_daemon_systemd import _unit_copy

REPO = Path(__file__).resolve().parents[1]
DROPINS = REPO / "systemd" / "semwatch.service.d"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    # Every sample names the instrument ([instrument] name: the host name by default); the
    # assertions below then leave the label out.
    assert {s.labels.get("instrument") for s in samples} == {socket.gethostname()}
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "instrument"))): s.value
            for s in samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def metrics_daemon(tmp_path: Path, tiny_model: Path) -> Iterator[Callable[[int], Daemon]]:
    made: list[Daemon] = []

    def make(port: int) -> Daemon:
        d = Daemon(tmp_path / "d", tiny_model, settle_seconds=0.2)
        with open(d.config, "a", encoding="utf-8") as fh:
            fh.write(f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def test_metrics_scraped_from_a_running_daemon_match_its_database(
        metrics_daemon: Callable[[int], Daemon], ncm_dir: Path) -> None:
    port = free_port()
    d = metrics_daemon(port)
    # Three results of an older model already in the database: outdated for this daemon.
    old = [{"path": f"/old/s0/{i}.tif", "model_id": "an-older-model", "sample_id": "s0"} for i in range(3)]
    make_database(d.database, now=datetime.now(UTC), images=old, samples=[{"sample_id": "s0"}])
    images = [copy_image(src, d.folder / cls / src.name) for cls in ("333", "811")
              for src in ncm_images(ncm_dir, cls, 2)]
    d.start()
    d.wait_finished(images)
    deadline = time.monotonic() + 15  # database values are cached for 5 s
    while True:
        samples = scrape(port)
        in_db = {r["status"]: r["n"] for r in d.query(
            "SELECT status, count(*) AS n FROM images WHERE current = 1 GROUP BY status")}
        if all(value(samples, "semwatch_images", status=s) == n for s, n in in_db.items()):
            break
        assert time.monotonic() < deadline, (in_db, samples)
        time.sleep(0.5)
    rows = d.rows("current = 1 AND model_id != 'an-older-model'")
    model_id = rows[0]["model_id"]
    info = {dict(labels)["device"]: v for (name, labels), v in samples.items()
            if name == "semwatch_model_info" and dict(labels).get("model_id") == model_id
            and dict(labels).get("site") == ""}
    assert list(info.values()) == [1.0] and next(iter(info)).startswith("cpu")  # "cpu, <runtime>"
    assert value(samples, "semwatch_outdated_results") == 3
    assert sum(v for (name, _), v in samples.items() if name == "semwatch_results_total") == len(images)
    assert value(samples, "semwatch_verdict_latency_seconds_count") == len(images)
    assert 0 < value(samples, "semwatch_verdict_latency_seconds_sum") < 60 * len(images)
    assert value(samples, "semwatch_tiles_classified_total") == sum(r["n_tiles"] for r in rows)
    assert value(samples, "semwatch_inference_batch_tiles_sum") == sum(r["n_tiles"] for r in rows)
    assert value(samples, "semwatch_inference_batch_images_sum") == len(images)
    verdicts = {r["verdict"]: r["n"] for r in d.query(
        "SELECT verdict, count(*) AS n FROM samples GROUP BY verdict")}
    assert all(value(samples, "semwatch_samples", verdict=v) == n for v, n in verdicts.items())
    for stage in ("settling", "queued", "reading", "prepared", "inference", "writer"):
        assert value(samples, "semwatch_queue_depth", stage=stage) >= 0
    assert value(samples, "process_resident_memory_bytes") > 0
    heartbeat = datetime.fromisoformat(d.query("SELECT heartbeat_at FROM daemon")[0]["heartbeat_at"])
    assert abs(value(samples, "semwatch_last_heartbeat_timestamp_seconds") - heartbeat.timestamp()) < 10
    rc, _ = d.stop()
    assert rc == 0, d.log_text()[-2000:]
    with pytest.raises(urllib.error.URLError):  # the server went with the daemon
        scrape(port)
    assert "metrics on http://127.0.0.1:" in d.log_text()


def test_metrics_listen_is_checked() -> None:
    def listen(text: str, allow_remote: bool = False) -> tuple[str, int] | None:
        return load_settings(None, environ={}, overrides={
            "metrics": {"listen": text, "allow_remote": allow_remote}}).metrics.address()

    assert listen("") is None
    assert listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert listen("127.8.0.1:9464") == ("127.8.0.1", 9464)
    assert listen("[::1]:9464") == ("::1", 9464)
    assert listen("localhost:9464") == ("localhost", 9464)
    for bad in ("9464", "localhost", "127.0.0.1:", ":9464", "127.0.0.1:99999", "127.0.0.1:http", "::9464",
                "host:", ":99999", "[::1", "[::1]", "[::1]9464", "::1:9464", "[nothost]:9464", "1.2.3:9464",
                "a b:9464", "127.0.0.1:0", "127.0.0.1:９４６４"):
        with pytest.raises(ConfigError, match=r"\[metrics\] listen must be host:port"):
            listen(bad)
        with pytest.raises(ConfigError, match=r"\[metrics\] listen must be host:port"):
            listen(bad, allow_remote=True)
    for remote in ("0.0.0.0:9464", "[::]:9464", "192.168.1.20:9464", "[fe80::1]:9464", "metrics-host:9464",
                   "sem.lab.example:9464"):
        with pytest.raises(ConfigError, match=r"\[metrics\] listen = .* not a loopback .*allow_remote"):
            listen(remote)
        assert listen(remote, allow_remote=True) is not None


def test_a_remote_listen_address_is_logged_at_start(caplog: pytest.LogCaptureFixture) -> None:
    """With `allow_remote`, the daemon's metrics start serving on 0.0.0.0 and say so as a warning."""
    from semwatch.service.metrics import start_metrics

    port = free_port()
    settings = load_settings(None, environ={}, overrides={
        "metrics": {"listen": f"0.0.0.0:{port}", "allow_remote": True}})
    metrics = start_metrics(settings, model_id="m", device="cpu", depths=lambda: {})
    assert metrics is not None
    try:
        assert metrics.port == port
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert warnings == [f"metrics on http://0.0.0.0:{port}/metrics, NOT loopback ([metrics] allow_remote "
                            "= true): anyone who can reach this port reads them, without authentication"]
    finally:
        metrics.stop()


def _merged(dropin: Path, tmp_path: Path) -> Path:
    """The unit with a drop-in's [Service] lines appended (what systemd merges), for verify."""
    unit = _unit_copy(tmp_path)
    extra = [line for line in dropin.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith(("#", "["))]
    unit.write_text(unit.read_text(encoding="utf-8").replace(
        "\n[Install]", "\n" + "\n".join(extra) + "\n\n[Install]"), encoding="utf-8")
    return unit


@pytest.mark.parametrize("name", ["metrics-localhost.conf", "alerts.conf"])
def test_network_dropins(name: str, tmp_path: Path) -> None:
    """The unit has no network; each drop-in opens only what its feature needs, and verifies clean."""
    lines = [line.strip() for line in (DROPINS / name).read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "[Service]"
    assert "PrivateNetwork=no" in lines
    families = lines.index("RestrictAddressFamilies=")  # reset first, then the full list
    assert lines[families + 1] == "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"
    assert "IPAddressAllow=localhost" in lines and "IPAddressDeny=" not in lines  # the unit's deny stays
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    proc = subprocess.run(["systemd-analyze", "verify", str(_merged(DROPINS / name, tmp_path))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


def test_the_model_metrics_follow_a_switched_model(tmp_path: Path) -> None:
    """After a promotion the daemon serves another model: `semwatch_model` names it and the outdated
    count is taken against it (not the model the daemon started with)."""
    from semwatch.service.metrics import start_metrics

    rows: list[dict[str, object]] = [{"model_id": "old"}, {"model_id": "old", "path": "/export/s1/b.tif"},
                                     {"model_id": "new", "path": "/export/s1/c.tif"}]
    make_database(tmp_path / "semwatch.db", now=datetime.now(UTC), images=rows)
    port = free_port()
    settings = load_settings(None, environ={}, overrides={
        "metrics": {"listen": f"127.0.0.1:{port}"}, "store": {"database": str(tmp_path / "semwatch.db")}})
    metrics = start_metrics(settings, model_id="old", device="cpu", depths=lambda: {})
    assert metrics is not None
    try:
        before = scrape(port)
        assert value(before, "semwatch_model_info", model_id="old", device="cpu", site="") == 1
        assert value(before, "semwatch_outdated_results") == 1
        metrics.switched("new")
        after = scrape(port)
        assert value(after, "semwatch_model_info", model_id="new", device="cpu", site="") == 1
        assert ("semwatch_model_info", (("device", "cpu"), ("model_id", "old"), ("site", ""))) not in after
        assert value(after, "semwatch_outdated_results") == 2
    finally:
        metrics.stop()
