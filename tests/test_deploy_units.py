"""The shipped systemd units: accepted by `systemd-analyze verify` where the
machine has it, and always parsed for the keys the service needs."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = {
    "meter-dap.service": ("/opt/meter-dap/bin/", "meter-dap"),
    "meter-headend.service": ("/opt/meter-headend/bin/", "meter-headend"),
    "meter-headend-worker@.service": ("/opt/meter-headend/bin/", "meter-headend"),
}


def parse(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # systemd keys are case-sensitive
    cp.read_string(path.read_text())
    return cp


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_has_what_the_service_needs(unit: str) -> None:
    cp = parse(ROOT / "deploy" / unit)
    svc = cp["Service"]
    assert svc["Restart"] == "on-failure"
    assert svc["User"] and svc["User"] != "root"
    assert svc["StateDirectory"]
    assert svc["StandardOutput"] == "journal"
    assert "--config" in svc["ExecStart"] or "--site" in svc["ExecStart"]
    assert cp["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in cp["Unit"]["After"]


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    prefix, script = UNITS[unit]
    real = Path(sys.executable).parent / script  # the console script of this install
    assert real.exists(), f"{real} missing: run `pip install -e .` (make deps)"
    text = (ROOT / "deploy" / unit).read_text().replace(prefix + script, str(real))
    copy = tmp_path / unit
    copy.write_text(text)
    if tool is None:
        # No systemd on this machine: the parse test above is the check.
        parse(copy)
        return
    proc = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True,
                          timeout=60)
    problems = [ln for ln in (proc.stdout + proc.stderr).splitlines() if unit in ln]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr
