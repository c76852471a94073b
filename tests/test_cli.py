"""The head-end's command line, as a user runs it: provision a site, start
the embedded broker and `serve` from it, read meters with `read` while
`serve` ingests, then `meters`, `success` and `export`. Every command has
--help, and errors say what to do next."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware.flash import Flash
from shared import obis
from sim.fleet import Fleet
from sim.procs import Proc, free_port, wait_port
from tests.dap_helpers import headend_cli as cli
from tests.system import expected_intervals, expected_registers, wait_until, yesterday

ROOT = Path(__file__).resolve().parent.parent
CMDS = ["provision", "broker", "serve", "read", "meters", "success", "export", "firmware",
        "flash"]


@pytest.mark.parametrize("cmd", CMDS)
def test_every_command_has_help(cmd: str) -> None:
    out = cli(cmd, "--help").stdout
    assert out.startswith("usage:") and "--" in out


def test_provision_subcommands_have_help() -> None:
    for what in ("init", "dap", "meters"):
        assert cli("provision", what, "--help").stdout.startswith("usage:")


@pytest.fixture(scope="module")
def running(tmp_path_factory) -> Iterator[dict]:
    """A site provisioned through the CLI, its broker, `serve`, a DAP and
    the site's meters running the firmware core."""
    tmp = tmp_path_factory.mktemp("cli")
    site = tmp / "site"
    port = free_port()
    cli("provision", "init", "--site", str(site), "--broker-port", str(port))
    cli("provision", "dap", "--site", str(site), "--id", "1", "--mode", "aggregate")
    cli("provision", "meters", "--site", str(site), "--ids", "1001-1003", "--group", "1")
    cli("provision", "meters", "--site", str(site), "--ids", "2001-2003", "--dap", "1",
        "--group", "2")
    procs = [Proc("broker", [sys.executable, "-m", "headend", "broker", "--site", str(site)],
                  cwd=ROOT, log=tmp / "broker.log", ready="listening")]
    fleet = None
    try:
        assert wait_port("127.0.0.1", port)
        procs.append(Proc("serve", [sys.executable, "-m", "headend", "serve", "--site", str(site),
                                   "--stats-interval", "5"],
                          cwd=ROOT, log=tmp / "serve.log", ready="serving"))
        home = site / "daps" / "d1"
        procs.append(Proc("dap", [sys.executable, "-m", "dap", "--config", str(home / "dap.toml")],
                          cwd=home, log=tmp / "dap.log", ready="connected to the broker"))
        fleet = Fleet()
        for p in sorted((site / "meters").glob("m*/meter.json")):
            fleet.add(p.read_text(), Flash(str(p.parent / "flash")), history_days=2,
                      base=p.parent)
        fleet.start()

        def online() -> int:
            out = json.loads(cli("meters", "--site", str(site), "--json").stdout)
            return sum(r["online"] for r in out)

        wait_until(lambda: online() == 6, 60, "6 meters online")
        yield {"site": site, "fleet": fleet, "procs": procs, "tmp": tmp}
    finally:
        if fleet is not None:
            fleet.stop()
        for p in reversed(procs):
            p.stop()


def test_provisioned_secrets_are_private(running: dict) -> None:
    site = running["site"]
    secrets = [site / "headend.key", site / "headend.pass", site / "daps" / "d1" / "password",
               *sorted((site / "meters").glob("m*/meter.json"))]
    for path in secrets:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # the registry keeps public keys only: no meter's secret key is in the store
    db = (site / "headend.db").read_bytes()
    for p in sorted((site / "meters").glob("m*/meter.json")):
        sk = bytes.fromhex(json.loads(p.read_text())["secret_key"])
        assert sk not in db


def test_read_while_serve_ingests(running: dict) -> None:
    site, fleet = running["site"], running["fleet"]
    out = json.loads(cli("read", "--site", str(site), "--meter", "1001", "--json").stdout)
    (r,) = out
    assert r["status"] == "answered"
    regs = {obis.CODES[q][0]: q for q in obis.CODES}
    got = {regs[x["obis"]]: x["value"] for x in r["readings"]}
    (ts,) = {x["time"] for x in r["readings"]}
    assert got == expected_registers(fleet.meters[1001], ts)


