"""End to end, over a real broker (amqtt and Mosquitto), with the real DAPs:
every flow of the use case, checked value for value against what each
simulated meter says it measured."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import cbor2
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from headend.requests import ReadSpec
from shared import gateway, obis, topics
from shared.backend import NATIVE
from sim.scenarios import plaintext_patterns, scan
from tests.brokers import KINDS
from tests.system import (
    DAY,
    System,
    expected_intervals,
    expected_registers,
    wait_until,
    yesterday,
)

DIRECT, BEHIND_AGG, BEHIND_ROUTER = [1001, 1002, 1003], [2001, 2002, 2003, 2004], \
    [3001, 3002, 3003, 3004]
GROUPS = {1: (DIRECT, None), 2: (BEHIND_AGG, 1), 3: (BEHIND_ROUTER, 2)}
DAPS = {1: ("aggregate", "utility"), 2: ("router", "fieldnet-contractor")}
TIMEOUT = 45.0


@pytest.fixture(scope="module", params=KINDS)
def system(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[System]:
    s = System(tmp_path_factory.mktemp(f"e2e-{request.param}"), request.param, GROUPS, DAPS)
    try:
        yield s
    finally:
        s.close()


def next_second() -> None:
    """A current reading is stored under (meter, quantity, second): a second
    read of the same meter in the same second is the same row, kept once
    (under the first request). Tests that re-read a meter start a new second."""
    time.sleep(1.0 - time.time() % 1.0 + 0.01)


def stored(s: System, meter: int, request: int) -> dict[tuple[int, int], int]:
    return {(q, t): v for q, t, v, _, r in s.store.readings(meter) if r == request}


def check_current(s: System, meter: int, request: int) -> None:
    rows = stored(s, meter, request)
    assert {q for q, _ in rows} == set(obis.CURRENT_REGISTERS), rows
    (ts,) = {t for _, t in rows}
    want = expected_registers(s.meter(meter), ts)
    assert {q: v for (q, _), v in rows.items()} == want


def check_interval(s: System, meter: int, request: int, start: int, end: int) -> None:
    """What the store holds for those intervals (from this request, or from
    an earlier read of the same rows: a re-read stores nothing twice) is
    what the meter measured."""
    assert s.store.request_status(request, meter) == "answered"
    got = {(q, t): v for q, t, v, _, _ in s.store.readings(meter, None, start, end)
           if q in (obis.INTERVAL_IMPORT, obis.INTERVAL_EXPORT)}
    assert got == expected_intervals(s.meter(meter), start, end)
    # the registers at the start of the range came too, and agree
    imp, exp, _ = s.meter(meter).core.profile.row(start // 900 - 1)
    regs = {q: v for q, t, v, _, _ in s.store.readings(meter, None, start, start + 1)}
    assert regs[obis.ENERGY_IMPORT] == imp and regs[obis.ENERGY_EXPORT] == exp


def read(s: System, meter: int, spec: ReadSpec):
    h = s.he.read(meter, spec)
    assert h.wait(TIMEOUT) == {meter: "answered"}
    return h


# -- on-demand and interval reads, every flow -----------------------------------------

@pytest.mark.parametrize("meter", [DIRECT[0], BEHIND_AGG[0], BEHIND_ROUTER[0]],
                         ids=["flow-A", "flow-B-aggregate", "flow-B-router"])
def test_on_demand_read(system: System, meter: int) -> None:
    h = read(system, meter, ReadSpec("current"))
    check_current(system, meter, h.request)


@pytest.mark.parametrize("meter", [DIRECT[1], BEHIND_AGG[1], BEHIND_ROUTER[1]],
                         ids=["flow-A", "flow-B-aggregate", "flow-B-router"])
def test_interval_read_14_to_20(system: System, meter: int) -> None:
    start, end = yesterday(14, 20)
    h = read(system, meter, ReadSpec("interval", start, end))
    check_interval(system, meter, h.request, start, end)
    assert len(stored(system, meter, h.request)) == 2 * 24 + 2  # first read of these rows


def test_interval_read_spanning_days(system: System) -> None:
    """From the day before yesterday 20:00 to today 02:00: more than 96 rows,
    so the meter answers in several parts, each sealed on its own."""
    meter = BEHIND_AGG[2]
    start, _ = yesterday(20, 20)
    start -= DAY
    end = int(time.time()) // DAY * DAY + 2 * 3600
    end = min(end, int(time.time()) // 900 * 900)
    h = read(system, meter, ReadSpec("interval", start, end))
    check_interval(system, meter, h.request, start, end)
    parts = system.store.db.execute("SELECT parts FROM requests WHERE request = ? AND meter = ?",
                                    (h.request, meter)).fetchone()[0]
    assert parts == -(-((end - start) // 900) // 96) and parts >= 2


# -- group reads, both ways ---------------------------------------------------------------

@pytest.mark.parametrize(("group", "mode"), [(2, "fanout"), (3, "fanout"), (3, "router")],
                         ids=["fanout-by-aggregating-dap", "fanout-by-router-dap",
                              "per-meter-through-router-dap"])
def test_group_read(system: System, group: int, mode: str) -> None:
    members = GROUPS[group][0]
    next_second()
    h = system.he.read_group(group, ReadSpec("current"), mode)
    assert h.wait(TIMEOUT) == {m: "answered" for m in members}
    for m in members:
        check_current(system, m, h.request)


def test_group_interval_read_with_direct_members(system: System) -> None:
    """A group with no DAP is read by sealed copies straight to each meter."""
    start, end = yesterday(14, 20)
    h = system.he.read_group(1, ReadSpec("interval", start, end), "fanout")
    assert h.wait(TIMEOUT) == {m: "answered" for m in DIRECT}
    for m in DIRECT:
        check_interval(system, m, h.request, start, end)


# -- delay tolerance ----------------------------------------------------------------------

def test_delay_tolerance_is_honoured_by_the_aggregating_dap(system: System) -> None:
    """With an 8 s tolerance, the aggregating DAP (10 s window) holds the
    group's answers and sends them together by the deadline: fewer bundles
    than answers, all of them stored, value for value. (The tolerance is
    long enough for every meter to have answered before it runs out, even
    on a busy machine.)"""
    ups = system.observe(topics.HEADEND, "headend-tolerance", [topics.dap_up(1)])
    next_second()
    h = system.he.read_group(2, ReadSpec("current", tolerance=8), "fanout")
    assert h.wait(TIMEOUT) == {m: "answered" for m in BEHIND_AGG}
    for m in BEHIND_AGG:
        check_current(system, m, h.request)
    wait_until(lambda: ups.count(topics.dap_up(1)) >= 1, 20, "the bundle")
    bundles = [gateway.decode(NATIVE, p) for t, p in ups.messages]
    carried = sum(len(b[3]) for b in bundles)
    assert carried >= len(BEHIND_AGG) and len(bundles) < len(BEHIND_AGG), bundles
    # the meters saw the tolerance too, inside the sealed request
    row = system.store.db.execute("SELECT tolerance FROM requests WHERE request = ?",
                                  (h.request,)).fetchone()
    assert row[0] == 8


# -- the third-party DAP sees only ciphertext ---------------------------------------------

def test_third_party_dap_sees_no_plaintext(system: System) -> None:
    """Subscribe with the router DAP's own account to everything it receives,
    and as the head-end to what it sends; read its meters every way; no
    reading value appears in any byte, while the head-end stores them all."""
    spy = system.observe(topics.dap_name(2), "d2-spy",
                         [topics.dap_meters_up(2), topics.dap_req(2), topics.dap_ack(2)])
    out = system.observe(topics.HEADEND, "headend-spy", [topics.dap_up(2)])
    start, end = yesterday(8, 14)
    for spec, mode in ((ReadSpec("current"), "fanout"), (ReadSpec("current"), "router"),
                       (ReadSpec("interval", start, end), "fanout")):
        h = system.he.read_group(3, spec, mode)
        assert h.wait(TIMEOUT) == {m: "answered" for m in BEHIND_ROUTER}
    time.sleep(0.5)
    seen = spy.payloads() + out.payloads()
    assert len(seen) >= 3 * 2 * len(BEHIND_ROUTER)
    patterns = plaintext_patterns(system.store, BEHIND_ROUTER)
    assert len(patterns) >= 20
    assert scan(seen, patterns) == 0
    # the scan finds them when they are there: the same data in clear
    clear = [cbor2.dumps([r for q, t, v, _, _ in system.store.readings(m) for r in (q, v)])
             for m in BEHIND_ROUTER] + [p for p in patterns[:10]]
    assert scan(clear, patterns[:10]) >= 10


# -- bad input on every topic --------------------------------------------------------------

@pytest.fixture(scope="module", params=KINDS)
def open_system(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[System]:
    """Small system on the same broker kind, for throwing bad input at."""
    s = System(tmp_path_factory.mktemp(f"bad-{request.param}"), request.param,
               {1: ([1101, 1102], None), 2: ([2101, 2102], 1)}, {1: ("aggregate", "utility")},
               history_days=1)
    try:
        yield s
    finally:
        s.close()


class Raw:
    """A client of an account that publishes whatever it is told to."""

    def __init__(self, s: System, username: str, client_id: str) -> None:
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv311)
        self.c.username_pw_set(username, s.password(username))
        self.c.connect(s.broker.host, s.broker.port, 30)
        self.c.loop_start()

    def send(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_bad_input_on_every_topic_is_rejected_and_counted(open_system: System) -> None:
    s = open_system
    counts0 = s.store.counts()
    n0 = s.store.reading_count()
    # a real envelope of meter 1101, to misuse
    sniff = s.observe(topics.HEADEND, "headend-sniff", [topics.meter_up(1101)])
    read(s, 1101, ReadSpec("current"))
    wait_until(lambda: sniff.count(topics.meter_up(1101)) >= 1, 10, "an envelope of m1101")
    real = sniff.messages[-1][1]
    n0 = s.store.reading_count()

    m1102 = Raw(s, "m1102", "m1102-bad")      # a meter's own account: only its own topic
    m1101 = Raw(s, "m1101", "m1101-bad")
    dap = Raw(s, "d1", "d1-bad")              # the DAP's account: d1/up
    he = Raw(s, topics.HEADEND, "headend-bad")  # the head-end's: requests downstream
    try:
        m1101.send(topics.meter_up(1101), b"\x13" + bytes(59))                # not an envelope
        m1101.send(topics.meter_up(1101), b"\x11" + (1101).to_bytes(4, "big")
                   + os.urandom(70))                                          # forged box
        m1101.send(topics.meter_up(1101), b"\x11" + os.urandom(2000))         # oversized
        m1102.send(topics.meter_up(1102), real)                               # wrong topic
        dap.send(topics.dap_up(1), cbor2.dumps({"readings": [1, 2, 3]}))     # wrong shape
        dap.send(topics.dap_up(1), gateway.bundle(NATIVE, 1, 7, [
            b"\x11" + (999999).to_bytes(4, "big") + os.urandom(60)]))       # unknown meter
        dap.send(topics.dap_up(1), gateway.bundle(NATIVE, 1, 8, [real]))    # wrong path
        dap.send(topics.dap_up(1), b"\x9f" * 100)                           # bad CBOR
        he.send(topics.meter_down(1101), os.urandom(80))                     # at a meter
        he.send(topics.dap_req(1), os.urandom(80))                           # at the DAP
    finally:
        for c in (m1102, m1101, dap, he):
            c.close()

    want = {"rejected:malformed": 3, "rejected:auth": 1, "rejected:oversized": 1,
            "rejected:mismatch": 2, "rejected:unknown-meter": 1}

    def grown() -> dict[str, int]:
        now = s.store.counts()
        return {k: now.get(k, 0) - counts0.get(k, 0) for k in want}

    wait_until(lambda: grown() == want, 20, f"rejections {want} (have {grown()})")
    assert s.store.reading_count() == n0, "bad input stored something"
    wait_until(lambda: s.meter(1101).core.stats.get("rejected", 0) >= 1, 10, "the meter's count")
    # every component keeps running and answering
    assert all(p.alive() for p in s.procs)
    next_second()
    for meter in (1101, 1102, 2101, 2102):
        h = read(s, meter, ReadSpec("current"))
        check_current(s, meter, h.request)
