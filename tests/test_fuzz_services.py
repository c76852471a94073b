"""Fuzzing the running services over a real broker (Mosquitto).

A running real DAP (`python -m dap`, a subprocess, router mode) and a
running head-end (HeadEnd, in-process), with real meters (Fleet) behind the
DAP and one flow-A meter, all on an open Mosquitto so that the fuzzer can
publish on every topic they subscribe:

  the DAP        d1/+/up (d1/m1001/up, d1/m1002/up, d1/m777/up, d1/x1/up),
                 d1/req, d1/ack
  the head-end   +/up: flow-A m5001/up, m1001/up (a flow-B meter's flow-A
                 topic), m777/up, d1/up, d2/up, junk/up

Payloads (hypothesis): random bytes, random CBOR of any shape, CBOR of the
right shape with wrong or random contents (bundles, forwards, group and
ack messages, envelopes), mutations (bit flips, truncation, extension,
splices, CBOR-level field changes) of real envelopes, bundles, forward,
group and ack messages captured from the running system, and oversized
payloads (over an envelope's 1024 bytes, over a gateway message's 4 MiB).
The real messages are captured after they were used, so replaying one
unchanged is a replay.

What is checked:

- no process crashes: the DAP process is alive, the head-end's threads are,
  and both still serve a real read afterwards (flow A and through the DAP);
- nothing is stored: the readings table holds the same rows;
- every payload is counted as rejected, exactly. The unit of counting is
  what each receiver counts: a message refused as a whole counts 1; a
  well-formed bundle counts once per envelope at the head-end; a forward
  message once per envelope and a group message once per member entry,
  each either refused by the DAP or delivered and refused by the meter.
  For each payload an oracle written here from docs/protocol.md (not the
  services' code) predicts where each unit ends up, and the test compares
  the sums, per receiver, with the counters:

    DAP     sum of rejected:*  == uplinks it must refuse + requests and
                                  request envelopes it must refuse + bad acks
            dropped:duplicate  == uplinks it must take for redeliveries of
                                  one it holds (same meter id and nonce)
    head-end sum of rejected:* == payloads and bundle envelopes on +/up
                                  + uplinks the DAP forwards to it
    meters  rejected (each)    == items the DAP delivered to that meter
    observer                    == deliveries per meter id, which shows the
                                  items addressed to meters that do not
                                  exist (nobody is there to count them)
    acks    well-formed acks for d1 are not rejections: they are applied
            (ack messages are clear and unauthenticated; the broker ACL
            lets only the head-end publish on d<k>/ack)

  so every unit is accounted for exactly once, and the totals must match
  exactly, not "at least".
"""

from __future__ import annotations

import io
import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cbor2
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from headend import provision
from headend.config import HeadEndConfig
from headend.requests import ReadSpec
from headend.service import HeadEnd
from headend.store import Store
from shared import topics
from shared.hostmqtt import BrokerSettings
from sim.fleet import Fleet
from tests.waits import wait_until
from tests.brokers import start_mosquitto
from tests.dap_helpers import DapProcess

DAP = 1
BEHIND = (1001, 1002)
DIRECT = 5001
GROUP = 3
EXAMPLES = 2500    # hypothesis examples, one payload each: ~15 s on 2 cores
WAIT = 60.0

# The spec's limits (docs/protocol.md §3, §6.2), restated for the oracle.
MAX_ENVELOPE = 1024
MIN_ENVELOPE = 29 + 16
MAX_GATEWAY = 4 * 1024 * 1024
MAX_ITEMS = 20000
U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1

DAP_UP_TOPICS = ("d1/m1001/up", "d1/m1002/up", "d1/m777/up", "d1/x1/up")
DAP_TOPICS = (*DAP_UP_TOPICS, "d1/req", "d1/ack")
HEADEND_TOPICS = ("m5001/up", "m1001/up", "m777/up", "d1/up", "d2/up", "junk/up")
ALL_TOPICS = DAP_TOPICS + HEADEND_TOPICS


# -- the oracle (from the spec, not from the services' code) ------------------------------


