"""headend/flashing.py: the firmware bundle and the flash command, without
hardware (mpremote is replaced by a recorder, or made to be missing)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from headend import flashing


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return flashing.build(tmp_path_factory.mktemp("bundle") / "out" / "firmware")


def test_flashing_build_bundle_layout_and_size(report: dict) -> None:
    out = Path(report["out"])
    names = {p for p, _ in report["files"]}
    assert "main.py" in names and (out / "main.py").read_text().startswith("#")
    assert not (out / "firmware" / "main.mpy").exists()  # main.py stays source
    for mod in ("meter", "app", "board", "mqtt", "outbox", "config", "flash", "state",
                "profile", "metrology"):
        assert f"firmware/{mod}.mpy" in names
    assert {"shared/box.mpy", "shared/x25519.mpy", "shared/cbor.mpy", "shared/channel.mpy",
            "shared/__init__.mpy"} <= names
    # Only what the firmware imports: never the CPython-only MQTT helper,
    # and nothing the meter does not use.
    assert not any("hostmqtt" in n for n in names)
    assert "shared/gateway.mpy" not in names and "shared/group.mpy" not in names
    assert not any(n.endswith(".py") and n != "main.py" for n in names)
    assert report["total"] == sum(n for _, n in report["files"])
    assert report["fits"] and report["blocks"] <= 256 * 1024
    assert report["total"] < report["blocks"]
    for p in out.rglob("*.mpy"):
        head = flashing.mpy_header(p.read_bytes()[:4])
        assert head["version"] == 6 and head["arch"] == 0
    print("\n" + flashing.format_report(report))


def test_flashing_build_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert flashing.main_build(["--out", str(tmp_path / "fw")]) == 0
    text = capsys.readouterr().out
    assert "fits" in text and "main.py" in text
    with pytest.raises(SystemExit) as e:
        flashing.main_build(["--help"])
    assert e.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_flashing_shared_closure_refuses_host_modules(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from shared import hostmqtt\n")
    with pytest.raises(flashing.BuildError, match="host-only"):
        flashing.shared_closure([bad])
    assert "hostmqtt" not in flashing.shared_closure()


@pytest.fixture
def meter_json(tmp_path: Path) -> Path:
    m, h = PrivateKey.generate(), PrivateKey.generate()
    doc = {"meter": 7, "secret_key": bytes(m).hex(),
           "headend_public_key": bytes(h.public_key).hex(), "dap": None, "group": None,
           "period": 900, "broker": {"host": "127.0.0.1", "port": 1883, "username": "m7",
                                     "password": "x", "tls": False, "ca": None}}
    path = tmp_path / "site" / "meters" / "m7" / "meter.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(doc))
    return path


def test_flashing_missing_mpremote_is_a_clear_error(meter_json: Path, tmp_path: Path,
                                                     monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(flashing.sys, "executable", str(tmp_path / "nopython" / "python"))
    with pytest.raises(flashing.FlashError, match="mpremote was not found: install it"):
        flashing.flash("/dev/ttyUSB0", meter_json)
    with pytest.raises(flashing.FlashError, match="mpremote not found at"):
        flashing.flash("/dev/ttyUSB0", meter_json, mpremote="no-such-mpremote")


def test_flashing_bad_port_is_a_clear_error(meter_json: Path, tmp_path: Path) -> None:
    with pytest.raises(flashing.FlashError, match="no device at /dev/ttyNOPE9"):
        flashing.flash("/dev/ttyNOPE9", meter_json)
    plain = tmp_path / "not-a-tty"
    plain.write_text("")
    with pytest.raises(flashing.FlashError, match="not a serial device"):
        flashing.flash(str(plain), meter_json)


def test_flashing_bad_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(flashing.FlashError, match="not found: provision the meter first"):
        flashing.flash("/dev/null", tmp_path / "meters" / "m1" / "meter.json")
    bad = tmp_path / "meter.json"
    bad.write_text('{"meter": 1}')
    with pytest.raises(flashing.FlashError, match="secret_key"):
        flashing.flash("/dev/null", bad)


def test_flashing_runs_mpremote_in_order(meter_json: Path, tmp_path: Path, report: dict) -> None:
    """With a stand-in for mpremote: the commands, and the board's data/
    directory never touched. /dev/null stands in for the serial device."""
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    done = flashing.flash("/dev/null", meter_json, bundle=report["out"], mpremote="true",
                          run=run, log=lambda s: None, settle=0)
    assert done["meter"] == 7
    first, second = calls
    assert first[1:] == ["connect", "/dev/null", "reset"]
    assert second[1:5] == ["connect", "/dev/null", "mip", "install"]
    assert second[5] == flashing.UMQTT_SIMPLE
    text = " ".join(second)
    assert f"{report['out']}/firmware :" in text and f"{report['out']}/shared :" in text
    assert f"{meter_json} :meter.json" in text and text.endswith("reset")
    clean = second[second.index("exec") + 1]
    assert "'firmware', 'shared'" in clean and "data" not in clean
    # mpremote failures are explained
    def failing(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "failed to access /dev/null")
    with pytest.raises(flashing.FlashError, match="no device at /dev/null"):
        flashing.flash("/dev/null", meter_json, bundle=report["out"], mpremote="true",
                       run=failing, log=lambda s: None, settle=0)


def test_flashing_cli_help_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        flashing.main_flash(["--help"])
    assert e.value.code == 0
    assert "--meter" in capsys.readouterr().out
    code = flashing.main_flash(["--meter", "99", "--port", "/dev/ttyNOPE9",
                                "--site", str(tmp_path), "--mpremote", "true"])
    assert code == 1
    assert "provision the meter first" in capsys.readouterr().err


def test_flashing_real_mpremote_reports_a_missing_board(meter_json: Path, report: dict) -> None:
    """The installed mpremote against a device that is no board (/dev/null,
    which every Linux and macOS machine has: never a reason to skip)."""
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    with pytest.raises(flashing.FlashError) as e:
        flashing.flash("/dev/null", meter_json, bundle=report["out"], log=lambda s: None,
                       settle=0)
    assert "/dev/null" in str(e.value)
