"""The systemd unit: `systemd-analyze verify` clean, exposure <= 2.5, the GPU still reachable, and the
daemon still working inside the unit's sandbox (emulated here: no systemd as PID 1 in this place)."""

from __future__ import annotations

import ctypes.util
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "semwatch.service"
SEMWATCH = Path(sys.executable).parent / "semwatch"
MAX_EXPOSURE = 2.5

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed")


def _lines() -> list[str]:
    text = UNIT.read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _values(key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in _lines() if line.split("=", 1)[0] == key]


def test_unit_settings() -> None:
    lines = set(_lines())
    for needed in ("Type=notify", "Restart=on-failure", "RestartPreventExitStatus=78", "User=semwatch",
                   "WatchdogSec=120", "DeviceAllow=/dev/nvidiactl rw", "DeviceAllow=char-nvidia-frontend rw",
                   "SupplementaryGroups=video render", "SystemCallFilter=@system-service",
                   "SystemCallErrorNumber=EPERM", "PrivateUsers=yes", "PrivateNetwork=yes",
                   "IPAddressDeny=any", "RestrictAddressFamilies=AF_UNIX", "CapabilityBoundingSet=",
                   "NoNewPrivileges=yes"):
        assert needed in lines, needed
    # 75 = another daemon holds the database: a later restart is right, so it stays restartable.
    assert all("75" not in v.split() for v in _values("RestartPreventExitStatus"))
    # Each of these would take the NVIDIA GPU away (see INSTALL.md).
    for forbidden in ("PrivateDevices=yes", "MemoryDenyWriteExecute=yes", "ProcSubset=pid"):
        assert forbidden not in lines


def _unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's semwatch (verify checks it exists)."""
    if not SEMWATCH.exists():
        pytest.skip("semwatch console script not installed in this environment")
    unit = tmp_path / "semwatch.service"
    text = UNIT.read_text(encoding="utf-8").replace("/opt/semwatch/.venv/bin/semwatch", str(SEMWATCH))
    unit.write_text(text, encoding="utf-8")
    return unit


@needs_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "verify", str(_unit_copy(tmp_path))], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr  # clean: not even a warning


@needs_analyze
def test_systemd_analyze_security_exposure(tmp_path: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                           str(_unit_copy(tmp_path))], capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    if match is None and "offline" in proc.stderr:
        pytest.skip(f"this systemd-analyze cannot rate a unit file offline: {proc.stderr.strip()}")
    assert match is not None, proc.stdout + proc.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, proc.stdout


# --- the sandbox, emulated --------------------------------------------------------------------

_SECCOMP_EXEC = r'''
"""Load a seccomp filter (allowed system calls, socket() only for some families, default errno),
then exec the command: what systemd does for SystemCallFilter= and RestrictAddressFamilies=."""
import ctypes, ctypes.util, errno, os, sys

allowed_file, families, errno_name, *command = sys.argv[1:]
lib = ctypes.CDLL(ctypes.util.find_library("seccomp"), use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                       ctypes.c_void_p]
lib.seccomp_load.argtypes = [ctypes.c_void_p]


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


ALLOW, SCMP_CMP_EQ = 0x7FFF0000, 4
ctx = lib.seccomp_init(0x00050000 | getattr(errno, errno_name))
for name in open(allowed_file).read().split():
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr >= 0 and name != "socket":
        assert lib.seccomp_rule_add_array(ctx, ALLOW, nr, 0, None) == 0, name
nr_socket = lib.seccomp_syscall_resolve_name(b"socket")
for family in map(int, families.split(",")):
    cmp = ArgCmp(0, SCMP_CMP_EQ, family, 0)
    assert lib.seccomp_rule_add_array(ctx, ALLOW, nr_socket, 1, ctypes.byref(cmp)) == 0
assert lib.seccomp_load(ctx) == 0
os.execv(command[0], command)
'''


def _syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        item = line.strip().split(" ")[0] if line.strip() else ""
        if not item or item.startswith("#"):
            continue
        if not line[0].isspace() and item.startswith("@"):
            current = groups.setdefault(item, [])
        elif current is not None:
            current.append(item)
    return groups


def _expand(name: str, groups: dict[str, list[str]], seen: set[str] | None = None) -> set[str]:
    seen = set() if seen is None else seen
    if not name.startswith("@"):
        return {name}
    if name in seen:
        return set()
    seen.add(name)
    return set().union(*(_expand(m, groups, seen) for m in groups.get(name, [])))