def strict_cbor(data: bytes):
    """One CBOR item and nothing after it, or None. Depth is bounded like
    the services' decoder (16), so deeper input counts as malformed."""
    if len(data) > MAX_GATEWAY:
        return None
    fp = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(fp, max_depth=16).decode()
    except Exception:
        return None
    return obj if fp.tell() == len(data) else None


def is_uint(x, top: int = U32) -> bool:
    return type(x) is int and 0 <= x <= top


def envelopes_ok(items) -> bool:
    return (type(items) is list and 1 <= len(items) <= MAX_ITEMS
            and all(type(e) is bytes and MIN_ENVELOPE <= len(e) <= MAX_ENVELOPE for e in items))


def gateway(data: bytes):
    """(kind, fields) of a well-formed gateway message, else None."""
    obj = strict_cbor(data)
    if type(obj) is not list or len(obj) < 2 or type(obj[0]) is not int or obj[0] != 1:
        return None
    kind = obj[1]
    if type(kind) is not int:
        return None
    if kind == 1 and len(obj) == 4 and is_uint(obj[2]) and envelopes_ok(obj[3]):
        return 1, obj
    if kind == 3 and len(obj) == 5 and is_uint(obj[2]) and is_uint(obj[3], U64) \
            and envelopes_ok(obj[4]):
        return 3, obj
    if kind == 2 and len(obj) == 7:
        _, _, tol, gid, nonce, body, entries = obj
        if (is_uint(tol) and is_uint(gid) and type(nonce) is bytes and len(nonce) == 24
                and type(body) is bytes and 0 < len(body) <= MAX_ENVELOPE
                and type(entries) is list and 1 <= len(entries) <= MAX_ITEMS
                and all(type(e) is list and len(e) == 2 and is_uint(e[0])
                        and type(e[1]) is bytes and len(e[1]) == 32 for e in entries)):
            return 2, obj
        return None
    if kind == 4 and len(obj) == 4 and type(obj[3]) is list and len(obj[3]) <= MAX_ITEMS \
            and all(type(r) is list and len(r) == 2 and is_uint(r[0], U64)
                    and is_uint(r[1], U64) and r[0] <= r[1] for r in obj[3]) \
            and is_uint(obj[2]):
        return 4, obj
    return None


def sealed_for(env: bytes, meter: int | None = None) -> bool:
    """A well-framed sealed envelope (kind 0x11), for `meter` if given."""
    return (MIN_ENVELOPE <= len(env) <= MAX_ENVELOPE and env[0] == 0x11
            and (meter is None or int.from_bytes(env[1:5], "big") == meter))


@dataclass
class Expected:
    """Where each unit of the payloads sent so far must be counted."""

    payloads: Counter = field(default_factory=Counter)       # topic -> payloads sent
    units: int = 0
    dap_rejected: int = 0
    dap_duplicate: int = 0
    headend_rejected: int = 0
    deliveries: Counter = field(default_factory=Counter)    # meter -> items the DAP delivers
    acks_applied: int = 0
    recent: set = field(default_factory=set)                 # (meter id + nonce) the DAP holds

    def add(self, topic: str, payload: bytes) -> None:
        self.payloads[topic] += 1
        if topic in DAP_UP_TOPICS:
            self.units += 1
            meter = None if topic == "d1/x1/up" else int(topic.split("/")[1][1:])
            if meter is None or not sealed_for(payload, meter):
                self.dap_rejected += 1
            elif payload[1:29] in self.recent:
                self.dap_duplicate += 1
            else:
                self.recent.add(payload[1:29])
                self.headend_rejected += 1           # forwarded, refused by the head-end
        elif topic == "d1/req":
            msg = gateway(payload)
            if msg is None or msg[0] not in (1, 2):
                self.units += 1
                self.dap_rejected += 1
            elif msg[0] == 1:
                for env in msg[1][3]:
                    self.units += 1
                    if env[0] == 0x11:
                        self.deliveries[int.from_bytes(env[1:5], "big")] += 1
                    else:
                        self.dap_rejected += 1
            else:
                _, _, _, _, _, body, entries = msg[1]
                if 29 + 32 + len(body) > MAX_ENVELOPE:
                    self.units += 1
                    self.dap_rejected += 1
                else:
                    for m, _ in entries:
                        self.units += 1
                        self.deliveries[m] += 1
        elif topic == "d1/ack":
            self.units += 1
            msg = gateway(payload)
            if msg is not None and msg[0] == 4 and msg[1][2] == DAP:
                self.acks_applied += 1
            else:
                self.dap_rejected += 1
        else:  # the head-end's +/up
            msg = gateway(payload) if topic.startswith("d") else None
            if msg is not None and msg[0] == 3 and msg[1][2] == int(topic[1]):
                n = len(msg[1][4])
            else:
                n = 1
            self.units += n
            self.headend_rejected += n