def test_read_via_dap_and_interval_range(running: dict) -> None:
    site, fleet = running["site"], running["fleet"]
    start, end = yesterday(14, 20)
    iso = time.strftime("%Y-%m-%dT%H:%M", time.gmtime(start))
    iso_end = time.strftime("%Y-%m-%dT%H:%M", time.gmtime(end))
    out = json.loads(cli("read", "--site", str(site), "--meter", "2001", "--via-dap",
                         "--from", iso, "--to", iso_end, "--json").stdout)
    (r,) = out
    assert r["status"] == "answered"
    codes = {obis.CODES[q][0]: q for q in obis.CODES}
    got = {(codes[x["obis"]], x["time"]): x["value"] for x in r["readings"]
           if codes[x["obis"]] in (obis.INTERVAL_IMPORT, obis.INTERVAL_EXPORT)}
    assert got == expected_intervals(fleet.meters[2001], start, end)


def test_group_reads_both_ways_with_tolerance(running: dict) -> None:
    site = running["site"]
    for extra in ([], ["--router"], ["--tolerance", "2"]):
        out = json.loads(cli("read", "--site", str(site), "--group", "2", "--json",
                             *extra).stdout)
        assert sorted(r["meter"] for r in out) == [2001, 2002, 2003]
        assert all(r["status"] == "answered" for r in out), out
        time.sleep(1.0 - time.time() % 1.0 + 0.01)  # a new second: new current readings


def test_human_output_of_read(running: dict) -> None:
    out = cli("read", "--site", str(running["site"]), "--meter", "1002").stdout
    assert out.startswith("meter 1002: answered")
    assert "1.0.1.8.0" in out and "Wh" in out


def test_meters_success_and_export(running: dict) -> None:
    site, fleet = running["site"], running["fleet"]
    out = json.loads(cli("meters", "--site", str(site), "--json").stdout)
    by = {r["meter"]: r for r in out}
    assert set(by) == {1001, 1002, 1003, 2001, 2002, 2003}
    assert by[1001]["online"] and by[1001]["last_reading"] is not None
    assert by[2001]["dap"] == 1 and by[1001]["dap"] is None
    assert cli("meters", "--site", str(site)).stdout.splitlines()[0].split()[0] == "meter"
    success = json.loads(cli("success", "--site", str(site), "--json").stdout)
    assert set(success["groups"]) == {"1", "2"}
    assert "read success" in cli("success", "--site", str(site), "--meters").stdout
    # export: the interval rows read above, as CSV
    start, end = yesterday(14, 20)
    text = cli("export", "--site", str(site), "--meter", "2001", "--from", str(start),
               "--to", str(end)).stdout
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 48
    want = expected_intervals(fleet.meters[2001], start, end)
    codes = {obis.CODES[q][0]: q for q in obis.CODES}
    assert {(codes[r["obis"]], int(r["interval_start"])): int(r["value"]) for r in rows} == want
    outfile = running["tmp"] / "m2001.csv"
    cli("export", "--site", str(site), "--meter", "2001", "--from", str(start), "--to",
        str(end), "--out", str(outfile))
    assert outfile.read_text() == text


@pytest.mark.parametrize(("args", "says"), [
    (["read", "--meter", "4242"], "not provisioned"),
    (["read", "--meter", "1001", "--via-dap"], "not behind a DAP"),
    (["read", "--meter", "1001", "--from", "2026-11-23T14:00"], "both --from and --to"),
    (["read", "--meter", "1001", "--from", "yesterday", "--to", "today"], "is not a time"),
    (["read", "--meter", "1001", "--tolerance", "70000"], "tolerance is 0 to 65535"),
    (["read", "--group", "99"], "has no meters"),
    (["export", "--meter", "4242", "--from", "0", "--to", "1"], "not provisioned"),
    (["provision", "init"], "already holds a site"),
    (["provision", "meters", "--ids", "1001"], "already provisioned"),
    (["provision", "meters", "--ids", "5000", "--dap", "9"], "provision dap --id 9"),
    (["provision", "meters", "--ids", "x-y"], "write them like"),
    (["provision", "dap", "--id", "5", "--mode", "aggregate", "--operator", "acme"],
     "router mode"),
])
def test_errors_name_the_problem_and_the_fix(running: dict, args: list[str], says: str) -> None:
    proc = cli(*args[:1], *(args[1:2] if args[0] == "provision" else []), "--site",
               str(running["site"]), *(args[2:] if args[0] == "provision" else args[1:]),
               check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_missing_site_says_how_to_create_it(tmp_path: Path) -> None:
    proc = cli("meters", "--site", str(tmp_path / "nowhere"), check=False)
    assert proc.returncode == 1 and "provision init" in proc.stderr


def test_second_serve_refuses_to_start(running: dict) -> None:
    proc = cli("serve", "--site", str(running["site"]), check=False, timeout=60)
    assert proc.returncode == 1 and "another head-end process" in proc.stderr
    assert os.path.exists(running["site"] / "headend.lock")
