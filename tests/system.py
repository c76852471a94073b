"""A whole provisioned system for end-to-end tests: a site made by
headend.provision (keys, accounts, ACLs, configs), a real broker with those
accounts, the real DAPs as subprocesses, an in-process head-end and a Fleet
of host meters running the firmware core. Everything is stopped on exit."""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from firmware.flash import Flash
from headend import provision
from headend.config import HeadEndConfig
from headend.service import HeadEnd
from headend.store import Store
from shared import obis, topics
from sim.fleet import Fleet, SimMeter
from sim.procs import PYTHON, Proc
from tests.brokers import Broker, start_broker
from tests.waits import wait_until

DAY = 86400


class Observer:
    """Records every message on some topics, with one account's rights."""

    def __init__(self, broker: Broker, username: str, password: str, client_id: str,
                 subs: list[str]) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv311)
        self.c.username_pw_set(username, password)
        self.c.on_message = self._msg
        self.c.on_subscribe = lambda *a: self.ready.set()
        self.c.on_connect = lambda c, *_: c.subscribe([(s, 1) for s in subs])
        self.c.connect(broker.host, broker.port, 30)
        self.c.loop_start()
        assert self.ready.wait(15), f"observer {client_id} could not subscribe"

    def _msg(self, c, u, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def count(self, topic: str) -> int:
        with self.lock:
            return sum(1 for t, _ in self.messages if t == topic)

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [p for _, p in self.messages]

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class System:
    """groups: {group: (meter ids, dap or None)}; daps: {dap: (mode, operator)}."""

    def __init__(self, workdir: Path, kind: str, groups: dict[int, tuple[list[int], int | None]],
                 daps: dict[int, tuple[str, str]], *, window: float = 10.0,
                 history_days: float = 3.0) -> None:
        self.workdir = workdir
        self.kind = kind
        self.groups = groups
        self.site = workdir / "site"
        self.procs: list[Proc] = []
        self.observers: list[Observer] = []
        self.broker: Broker | None = None
        self.he: HeadEnd | None = None
        self.fleet: Fleet | None = None
        try:
            self._start(daps, window, history_days)
        except BaseException:
            self.close()
            raise

    def _start(self, daps, window, history_days) -> None:
        provision.init(self.site)
        for dap, (mode, operator) in daps.items():
            provision.add_dap(self.site, dap, mode, operator)
        for grp, (ids, dap) in self.groups.items():
            provision.add_meters(self.site, ids, dap=dap, group=grp)
        self.broker = start_broker(self.kind, self.workdir / "broker",
                                   layout=provision.layout(self.site),
                                   accounts=provision.accounts(self.site))
        cfg = HeadEndConfig.load(self.site)
        self.cfg = cfg
        self.settings = dataclasses.replace(cfg.broker, port=self.broker.port)
        for dap in daps:
            home = self.site / "daps" / topics.dap_name(dap)
            toml = home / "dap.toml"
            text = re.sub(r"^port = \d+$", f"port = {self.broker.port}", toml.read_text(),
                          flags=re.M)
            toml.write_text(text.replace("window = 10.0", f"window = {window}"))
            self.procs.append(Proc(f"dap{dap}", [PYTHON, "-m", "dap", "--config", str(toml)],
                                   cwd=home, log=self.workdir / f"dap{dap}.log"))
        self.he = HeadEnd(cfg.db, cfg.secret_key, self.settings, retries=cfg.retries).start()
        self.store = Store(cfg.db)
        state = self.observe(topics.HEADEND, "headend-sysstate", ["+/state"])
        wait_until(lambda: len({t for t, _ in state.messages}) >= len(daps), 30,
                   "the DAPs to report online")
        self.fleet = Fleet(host=self.broker.host, port=self.broker.port)
        for p in sorted((self.site / "meters").glob("m*/meter.json")):
            self.fleet.add(p.read_text(), Flash(str(p.parent / "flash")),
                           history_days=history_days, base=p.parent)
        self.fleet.start()
        n = sum(len(ids) for ids, _ in self.groups.values())
        wait_until(lambda: self.online() == n, 60, f"{n} meters online")

    def online(self) -> int:
        return self.store.online_count()

    def password(self, username: str) -> str:
        return self.broker.accounts[username].password

    def observe(self, username: str, client_id: str, subs: list[str]) -> Observer:
        o = Observer(self.broker, username, self.password(username), client_id, subs)
        self.observers.append(o)
        return o

    def meter(self, meter: int) -> SimMeter:
        return self.fleet.meters[meter]

    def close(self) -> None:
        if self.fleet is not None:
            self.fleet.stop()
        if self.he is not None:
            self.he.stop()
        for o in self.observers:
            o.stop()
        for p in self.procs:
            p.stop()
        if self.broker is not None:
            self.broker.stop()


# -- what a meter itself says it measured ----------------------------------------

def expected_registers(m: SimMeter, ts: int) -> dict[int, int]:
    """The registers the meter reported at `ts`, rebuilt from its own profile
    and metrology (the row before ts's interval, plus the part of that
    interval up to ts)."""
    core, p = m.core, m.core.period
    k = ts // p
    imp, exp, _ = core.profile.row(k - 1)
    di, de = m.source.peek(k, ts - k * p)
    return {obis.ENERGY_IMPORT: (imp + di) & 0xFFFFFFFF,
            obis.ENERGY_EXPORT: (exp + de) & 0xFFFFFFFF,
            obis.POWER: m.source.power(ts), obis.VOLTAGE: m.source.voltage(ts)}


def expected_intervals(m: SimMeter, start: int, end: int) -> dict[tuple[int, int], int]:
    """(quantity, interval start) -> Wh, from the meter's own profile rows."""
    core, p = m.core, m.core.period
    out = {}
    for k in range(start // p, end // p):
        imp, exp, _ = core.profile.row(k)
        pimp, pexp, _ = core.profile.row(k - 1)
        out[(obis.INTERVAL_IMPORT, k * p)] = (imp - pimp) & 0xFFFFFFFF
        out[(obis.INTERVAL_EXPORT, k * p)] = (exp - pexp) & 0xFFFFFFFF
    return out


def yesterday(hour_from: int, hour_to: int) -> tuple[int, int]:
    day = int(time.time()) // DAY * DAY - DAY
    return day + hour_from * 3600, day + hour_to * 3600