# -- the system ------------------------------------------------------------------------------


class Observer:
    """Sees everything on the open broker: the real traffic to take seeds
    from, the DAP's retained status, and each item the DAP delivers."""

    def __init__(self, host: str, port: int) -> None:
        self.lock = threading.Lock()
        self.messages: list[tuple[str, bytes]] = []
        self.deliveries: Counter = Counter()
        self.dap_state: dict = {}
        self.capture = True
        ready = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fuzz-observer",
                        protocol=mqtt.MQTTv311)
        c.on_connect = lambda cl, *a: cl.subscribe([("#", 1)])
        c.on_subscribe = lambda *a: ready.set()
        c.on_message = self._on_message
        c.connect(host, port, 30)
        c.loop_start()
        assert ready.wait(15)
        self.c = c

    def _on_message(self, c, u, msg) -> None:
        payload = bytes(msg.payload)
        with self.lock:
            if msg.topic == topics.dap_state(DAP):
                self.dap_state = json.loads(payload)
                return
            if msg.topic.startswith("d1/m") and msg.topic.endswith("/down"):
                self.deliveries[topics.parse(msg.topic)[1]] += 1
            if self.capture:
                self.messages.append((msg.topic, payload))

    def dap_counters(self) -> dict[str, int]:
        with self.lock:
            return dict(self.dap_state.get("counters", {}))

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class System:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.broker = self.he = self.dap = self.fleet = self.obs = None
        self.pub = None
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        site = self.tmp / "site"
        provision.init(site, port=1883)
        provision.add_dap(site, DAP, "router")
        provision.add_meters(site, list(BEHIND), dap=DAP, group=GROUP)
        provision.add_meters(site, [DIRECT])
        cfg = HeadEndConfig.load(site)
        self.broker = start_mosquitto(self.tmp / "broker", anonymous=True)
        host, port = self.broker.host, self.broker.port
        self.obs = Observer(host, port)
        self.store = Store(cfg.db)
        self.he = HeadEnd(cfg.db, cfg.secret_key, BrokerSettings(host=host, port=port)).start()
        conf = self.tmp / "dap.toml"
        conf.write_text(f"""dap = {DAP}
mode = "router"
state_dir = "{self.tmp / 'dap-state'}"

[meters_broker]
host = "{host}"
port = {port}

[queue]
ack_timeout = 3600.0   # no re-sends while fuzzing: each bundle reaches the head-end once

[log]
level = "INFO"
stats_interval = 0.2
""")
        self.dap = DapProcess(conf, self.tmp / "dap.log").start()
        wait_until(lambda: self.dap.check_alive() and self.obs.dap_state.get("state") == "online",
                   WAIT, "the DAP to announce itself online")
        self.fleet = Fleet(host=host, port=port)
        for m in (*BEHIND, DIRECT):
            self.fleet.add((site / "meters" / topics.meter_name(m) / "meter.json").read_text())
        self.fleet.start()
        wait_until(lambda: all(self.store.online().get(m) for m in (*BEHIND, DIRECT)), WAIT,
                   "every meter online")
        self.pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fuzzer",
                               protocol=mqtt.MQTTv311)
        self.pub.max_inflight_messages_set(100)
        self.pub.connect(host, port, 30)
        self.pub.loop_start()

    def send(self, topic: str, payload: bytes) -> None:
        assert self.pub is not None
        self.pub.publish(topic, payload, qos=1).wait_for_publish(30)

    def real_reads(self) -> None:
        """Flow A, flow B and a group fan-out, each answered."""
        assert self.he is not None
        day = int(time.time()) // 86400 * 86400 - 86400
        for m, spec in ((DIRECT, ReadSpec("current")), (1001, ReadSpec("current")),
                        (1002, ReadSpec("interval", day, day + 6 * 3600))):
            assert self.he.read(m, spec).wait(WAIT) == {m: "answered"}
        h = self.he.read_group(GROUP, ReadSpec("current"), "fanout")
        assert h.wait(WAIT) == {m: "answered" for m in BEHIND}

    def rejected(self) -> dict[str, int]:
        assert self.he is not None
        for _ in range(100):  # the ingest thread may be adding a key
            try:
                return {k: v for k, v in self.he.ingest.totals.items()
                        if k.startswith("rejected:")}
            except RuntimeError:
                time.sleep(0.001)
        raise AssertionError("could not read the head-end's counters")

    def meter_rejected(self) -> dict[int, int]:
        assert self.fleet is not None
        return {m: sm.core.stats["rejected"] for m, sm in self.fleet.meters.items()}

    def close(self) -> None:
        for step in (lambda: self.pub and (self.pub.disconnect(), self.pub.loop_stop()),
                     lambda: self.fleet and self.fleet.stop(goodbye=False),
                     lambda: self.dap and self.dap.stop(),
                     lambda: self.he and self.he.stop(),
                     lambda: self.obs and self.obs.close(),
                     lambda: self.broker and self.broker.stop()):
            try:
                step()
            except Exception:
                pass
        if self.dap is not None:
            self.dap.kill()


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    s = System(tmp_path)
    try:
        yield s
    finally:
        s.close()


