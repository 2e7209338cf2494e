"""Alerts (`[notify]`, apprise): a real daemon against a real HTTP receiver on loopback.

One message per failing sample, none repeated across a restart (the sent log beside the database),
results still prompt while the receiver hangs, and `semwatch notify --test`. The tiny model is
poor, so the failing samples expect a class that does not exist ("999"): whatever it finds fails.
"""

from __future__ import annotations

import http.server
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dbfixture import iso, make_database
from semwatch.config import Settings, load_settings
from semwatch.errors import ConfigError
from semwatch.liveness import Stuck
from semwatch.service.events import HealthTracker, SamplePoller, health_conditions
from semwatch.service.folderprobe import FolderState
from semwatch.service.notify import start_alerts, state_path
from semwatch.store import db
from test_daemon import Daemon, copy_image, ncm_images


class Receiver:
    """An HTTP server on loopback that records every JSON POST (apprise's json:// plugin)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        received = self.messages

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append({"path": self.path, **json.loads(body)})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="test-receiver")
        self.thread.start()

    @property
    def url(self) -> str:
        return f"json://127.0.0.1:{self.port}/alerts"

    def titles(self) -> list[str]:
        return [m["title"] for m in list(self.messages)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class HangingReceiver:
    """Accepts connections and never answers (a webhook host that hangs)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[float] = []
        self.conns: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._accept, name="test-hanging-receiver")
        self.thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted.append(time.time())
            self.conns.append(conn)

    def close(self) -> None:
        self._stop = True
        self.thread.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


