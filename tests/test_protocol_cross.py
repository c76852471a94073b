"""The protocol across the runtime boundary: the CPython head-end (NATIVE
backend: PyNaCl + cbor2) against the firmware Meter core running under the
real MicroPython (WebAssembly port, PURE backend).

Keys are generated here at run time. The head-end's own request code
(headend.requests.Requester, on a scratch store) seals on-demand, interval
and group requests; the DAP's code (dap.inbound) splits group and forward
messages; the meters, under MicroPython, connect (will + birth) and handle
every delivery; CPython opens every answer and checks it field by field
against what firmware.metrology.SimulatedLoad says the meter measured.
The same run also opens envelopes CPython sealed, and encodes inner messages
that must equal cbor2's bytes. One MicroPython run serves the whole module.
"""

from __future__ import annotations

import os
import random

import cbor2
import nacl.bindings
import pytest
from nacl.public import PrivateKey

from dap import inbound
from firmware.metrology import SimulatedLoad
from headend.requests import ReadSpec, Requester
from headend.store import Store
from shared import messages, topics
from shared.backend import NATIVE
from shared.channel import Channel
from shared.const import (
    DEATH_ORDERLY,
    DEATH_WILL,
    DOWN,
    MAX_ROWS,
    MAX_U32,
    S_MALFORMED,
    S_NO_DATA,
    T_BIRTH,
    T_CURRENT,
    T_DEATH,
    T_INTERVAL,
    T_READ_CURRENT,
    T_READ_INTERVAL,
    T_STATUS,
    UP,
    VERSION,
)
from tests.mpy_harness import run_json
# the padding as the vector generator counts it, with cbor2, apart from shared/
from tools.make_envelope_vectors import padding as reference_padding

NOW = 1_767_225_600  # 2026-01-01T00:00:00Z
HISTORY = NOW - 86400  # the simulated meters come with a day of history
ISSUE = NOW + 400  # when the head-end issues its requests
AT = ISSUE + 3  # when the meters handle them
DAP = 9
GROUP = 55
METERS = {  # id -> (seed of its simulated load, DAP or None)
    MAX_U32: (7, None),  # flow A, the largest id
    4002: (9, DAP),  # flow B, a home with solar
    4003: (13, DAP),  # flow B
}

MPY_SCRIPT = r"""
import binascii, json, os
from shared.backend import PURE as B
from shared.channel import Channel
from shared import messages
from shared.errors import ProtocolError
from firmware.flash import Flash
from firmware.meter import Meter
from firmware.metrology import SimulatedLoad

def unhex(s):
    return binascii.unhexlify(s)

def tohex(b):
    return binascii.hexlify(b).decode()

with open("/proj/in.json") as f:
    job = json.load(f)
hpk = unhex(job["headend_public"])
out = {"meters": {}, "encoded": [], "opened": []}
meters = {}
for m in job["meters"]:
    key = B.beforenm(hpk, unhex(m["secret"]))
    meter = Meter(m["id"], key, B, Flash("/flash/m%d" % m["id"]), SimulatedLoad(m["seed"]))
    meter.catch_up(job["now"], history_from=job["history"])
    will, birth = meter.connect(job["now"], os.urandom)
    meters[m["id"]] = (meter, key)
    out["meters"][str(m["id"])] = {"will": tohex(will), "birth": tohex(birth), "answers": []}
for d in job["deliveries"]:
    meter = meters[d["meter"]][0]
    got = meter.handle(unhex(d["payload"]), d["at"], os.urandom)
    out["meters"][str(d["meter"])]["answers"].append([tohex(w) for w in got])
for m in job["meters"]:
    meter = meters[m["id"]][0]
    out["meters"][str(m["id"])]["stats"] = meter.stats
    out["meters"][str(m["id"])]["goodbye"] = tohex(meter.goodbye(os.urandom))
for e in job["encode"]:
    out["encoded"].append(tohex(messages.encode(B, e[0], e[1], e[2], e[3], e[4])))
channels = {}
for o in job["open"]:
    name = o["channel"]
    if name not in channels:
        channels[name] = Channel(B, meters[o["meter"]][1], o["meter"], o["sends"], None)
    try:
        mtype, ctr, body = channels[name].open(unhex(o["wire"]))
        out["opened"].append({"ok": [mtype, ctr, body]})
    except ProtocolError as e:
        out["opened"].append({"error": e.reason})
with open("/proj/out.json", "w") as f:
    json.dump(out, f)
"""


class Seq:
    def __init__(self, start=0):
        self.value = start

    def next(self):
        v = self.value
        self.value += 1
        return v