# -- payloads ---------------------------------------------------------------------------------


def leaves() -> st.SearchStrategy:
    return (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
            | st.sampled_from([0, 1, 2, 3, 4, 17, U32, U32 + 1, U64, U64 + 1, -1])
            | st.floats(allow_nan=True) | st.binary(max_size=64) | st.text(max_size=16))


def any_cbor() -> st.SearchStrategy:
    tree = st.recursive(leaves(), lambda c: st.lists(c, max_size=6)
                        | st.dictionaries(st.integers(0, 9) | st.text(max_size=3), c,
                                          max_size=3), max_leaves=24)
    return tree.map(cbor2.dumps)


def envelope_like(meters=(*BEHIND, DIRECT, 777)) -> st.SearchStrategy:
    """Framed like an envelope (kind, meter id, then random bytes), at the
    edges of the size limits too."""
    return st.builds(
        lambda kind, meter, n, seed: bytes([kind]) + meter.to_bytes(4, "big")
        + random.Random(seed).randbytes(n),
        st.sampled_from([0x11, 0x11, 0x11, 0x12, 0x21, 0x01, 0xFF]),
        st.sampled_from(meters) | st.integers(0, U32),
        st.sampled_from([0, 39, 40, 41, 57, 200, 1019, 1020]) | st.integers(0, 1100),
        st.integers(0, 1 << 30))


def shaped() -> st.SearchStrategy:
    """Gateway messages of the right shape, with random or wrong contents."""
    u = st.sampled_from([0, 1, 2, 3, 7, U32, U32 + 1, -1]) | st.integers(0, U32)
    envs = st.lists(envelope_like(), min_size=0, max_size=6)
    entries = st.lists(st.tuples(st.sampled_from([*BEHIND, 777]) | u,
                                 st.binary(min_size=31, max_size=33)).map(list), max_size=5)
    body = st.binary(min_size=0, max_size=40) | st.binary(min_size=960, max_size=1030)
    msgs = st.one_of(
        st.builds(lambda t, e: [1, 1, t, e], u, envs),                       # forward
        st.builds(lambda d, s, e: [1, 3, d, s, e], st.sampled_from([1, 2, 3]) | u,
                  st.integers(0, U64 + 1), envs),                            # bundle
        st.builds(lambda t, g, n, b, e: [1, 2, t, g, n, b, e], u, u,
                  st.binary(min_size=23, max_size=25), body, entries),      # group
        st.builds(lambda d, r: [1, 4, d, r], st.sampled_from([1, 2]) | u,
                  st.lists(st.lists(st.integers(0, U64 + 1), min_size=1, max_size=3),
                           max_size=4)),                                     # ack
        st.builds(lambda v, k, rest: [v, k, *rest], st.sampled_from([0, 1, 2, True, 1.0]),
                  st.sampled_from([0, 1, 2, 3, 4, 5, "1"]),
                  st.lists(leaves(), max_size=6)),                           # wrong head
    )
    return msgs.map(cbor2.dumps)