class AlertDaemon(Daemon):
    """The test_daemon helper with `[notify]` (and a model setting that makes every image vote)."""

    def __init__(self, root: Path, model: Path, notify: dict[str, Any]) -> None:
        super().__init__(root, model, settle_seconds=0.2)
        text = self.config.read_text(encoding="utf-8")
        # Every image an `ok` vote (the tiny model is unsure of everything), every vote confident.
        text = text.replace("[model]\n", "[model]\nmin_confidence = 0.0\nunknown_threshold = 1e9\n")
        lines = ["[samples]", "pass_confidence = 0.0", "min_uniformity = 0.0", "[notify]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in notify.items()]
        self.config.write_text(text + "\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def alert_daemon(tmp_path: Path, tiny_model: Path) -> Iterator[Callable[..., AlertDaemon]]:
    made: list[AlertDaemon] = []

    def make(**notify: Any) -> AlertDaemon:
        d = AlertDaemon(tmp_path / f"d{len(made)}", tiny_model, notify)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def _sample(d: Daemon, ncm_dir: Path, name: str, cls: str, n: int, *, expected: str | None,
            skip: int = 0) -> list[Path]:
    folder = d.folder / name
    folder.mkdir(parents=True, exist_ok=True)
    if expected is not None:
        (folder / "expected.txt").write_text(expected + "\n", encoding="utf-8")
    return [copy_image(src, folder / f"{name}-{src.name}") for src in ncm_images(ncm_dir, cls, n, skip)]


def _wait(what: Callable[[], bool], timeout: float, d: Daemon, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"{message}\n{d.log_text()[-3000:]}"
        time.sleep(0.1)


def test_one_message_per_failing_sample_and_none_again_after_a_restart(
        alert_daemon: Callable[..., AlertDaemon], receiver: Receiver, ncm_dir: Path) -> None:
    d = alert_daemon(urls=[receiver.url], on=["sample_fail", "sample_uncertain", "daemon_degraded"],
                     sample_quiet_seconds=1.0, poll_seconds=0.2)
    bad1 = _sample(d, ncm_dir, "bad1", "333", 2, expected="999")
    bad2 = _sample(d, ncm_dir, "bad2", "811", 1, expected="999")
    plain = _sample(d, ncm_dir, "plain", "523", 1, expected=None)  # no expectation: verdict unknown
    d.start()
    d.wait_finished(bad1 + bad2 + plain)
    _wait(lambda: len(receiver.messages) >= 2, 60, d, f"two alerts expected, got {receiver.titles()}")
    time.sleep(1.0)  # nothing else is coming: the plain sample, a second image of bad1
    verdicts = {r["sample_id"]: r for r in d.query("SELECT * FROM samples")}
    assert verdicts["bad1"]["verdict"] == verdicts["bad2"]["verdict"] == "fail"
    assert verdicts["plain"]["verdict"] == "unknown"
    by_sample = {m["title"].split()[3]: m for m in receiver.messages}  # "semwatch [host]: sample X"
    assert sorted(by_sample) == ["bad1", "bad2"] and len(receiver.messages) == 2, receiver.titles()
    # The message describes the sample when it had been quiet for sample_quiet_seconds: normally
    # both images; on a loaded machine the second may come later (then it is not sent again).
    message = by_sample["bad1"]["message"]
    m = re.search(r"expected 999, found (\S+) \(confidence ([0-9.]+)\)\n(\d+) image\(s\)", message)
    assert m is not None, message
    listed = [line.strip() for line in message.splitlines() if line.startswith("  /")]
    assert 1 <= len(listed) == int(m.group(3)) <= 2 and set(listed) <= {str(p) for p in bad1}
    if len(listed) == 2:
        assert m.group(1) == verdicts["bad1"]["predicted_class"]
        assert m.group(2) == f"{verdicts['bad1']['confidence']:.2f}"
    print(f"bad1 announced with {len(listed)} of 2 images")
    assert by_sample["bad1"]["path"] == "/alerts" and "FAIL" in by_sample["bad1"]["title"]
    rc, _ = d.stop()
    assert rc == 0, d.log_text()[-2000:]
    state = json.loads(state_path(d.database).read_text(encoding="utf-8"))
    assert set(state["sent"]) == {"sample_fail:bad1", "sample_fail:bad2"}

    # After a restart: bad1 gets another image (its verdict recomputed, still fail): not sent again;
    # a new failing sample is.
    d.start()
    more = _sample(d, ncm_dir, "bad1", "333", 1, expected="999", skip=2)
    bad3 = _sample(d, ncm_dir, "bad3", "622", 1, expected="999")
    d.wait_finished(more + bad3)
    _wait(lambda: len(receiver.messages) >= 3, 60, d, f"bad3's alert expected, got {receiver.titles()}")
    time.sleep(1.5)
    assert d.query("SELECT n_images, verdict FROM samples WHERE sample_id = 'bad1'") == [
        {"n_images": 3, "verdict": "fail"}]
    assert sorted(t.split()[3] for t in receiver.titles()) == ["bad1", "bad2", "bad3"]
    # The daemon degraded (its watch folder gone) and recovered: one message each.
    away = d.folder.with_name("incoming.away")
    d.folder.rename(away)
    _wait(lambda: len(receiver.messages) >= 4, 30, d, f"no degraded alert: {receiver.titles()}")
    away.rename(d.folder)
    _wait(lambda: len(receiver.messages) >= 5, 30, d, f"no recovery alert: {receiver.titles()}")
    degraded, recovered = receiver.titles()[3:]
    assert "degraded: watch folder gone: " in degraded and str(d.folder) in degraded
    assert recovered.endswith(": recovered")
    rc, _ = d.stop()
    assert rc == 0
    assert len(receiver.messages) == 5


def test_a_hanging_receiver_does_not_slow_the_pipeline(alert_daemon: Callable[..., AlertDaemon],
                                                        ncm_dir: Path) -> None:
    hang = HangingReceiver()
    try:
        d = alert_daemon(urls=[f"json://127.0.0.1:{hang.port}/alerts"], on=["sample_fail"],
                         sample_quiet_seconds=0.0, poll_seconds=0.2, timeout_seconds=60.0, retries=2)
        first = _sample(d, ncm_dir, "bad1", "333", 1, expected="999")
        d.start()
        d.wait_finished(first)
        _wait(lambda: bool(hang.accepted), 20, d, "the alert never reached the receiver")
        # The send thread now waits up to 60 s for an answer; more failing samples arrive meanwhile.
        t0 = time.time()
        later = [p for i in range(2, 5) for p in _sample(d, ncm_dir, f"bad{i}", "811", 1, expected="999",
                                                         skip=i)]
        rows = d.wait_finished(later, 40)
        took = time.time() - t0
        assert len(hang.accepted) == 1  # still stuck in the first send
        assert all(r["status"] == "ok" for r in rows)
        rc, stop_took = d.stop()
        assert rc == 0 and stop_took < 10.0, d.log_text()[-2000:]
        assert "not sent at stop" in d.log_text()
        print(f"3 images while the receiver hung: {took:.1f} s; stop {stop_took:.1f} s")
        assert took < 30.0
    finally:
        hang.close()


def test_notify_test_command(cli: Any, tmp_path: Path, receiver: Receiver,
                             caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[notify]\nurls = ["{receiver.url}"]\n', encoding="utf-8")
    run = cli("notify", "--test")
    assert run.code == 0 and run.out.strip() == f"json://127.0.0.1:{receiver.port} (urls[0]): delivered"
    assert [m["title"].startswith(f"semwatch [{socket.gethostname()}]: test message")
            for m in receiver.messages] == [True]
    with socket.socket() as closed:  # a port nobody listens on: refused at once
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    config.write_text(f'[notify]\nurls = ["{receiver.url}", "json://127.0.0.1:{dead}/x"]\n'
                      "timeout_seconds = 2.0\n", encoding="utf-8")
    run = cli("notify", "--test", "--json")
    assert run.code == 1
    assert [json.loads(line)["delivered"] for line in run.out.splitlines()] == [True, False]
    config.write_text("[notify]\nurls = []\n", encoding="utf-8")
    run = cli("notify", "--test")
    assert run.code == 78 and "no alert targets configured" in run.err
    config.write_text('[notify]\nurls = ["nosuchscheme://x"]\n', encoding="utf-8")
    run = cli("notify", "--test")
    assert run.code == 78 and "urls[0] is not a URL apprise can send to" in run.err
    assert "nosuchscheme" not in caplog.text  # a URL may hold a token: never logged


def _dead_port() -> int:
    with socket.socket() as closed:  # a port nobody listens on: refused at once
        closed.bind(("127.0.0.1", 0))
        return int(closed.getsockname()[1])


def _secret_urls(port: int) -> tuple[list[str], list[str]]:
    """Alert URLs with a secret in every part, and the secrets. The loopback ones go to `port`
    (nobody listens); the others name hosts that `offline` does not resolve."""
    urls = [
        f"json://ju1:jpw1@127.0.0.1:{port}/api/webhooks/JSONSECRET1?token=QTOKEN1",
        f"form://127.0.0.1:{port}/hooks/FORMSECRET2",
        f"xml://127.0.0.1:{port}/XMLSECRET3",
        f"ntfys://127.0.0.1:{port}/secret-topic-4",
        "ntfy://ntfy.lab.example/semwatchTopic5",
        f"gotify://127.0.0.1:{port}/GOTIFYTOKEN6",
        f"matrix://mxuser7:mxpass7@127.0.0.1:{port}/!room7:lab.example",
        f"mailtos://semwatch8:mailpw8@lab.example?smtp=127.0.0.1&port={port}&to=team8@lab.example",
        "tgram://123456789:AAHbotSecret9/-100200300",
        "discord://4174216298/DISCORDTOKEN10",
        "slack://T1JJ3T3L2/A1BRTD4JD/SLACKSECRET11/#general",
        "pover://userkey12@apptoken12",
        f"json://localhost:{port}/LOCALSECRET13",
        "ntfy://bare-secret-topic14",
    ]
    secrets = ["ju1", "jpw1", "JSONSECRET1", "QTOKEN1", "webhooks", "FORMSECRET2", "XMLSECRET3",
               "secret-topic-4", "semwatchTopic5", "GOTIFYTOKEN6", "mxuser7", "mxpass7", "room7",
               "semwatch8", "mailpw8", "team8", "123456789", "AAHbotSecret9", "100200300", "4174216298",
               "DISCORDTOKEN10", "T1JJ3T3L2", "A1BRTD4JD", "SLACKSECRET11", "general", "userkey12",
               "apptoken12", "LOCALSECRET13", "bare-secret-topic14"]
    return urls, secrets


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fault of a machine without a route out: names other than loopback do not resolve (so no
    test message leaves this machine for Telegram, Discord, ...)."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in ("127.0.0.1", "localhost", "::1", b"127.0.0.1", b"localhost"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_no_secret_in_notify_test_output_or_alert_logs(cli: Any, tmp_path: Path, offline: None,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Issue 18 item 3: `notify --test` (plain and JSON) and the "failed; retry" / "not delivered"
    lines of a real send show each URL as `urls.mask_url` does, with its place in the list; not one
    secret of any scheme appears, even with every logger at DEBUG."""
    caplog.set_level(logging.DEBUG)
    urls, secrets = _secret_urls(_dead_port())
    config = tmp_path / "config.toml"
    config.write_text(f"[notify]\nurls = {json.dumps(urls)}\ntimeout_seconds = 2.0\n", encoding="utf-8")
    run = cli("notify", "--test")
    assert run.code == 1
    lines = run.out.splitlines()
    assert len(lines) == len(urls) and all(line.endswith(": FAILED") for line in lines)
    assert lines[0] == f"json://127.0.0.1:{urls[0].split(':')[3].split('/')[0]} (urls[0]): FAILED"
    assert lines[8] == "tgram://<hidden> (urls[8]): FAILED"
    assert lines[4] == "ntfy://ntfy.lab.example (urls[4]): FAILED"
    shown = run.out + run.err
    run = cli("notify", "--test", "--json")
    assert run.code == 1
    assert [json.loads(line)["delivered"] for line in run.out.splitlines()] == [False] * len(urls)
    shown += run.out + run.err

    database = tmp_path / "semwatch.db"
    make_database(database, now=datetime.now(UTC), images=[{}])
    settings = load_settings(None, environ={}, overrides={
        "store": {"database": str(database)},
        "notify": {"urls": urls, "poll_seconds": 0.1, "retries": 1, "timeout_seconds": 2.0}})
    alerts = start_alerts(settings)
    assert alerts is not None
    try:
        alerts.health({"folder": "watch folder gone: /export"})
        deadline = time.monotonic() + 60
        while "not delivered" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text[-3000:]
            time.sleep(0.1)
    finally:
        alerts.stop()
    assert "alert daemon_degraded:folder to json://127.0.0.1:" in caplog.text
    assert "failed; retry 1/1" in caplog.text and "tgram://<hidden> (urls[8])" in caplog.text
    shown += caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    leaked = [s for s in secrets if s in shown]
    assert not leaked, leaked


def test_notify_settings_are_checked() -> None:
    ok = load_settings(None, environ={}, overrides={"notify": {"on": ["sample_fail"]}})
    assert ok.notify.on == ("sample_fail",)
    for bad, message in ((["sample_fial"], "[notify] on[0] must be one of"),):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_settings(None, environ={}, overrides={"notify": {"on": bad}})
    with pytest.raises(ConfigError, match="not an apprise URL"):
        load_settings(None, environ={}, overrides={"notify": {"urls": ["example.org"]}})
    with pytest.raises(ConfigError, match="unknown_share must be between 0 and 1"):
        load_settings(None, environ={}, overrides={"notify": {"unknown_share": 1.5}})


def test_poller_sample_quiet_period_and_unknown_spike(tmp_path: Path) -> None:
    """Against a real database: a failing sample is reported once it has been quiet; the unknown
    share crossing the threshold is reported once, and again only after it fell below."""
    now = datetime.now(UTC)
    database = tmp_path / "semwatch.db"
    images = [{"path": f"/x/s1/{i}.tif", "status": "unknown" if i >= 6 else "ok",
               "processed_at": iso(now + timedelta(milliseconds=i))} for i in range(10)]
    make_database(database, now=now, images=images, samples=[
        {"sample_id": "s1", "verdict": "fail", "expected": "811", "updated_at": iso(now)}])
    settings = load_settings(None, environ={}, overrides={"notify": {
        "unknown_window": 10, "unknown_share": 0.4, "sample_quiet_seconds": 5.0}}).notify
    clock = [100.0]
    poller = SamplePoller(settings, watermark="", in_spike=False, clock=lambda: clock[0])
    conn = db.connect(database, readonly=True)
    try:
        events = poller.poll(conn)
        assert [e.key for e in events] == [f"unknown_spike:{images[-1]['processed_at']}"]
        assert "40% of the last 10 images" in events[0].title
        assert poller.resume_from() == (iso(now), [])  # s1 waits for its quiet period
        clock[0] += 5.0
        events = poller.poll(conn)
        assert [e.key for e in events] == ["sample_fail:s1"]
        assert "expected 811, found 622_pristine" in events[0].body and "/x/s1/0.tif" in events[0].body
        assert poller.poll(conn) == []  # nothing new
    finally:
        conn.close()


def test_health_tracker_reports_degraded_and_recovered(tmp_path: Path) -> None:
    tracker = HealthTracker("lab-pc")
    folder = tmp_path / "gone"
    cond = health_conditions(stuck=[Stuck("reader-0", 95.0, "reading /x/a.tif")], database="disk I/O error",
                             folder=FolderState(folder, False, 0.0, False), observer_restarts=0)
    assert set(cond) == {"stuck:reader-0", "database", "folder"}
    first = tracker.update(cond)
    assert {e.key for e in first} == {"daemon_degraded:stuck:reader-0", "daemon_degraded:database",
                                      "daemon_degraded:folder"}
    assert tracker.update(cond) == []  # still degraded: nothing new
    back = FolderState(folder, True, 0.0, False)
    later = tracker.update(health_conditions(stuck=[], database=None, folder=back, observer_restarts=1))
    assert {e.key for e in later} == {"daemon_degraded:observer", "daemon_recovered:stuck:reader-0",
                                      "daemon_recovered:database", "daemon_recovered:folder"}
    assert all(e.kind == "daemon_degraded" for e in later)
    frozen = health_conditions(stuck=[], database=None, folder=FolderState(folder, True, 12.4, True),
                               observer_restarts=0)
    assert frozen == {"folder_unreachable": f"watch folder unreachable: {folder} has not answered for 12 s "
                                            "(a frozen network share?)"}


def test_alerts_in_process_each_event_once_also_after_a_restart(tmp_path: Path, receiver: Receiver) -> None:
    """`Alerts` as the daemon drives it: a report and a degraded/recovered condition are sent once,
    a second `Alerts` on the same database (a restart) does not repeat them, and an old failing
    sample already in the database when alerts are first enabled is not replayed."""
    database = tmp_path / "semwatch.db"
    make_database(database, now=datetime.now(UTC), images=[{}],
                  samples=[{"sample_id": "old", "verdict": "fail"}])
    settings = load_settings(None, environ={}, overrides={
        "store": {"database": str(database)},
        "notify": {"urls": [receiver.url], "poll_seconds": 0.1, "sample_quiet_seconds": 0.0}})
    report = tmp_path / "reports" / "2026-11-25" / "report.html"
    for _ in range(2):
        alerts = start_alerts(settings)
        assert alerts is not None
        try:
            alerts.report_ready(date(2026, 11, 25), report)
            alerts.report_ready(date(2026, 11, 25), report)  # queued or sent already: not again
            alerts.health({"folder": "watch folder gone: /export"})
            alerts.health({"folder": "watch folder gone: /export"})
            alerts.health({})
            deadline = time.monotonic() + 10
            while len(receiver.messages) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # and the old failing sample stays unreported
        finally:
            alerts.stop()
        assert len(receiver.messages) == 3, receiver.titles()
    titles = receiver.titles()
    assert titles[0] == f"semwatch [{socket.gethostname()}]: report for 2026-11-25 is ready"
    assert str(report) in receiver.messages[0]["message"]
    assert "degraded: watch folder gone: /export" in titles[1] and titles[2].endswith("recovered")
    assert set(json.loads(state_path(database).read_text(encoding="utf-8"))["sent"]) == {
        "report_ready:2026-11-25", "daemon_degraded:folder", "daemon_recovered:folder"}


def test_the_report_scheduler_tells_of_each_report_written(settings: Settings) -> None:
    """The scheduler's catch-up writes a missed night and hands its page to `on_written` (the
    daemon's `Alerts.report_ready`); a report that fails is not announced."""
    from semwatch.service.scheduler import ReportScheduler

    day = date(2026, 11, 23)
    make_database(settings.store.database, now=datetime(2026, 11, 24, tzinfo=UTC),
                  images=[{"processed_at": iso(datetime(2026, 11, 23, 12, tzinfo=UTC))}])
    told: list[tuple[date, Path]] = []
    sched = ReportScheduler(settings, on_written=lambda d, p: told.append((d, p)))
    written = sched.catch_up(datetime(2026, 11, 24, 6, tzinfo=UTC))
    assert [p.day for p in written] == [day] and told == [(day, written[0].html)]
    assert told[0][1].is_file()


def test_many_failing_samples_at_once_become_one_digest(tmp_path: Path, receiver: Receiver) -> None:
    """A re-classification run (another process) touches 12 failing samples at once: one digest
    message, and each sample counts as announced (not sent again on its next update)."""
    database = tmp_path / "semwatch.db"
    now = datetime.now(UTC)
    make_database(database, now=now, images=[{}], samples=[
        {"sample_id": f"lot{i:02d}", "verdict": "fail", "expected": "811"} for i in range(12)])
    settings = load_settings(None, environ={}, overrides={
        "store": {"database": str(database)},
        "notify": {"urls": [receiver.url], "poll_seconds": 0.1, "sample_quiet_seconds": 0.0}})
    alerts = start_alerts(settings)
    assert alerts is not None
    try:
        time.sleep(0.3)
        writer = db.connect(database)
        try:
            with writer:
                writer.execute("UPDATE samples SET updated_at = ?", (iso(now + timedelta(seconds=1)),))
        finally:
            writer.close()
        deadline = time.monotonic() + 10
        while not receiver.messages and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        alerts.stop()
    assert len(receiver.messages) == 1, receiver.titles()
    assert receiver.titles() == [f"semwatch [{socket.gethostname()}]: 12 samples failed or are uncertain"]
    assert receiver.messages[0]["message"].count("FAIL (expected 811, found 622_pristine)") == 12
    sent = json.loads(state_path(database).read_text(encoding="utf-8"))["sent"]
    assert {f"sample_fail:lot{i:02d}" for i in range(12)} <= set(sent)