def expected_registers(seed, now, history=HISTORY):
    """The registers a SimulatedLoad meter reports at `now`, computed here."""
    src = SimulatedLoad(seed)
    k_now = now // 900
    imp, exp = src.initial()
    for k in range(min(k_now, history // 900), k_now):
        di, de = src.interval(k)
        imp, exp = (imp + di) & MAX_U32, (exp + de) & MAX_U32
    di, de = src.peek(k_now, now - k_now * 900)
    return [1, (imp + di) & MAX_U32, 2, (exp + de) & MAX_U32, 3, src.power(now), 4,
            src.voltage(now)]


def _random_bodies(rng):
    """Valid inner messages with values around every CBOR length boundary."""
    edge = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**31, MAX_U32 - 1, MAX_U32]

    def u():
        return rng.choice(edge) if rng.random() < 0.5 else rng.randrange(0, MAX_U32 + 1)

    out = []
    for _ in range(40):
        rows = rng.randrange(0, MAX_ROWS + 1)
        small = [rng.randrange(0, 70000) for _ in range(rows)]
        flags = [x for r in sorted(rng.sample(range(rows), min(rows, 5))) for x in (r, 1 + r % 15)]
        for mtype, body in (
            (T_CURRENT, [u(), u(), [1, u(), 2, u(), 3, u(), 4, u()]
                         + ([5, u()] if u() % 2 else [])]),
            (T_INTERVAL, [u(), 0, 1, 900 * rng.randrange(0, MAX_U32 // 900), 900, u(), u(),
                          small, small[::-1], flags]),
            (T_STATUS, [u(), rng.randrange(1, 5), u()]),
            (T_BIRTH, [u(), u(), u(), 900, u()]),
            (T_DEATH, [u(), rng.randrange(0, 2)]),
            (T_READ_CURRENT, [u(), u(), u()]),
            (T_READ_INTERVAL, [u(), u(), u(), 0, u() or 1]),
        ):
            out.append([u(), messages.direction_of(mtype), mtype, u(), body])
    return out


@pytest.fixture(scope="module")
def exchange(tmp_path_factory):
    headend = PrivateKey.generate()
    keys = {m: PrivateKey.generate() for m in METERS}
    pairwise = {m: nacl.bindings.crypto_box_beforenm(bytes(k.public_key), bytes(headend))
                for m, k in keys.items()}

    # The head-end's registry and its request code.
    store = Store(tmp_path_factory.mktemp("headend") / "store.db")
    store.add_dap(DAP, "aggregate")
    store.add_meters([(m, bytes(keys[m].public_key), dap, GROUP if dap else None, 900)
                      for m, (_, dap) in METERS.items()])
    req = Requester(store, bytes(headend), NATIVE)
    direct, far = MAX_U32, 4002
    deliveries = []  # what reaches each meter, in order
    issued = {}

    def deliver(out, name):
        """Publish an Outgoing: straight to a meter, or through the DAP."""
        if out.topic.startswith("d"):
            split = inbound.request(NATIVE, DAP, out.payload)
            assert not split.rejected
            for d in split.deliveries:
                assert topics.parse(d.topic) == ("down", d.meter, DAP)
                deliveries.append({"meter": d.meter, "payload": d.payload.hex(), "at": AT,
                                   "name": name})
        else:
            leaf, meter, dap = topics.parse(out.topic)
            assert leaf == "down" and dap is None
            deliveries.append({"meter": meter, "payload": out.payload.hex(), "at": AT,
                               "name": name})

    spec_current = ReadSpec("current")
    spec_interval = ReadSpec("interval", start=NOW - 6 * 3600, end=NOW)
    for name, call in (
        ("current-A", lambda: req.unicast(direct, spec_current, ISSUE)),
        ("interval-A", lambda: req.unicast(direct, spec_interval, ISSUE)),
        ("current-B", lambda: req.unicast(far, spec_current, ISSUE)),
        ("interval-B-2days", lambda: req.unicast(
            far, ReadSpec("interval", start=HISTORY - 86400, end=NOW + 3600), ISSUE)),
        ("group-current", lambda: req.group_fanout(GROUP, ReadSpec("current", tolerance=60),
                                                   ISSUE)),
        ("group-interval", lambda: req.group_fanout(GROUP, spec_interval, ISSUE)),
    ):
        got = call()
        issued[name] = got
        for out in got.messages:
            deliver(out, name)
    # A replay of the first request; a request for one meter delivered to
    # another; an authentic but malformed request (from > to), sealed with
    # Channel(DOWN) directly.
    first = deliveries[0]
    deliveries.append({**first, "name": "replay"})
    deliveries.append({"meter": 4003, "payload": deliveries[2]["payload"], "at": AT,
                       "name": "other-meter"})
    down = Channel(NATIVE, pairwise[direct], direct, DOWN, Seq(10**6))
    deliveries.append({"meter": direct, "at": AT, "name": "malformed", "payload": down.seal(
        T_READ_INTERVAL, [77, AT + 10, 0, NOW, NOW - 900], os.urandom(24))[1].hex()})

    # CPython seals, MicroPython opens: downlink at the meter side, uplink at
    # the head-end side, with tampered, reflected, replayed and misaddressed
    # copies.
    m = 4003
    opens, want = [], []
    he = Channel(NATIVE, pairwise[m], m, DOWN, Seq(5000))
    as_meter = Channel(NATIVE, pairwise[m], m, UP, Seq(70))
    samples = [
        (he, T_READ_CURRENT, [1, AT, 0]),
        (he, T_READ_INTERVAL, [2, AT, 600, NOW - 3600, NOW]),
        (as_meter, T_CURRENT, [3, NOW, [1, 10, 2, 0, 3, 400, 4, 2301]]),
        (as_meter, T_INTERVAL, [4, 0, 1, NOW, 900, 5, 6, [1, 2], [0, 0], [1, 4]]),
        (as_meter, T_STATUS, [5, S_NO_DATA, HISTORY]),
        (as_meter, T_BIRTH, [2, 69, NOW, 900, HISTORY]),
        (as_meter, T_DEATH, [2, DEATH_ORDERLY]),
    ]
    for sender, mtype, body in samples:
        ctr, wire = sender.seal(mtype, body, os.urandom(24))
        receiving = "meter" if sender is he else "headend"
        sends = UP if sender is he else DOWN
        job = {"meter": m, "sends": sends, "channel": receiving, "wire": wire.hex()}
        bad = bytearray(wire)
        bad[len(bad) // 2] ^= 0x20
        opens += [dict(job, wire=bytes(bad).hex()), job, job,
                  dict(job, channel="reflect-%d" % sends, sends=UP if sends == DOWN else DOWN)]
        want += [{"error": "auth"}, {"ok": [mtype, ctr, body]}, {"error": "duplicate"},
                 {"error": "direction"}]
    named_other = Channel(NATIVE, pairwise[m], 4002, DOWN, Seq(9000))
    opens.append({"meter": m, "sends": UP, "channel": "meter",
                  "wire": named_other.seal(T_READ_CURRENT, [1, AT, 0], os.urandom(24))[1].hex()})
    want.append({"error": "mismatch"})

    encode = _random_bodies(random.Random(os.urandom(8)))
    payload = {
        "headend_public": bytes(headend.public_key).hex(),
        "meters": [{"id": mid, "seed": seed, "secret": bytes(keys[mid]).hex()}
                   for mid, (seed, _) in METERS.items()],
        "now": NOW, "history": HISTORY,
        "deliveries": deliveries, "encode": encode, "open": opens,
    }
    answers = run_json(MPY_SCRIPT, payload, heap="2048k")
    store.close()
    return {"pairwise": pairwise, "issued": issued, "deliveries": deliveries,
            "answers": answers, "encode": encode, "open_want": want}


def _answers(ex, name, meter):
    """The opened answers of `meter` to the delivery called `name`."""
    mine = [d for d in ex["deliveries"] if d["meter"] == meter]
    got = ex["answers"]["meters"][str(meter)]["answers"]
    assert len(got) == len(mine)
    ch = ex.setdefault("channels", {}).get(meter)
    if ch is None:
        ch = ex["channels"][meter] = Channel(NATIVE, ex["pairwise"][meter], meter, DOWN, Seq())
    out = []
    for d, wires in zip(mine, got):
        if d["name"] == name:
            for w in wires:
                key = (meter, w)
                if key not in ex.setdefault("opened", {}):
                    ex["opened"][key] = ch.open(bytes.fromhex(w))
                out.append(ex["opened"][key])
    return out


def test_birth_from_micropython(exchange):
    for meter, (seed, _) in METERS.items():
        got = exchange["answers"]["meters"][str(meter)]
        ch = Channel(NATIVE, exchange["pairwise"][meter], meter, DOWN, Seq())
        mtype, ctr, body = ch.open(bytes.fromhex(got["birth"]))
        assert mtype == T_BIRTH
        session, will_ctr, at, period, oldest = body
        assert (session, at, period, oldest) == (1, NOW, 900, HISTORY)
        assert ch.pending_will == will_ctr
        # The will (sealed first, published by the broker) and the goodbye.
        assert ch.open(bytes.fromhex(got["will"])) == (T_DEATH, will_ctr, [1, DEATH_WILL])
        mtype, gctr, gbody = ch.open(bytes.fromhex(got["goodbye"]))
        assert (mtype, gbody) == (T_DEATH, [1, DEATH_ORDERLY]) and gctr > ctr


def test_current_read_flow_a(exchange):
    reqid = exchange["issued"]["current-A"].request
    (got,) = _answers(exchange, "current-A", MAX_U32)
    assert got[0] == T_CURRENT
    assert got[2] == [reqid, AT, expected_registers(METERS[MAX_U32][0], AT)]


def test_current_read_flow_b(exchange):
    reqid = exchange["issued"]["current-B"].request
    (got,) = _answers(exchange, "current-B", 4002)
    assert got[2] == [reqid, AT, expected_registers(METERS[4002][0], AT)]


def _check_interval(parts, reqid, seed, start, end):
    src = SimulatedLoad(seed)
    k0, k1 = max(start // 900, HISTORY // 900), min(end // 900, NOW // 900)
    assert [p[0] for p in parts] == [T_INTERVAL] * len(parts)
    bodies = [p[2] for p in parts]
    assert [b[:3] for b in bodies] == [[reqid, i, len(parts)] for i in range(len(parts))]
    imps = [x for b in bodies for x in b[7]]
    exps = [x for b in bodies for x in b[8]]
    assert imps == [src.interval(k)[0] for k in range(k0, k1)]
    assert exps == [src.interval(k)[1] for k in range(k0, k1)]
    assert bodies[0][3:5] == [k0 * 900, 900]
    base_imp, base_exp = SimulatedLoad(seed).initial()
    for k in range(HISTORY // 900, k0):
        base_imp += src.interval(k)[0]
        base_exp += src.interval(k)[1]
    assert bodies[0][5:7] == [base_imp, base_exp]
    for b in bodies:
        assert b[9] == []


def test_interval_read_flow_a(exchange):
    reqid = exchange["issued"]["interval-A"].request
    parts = _answers(exchange, "interval-A", MAX_U32)
    assert len(parts) == 1 and len(parts[0][2][7]) == 24
    _check_interval(parts, reqid, METERS[MAX_U32][0], NOW - 6 * 3600, NOW)


def test_interval_read_beyond_what_is_held(exchange):
    """Asked for two days and an hour ahead: the meter serves what it holds
    (one day, 96 rows: one full part)."""
    reqid = exchange["issued"]["interval-B-2days"].request
    parts = _answers(exchange, "interval-B-2days", 4002)
    _check_interval(parts, reqid, METERS[4002][0], HISTORY - 86400, NOW + 3600)
    assert sum(len(p[2][7]) for p in parts) == 96


def test_group_reads_through_the_dap(exchange):
    for name, spec_check in (("group-current", "current"), ("group-interval", "interval")):
        issued = exchange["issued"][name]
        assert sorted(issued.meters) == [4002, 4003]
        for meter in (4002, 4003):
            got = _answers(exchange, name, meter)
            seed = METERS[meter][0]
            if spec_check == "current":
                (one,) = got
                assert one[0] == T_CURRENT
                assert one[2] == [issued.request, AT, expected_registers(seed, AT)]
            else:
                _check_interval(got, issued.request, seed, NOW - 6 * 3600, NOW)


def test_micropython_meter_refuses_bad_requests(exchange):
    assert _answers(exchange, "replay", MAX_U32) == []
    assert _answers(exchange, "other-meter", 4003) == []
    (got,) = _answers(exchange, "malformed", MAX_U32)
    assert got[0] == T_STATUS and got[2] == [77, S_MALFORMED, 0]
    stats = {m: exchange["answers"]["meters"][str(m)]["stats"] for m in METERS}
    assert stats[MAX_U32]["rejected"] == 1 and stats[MAX_U32]["rejected:duplicate"] == 1
    assert stats[4003]["rejected:mismatch"] == 1  # addressed to another meter
    assert stats[MAX_U32]["requests"] == 3 and stats[4002]["requests"] == 4
    assert stats[4003]["requests"] == 2


def test_cpython_seals_micropython_opens(exchange):
    assert exchange["answers"]["opened"] == exchange["open_want"]


def test_micropython_encoding_equals_cbor2(exchange):
    got = exchange["answers"]["encoded"]
    assert len(got) == len(exchange["encode"])
    for (meter, direction, mtype, ctr, body), h in zip(exchange["encode"], got):
        want = (cbor2.dumps([VERSION, meter, direction, mtype, ctr] + body)
                + reference_padding(mtype, body))
        assert bytes.fromhex(h) == want, (mtype, body)
        assert messages.encode(NATIVE, meter, direction, mtype, ctr, body) == want


def test_answers_are_sealed_with_fresh_nonces(exchange):
    wires = [bytes.fromhex(w) for m in exchange["answers"]["meters"].values()
             for ws in m["answers"] for w in ws]
    wires += [bytes.fromhex(m[k]) for m in exchange["answers"]["meters"].values()
              for k in ("will", "birth", "goodbye")]
    nonces = [w[5:29] for w in wires]
    assert len(set(nonces)) == len(nonces) > 10