def mutate(seed: bytes, rnd: random.Random) -> bytes:
    """One random byte-level or CBOR-level change of a real message, never
    the identity."""
    data = bytearray(seed)
    op = rnd.randrange(8)
    if op == 0 and data:                      # flip 1-3 bits
        for _ in range(rnd.randint(1, 3)):
            data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
    elif op == 1 and len(data) > 1:           # truncate
        del data[rnd.randrange(len(data)):]
    elif op == 2:                             # extend
        data += rnd.randbytes(rnd.randint(1, 64))
    elif op == 3 and data:                    # insert or delete a byte
        i = rnd.randrange(len(data))
        if rnd.random() < 0.5:
            data.insert(i, rnd.randrange(256))
        else:
            del data[i]
    elif op == 4 and len(data) > 8:           # overwrite a run
        i = rnd.randrange(len(data) - 4)
        data[i:i + 4] = rnd.randbytes(4)
    else:                                     # a CBOR field changed (or a splice)
        try:
            obj = cbor2.loads(bytes(seed))
        except Exception:
            obj = None
        if type(obj) is list and obj:
            i = rnd.randrange(len(obj))
            x = obj[i]
            choices = [None, -1, U32 + 1, U64, b"", "x", [x, x], 1.5]
            if type(x) is bytes and x:
                xb = bytearray(x)
                xb[rnd.randrange(len(xb))] ^= 0x80
                choices.append(bytes(xb))
            if type(x) is list and x:
                choices += [x[:-1], x + x[-1:], [x[-1]] + x[:-1]]
            if type(x) is int:
                choices += [x + 1, x - 1 if x else 1]
            obj[i] = rnd.choice(choices)
            data = bytearray(cbor2.dumps(obj))
        else:
            data = bytearray(seed[: len(seed) // 2] + rnd.randbytes(8))
    if bytes(data) == seed:
        data += b"\x00"
    return bytes(data)


@dataclass
class Seeds:
    """Real messages taken off the broker after the system used them."""

    envelopes: list[bytes]     # meters' uplink envelopes
    requests: list[bytes]      # sealed requests (flow A downlink, items of forwards)
    items: list[bytes]         # group items delivered by the DAP
    bundles: list[bytes]       # the DAP's bundles
    forwards: list[bytes]
    groups: list[bytes]
    acks: list[bytes]

    def all(self) -> list[bytes]:
        return (self.envelopes + self.requests + self.items + self.bundles + self.forwards
                + self.groups + self.acks)


def take_seeds(obs: Observer) -> Seeds:
    with obs.lock:
        msgs = list(obs.messages)
    s = Seeds([], [], [], [], [], [], [])
    for topic, p in msgs:
        leaf, meter, dap = topics.parse(topic) if topic != "d1/state" else ("state", None, None)
        if leaf == "up" and meter is not None:
            s.envelopes.append(p)
        elif leaf == "down":
            (s.items if p[:1] == b"\x12" else s.requests).append(p)
        elif leaf == "up":
            s.bundles.append(p)
        elif leaf == "req":
            (s.groups if cbor2.loads(p)[1] == 2 else s.forwards).append(p)
        elif leaf == "ack":
            s.acks.append(p)
    return s


def generic() -> st.SearchStrategy:
    """Garbage of every kind, for any topic."""
    return st.one_of(
        st.binary(max_size=1500),
        any_cbor(),
        shaped(),
        envelope_like(),
        st.integers(MAX_ENVELOPE + 1, 3 * MAX_ENVELOPE).map(lambda n: b"\x11" + os.urandom(n)),
    )


def shaped_bundle(dap: int) -> st.SearchStrategy:
    return st.builds(lambda d, seq, envs: cbor2.dumps([1, 3, d, seq, envs]),
                     st.sampled_from([dap, dap, dap, 2, 0]), st.integers(0, U64),
                     st.lists(envelope_like(), min_size=1, max_size=6))


def shaped_request() -> st.SearchStrategy:
    inside = st.sampled_from(BEHIND)
    return st.one_of(
        st.builds(lambda t, envs: cbor2.dumps([1, 1, t, envs]), st.integers(0, 600),
                  st.lists(envelope_like(meters=(*BEHIND, 777)), min_size=1, max_size=4)),
        st.builds(lambda t, g, n, b, members: cbor2.dumps(
            [1, 2, t, g, n, b, [[m, os.urandom(32)] for m in members]]),
            st.integers(0, 600), st.integers(0, U32), st.binary(min_size=24, max_size=24),
            st.binary(min_size=1, max_size=40),
            st.lists(inside | st.integers(0, U32), min_size=1, max_size=4)),
    )


def payload_for(topic: str, seeds: Seeds) -> st.SearchStrategy:
    """Mostly what belongs on `topic`, real (replayed or mutated) or made up;
    sometimes anything at all."""

    def real(pool: list[bytes]) -> list[st.SearchStrategy]:
        if not pool:
            return []
        mutated = st.builds(lambda seed, n: mutate(seed, random.Random(n)),
                            st.sampled_from(pool), st.integers(0, 1 << 32))
        return [mutated, mutated, mutated, st.sampled_from(pool)]

    leaf, meter, dap = topics.parse(topic) if topic not in ("d1/x1/up", "junk/up") else \
        (None, None, None)
    if meter is not None:  # an envelope's topic
        own = [e for e in seeds.envelopes if e[1:5] == meter.to_bytes(4, "big")]
        made = envelope_like(meters=(meter,))
        parts = real(own or seeds.envelopes) + real(seeds.requests) + [made, made]
    elif leaf == "req":
        parts = real(seeds.forwards + seeds.groups) + [shaped_request(), shaped_request()]
    elif leaf == "ack":
        made = st.builds(lambda d, r: cbor2.dumps([1, 4, d, r]), st.sampled_from([DAP, DAP, 2]),
                         st.lists(st.tuples(st.integers(0, 99), st.integers(0, 99))
                                  .map(lambda r: sorted(r)), max_size=3))
        parts = real(seeds.acks) + [made]
    elif leaf == "up":  # a bundle's topic
        parts = real(seeds.bundles) + [shaped_bundle(dap), shaped_bundle(dap)]
    else:
        parts = []
    return st.one_of(*parts, generic(), generic()) if parts else generic()


# -- the test -------------------------------------------------------------------------------


def test_fuzz_every_subscribed_topic_of_the_dap_and_the_headend(system: System) -> None:
    s = system
    assert s.he is not None and s.dap is not None and s.obs is not None
    s.real_reads()  # real traffic of every kind, to take seeds from
    wait_until(lambda: take_seeds(s.obs).acks and take_seeds(s.obs).groups, WAIT, "seeds")
    time.sleep(0.5)  # let the last acks of the reads arrive before the baseline
    seeds = take_seeds(s.obs)
    assert all([seeds.envelopes, seeds.requests, seeds.items, seeds.bundles, seeds.forwards,
                seeds.groups, seeds.acks]), seeds
    s.obs.capture = False
    exp = Expected()
    # every envelope the DAP has taken so far is in its redelivery filter
    with s.obs.lock:
        exp.recent = {p[1:29] for t, p in s.obs.messages if t.startswith("d1/m") and
                      t.endswith("/up") and sealed_for(p)}
    rows0 = s.store.reading_count()
    he0, dap0 = s.rejected(), s.obs.dap_counters()
    meters0, deliveries0 = s.meter_rejected(), Counter(s.obs.deliveries)
    stats0 = {m: dict(sm.core.stats) for m, sm in s.fleet.meters.items()}
    assert dap0 and not any(k.startswith("rejected") for k in dap0)

    def send(topic: str, payload: bytes) -> None:
        exp.add(topic, payload)
        s.send(topic, payload)

    # explicit: the largest payloads, and a bundle of many envelopes
    big = b"\x11" + os.urandom(MAX_GATEWAY)
    for topic in ("d1/m1001/up", "d1/req", "d1/ack", "m5001/up", "d1/up"):
        send(topic, big)
    many = cbor2.dumps([1, 3, DAP, 99, [b"\x11" + (1001).to_bytes(4, "big") + os.urandom(60)
                                        for _ in range(500)]])
    send("d1/up", many)
    send("d1/req", cbor2.dumps([1, 1, 0, [b"\x11" + (1001).to_bytes(4, "big") + os.urandom(60)
                                          for _ in range(50)]]))

    per_topic = {t: st.tuples(st.just(t), payload_for(t, seeds)) for t in ALL_TOPICS}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              phases=(Phase.explicit, Phase.generate),
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(ALL_TOPICS).flatmap(per_topic.__getitem__))
    def fuzz(message: tuple[str, bytes]) -> None:
        send(*message)

    fuzz()
    assert s.dap.check_alive()

    def counted() -> dict[str, object]:
        he, dap = s.rejected(), s.obs.dap_counters()
        meters = s.meter_rejected()
        with s.obs.lock:
            deliveries = s.obs.deliveries - deliveries0
        return {
            "dap_rejected": sum(v - dap0.get(k, 0) for k, v in dap.items()
                                if k.startswith("rejected:")),
            "dap_duplicate": dap.get("dropped:duplicate", 0) - dap0.get("dropped:duplicate", 0),
            "headend_rejected": sum(v - he0.get(k, 0) for k, v in he.items()),
            "meter_rejected": {m: meters[m] - meters0[m] for m in meters},
            "deliveries": dict(deliveries),
        }

    fleet = (*BEHIND, DIRECT)  # DIRECT listens on m5001/down: nothing the DAP sends reaches it
    want = {
        "dap_rejected": exp.dap_rejected,
        "dap_duplicate": exp.dap_duplicate,
        "headend_rejected": exp.headend_rejected,
        "meter_rejected": {m: exp.deliveries.get(m, 0) if m in BEHIND else 0 for m in fleet},
        "deliveries": {m: n for m, n in exp.deliveries.items() if n},
    }
    last: dict = {}

    def settled() -> bool:
        last.update(counted())
        return last == want

    try:
        wait_until(settled, WAIT, "every payload to be counted")
    except AssertionError:
        raise AssertionError(f"counted {last}\nexpected {want}") from None

    # still serving, and nothing counted twice or stored meanwhile
    assert s.store.reading_count() == rows0, "a fuzzed payload stored a reading"
    s.real_reads()
    after = counted()
    del after["deliveries"], want["deliveries"]  # the real reads' own deliveries
    assert after == want
    assert s.dap.check_alive() and all(t.is_alive() for t in s.he._threads)
    dap = s.obs.dap_counters()
    assert dap.get("rejected:internal", 0) == 0, "the DAP hit a bug (see its log)"
    void = sum(n for m, n in exp.deliveries.items() if m not in BEHIND)
    at_meters = sum(n for m, n in exp.deliveries.items() if m in BEHIND)
    total = (exp.dap_rejected + exp.dap_duplicate + exp.headend_rejected + at_meters + void
             + exp.acks_applied)
    assert total == exp.units  # the oracle's own bookkeeping: each unit in one bucket
    by_reason = {k: v - he0.get(k, 0) for k, v in s.rejected().items() if v != he0.get(k, 0)}
    at_meter = {m: {k: v - stats0[m].get(k, 0) for k, v in sm.core.stats.items()
                    if k.startswith("rejected:") and v != stats0[m].get(k, 0)}
                for m, sm in s.fleet.meters.items()}
    at_dap = {k: v - dap0.get(k, 0) for k, v in dap.items()
              if k.startswith(("rejected:", "dropped:")) and v != dap0.get(k, 0)}
    print(f"\nfuzz: {sum(exp.payloads.values())} payloads on {len(exp.payloads)} topics, "
          f"{exp.units} units: DAP rejected {exp.dap_rejected} + redeliveries dropped "
          f"{exp.dap_duplicate}, head-end rejected {exp.headend_rejected}, meters rejected "
          f"{at_meters}, delivered to no meter {void}, well-formed acks applied "
          f"{exp.acks_applied}\nhead-end by reason: {by_reason}\n"
          f"meters by reason: {at_meter}\nDAP by reason: {at_dap}")
