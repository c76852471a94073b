"""TLS on every client: a host meter (sim.fleet, the firmware core behind
paho-mqtt), the DAP (`python -m dap`, a subprocess) and the head-end
(HeadEnd) all connect to Mosquitto's TLS listener, and a read works end to
end, straight to a meter (flow A) and through the DAP (flow B). A client
that trusts another CA is refused, with an error that says why.

The CA, the broker's certificate and their keys are made at test time by
tools/make-ca.sh (openssl) in the test's temporary folder; none is ever
committed. The site is provisioned with `tls_ca`, so the head-end's and the
DAP's configs and the meters' meter.json say TLS themselves: only the
broker's port is the TLS listener's, and nothing else listens there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from headend import provision
from headend.brokerconf import TlsFiles
from headend.config import HeadEndConfig
from headend.requests import ReadSpec
from headend.service import HeadEnd
from shared import topics
from shared.hostmqtt import MqttSetupError, client, connect
from sim.fleet import Fleet
from tests.waits import wait_until
from tests.brokers import Broker, free_port, start_mosquitto
from tests.dap_helpers import DapProcess, run_cli

REPO = Path(__file__).resolve().parent.parent
DAP = 1
BEHIND = 1001
DIRECT = 5001
WAIT = 45.0


def make_ca(out: Path) -> Path:
    """A throwaway CA and a broker certificate for localhost/127.0.0.1."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test CA: apt-get install openssl")
    r = subprocess.run(["bash", str(REPO / "tools" / "make-ca.sh"), str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for name in ("ca.crt", "broker.crt", "broker.key"):
        assert (out / name).is_file(), name
    assert (out / "broker.key").stat().st_mode & 0o077 == 0  # the key is 0600
    return out


def meter_json(site: Path, meter: int, ca: Path) -> str:
    """A provisioned meter.json, with its CA file where this host keeps it.
    Provisioning writes "ca": "ca.pem", the name of the file flashed next to
    it on the board; the host simulation opens it from its own folder."""
    doc = json.loads((site / "meters" / topics.meter_name(meter) / "meter.json").read_text())
    assert doc["broker"]["tls"] is True and doc["broker"]["ca"]
    doc["broker"]["ca"] = str(ca)
    return json.dumps(doc)


@dataclass
class Tls:
    tmp: Path
    site: Path
    ca: Path
    other_ca: Path
    broker: Broker
    tls_port: int


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[Tls]:
    ca = make_ca(tmp_path / "ca")
    other = make_ca(tmp_path / "other-ca")  # a CA the broker's certificate is not from
    tls_port = free_port()
    site = tmp_path / "site"
    provision.init(site, port=tls_port, tls_ca=ca / "ca.crt")
    provision.add_dap(site, DAP, "router")
    provision.add_meters(site, [BEHIND], dap=DAP)
    provision.add_meters(site, [DIRECT])
    broker = start_mosquitto(tmp_path / "broker", layout=provision.layout(site),
                             accounts=provision.accounts(site),
                             tls=TlsFiles(ca / "broker.crt", ca / "broker.key", tls_port))
    try:
        yield Tls(tmp_path, site, ca / "ca.crt", other / "ca.crt", broker, tls_port)
    finally:
        broker.stop()


def test_every_client_connects_over_tls_and_a_read_works(tls: Tls) -> None:
    cfg = HeadEndConfig.load(tls.site)
    # the provisioned configs ask for TLS on the TLS listener
    assert cfg.broker.tls_ca == tls.ca and cfg.broker.port == tls.tls_port
    dap_toml = tls.site / "daps" / topics.dap_name(DAP) / "dap.toml"
    assert f'tls_ca = "{tls.ca}"' in dap_toml.read_text()
    he = dap = fleet = watcher = None
    try:
        he = HeadEnd(cfg.db, cfg.secret_key, cfg.broker).start()
        assert isinstance(he.mqtt.socket(), ssl.SSLSocket)
        # the DAP's own check, then the DAP itself, from its provisioned config
        r = run_cli("--config", str(dap_toml), "--check", "--timeout", "10")
        assert r.returncode == 0 and "(TLS, as d1)" in r.stdout, r.stdout + r.stderr
        online = threading.Event()
        watcher = client(cfg.broker, "headend-watch")
        watcher.on_message = lambda c, u, m: (b'"online"' in m.payload) and online.set()
        watcher.on_connect = lambda c, *a: c.subscribe(topics.dap_state(DAP), 1)
        connect(watcher, cfg.broker)
        dap = DapProcess(dap_toml, tls.tmp / "dap.log").start()
        wait_until(lambda: dap.check_alive() and online.is_set(), WAIT,
                   "the DAP to announce itself online over TLS")
        fleet = Fleet()  # host and port from each meter.json: the TLS listener
        for m in (BEHIND, DIRECT):
            fleet.add(meter_json(tls.site, m, tls.ca))
        fleet.start()
        wait_until(lambda: all(fleet.meters[m].connected for m in (BEHIND, DIRECT)), WAIT,
                   "the meters to connect over TLS")
        for m in (BEHIND, DIRECT):
            assert isinstance(fleet.meters[m].client.socket(), ssl.SSLSocket)
        for m in (DIRECT, BEHIND):
            h = he.read(m, ReadSpec("current"))
            assert h.wait(WAIT) == {m: "answered"}, (m, dap.log())
        assert he.ingest.store.reading_count() >= 8
    finally:
        if fleet is not None:
            fleet.stop(goodbye=False)
        if dap is not None:
            dap.stop()
        if watcher is not None:
            watcher.disconnect()
            watcher.loop_stop()
        if he is not None:
            he.stop()


def test_a_client_with_the_wrong_ca_is_refused_with_a_clear_error(
        tls: Tls, caplog: pytest.LogCaptureFixture) -> None:
    cfg = HeadEndConfig.load(tls.site)
    wrong = dataclasses.replace(cfg.broker, port=tls.tls_port, tls_ca=tls.other_ca)
    # the head-end
    he = HeadEnd(cfg.db, cfg.secret_key, wrong)
    try:
        with pytest.raises(MqttSetupError, match="certificate verify failed") as e:
            he.start(timeout=10)
    finally:
        he.stop()
    assert f"{cfg.broker.host}:{tls.tls_port}" in str(e.value)
    print(f"\nhead-end with the wrong CA: {e.value}")
    # the DAP: its check and the service itself stop with the reason
    dap_toml = tls.site / "daps" / topics.dap_name(DAP) / "dap.toml"
    bad_toml = tls.tmp / "dap-wrong-ca.toml"
    bad_toml.write_text(dap_toml.read_text().replace(str(tls.ca), str(tls.other_ca))
                        .replace('state_dir = "state"', f'state_dir = "{tls.tmp / "st"}"')
                        .replace('password_file = "password"',
                                 f'password_file = "{dap_toml.parent / "password"}"'))
    r = run_cli("--config", str(bad_toml), "--check", "--timeout", "10")
    assert r.returncode == 1 and "certificate verify failed" in r.stderr, r.stdout + r.stderr
    dap = DapProcess(bad_toml, tls.tmp / "dap-wrong.log").start()
    try:
        dap.proc.wait(WAIT)
    finally:
        dap.kill()
    assert dap.proc.returncode == 1
    assert "certificate verify failed" in dap.log()
    # a host meter: it never connects, and says why on every attempt
    caplog.set_level(logging.DEBUG, logger="sim.fleet")
    fleet = Fleet()
    fleet.add(meter_json(tls.site, DIRECT, tls.other_ca))
    fleet.start()
    try:
        wait_until(lambda: "certificate verify failed" in caplog.text, WAIT,
                   "the meter's connection to fail verification")
        assert not fleet.meters[DIRECT].connected
    finally:
        fleet.stop(goodbye=False)
    # and the right CA on a plain client, for contrast: it connects
    right = dataclasses.replace(cfg.broker, port=tls.tls_port, tls_ca=tls.ca)
    ok = client(right, "headend-probe")
    connect(ok, right, 10)
    ok.disconnect()
    ok.loop_stop()
