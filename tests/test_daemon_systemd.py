"""The systemd unit passes `systemd-analyze verify` and keeps the GPU usable."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "semwatch.service"


def test_unit_settings() -> None:
    text = UNIT.read_text(encoding="utf-8")
    lines = {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}
    for needed in ("Type=notify", "Restart=on-failure", "RestartPreventExitStatus=78", "User=semwatch",
                   "DeviceAllow=/dev/nvidiactl rw", "DeviceAllow=char-nvidia-frontend rw"):
        assert needed in lines
    assert any(line.startswith("WatchdogSec=") for line in lines)
    for forbidden in ("PrivateDevices=yes", "MemoryDenyWriteExecute=yes"):
        assert forbidden not in lines


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at this environment's semwatch.
    semwatch = Path(sys.executable).parent / "semwatch"
    if not semwatch.exists():
        pytest.skip("semwatch console script not installed in this environment")
    unit = tmp_path / "semwatch.service"
    text = UNIT.read_text(encoding="utf-8").replace("/opt/semwatch/.venv/bin/semwatch", str(semwatch))
    unit.write_text(text, encoding="utf-8")
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