def _unit_syscalls() -> set[str]:
    """The system calls the unit's SystemCallFilter= lines allow (allow list, then ~deny lists)."""
    groups = _syscall_groups()
    allowed: set[str] = set()
    for value in _values("SystemCallFilter"):
        deny = value.startswith("~")
        names = set().union(*(_expand(n, groups) for n in value.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    assert allowed, "the unit sets no SystemCallFilter allow list"
    return allowed


def _sandbox_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("emulating the unit's sandbox needs root (namespaces, dropping capabilities)")
    for tool in ("systemd-analyze", "unshare", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    if subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("cannot create a network namespace here")


@pytest.fixture
def sandbox_dir() -> Iterator[Path]:
    # Under /tmp, short (a notify socket path must fit 108 bytes), traversable by other users.
    folder = Path(tempfile.mkdtemp(prefix="swsbx", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _sandboxed(command: list[str], folder: Path) -> list[str]:
    """`command` as the unit runs it, minus what needs systemd itself: a private network namespace
    (PrivateNetwork=), no capabilities (CapabilityBoundingSet=, AmbientCapabilities=),
    NoNewPrivileges=, then the unit's system call filter and address families (seccomp)."""
    if ctypes.util.find_library("seccomp") is None:
        pytest.skip("libseccomp not installed")
    allowed = folder / "allowed-syscalls"
    allowed.write_text("\n".join(sorted(_unit_syscalls())), encoding="utf-8")
    launcher = folder / "seccomp_exec.py"
    launcher.write_text(_SECCOMP_EXEC, encoding="utf-8")
    families = ",".join(str(int(getattr(socket, name))) for value in _values("RestrictAddressFamilies")
                        for name in value.split())
    errno_name = (_values("SystemCallErrorNumber") or ["EPERM"])[-1]
    return ["unshare", "--net", "setpriv", "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all", "--",
            sys.executable, str(launcher), str(allowed), families, errno_name, *command]


def test_sandbox_emulation_enforces_the_filter(sandbox_dir: Path) -> None:
    """The emulation is real: what the unit forbids fails inside it."""
    _sandbox_tools()
    probe = ("import os, socket\n"
             "def refused(f):\n"
             "    try:\n        f()\n    except OSError as e:\n        return e.errno\n    return 0\n"
             "print(refused(lambda: os.setuid(0)), refused(lambda: socket.socket(socket.AF_INET)),\n"
             "      refused(lambda: socket.socket(socket.AF_UNIX).close()))\n")
    proc = subprocess.run(_sandboxed([sys.executable, "-c", probe], sandbox_dir), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "1", "0"]  # setuid (@privileged): EPERM; AF_INET: EPERM; AF_UNIX ok


def test_private_users_keeps_supplementary_group_access(sandbox_dir: Path) -> None:
    """Why PrivateUsers=yes does not take the GPU away: a device node that only a supplementary
    group may open (as /dev/nvidia* on sites with NVreg_DeviceFileMode=0660) stays openable inside a
    user namespace where that group is unmapped ("nogroup"); without the group it is refused."""
    _sandbox_tools()
    node = sandbox_dir / "fake-nvidiactl"
    try:
        os.mknod(node, 0o660 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers: harmless
    except OSError as exc:
        pytest.skip(f"cannot create a device node here: {exc}")
    os.chown(node, 0, 4242)
    node.chmod(0o660)
    opener = ["sh", "-c", f"id -G; : < {node} && echo opened"]

    def run(groups: list[str]) -> subprocess.CompletedProcess[str]:
        command = ["setpriv", "--reuid=12345", "--regid=12345", *groups, "--",
                   "unshare", "--user", "--map-current-user", *opener]
        return subprocess.run(command, capture_output=True, text=True, timeout=30)

    with_group = run(["--groups=4242"])
    if with_group.returncode != 0 and "unshare" in with_group.stderr:
        pytest.skip(f"no user namespaces here: {with_group.stderr.strip()}")
    assert with_group.stdout.split()[-1] == "opened", with_group.stderr
    assert "4242" not in with_group.stdout.split()[:-1]  # unmapped inside: shown as the overflow gid
    without = run(["--clear-groups"])
    assert "opened" not in without.stdout and "Permission denied" in without.stderr


@pytest.mark.slow
def test_daemon_runs_inside_the_units_sandbox(sandbox_dir: Path, tiny_model: Path, ncm_dir: Path) -> None:
    """The real daemon (CPU, small model) under the emulated sandbox: READY=1 reaches the notify
    socket across the private network namespace, a real micrograph gets a verdict, SIGTERM stops
    it with exit 0 (and STOPPING=1)."""
    _sandbox_tools()
    incoming = sandbox_dir / "incoming"
    (incoming / "lot1").mkdir(parents=True)
    state = sandbox_dir / "state"
    config = sandbox_dir / "config.toml"
    config.write_text(
        f'[watch]\nfolder = "{incoming}"\nsettle_seconds = 0.5\n'
        f'[store]\ndatabase = "{state / "semwatch.db"}"\nresults_csv = "{state / "results.csv"}"\n'
        f'[model]\npath = "{tiny_model}"\ndevice = "cpu"\n[report]\nfolder = "{state / "reports"}"\n',
        encoding="utf-8")
    notify_path = sandbox_dir / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(1.0)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
        proc = subprocess.Popen(_sandboxed([str(SEMWATCH), "watch", "--plain", "--config", str(config)],
                                           sandbox_dir), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            messages = _receive_until(notify, "READY=1", proc, 300)
            assert "READY=1" in messages
            shutil.copy(sorted((ncm_dir / "811_cycled").glob("*.jpg"))[0], incoming / "lot1" / "a.jpg")
            results = state / "results.csv"
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and "a.jpg" not in (
                    results.read_text(encoding="utf-8") if results.exists() else ""):
                time.sleep(0.2)
            assert "a.jpg" in results.read_text(encoding="utf-8")
            proc.terminate()  # the chain execs all the way: this pid is the daemon's
            assert proc.wait(60) == 0
            assert "STOPPING=1" in _receive_until(notify, "STOPPING=1", None, 5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            output = proc.stdout.read() if proc.stdout else ""
            if proc.stdout:
                proc.stdout.close()
    assert "Traceback" not in output, output
    assert "stopped (exit 0)" in output, output


def _receive_until(sock: socket.socket, wanted: str, proc: subprocess.Popen[str] | None,
                   timeout: float) -> str:
    """Datagrams from the notify socket until one holds `wanted` (or the process ends)."""
    received: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            received.append(sock.recv(4096).decode("utf-8", "replace"))
        except TimeoutError:
            if proc is not None and proc.poll() is not None:
                break
            continue
        if wanted in received[-1]:
            break
    return "\n".join(received)
