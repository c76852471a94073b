"""The protocol core (shared/) and the meter core (firmware/meter.py) on
CPython, every test against BOTH backends through the `backend` fixture:
NATIVE (PyNaCl + cbor2) and PURE (shared/box.py, x25519.py, cbor.py).

  - round trips of every message type, group requests and gateway messages;
  - hypothesis properties: encode/decode round trip, any single-byte flip
    rejected, any shuffle within the window accepted exactly once, rejected
    input leaves the window unchanged, the skip-ahead counter never repeats
    a value across power loss;
  - bad input: every decoder rejects it with the specific ProtocolError
    (class and .reason), and a fuzz test that nothing else ever escapes;
  - wire sizes, asserted and printed (run with -s to see them);
  - the last-will rule.

Keys are drawn at run time (os.urandom); the fixed test-vector keys are in
tests/vectors/envelope.json (tests/test_envelope_vectors.py).
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import struct
import tempfile

import cbor2
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from dap import inbound
from firmware.flash import Flash
from firmware.meter import Meter
from firmware.metrology import SimulatedLoad
from firmware.state import State
from headend.ingest import Ingest
from headend.requests import MAX_TOLERANCE, ReadSpec, Requester
from headend.store import Store
from shared import envelope, gateway, group, messages, obis, topics
from shared.backend import NATIVE, PURE
from shared.channel import Channel, digest
from shared.const import (
    DEATH_ORDERLY,
    DEATH_WILL,
    DOWN,
    ENV_GROUP_ITEM,
    ENV_HEADER,
    ENV_SEALED,
    K_ACK,
    K_BUNDLE,
    K_FORWARD,
    K_GROUP,
    MAC_BYTES,
    MAX_BUNDLE_ITEMS,
    MAX_ENVELOPE,
    MAX_GATEWAY_MSG,
    MAX_GROUP_MEMBERS,
    MAX_INNER,
    MAX_PARTS,
    MAX_ROWS,
    MAX_U32,
    NONCE_BYTES,
    Q_CLOCK,
    Q_OVERFLOW,
    REPLAY_WINDOW,
    S_EXPIRED,
    S_MALFORMED,
    S_NO_DATA,
    S_UNSUPPORTED,
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
from shared.counter import SkipAheadCounter
from shared.errors import (
    AuthError,
    DecodeError,
    DirectionError,
    DuplicateError,
    MismatchError,
    ProtocolError,
    StaleError,
    TooLarge,
    UnknownPeerError,
    VersionError,
)
from shared.replay import ReplayWindow
# the padding as the vector generator counts it, with cbor2, apart from shared/
from tools.make_envelope_vectors import padding as reference_padding

# --------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------

_BACKENDS = {"native": NATIVE, "pure": PURE}


@pytest.fixture(scope="module", params=sorted(_BACKENDS))
def backend(request):
    """Each test runs once per backend. Module scope: it is immutable, and
    hypothesis refuses function-scoped fixtures."""
    b = _BACKENDS[request.param]
    if b is None:
        pytest.fail("the native backend needs PyNaCl and cbor2: run `make deps` "
                    "(or .venv/bin/pip install -e '.[dev]')")
    return b


def other(backend):
    return PURE if backend is NATIVE else NATIVE


HEADEND_SK = os.urandom(32)
METER_SK = os.urandom(32)
STRANGER_SK = os.urandom(32)  # someone who is not the head-end
METER = 4_000_000_007
OTHER_METER = 4_000_000_008
NOW = 1_767_225_600  # 2026-01-01T00:00:00Z
PROPS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

_keys: dict = {}


def pairwise(backend, meter_sk=METER_SK, headend_sk=HEADEND_SK):
    """The pairwise key, computed at both ends (they must agree)."""
    k = (backend.name, meter_sk, headend_sk)
    if k not in _keys:
        at_meter = backend.beforenm(backend.public_key(headend_sk), meter_sk)
        at_headend = backend.beforenm(backend.public_key(meter_sk), headend_sk)
        assert at_meter == at_headend
        _keys[k] = at_meter
    return _keys[k]


class Seq:
    """A counter: next() returns start, start + 1, ..."""

    def __init__(self, start=0):
        self.value = start

    def next(self):
        v = self.value
        self.value += 1
        return v


class Link:
    """Both ends of one meter's channel."""

    def __init__(self, backend, meter=METER, key=None, up=0, down=1000):
        self.backend = backend
        self.key = key or pairwise(backend)
        self.meter_id = meter
        self.meter = Channel(backend, self.key, meter, UP, Seq(up))
        self.headend = Channel(backend, self.key, meter, DOWN, Seq(down))

    def sender_receiver(self, mtype):
        if mtype in messages.DOWNLINK:
            return self.headend, self.meter
        return self.meter, self.headend


def nonce():
    return os.urandom(NONCE_BYTES)


def snapshot(ch):
    return ch.window.state(), ch.pending_will


def flip(wire, pos, mask):
    b = bytearray(wire)
    b[pos] ^= mask
    return bytes(b)


def expect(exc, fn, *args):
    """fn(*args) raises exactly `exc` (not a subclass, not a parent)."""
    with pytest.raises(ProtocolError) as info:
        fn(*args)
    got = info.value
    assert type(got) is exc, f"{type(got).__name__}({got}) where {exc.__name__} was expected"
    assert got.reason == exc.reason
    return got


def seal_plain(backend, key, meter, pt, kind=ENV_SEALED):
    """An envelope around any plaintext, authentic under `key`."""
    n = nonce()
    return envelope.header(kind, meter, n) + backend.seal(key, n, pt)


# One sample of every inner message type.
SAMPLES = [
    ("current", T_CURRENT, [7, NOW, [1, 3_304_512, 2, 0, 3, 412, 4, 2301]]),
    ("interval", T_INTERVAL,
     [8, 0, 1, NOW, 900, 3_330_000, 0, [52, 51, 94, 75], [0, 0, 3, 0], [2, Q_CLOCK]]),
    ("status", T_STATUS, [9, S_NO_DATA, NOW - 86400]),
    ("birth", T_BIRTH, [3, 40, NOW, 900, NOW - 8 * 86400]),
    ("death", T_DEATH, [3, DEATH_ORDERLY]),
    ("read-current", T_READ_CURRENT, [7, NOW + 10, 0]),
    ("read-interval", T_READ_INTERVAL, [8, NOW + 10, 600, NOW - 21600, NOW]),
]
SAMPLE_IDS = [s[0] for s in SAMPLES]


# --------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "mtype", "body"), SAMPLES, ids=SAMPLE_IDS)
def test_round_trip_every_message_type(backend, name, mtype, body):
    link = Link(backend)
    sender, receiver = link.sender_receiver(mtype)
    ctr, wire = sender.seal(mtype, body, nonce())
    assert envelope.peek(wire) == (ENV_SEALED, METER)
    assert receiver.open(wire) == (mtype, ctr, body)
    assert receiver.window.state() == (ctr, 1)
    # The same bytes open under the other backend's implementation too.
    o = other(backend)
    twin = Channel(o, pairwise(o), METER, receiver.sends, Seq())
    assert twin.open(wire) == (mtype, ctr, body)


def test_round_trip_both_ways_in_sequence(backend):
    """Every sample three times over, both directions interleaved: the
    counters arrive in order at each end."""
    link = Link(backend)
    up_seen, down_seen = [], []
    for name, mtype, body in SAMPLES * 3:
        sender, receiver = link.sender_receiver(mtype)
        ctr, wire = sender.seal(mtype, body, nonce())
        assert receiver.open(wire) == (mtype, ctr, body)
        (up_seen if receiver is link.headend else down_seen).append(ctr)
    assert up_seen == list(range(len(up_seen)))
    assert down_seen == list(range(1000, 1000 + len(down_seen)))


def _members(backend, n):
    out = []
    for i in range(n):
        sk = os.urandom(32)
        out.append((METER + i, sk, pairwise(backend, sk)))
    return out


def test_group_request_round_trip(backend):
    members = _members(backend, 3)
    gid, tol, ctr, dap = 77, 300, 5000, 12
    n = nonce()
    req = [11, NOW + 330, tol]
    body, entries = group.build(backend, gid, T_READ_CURRENT, ctr, req,
                                [(m, k) for m, _, k in members], n)
    assert body == cbor2.dumps([VERSION, gid, DOWN, T_READ_CURRENT, ctr] + req)
    assert group.body_header(backend, body) == (gid, T_READ_CURRENT, ctr)
    msg = gateway.group(backend, tol, gid, n, body, entries)
    assert gateway.decode(backend, msg) == (K_GROUP, tol, gid, n, body, entries)
    # The DAP's own logic splits it; each member opens its item.
    split = inbound.request(backend, dap, msg)
    assert split.kind == K_GROUP and split.group == gid and not split.rejected
    assert [d.meter for d in split.deliveries] == [m for m, _, _ in members]
    for (m, _, key), d, (em, box) in zip(members, split.deliveries, entries):
        assert d.topic == topics.meter_down(m, dap)
        assert d.payload == group.item(em, n, box, body)
        assert envelope.peek(d.payload) == (ENV_GROUP_ITEM, m)
        ch = Channel(backend, key, m, UP, Seq())
        assert ch.open_group_item(d.payload) == (T_READ_CURRENT, ctr, req, gid)
        expect(DuplicateError, ch.open_group_item, d.payload)
        # The other backend agrees.
        o = other(backend)
        twin = Channel(o, pairwise(o, dict((x, s) for x, s, _ in members)[m]), m, UP, Seq())
        assert twin.open_group_item(d.payload) == (T_READ_CURRENT, ctr, req, gid)
    # Member 0's item delivered to member 1 is refused.
    m1 = Channel(backend, members[1][2], members[1][0], UP, Seq())
    expect(MismatchError, m1.open_group_item, split.deliveries[0].payload)


def test_group_interval_request_round_trip(backend):
    (m, _, key), = _members(backend, 1)
    n = nonce()
    req = [12, NOW + 100, 0, NOW - 21600, NOW]
    body, entries = group.build(backend, 5, T_READ_INTERVAL, 9, req, [(m, key)], n)
    item = group.item(m, n, entries[0][1], body)
    assert Channel(backend, key, m, UP, Seq()).open_group_item(item) == (
        T_READ_INTERVAL, 9, req, 5)


GATEWAY_SAMPLES = [
    ("forward", lambda b, e: gateway.forward(b, 30, [e]), lambda e: (K_FORWARD, 30, [e])),
    ("forward-many", lambda b, e: gateway.forward(b, 0, [e] * 5),
     lambda e: (K_FORWARD, 0, [e] * 5)),
    ("bundle", lambda b, e: gateway.bundle(b, 12, 2**64 - 1, [e, e]),
     lambda e: (K_BUNDLE, 12, 2**64 - 1, [e, e])),
    ("ack", lambda b, e: gateway.ack(b, 12, [(0, 0), (5, 9)]),
     lambda e: (K_ACK, 12, [[0, 0], [5, 9]])),
    ("ack-empty", lambda b, e: gateway.ack(b, 12, []), lambda e: (K_ACK, 12, [])),
]


@pytest.mark.parametrize(("name", "make", "want"), GATEWAY_SAMPLES,
                         ids=[g[0] for g in GATEWAY_SAMPLES])
def test_gateway_round_trip(backend, name, make, want):
    link = Link(backend)
    _, env = link.meter.seal(*SAMPLES[0][1:], nonce())
    data = make(backend, env)
    assert data == make(other(backend), env)  # same bytes from both encoders
    assert gateway.decode(backend, data) == want(env)


envelopes_st = st.binary(min_size=ENV_HEADER + MAC_BYTES, max_size=200)
u32 = st.integers(0, MAX_U32)
u64 = st.integers(0, 2**64 - 1)


@PROPS
@given(kind=st.sampled_from(["forward", "bundle", "ack", "group"]), tol=u32, dap=u32, seq=u64,
       envs=st.lists(envelopes_st, min_size=1, max_size=5),
       ranges=st.lists(st.tuples(u64, u64).map(sorted), max_size=5),
       gid=u32, n=st.binary(min_size=24, max_size=24), body=st.binary(min_size=1, max_size=200),
       entries=st.lists(st.tuples(u32, st.binary(min_size=32, max_size=32)).map(list),
                        min_size=1, max_size=5))
def test_gateway_encode_decode_property(backend, kind, tol, dap, seq, envs, ranges, gid, n,
                                        body, entries):
    if kind == "forward":
        data, want = gateway.forward(backend, tol, envs), (K_FORWARD, tol, envs)
    elif kind == "bundle":
        data, want = gateway.bundle(backend, dap, seq, envs), (K_BUNDLE, dap, seq, envs)
    elif kind == "ack":
        data, want = gateway.ack(backend, dap, ranges), (K_ACK, dap, [list(r) for r in ranges])
    else:
        data = gateway.group(backend, tol, gid, n, body, entries)
        want = (K_GROUP, tol, gid, n, body, entries)
    assert gateway.decode(backend, data) == want
    assert gateway.decode(other(backend), data) == want


# --------------------------------------------------------------------------
# hypothesis: valid bodies, encode/decode round trip
# --------------------------------------------------------------------------


@st.composite
def current_bodies(draw):
    extra = draw(st.sets(st.sampled_from([obis.INTERVAL_IMPORT, obis.INTERVAL_EXPORT])))
    regs = []
    for tag in sorted(set(obis.CURRENT_REGISTERS) | extra):
        regs += [tag, draw(u32)]
    return [draw(u32), draw(u32), regs]


@st.composite
def interval_bodies(draw):
    parts = draw(st.integers(1, MAX_PARTS))
    part = draw(st.integers(0, parts - 1))
    period = draw(st.one_of(st.just(900), st.integers(1, MAX_U32)))
    start = period * draw(st.integers(0, MAX_U32 // period))
    rows = draw(st.integers(0, MAX_ROWS))
    value = st.one_of(st.integers(0, 300), st.integers(0, 0xFFFF), u32)
    imps = draw(st.lists(value, min_size=rows, max_size=rows))
    exps = draw(st.lists(value, min_size=rows, max_size=rows))
    flags = []
    for row in sorted(draw(st.sets(st.integers(0, max(rows - 1, 0)), max_size=rows))):
        flags += [row, draw(st.integers(1, MAX_U32))]
    return [draw(u32), part, parts, start, period, draw(u32), draw(u32), imps, exps, flags]


@st.composite
def read_interval_bodies(draw):
    frm = draw(st.integers(0, MAX_U32 - 1))
    return [draw(u32), draw(u32), draw(u32), frm, draw(st.integers(frm + 1, MAX_U32))]


def body_strategy(mtype):
    return {
        T_CURRENT: current_bodies(),
        T_INTERVAL: interval_bodies(),
        T_STATUS: st.tuples(u32, st.integers(S_NO_DATA, S_UNSUPPORTED), u32).map(list),
        T_BIRTH: st.lists(u32, min_size=5, max_size=5),
        T_DEATH: st.tuples(u32, st.sampled_from([DEATH_WILL, DEATH_ORDERLY])).map(list),
        T_READ_CURRENT: st.lists(u32, min_size=3, max_size=3),
        T_READ_INTERVAL: read_interval_bodies(),
    }[mtype]


valid_messages = st.sampled_from(sorted(messages.BODY)).flatmap(
    lambda t: st.tuples(st.just(t), body_strategy(t)))


@PROPS
@given(msg=valid_messages, meter=u32, ctr=u32)
def test_encode_decode_round_trip_property(backend, msg, meter, ctr):
    mtype, body = msg
    direction = messages.direction_of(mtype)
    pt = messages.encode(backend, meter, direction, mtype, ctr, body)
    assert pt == (cbor2.dumps([VERSION, meter, direction, mtype, ctr] + body)
                  + reference_padding(mtype, body))
    assert pt == messages.encode(other(backend), meter, direction, mtype, ctr, body)
    if len(pt) > MAX_INNER:
        expect(TooLarge, messages.decode, backend, pt, meter, direction)
        return
    got = messages.decode(backend, pt, meter, direction)
    assert got == (mtype, ctr, body)
    assert messages.check_body(mtype, got[2]) == body


@settings(PROPS, max_examples=60)
@given(msg=valid_messages, ctr=u32)
def test_sealed_round_trip_property(backend, msg, ctr):
    mtype, body = msg
    pt = messages.encode(backend, METER, messages.direction_of(mtype), mtype, ctr, body)
    assume(len(pt) <= MAX_INNER)
    link = Link(backend)
    sender, receiver = link.sender_receiver(mtype)
    sender.counter = Seq(ctr)
    assert receiver.open(sender.seal(mtype, body, nonce())[1]) == (mtype, ctr, body)


# --------------------------------------------------------------------------
# any single flipped byte is rejected
# --------------------------------------------------------------------------

HINT = range(1, 5)  # the meter-id hint of a sealed envelope: test_flip_meter_id_hint_... below
MASKS = (0x01, 0x10, 0x80, 0xFF)


def _sealed_sample(backend, mtype, body):
    link = Link(backend)
    sender, receiver = link.sender_receiver(mtype)
    return receiver, sender.seal(mtype, body, nonce())[1]


@pytest.mark.parametrize(("name", "mtype", "body"), SAMPLES, ids=SAMPLE_IDS)
def test_flip_any_byte_of_an_envelope_exhaustive(backend, name, mtype, body):
    receiver, wire = _sealed_sample(backend, mtype, body)
    before = snapshot(receiver)
    positions = [p for p in range(len(wire)) if p not in HINT]
    for pos, mask in itertools.product(positions, MASKS + (random.randrange(1, 256),)):
        with pytest.raises(ProtocolError):
            receiver.open(flip(wire, pos, mask))
        assert snapshot(receiver) == before, (pos, mask)
    assert receiver.open(wire)[0] == mtype  # the original still opens: nothing moved


@pytest.mark.parametrize(("name", "mtype", "body"), SAMPLES[:1] + SAMPLES[-2:-1],
                         ids=[SAMPLES[0][0], SAMPLES[-2][0]])
def test_flip_meter_id_hint_of_an_envelope(backend, name, mtype, body):
    receiver, wire = _sealed_sample(backend, mtype, body)
    for pos in HINT:
        expect(MismatchError, receiver.open, flip(wire, pos, 0x01))


@settings(PROPS, max_examples=150)
@given(msg=valid_messages, data=st.data())
def test_flip_any_byte_property(backend, msg, data):
    mtype, body = msg
    pt = messages.encode(backend, METER, messages.direction_of(mtype), mtype, 0, body)
    assume(len(pt) <= MAX_INNER)
    receiver, wire = _sealed_sample(backend, mtype, body)
    pos = data.draw(st.integers(0, len(wire) - 1).filter(lambda p: p not in HINT))
    mask = data.draw(st.integers(1, 255))
    before = snapshot(receiver)
    with pytest.raises(ProtocolError):
        receiver.open(flip(wire, pos, mask))
    assert snapshot(receiver) == before


def _group_item(backend, req=None, mtype=T_READ_CURRENT, ctr=77):
    (m, _, key), = _members(backend, 1)
    n = nonce()
    req = req or [11, NOW + 330, 300]
    body, entries = group.build(backend, 42, mtype, ctr, req, [(m, key)], n)
    return Channel(backend, key, m, UP, Seq()), group.item(m, n, entries[0][1], body)


def test_flip_any_byte_of_a_group_item_exhaustive(backend):
    for req, mtype in (([11, NOW + 330, 300], T_READ_CURRENT),
                       ([MAX_U32, MAX_U32, MAX_U32, 0, MAX_U32], T_READ_INTERVAL)):
        ch, item = _group_item(backend, req, mtype)
        before = snapshot(ch)
        for pos, mask in itertools.product(range(len(item)), MASKS + (random.randrange(1, 256),)):
            with pytest.raises(ProtocolError):
                ch.open_group_item(flip(item, pos, mask))
            assert snapshot(ch) == before, (pos, mask)
        assert ch.open_group_item(item)[0] == mtype


@settings(PROPS, max_examples=100)
@given(data=st.data())
def test_flip_any_byte_of_a_group_item_property(backend, data):
    ch, item = _group_item(backend, data.draw(st.lists(u32, min_size=3, max_size=3)))
    pos, mask = data.draw(st.integers(0, len(item) - 1)), data.draw(st.integers(1, 255))
    before = snapshot(ch)
    with pytest.raises(ProtocolError):
        ch.open_group_item(flip(item, pos, mask))
    assert snapshot(ch) == before


# --------------------------------------------------------------------------
# the replay window
# --------------------------------------------------------------------------


@PROPS
@given(base=st.integers(0, MAX_U32 - REPLAY_WINDOW),
       offsets=st.sets(st.integers(0, REPLAY_WINDOW - 1), min_size=1, max_size=REPLAY_WINDOW),
       data=st.data())
def test_window_any_shuffle_accepted_exactly_once(base, offsets, data):
    ctrs = [base + o for o in offsets]
    order = data.draw(st.permutations(ctrs))
    # Duplicates of any counter, delivered at any later point.
    dups = data.draw(st.lists(st.tuples(st.integers(0, len(order)), st.sampled_from(ctrs)),
                              max_size=30))
    stream = list(order)
    for at, c in sorted(dups, reverse=True):
        stream.insert(at, c)
    w = ReplayWindow()
    accepted = []
    for c in stream:
        before = w.state()
        if c in accepted:
            with pytest.raises(DuplicateError):
                w.accept(c)
            assert w.state() == before
        else:
            w.accept(c)
            accepted.append(c)
    assert sorted(accepted) == sorted(ctrs)
    assert w.top == max(ctrs)
    for c in ctrs:  # and every one is now refused
        with pytest.raises(DuplicateError):
            w.check(c)


@PROPS
@given(history=st.lists(st.integers(0, 500), max_size=40), probe=st.integers(0, 600))
def test_window_check_matches_a_model(history, probe):
    """Against a plain set: accepted iff above top - 64 and never seen."""
    w = ReplayWindow()
    seen = set()
    for c in history + [probe]:
        top = max(seen) if seen else -1
        before = w.state()
        if c in seen and c > top - REPLAY_WINDOW:
            with pytest.raises(DuplicateError):
                w.accept(c)
            assert w.state() == before
        elif c <= top - REPLAY_WINDOW:
            with pytest.raises(StaleError):
                w.accept(c)
            assert w.state() == before
        else:
            w.accept(c)
            seen.add(c)


@settings(PROPS, max_examples=25)
@given(n=st.integers(1, 24), data=st.data())
def test_channel_shuffle_accepted_exactly_once(backend, n, data):
    link = Link(backend)
    sealed = [link.meter.seal(*SAMPLES[0][1:], nonce()) for _ in range(n)]
    order = data.draw(st.permutations(sealed))
    extra = data.draw(st.lists(st.sampled_from(sealed), max_size=10))
    accepted = set()
    for ctr, wire in order + extra:
        if ctr in accepted:
            before = snapshot(link.headend)
            expect(DuplicateError, link.headend.open, wire)
            assert snapshot(link.headend) == before
        else:
            assert link.headend.open(wire)[1] == ctr
            accepted.add(ctr)
    assert accepted == set(range(n))


def test_channel_stale_is_rejected(backend):
    link = Link(backend)
    sealed = [link.meter.seal(*SAMPLES[4][1:], nonce()) for _ in range(REPLAY_WINDOW + 1)]
    link.headend.open(sealed[-1][1])
    before = snapshot(link.headend)
    expect(StaleError, link.headend.open, sealed[0][1])  # exactly 64 behind
    assert snapshot(link.headend) == before
    link.headend.open(sealed[1][1])  # 63 behind: still inside


class Manual:
    """A counter whose next value the test sets."""

    value = 0

    def next(self):
        return self.value


ATTACKS = ["forged", "tampered", "replayed", "stale", "wrong-direction", "wrong-meter",
           "wrong-key", "bad-body", "truncated", "group-item"]


@settings(PROPS, max_examples=120)
@given(history=st.lists(st.integers(0, 300), max_size=12), attack=st.sampled_from(ATTACKS),
       data=st.data())
def test_rejected_message_leaves_window_unchanged(backend, history, attack, data):
    link = Link(backend)
    link.meter.counter = Manual()
    accepted = {}
    for c in history:
        link.meter.counter.value = c
        wire = link.meter.seal(T_STATUS, [c, S_NO_DATA, 0], nonce())[1]
        try:
            link.headend.open(wire)
            accepted[c] = wire
        except (DuplicateError, StaleError):
            pass
    he = link.headend
    top = he.window.top
    link.meter.counter.value = top + 1
    fresh = link.meter.seal(T_STATUS, [1, S_NO_DATA, 0], nonce())[1]
    if attack == "forged":
        bad, exc = envelope.header(ENV_SEALED, METER, nonce()) + data.draw(
            st.binary(min_size=MAC_BYTES, max_size=200)), AuthError
    elif attack == "tampered":
        pos = data.draw(st.integers(ENV_HEADER - NONCE_BYTES, len(fresh) - 1))
        bad, exc = flip(fresh, pos, data.draw(st.integers(1, 255))), AuthError
    elif attack == "replayed":
        assume(accepted)
        c = data.draw(st.sampled_from(sorted(accepted)))
        bad, exc = accepted[c], DuplicateError if c > top - REPLAY_WINDOW else StaleError
    elif attack == "stale":
        assume(top >= REPLAY_WINDOW)
        link.meter.counter.value = data.draw(st.integers(0, top - REPLAY_WINDOW))
        bad, exc = link.meter.seal(T_STATUS, [1, S_NO_DATA, 0], nonce())[1], StaleError
    elif attack == "wrong-direction":  # a request of the head-end reflected back to it
        bad, exc = he.seal(T_READ_CURRENT, [1, NOW, 0], nonce())[1], DirectionError
    elif attack == "wrong-meter":  # authentic, but names another meter
        ch = Channel(backend, link.key, OTHER_METER, UP, Seq(top + 1))
        bad, exc = ch.seal(T_STATUS, [1, S_NO_DATA, 0], nonce())[1], MismatchError
    elif attack == "wrong-key":
        ch = Channel(backend, pairwise(backend, METER_SK, STRANGER_SK), METER, UP, Seq(top + 1))
        bad, exc = ch.seal(T_STATUS, [1, S_NO_DATA, 0], nonce())[1], AuthError
    elif attack == "bad-body":
        link.meter.counter.value = top + 1
        bad, exc = link.meter.seal(T_STATUS, [1, 9, 0], nonce())[1], DecodeError
    elif attack == "truncated":
        bad = fresh[:data.draw(st.integers(0, len(fresh) - 1))]
        exc = DecodeError if len(bad) < ENV_HEADER + MAC_BYTES else AuthError
    else:  # a group item where a sealed message belongs
        bad, exc = _group_item(backend)[1], DecodeError
    before = snapshot(he)
    expect(exc, he.open, bad)
    assert snapshot(he) == before
    assert he.open(fresh)[1] == top + 1  # and the genuine next message is still accepted


# --------------------------------------------------------------------------
# the skip-ahead counter across power loss
# --------------------------------------------------------------------------


class PowerCut(Exception):
    pass


class WriteFailed(Exception):
    pass


boots_st = st.lists(
    st.tuples(
        st.integers(0, 80),  # next() calls before the power goes
        st.none() | st.integers(0, 4),  # which persist call of this boot fails
        st.sampled_from(["lost", "durable", "error"]),  # how it fails
    ),
    min_size=1, max_size=12)


@PROPS
@given(block=st.integers(1, 40), boots=boots_st)
def test_counter_never_repeats_across_power_loss(block, boots):
    """`lost`: the power went during the write, which did not complete;
    `durable`: it completed, the power went before persist() returned;
    `error`: persist() raised (flash full, say) and the meter carried on."""
    disk = {"saved": None}
    values = []
    for calls, fail_at, how in boots:
        persists = [0]

        def persist(value, fail_at=fail_at, how=how, persists=persists):
            i = persists[0]
            persists[0] += 1
            if i == fail_at:
                if how == "durable":
                    disk["saved"] = value
                    raise PowerCut()
                if how == "lost":
                    raise PowerCut()
                raise WriteFailed()
            disk["saved"] = value

        counter = SkipAheadCounter(disk["saved"], persist, block)
        for _ in range(calls):
            try:
                values.append(counter.next())
            except PowerCut:
                break
            except WriteFailed:
                continue
    assert len(values) == len(set(values)), "a counter value was used twice"
    assert values == sorted(values)


class CutFlash:
    """firmware.flash.Flash in RAM, whose power can fail during a write:
    the file then holds only a prefix of the new data (a torn write)."""

    def __init__(self):
        self.files = {}
        self.cut_at = None  # the write number that tears
        self.torn = 0  # bytes of that write that reach the flash
        self.writes = 0

    def read(self, name):
        return self.files.get(name)

    def write(self, name, data):
        self.writes += 1
        if self.writes == self.cut_at:
            self.files[name] = bytes(data[:self.torn])
            raise PowerCut()
        self.files[name] = bytes(data)

    def append(self, name, data):
        self.files[name] = self.files.get(name, b"") + bytes(data)

    def remove(self, name):
        self.files.pop(name, None)

    def names(self):
        return list(self.files)


def test_state_survives_reboot():
    """The two-slot record reads back what was saved (the newest slot)."""
    flash = CutFlash()
    state = State(flash)
    state.up_saved, state.down_top, state.session = 64, 1234, 3
    state.save()
    state.save()
    again = State(flash)
    assert (again.seq, again.up_saved, again.down_top, again.session) == (2, 64, 1234, 3)


@PROPS
@given(boots=st.lists(st.tuples(st.integers(0, 100), st.integers(1, 6), st.integers(0, 26)),
                      min_size=1, max_size=8))
def test_meter_state_counter_never_repeats_across_torn_writes(boots):
    """The meter's own persistence (firmware/state.py, two slots) under a
    skip-ahead counter: a write torn at any byte, then a reboot."""
    flash = CutFlash()
    values = []
    for calls, cut, torn in boots:
        state = State(flash)
        counter = SkipAheadCounter(state.up_saved, state.persist_counter)
        flash.cut_at, flash.torn, flash.writes = cut, torn, 0
        for _ in range(calls):
            try:
                values.append(counter.next())
            except PowerCut:
                break
        flash.cut_at = None
    assert len(values) == len(set(values))
    assert values == sorted(values)


# --------------------------------------------------------------------------
# bad input: the specific exception for every decoder
# --------------------------------------------------------------------------


def test_envelope_peek_rejects(backend):
    link = Link(backend)
    _, wire = link.meter.seal(*SAMPLES[0][1:], nonce())
    assert envelope.peek(wire) == (ENV_SEALED, METER)
    expect(DecodeError, envelope.peek, b"")
    expect(DecodeError, envelope.peek, wire[:ENV_HEADER + MAC_BYTES - 1])
    expect(TooLarge, envelope.peek, bytes([ENV_SEALED]) + bytes(MAX_ENVELOPE))
    expect(TooLarge, envelope.peek, wire, len(wire) - 1)
    assert envelope.peek(bytes([ENV_SEALED]) + bytes(MAX_ENVELOPE - 1))[0] == ENV_SEALED
    for kind in (0x21, 0x01, 0xF1, 0x02, 0x22):
        expect(VersionError, envelope.peek, bytes([kind]) + wire[1:])
    for kind in (0x10, 0x13, 0x1F):
        expect(DecodeError, envelope.peek, bytes([kind]) + wire[1:])
    expect(DecodeError, envelope.header, ENV_SEALED, METER, bytes(23))


def test_envelope_open_rejects(backend):
    link = Link(backend)
    _, wire = link.meter.seal(*SAMPLES[0][1:], nonce())
    assert envelope.open(backend, link.key, wire)
    expect(DecodeError, envelope.open, backend, link.key, bytes([ENV_GROUP_ITEM]) + wire[1:])
    expect(AuthError, envelope.open, backend, pairwise(backend, STRANGER_SK), wire)
    expect(AuthError, envelope.open, backend, link.key, wire[:-1])
    expect(AuthError, envelope.open, backend, link.key, wire[:ENV_HEADER + MAC_BYTES])
    expect(AuthError, envelope.open, backend, link.key, wire + b"\x00")
    expect(DecodeError, envelope.open, backend, link.key, wire[:ENV_HEADER + MAC_BYTES - 1])
    expect(TooLarge, envelope.open, backend, link.key, wire + bytes(MAX_ENVELOPE))


def _inner(body_override=None, **fields):
    """An inner message as a list: meter-side response to the head-end."""
    msg = [VERSION, METER, UP, T_STATUS, 5, 1, S_NO_DATA, 0]
    names = ["version", "meter", "direction", "mtype", "ctr"]
    for k, v in fields.items():
        msg[names.index(k)] = v
    if body_override is not None:
        msg = msg[:5] + body_override
    return msg


# (id, plaintext or list to encode, exception) for Channel.unseal at the head-end.
UNSEAL_BAD = [
    ("empty", b"", DecodeError),
    ("not-cbor", b"\xff", DecodeError),
    ("truncated-cbor", cbor2.dumps(_inner())[:-1], DecodeError),
    # zero bytes after the item are padding (test_padding_*); anything else is not
    ("trailing-bytes", cbor2.dumps(_inner()) + b"\x01", DecodeError),
    ("padding-not-zero", cbor2.dumps(_inner()) + b"\x00\x00\x80\x00", DecodeError),
    ("over-max-inner", cbor2.dumps(b"\x00" * (MAX_INNER - 3 + 1)), TooLarge),
    ("too-deep", b"\x81" * 17 + b"\x00", DecodeError),
    ("bad-utf8", b"\x62\xc3\x28", DecodeError),
    ("a-map", {0: 1, 1: METER, 2: UP, 3: T_STATUS, 4: 5}, DecodeError),
    ("an-int", 1, DecodeError),
    ("bytes", b"\x01" * 8, DecodeError),
    ("short-array", [VERSION, METER, UP, T_STATUS], DecodeError),
    ("version-2", _inner(version=2), VersionError),
    ("version-0", _inner(version=0), VersionError),
    ("version-bool", _inner(version=True), VersionError),
    ("version-float", _inner(version=1.0), VersionError),
    ("version-str", _inner(version="1"), VersionError),
    ("other-meter", _inner(meter=OTHER_METER), MismatchError),
    ("meter-float", _inner(meter=float(METER)), MismatchError),
    ("meter-bytes", _inner(meter=struct.pack(">I", METER)), MismatchError),
    ("meter-negative", _inner(meter=-METER), MismatchError),
    ("request-reflected", _inner(direction=DOWN, mtype=T_READ_CURRENT,
                                 body_override=[1, NOW, 0]), DirectionError),
    ("direction-down", _inner(direction=DOWN), DirectionError),
    ("direction-2", _inner(direction=2), DirectionError),
    ("direction-bool", _inner(direction=True), DirectionError),
    ("request-type-up", _inner(mtype=T_READ_CURRENT, body_override=[1, NOW, 0]), MismatchError),
    ("unknown-type", _inner(mtype=99), MismatchError),
    ("type-0", _inner(mtype=0), MismatchError),
    ("type-float", _inner(mtype=5.0), MismatchError),
    ("type-bool", _inner(mtype=True), MismatchError),
    ("counter-negative", _inner(ctr=-1), DecodeError),
    ("counter-2**32", _inner(ctr=2**32), DecodeError),
    ("counter-2**64", _inner(ctr=2**64 - 1), DecodeError),
    ("counter-bool", _inner(ctr=True), DecodeError),
    ("counter-float", _inner(ctr=5.0), DecodeError),
    ("counter-bytes", _inner(ctr=b"\x05"), DecodeError),
    ("counter-list", _inner(ctr=[5]), DecodeError),
    ("counter-none", _inner(ctr=None), DecodeError),
]


@pytest.mark.parametrize(("name", "inner", "exc"), UNSEAL_BAD, ids=[u[0] for u in UNSEAL_BAD])
def test_unseal_rejects(backend, name, inner, exc):
    link = Link(backend)
    pt = inner if isinstance(inner, bytes) else cbor2.dumps(inner)
    wire = seal_plain(backend, link.key, METER, pt)
    before = snapshot(link.headend)
    expect(exc, link.headend.unseal, wire)
    expect(exc, link.headend.open, wire)
    expect(exc, messages.decode, backend, pt, METER, UP)
    assert snapshot(link.headend) == before


def test_request_reflected_to_the_meter_is_a_direction_error(backend):
    """A meter's own response fed back to it, and the head-end's request fed
    back to the head-end: both authentic under the pairwise key."""
    link = Link(backend)
    for mtype, body in ((T_CURRENT, SAMPLES[0][2]), (T_STATUS, SAMPLES[2][2])):
        expect(DirectionError, link.meter.open, link.meter.seal(mtype, body, nonce())[1])
    for mtype, body in ((T_READ_CURRENT, SAMPLES[5][2]), (T_READ_INTERVAL, SAMPLES[6][2])):
        expect(DirectionError, link.headend.open, link.headend.seal(mtype, body, nonce())[1])


def test_wrong_key_is_an_auth_error(backend):
    link = Link(backend)
    stranger = Channel(backend, pairwise(backend, METER_SK, STRANGER_SK), METER, DOWN, Seq())
    expect(AuthError, link.meter.open, stranger.seal(T_READ_CURRENT, [1, NOW, 0], nonce())[1])
    expect(AuthError, stranger.open, link.meter.seal(*SAMPLES[0][1:], nonce())[1])


def _replace(body, i, value):
    body = list(body)
    body[i] = value
    return body


GOOD = {mtype: body for _, mtype, body in SAMPLES}
_iv = GOOD[T_INTERVAL]

# (id, type, body, ...) for messages.check_body: all DecodeError.
BODY_BAD = [
    ("current-short", T_CURRENT, GOOD[T_CURRENT][:2]),
    ("current-long", T_CURRENT, GOOD[T_CURRENT] + [0]),
    ("current-empty", T_CURRENT, []),
    ("current-reqid-bool", T_CURRENT, _replace(GOOD[T_CURRENT], 0, True)),
    ("current-reqid-negative", T_CURRENT, _replace(GOOD[T_CURRENT], 0, -1)),
    ("current-reqid-2**32", T_CURRENT, _replace(GOOD[T_CURRENT], 0, 2**32)),
    ("current-time-float", T_CURRENT, _replace(GOOD[T_CURRENT], 1, float(NOW))),
    ("current-time-str", T_CURRENT, _replace(GOOD[T_CURRENT], 1, "now")),
    ("current-regs-bytes", T_CURRENT, _replace(GOOD[T_CURRENT], 2, b"\x01\x02")),
    ("current-regs-map", T_CURRENT, _replace(GOOD[T_CURRENT], 2, {1: 1, 2: 2, 3: 3, 4: 4})),
    ("current-regs-int", T_CURRENT, _replace(GOOD[T_CURRENT], 2, 1)),
    ("current-regs-odd", T_CURRENT, _replace(GOOD[T_CURRENT], 2, [1, 5, 2, 0, 3, 1, 4])),
    ("current-regs-unsorted", T_CURRENT, _replace(GOOD[T_CURRENT], 2, [2, 0, 1, 5, 3, 1, 4, 1])),
    ("current-regs-repeated", T_CURRENT,
     _replace(GOOD[T_CURRENT], 2, [1, 5, 1, 5, 2, 0, 3, 1, 4, 1])),
    ("current-regs-missing-voltage", T_CURRENT, _replace(GOOD[T_CURRENT], 2, [1, 5, 2, 0, 3, 1])),
    ("current-regs-unknown-tag", T_CURRENT,
     _replace(GOOD[T_CURRENT], 2, [1, 5, 2, 0, 3, 1, 4, 1, 9, 9])),
    ("current-regs-tag-0", T_CURRENT,
     _replace(GOOD[T_CURRENT], 2, [0, 5, 1, 5, 2, 0, 3, 1, 4, 1])),
    ("current-regs-value-bool", T_CURRENT,
     _replace(GOOD[T_CURRENT], 2, [1, True, 2, 0, 3, 1, 4, 1])),
    ("current-regs-value-negative", T_CURRENT,
     _replace(GOOD[T_CURRENT], 2, [1, -5, 2, 0, 3, 1, 4, 1])),
    ("current-regs-value-2**32", T_CURRENT,
     _replace(GOOD[T_CURRENT], 2, [1, 2**32, 2, 0, 3, 1, 4, 1])),
    ("current-regs-nested", T_CURRENT,
     _replace(GOOD[T_CURRENT], 2, [[1, 5], [2, 0], [3, 1], [4, 1]])),
    ("current-regs-too-many", T_CURRENT,
     _replace(GOOD[T_CURRENT], 2, [x for k in range(2 * MAX_ROWS + 1) for x in (k, 0)])),
    ("interval-short", T_INTERVAL, _iv[:9]),
    ("interval-part-equals-parts", T_INTERVAL, _replace(_iv, 1, 1)),
    ("interval-parts-0", T_INTERVAL, _replace(_replace(_iv, 2, 0), 1, 0)),
    ("interval-parts-over-max", T_INTERVAL, _replace(_iv, 2, MAX_PARTS + 1)),
    ("interval-period-0", T_INTERVAL, _replace(_iv, 4, 0)),
    ("interval-start-off-boundary", T_INTERVAL, _replace(_iv, 3, NOW + 1)),
    ("interval-rows-differ", T_INTERVAL, _replace(_iv, 8, [0, 0, 3])),
    ("interval-rows-over-max", T_INTERVAL,
     _replace(_replace(_iv, 7, [1] * (MAX_ROWS + 1)), 8, [0] * (MAX_ROWS + 1))),
    ("interval-rows-bytes", T_INTERVAL, _replace(_iv, 7, b"\x01\x02\x03\x04")),
    ("interval-rows-map", T_INTERVAL, _replace(_iv, 7, {0: 1})),
    ("interval-row-negative", T_INTERVAL, _replace(_iv, 7, [1, -1, 1, 1])),
    ("interval-row-bool", T_INTERVAL, _replace(_iv, 8, [0, False, 0, 0])),
    ("interval-row-2**32", T_INTERVAL, _replace(_iv, 7, [1, 2**32, 1, 1])),
    ("interval-flags-missing-row", T_INTERVAL, _replace(_iv, 9, [4, Q_CLOCK])),
    ("interval-flags-zero", T_INTERVAL, _replace(_iv, 9, [2, 0])),
    ("interval-flags-odd", T_INTERVAL, _replace(_iv, 9, [2])),
    ("interval-flags-unsorted", T_INTERVAL, _replace(_iv, 9, [2, 1, 1, 1])),
    ("interval-flags-int", T_INTERVAL, _replace(_iv, 9, Q_CLOCK)),
    ("interval-base-bool", T_INTERVAL, _replace(_iv, 5, True)),
    ("interval-base-negative", T_INTERVAL, _replace(_iv, 6, -1)),
    ("status-code-0", T_STATUS, [9, 0, 0]),
    ("status-code-unknown", T_STATUS, [9, S_UNSUPPORTED + 1, 0]),
    ("status-detail-2**32", T_STATUS, [9, S_NO_DATA, 2**32]),
    ("status-long", T_STATUS, [9, S_NO_DATA, 0, 0]),
    ("birth-short", T_BIRTH, [3, 40, NOW, 900]),
    ("birth-will-negative", T_BIRTH, [3, -40, NOW, 900, 0]),
    ("birth-time-bool", T_BIRTH, [3, 40, False, 900, 0]),
    ("death-reason-unknown", T_DEATH, [3, DEATH_ORDERLY + 1]),
    ("death-session-list", T_DEATH, [[3], DEATH_WILL]),
    ("death-long", T_DEATH, [3, DEATH_WILL, 0]),
    ("read-current-short", T_READ_CURRENT, [7, NOW]),
    ("read-current-deadline-2**32", T_READ_CURRENT, [7, 2**32, 0]),
    ("read-current-tolerance-negative", T_READ_CURRENT, [7, NOW, -1]),
    ("read-current-reqid-bool", T_READ_CURRENT, [True, NOW, 0]),
    ("read-interval-empty-range", T_READ_INTERVAL, [8, NOW, 0, NOW, NOW]),
    ("read-interval-reversed", T_READ_INTERVAL, [8, NOW, 0, NOW, NOW - 900]),
    ("read-interval-to-2**32", T_READ_INTERVAL, [8, NOW, 0, 0, 2**32]),
    ("read-interval-from-str", T_READ_INTERVAL, [8, NOW, 0, "0", NOW]),
]


@pytest.mark.parametrize(("name", "mtype", "body"), BODY_BAD, ids=[b[0] for b in BODY_BAD])
def test_check_body_rejects(backend, name, mtype, body):
    expect(DecodeError, messages.check_body, mtype, body)
    # The same through the whole path: authentic, sealed, opened. The window
    # does not move, and the genuine sample still opens afterwards.
    link = Link(backend)
    sender, receiver = link.sender_receiver(mtype)
    ctr, wire = sender.seal(mtype, body, nonce())
    before = snapshot(receiver)
    assert receiver.unseal(wire) == (mtype, ctr, body)  # unseal leaves the body to check_body
    expect(DecodeError, receiver.open, wire)
    assert snapshot(receiver) == before
    assert receiver.open(sender.seal(mtype, GOOD[mtype], nonce())[1])[0] == mtype


@pytest.mark.parametrize(("name", "mtype", "body"), SAMPLES, ids=SAMPLE_IDS)
def test_check_body_accepts_the_samples(name, mtype, body):
    assert messages.check_body(mtype, body) is body


def test_check_body_edges_accepted():
    assert messages.check_body(T_CURRENT, [MAX_U32, MAX_U32, [1, MAX_U32, 2, 0, 3, 0, 4, 0, 5, 0,
                                                             6, MAX_U32]])
    assert messages.check_body(T_INTERVAL, [0, MAX_PARTS - 1, MAX_PARTS, 0, 1, 0, 0, [], [], []])
    rows = [0xFFFF] * MAX_ROWS
    flags = [x for r in range(MAX_ROWS) for x in (r, Q_OVERFLOW)]
    assert messages.check_body(T_INTERVAL, [0, 0, 1, NOW, 900, 0, 0, rows, rows, flags])
    assert messages.check_body(T_READ_INTERVAL, [0, 0, 0, MAX_U32 - 1, MAX_U32])
    assert messages.check_body(T_DEATH, [MAX_U32, DEATH_WILL])


def _group_pieces(backend):
    (m, _, key), = _members(backend, 1)
    return m, key, Channel(backend, key, m, UP, Seq())


def _item_for(backend, key, m, body_bytes, kind=ENV_GROUP_ITEM, n=None):
    """A group item for member m whose box authenticates exactly body_bytes."""
    n = n or nonce()
    return envelope.header(kind, m, n) + backend.seal(key, n, digest(body_bytes)) + body_bytes


GROUP_BAD = [  # (id, group body as a list or bytes, exception)
    ("version-2", [2, 42, DOWN, T_READ_CURRENT, 5, 1, NOW, 0], VersionError),
    ("group-id-2**32", [VERSION, 2**32, DOWN, T_READ_CURRENT, 5, 1, NOW, 0], DecodeError),
    ("group-id-negative", [VERSION, -1, DOWN, T_READ_CURRENT, 5, 1, NOW, 0], DecodeError),
    ("group-id-bool", [VERSION, True, DOWN, T_READ_CURRENT, 5, 1, NOW, 0], DecodeError),
    ("group-id-bytes", [VERSION, b"\x00", DOWN, T_READ_CURRENT, 5, 1, NOW, 0], DecodeError),
    ("direction-up", [VERSION, 42, UP, T_READ_CURRENT, 5, 1, NOW, 0], DirectionError),
    ("response-type", [VERSION, 42, DOWN, T_CURRENT, 5, 1, NOW, [1, 1, 2, 1, 3, 1, 4, 1]],
     MismatchError),
    ("counter-2**32", [VERSION, 42, DOWN, T_READ_CURRENT, 2**32, 1, NOW, 0], DecodeError),
    ("short", [VERSION, 42, DOWN, T_READ_CURRENT], DecodeError),
    ("a-map", {0: 1}, DecodeError),
    ("not-cbor", b"\xff\xff", DecodeError),
    ("trailing", cbor2.dumps([VERSION, 42, DOWN, T_READ_CURRENT, 5, 1, NOW, 0]) + b"\x00",
     DecodeError),
    ("over-max-inner", cbor2.dumps(bytes(MAX_INNER - 2)), TooLarge),
]


@pytest.mark.parametrize(("name", "body", "exc"), GROUP_BAD, ids=[g[0] for g in GROUP_BAD])
def test_group_item_rejects_bad_body(backend, name, body, exc):
    m, key, ch = _group_pieces(backend)
    body = body if isinstance(body, bytes) else cbor2.dumps(body)
    item = _item_for(backend, key, m, body)
    before = snapshot(ch)
    expect(exc, ch.open_group_item, item)
    assert snapshot(ch) == before


def test_group_item_rejects(backend):
    m, key, ch = _group_pieces(backend)
    good_body = messages.encode(backend, 42, DOWN, T_READ_CURRENT, 5, [1, NOW, 0])
    item = _item_for(backend, key, m, good_body)
    # mismatched body: another valid request with the first one's box
    other_body = messages.encode(backend, 42, DOWN, T_READ_CURRENT, 5, [2, NOW, 0])
    expect(MismatchError, ch.open_group_item, item[:ENV_HEADER + 32] + other_body)
    expect(MismatchError, ch.open_group_item, item + b"\x00")
    # addressed to another meter
    expect(MismatchError, ch.open_group_item, _item_for(backend, key, m + 1, good_body))
    # wrong key: a box made by someone who is not the head-end
    expect(AuthError, ch.open_group_item,
           _item_for(backend, pairwise(backend, STRANGER_SK), m, good_body))
    # a sealed envelope where a group item belongs, and the other way round
    expect(DecodeError, ch.open_group_item, bytes([ENV_SEALED]) + item[1:])
    expect(DecodeError, ch.open, item)
    # no body, or less than a box
    expect(DecodeError, ch.open_group_item, item[:ENV_HEADER + 32])
    expect(DecodeError, ch.open_group_item, item[:ENV_HEADER + MAC_BYTES])
    expect(DecodeError, ch.open_group_item, item[:ENV_HEADER])
    expect(TooLarge, ch.open_group_item, item + bytes(MAX_ENVELOPE))
    expect(VersionError, ch.open_group_item, bytes([0x22]) + item[1:])
    # a valid item still opens: nothing above moved the window
    assert ch.window.state() == (-1, 0)
    assert ch.open_group_item(item) == (T_READ_CURRENT, 5, [1, NOW, 0], 42)
    expect(DuplicateError, ch.open_group_item, item)
    expect(DecodeError, group.item, m, bytes(23), bytes(32), good_body)
    expect(DecodeError, group.item, m, bytes(24), bytes(31), good_body)


def _env(n=ENV_HEADER + MAC_BYTES):
    return bytes([ENV_SEALED]) + bytes(n - 1)


GATEWAY_BAD = [  # (id, value to encode with cbor2, or bytes, exception)
    ("empty", b"", DecodeError),
    ("not-cbor", b"\xff", DecodeError),
    ("trailing", cbor2.dumps([VERSION, K_ACK, 1, []]) + b"\x00", DecodeError),
    ("truncated", cbor2.dumps([VERSION, K_FORWARD, 0, [_env()]])[:-3], DecodeError),
    ("a-map", {VERSION: K_ACK}, DecodeError),
    ("an-int", 1, DecodeError),
    ("short", [VERSION], DecodeError),
    ("version-2", [2, K_ACK, 1, []], VersionError),
    ("version-bool", [True, K_ACK, 1, []], VersionError),
    ("version-str", ["1", K_ACK, 1, []], VersionError),
    ("kind-unknown", [VERSION, 9, 1, []], DecodeError),
    ("kind-fields", [VERSION, K_ACK, 1, [], 0], DecodeError),
    ("forward-none", [VERSION, K_FORWARD, 0, []], DecodeError),
    ("forward-too-many", [VERSION, K_FORWARD, 0, [_env()] * (MAX_BUNDLE_ITEMS + 1)], DecodeError),
    ("bundle-too-many", [VERSION, K_BUNDLE, 1, 0, [_env()] * (MAX_BUNDLE_ITEMS + 1)], DecodeError),
    ("forward-short-env", [VERSION, K_FORWARD, 0, [_env(ENV_HEADER + MAC_BYTES - 1)]], DecodeError),
    ("forward-long-env", [VERSION, K_FORWARD, 0, [_env(MAX_ENVELOPE + 1)]], DecodeError),
    ("forward-env-str", [VERSION, K_FORWARD, 0, ["x" * 50]], DecodeError),
    ("forward-env-list", [VERSION, K_FORWARD, 0, [[1] * 50]], DecodeError),
    ("forward-envs-bytes", [VERSION, K_FORWARD, 0, _env()], DecodeError),
    ("forward-envs-map", [VERSION, K_FORWARD, 0, {0: _env()}], DecodeError),
    ("forward-tolerance-negative", [VERSION, K_FORWARD, -1, [_env()]], DecodeError),
    ("forward-tolerance-2**32", [VERSION, K_FORWARD, 2**32, [_env()]], DecodeError),
    ("forward-tolerance-bool", [VERSION, K_FORWARD, False, [_env()]], DecodeError),
    ("bundle-seq-2**64", [VERSION, K_BUNDLE, 1, 2**64, [_env()]], DecodeError),
    ("bundle-seq-negative", [VERSION, K_BUNDLE, 1, -1, [_env()]], DecodeError),
    ("bundle-seq-bool", [VERSION, K_BUNDLE, 1, True, [_env()]], DecodeError),
    ("bundle-dap-2**32", [VERSION, K_BUNDLE, 2**32, 0, [_env()]], DecodeError),
    ("bundle-empty", [VERSION, K_BUNDLE, 1, 0, []], DecodeError),
    ("group-nonce-short", [VERSION, K_GROUP, 0, 1, bytes(23), b"\x01", [[1, bytes(32)]]],
     DecodeError),
    ("group-nonce-list", [VERSION, K_GROUP, 0, 1, [0] * 24, b"\x01", [[1, bytes(32)]]],
     DecodeError),
    ("group-body-empty", [VERSION, K_GROUP, 0, 1, bytes(24), b"", [[1, bytes(32)]]], DecodeError),
    ("group-body-over", [VERSION, K_GROUP, 0, 1, bytes(24), bytes(MAX_ENVELOPE + 1),
                         [[1, bytes(32)]]], DecodeError),
    ("group-body-list", [VERSION, K_GROUP, 0, 1, bytes(24), [1], [[1, bytes(32)]]], DecodeError),
    ("group-no-members", [VERSION, K_GROUP, 0, 1, bytes(24), b"\x01", []], DecodeError),
    ("group-too-many", [VERSION, K_GROUP, 0, 1, bytes(24), b"\x01",
                        [[1, bytes(32)]] * (MAX_GROUP_MEMBERS + 1)], DecodeError),
    ("group-box-short", [VERSION, K_GROUP, 0, 1, bytes(24), b"\x01", [[1, bytes(31)]]],
     DecodeError),
    ("group-entry-long", [VERSION, K_GROUP, 0, 1, bytes(24), b"\x01", [[1, bytes(32), 0]]],
     DecodeError),
    ("group-entry-map", [VERSION, K_GROUP, 0, 1, bytes(24), b"\x01", [{1: bytes(32)}]],
     DecodeError),
    ("group-meter-2**32", [VERSION, K_GROUP, 0, 1, bytes(24), b"\x01", [[2**32, bytes(32)]]],
     DecodeError),
    ("group-meter-bool", [VERSION, K_GROUP, 0, 1, bytes(24), b"\x01", [[True, bytes(32)]]],
     DecodeError),
    ("group-id-negative", [VERSION, K_GROUP, 0, -1, bytes(24), b"\x01", [[1, bytes(32)]]],
     DecodeError),
    ("ack-reversed", [VERSION, K_ACK, 1, [[5, 4]]], DecodeError),
    ("ack-range-short", [VERSION, K_ACK, 1, [[5]]], DecodeError),
    ("ack-range-int", [VERSION, K_ACK, 1, [5]], DecodeError),
    ("ack-ranges-map", [VERSION, K_ACK, 1, {5: 6}], DecodeError),
    ("ack-too-many", [VERSION, K_ACK, 1, [[0, 0]] * (MAX_BUNDLE_ITEMS + 1)], DecodeError),
    ("ack-seq-2**64", [VERSION, K_ACK, 1, [[0, 2**64]]], DecodeError),
    ("ack-dap-negative", [VERSION, K_ACK, -1, []], DecodeError),
]


@pytest.mark.parametrize(("name", "value", "exc"), GATEWAY_BAD, ids=[g[0] for g in GATEWAY_BAD])
def test_gateway_decode_rejects(backend, name, value, exc):
    data = value if isinstance(value, bytes) else cbor2.dumps(value)
    expect(exc, gateway.decode, backend, data)


@pytest.mark.parametrize("value", [[VERSION, True, 0, [_env()]], [VERSION, 4.0, 0, []],
                                   [VERSION, 2.0, 0, 1, bytes(24), b"\x01", [[1, bytes(32)]]]],
                         ids=["forward-kind-true", "ack-kind-float", "group-kind-float"])
def test_gateway_decode_rejects_kind_not_int(backend, value):
    expect(DecodeError, gateway.decode, backend, cbor2.dumps(value))


def test_gateway_decode_rejects_oversized(backend):
    data = cbor2.dumps([VERSION, K_FORWARD, 0, [_env(MAX_ENVELOPE)] * 4200])
    assert len(data) > MAX_GATEWAY_MSG
    expect(TooLarge, gateway.decode, backend, data)
    # A message at the item limits is fine.
    ok = cbor2.dumps([VERSION, K_FORWARD, 0, [_env()] * MAX_BUNDLE_ITEMS])
    assert gateway.decode(backend, ok)[0] == K_FORWARD


BAD_TOPICS = [
    "", "/", "m1", "m1/", "/up", "m/up", "m01/up", "m00/up", "m-1/up", "m+1/up", "m 1/up",
    "m1 /up", "m1.0/up", "m0x1/up", "m4294967296/up", "m99999999999/up", "M1/up", "m1/UP",
    "m1/req", "m1/ack", "m1/state", "m1/sideways", "m1/up/", "m1/up/x", "d1/down", "d1/m2/req",
    "d1/m2/ack", "d01/req", "d1/m02/up", "x1/up", "m1/m2/up", "d1/d2/up", "d4294967296/req",
    "d1//up", "d1/m2/up/x", "+/up", "#", "m1/+", "d1/+/up",
]


@pytest.mark.parametrize("topic", BAD_TOPICS)
def test_topics_parse_rejects(topic):
    expect(DecodeError, topics.parse, topic)


def test_topics_parse_accepts():
    assert topics.parse("m0/up") == ("up", 0, None)
    assert topics.parse("m4294967295/down") == ("down", MAX_U32, None)
    assert topics.parse("d7/req") == ("req", None, 7)
    assert topics.parse("d7/m4294967295/up") == ("up", MAX_U32, 7)
    for d, m in ((0, 0), (7, 12), (MAX_U32, MAX_U32)):
        assert topics.parse(topics.meter_up(m, d)) == ("up", m, d)
        assert topics.parse(topics.meter_down(m)) == ("down", m, None)
        for leaf, f in (("req", topics.dap_req), ("up", topics.dap_up), ("ack", topics.dap_ack),
                        ("state", topics.dap_state)):
            assert topics.parse(f(d)) == (leaf, None, d)


@pytest.mark.parametrize("topic", ["m\u00b2/up", "d\u00b9/req", "d1/m\u2463/up"])
def test_topics_parse_non_ascii_digits_raise_decode_error(topic):
    expect(DecodeError, topics.parse, topic)


def test_topics_parse_non_ascii_digits_not_a_meter_name():
    expect(DecodeError, topics.parse, "m\u0661/up")


LOADS_BAD = [
    (b"", DecodeError),
    (b"\x18", DecodeError),  # truncated argument
    (b"\x82\x01", DecodeError),  # truncated array
    (b"\x9f\x01", DecodeError),  # no break
    (b"\xff", DecodeError),  # lone break
    (b"\x1c", DecodeError),  # reserved additional info
    (b"\x01\x02", DecodeError),  # trailing
    (b"\x81" * 17 + b"\x00", DecodeError),  # too deep
    (b"\x5b" + b"\xff" * 8, DecodeError),  # length past the end
    (b"\x9b" + b"\xff" * 8, DecodeError),
    (b"\x62\xc3\x28", DecodeError),  # bad UTF-8
    (b"\xa2\x00\x01\x00\x02", DecodeError),  # duplicate map key
]


@pytest.mark.parametrize(("data", "exc"), LOADS_BAD, ids=[d.hex() or "empty" for d, _ in LOADS_BAD])
def test_backend_loads_rejects(backend, data, exc):
    expect(exc, backend.loads, data, 100)


def test_backend_loads_size_limit(backend):
    data = cbor2.dumps(bytes(100))
    assert backend.loads(data, len(data)) == bytes(100)
    expect(TooLarge, backend.loads, data, len(data) - 1)
    expect(TooLarge, messages.decode, backend, cbor2.dumps(bytes(MAX_INNER)), METER, UP)


@pytest.fixture
def registry(tmp_path):
    store = Store(tmp_path / "store.db")
    store.add_meters([(METER, PURE.public_key(METER_SK), None, None, 900)])
    yield store
    store.close()


def test_unknown_meter(backend, registry):
    ingest = Ingest(registry, HEADEND_SK, backend)
    expect(UnknownPeerError, ingest.channel, OTHER_METER)
    # An envelope that names an unregistered meter is refused and counted.
    link = Link(backend, meter=OTHER_METER, key=pairwise(backend))
    wire = link.meter.seal(*SAMPLES[0][1:], nonce())[1]
    batch = ingest.process([(topics.meter_up(OTHER_METER), wire)], NOW)
    assert batch.accepted == 0 and dict(batch.rejected) == {"unknown-meter": 1}
    # The registered meter's envelope goes through; one under a stranger's key does not.
    ok = Link(backend).meter.seal(*SAMPLES[0][1:], nonce())[1]
    bad = Channel(backend, pairwise(backend, METER_SK, STRANGER_SK), METER, UP, Seq(5)).seal(
        *SAMPLES[0][1:], nonce())[1]
    batch = ingest.process([(topics.meter_up(METER), ok), (topics.meter_up(METER), bad)], NOW)
    assert batch.accepted == 1 and dict(batch.rejected) == {"auth": 1}


# --------------------------------------------------------------------------
# fuzz: nothing but ProtocolError ever escapes a decoder
# --------------------------------------------------------------------------

cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats()
    | st.binary(max_size=40) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(
        st.integers(-5, 40) | st.text(max_size=3), inner, max_size=4),
    max_leaves=30)


def _mutate(data, draw):
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 3))
        if op == 0 and b:
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        elif op == 1 and b:
            at = draw(st.integers(0, len(b) - 1))
            del b[at:at + draw(st.integers(1, 8))]
        elif op == 2:
            at = draw(st.integers(0, len(b)))
            b[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif b:
            b = b[:draw(st.integers(0, len(b)))]
    return bytes(b)


def _valid_inners(backend):
    out = []
    for _, mtype, body in SAMPLES:
        out.append(messages.encode(backend, METER, messages.direction_of(mtype), mtype, 3, body))
    return out


def _guarded(fn, *args):
    """Call fn; only a ProtocolError may come out."""
    try:
        return fn(*args)
    except ProtocolError as e:
        assert type(e.reason) is str
        return None


@settings(PROPS, max_examples=300)
@given(data=st.data())
def test_fuzz_every_decoder(backend, data):
    link = Link(backend)
    gm, gkey, gch = link.meter_id, link.key, link.meter
    source = data.draw(st.sampled_from(["random", "cbor", "mutated-inner", "mutated-wire",
                                        "mutated-gateway", "mutated-group"]))
    if source == "random":
        raw = data.draw(st.binary(max_size=300))
    elif source == "cbor":
        raw = cbor2.dumps(data.draw(cbor_values))
    elif source == "mutated-inner":
        raw = _mutate(data.draw(st.sampled_from(_valid_inners(backend))), data.draw)
    elif source == "mutated-wire":
        mtype, body = data.draw(st.sampled_from([(t, b) for _, t, b in SAMPLES]))
        sender, _ = link.sender_receiver(mtype)
        raw = _mutate(sender.seal(mtype, body, nonce())[1], data.draw)
    elif source == "mutated-gateway":
        env = link.meter.seal(*SAMPLES[0][1:], nonce())[1]
        raw = _mutate(data.draw(st.sampled_from([
            gateway.forward(backend, 3, [env]), gateway.bundle(backend, 1, 2, [env]),
            gateway.ack(backend, 1, [[1, 2]]),
            gateway.group(backend, 1, 2, bytes(24), b"\x01", [[1, bytes(32)]])])), data.draw)
    else:
        body = messages.encode(backend, 42, DOWN, T_READ_INTERVAL, 5, GOOD[T_READ_INTERVAL])
        raw = _mutate(body, data.draw)
    # The raw bytes into every decoder.
    _guarded(backend.loads, raw, MAX_INNER)
    _guarded(envelope.peek, raw)
    _guarded(envelope.open, backend, link.key, raw)
    _guarded(link.headend.unseal, raw)
    _guarded(link.headend.open, raw)
    _guarded(link.meter.open, raw)
    _guarded(link.meter.unseal_group_item, raw)
    _guarded(link.meter.open_group_item, raw)
    _guarded(gateway.decode, backend, raw)
    _guarded(group.body_header, backend, raw)
    for d in (UP, DOWN):
        got = _guarded(messages.decode, backend, raw, METER, d)
        if got is not None:
            _guarded(messages.check_body, got[0], got[2])
    # Sealed as a plaintext (so it gets past the MAC) and as a group body.
    if len(raw) <= MAX_ENVELOPE - ENV_HEADER - MAC_BYTES:
        _guarded(link.headend.open, seal_plain(backend, link.key, METER, raw))
        _guarded(link.meter.open, seal_plain(backend, link.key, METER, raw))
        _guarded(gch.open_group_item, _item_for(backend, gkey, gm, raw or b"\x00"))
    # And any structure into check_body, whatever its type says.
    body = data.draw(st.lists(cbor_values, max_size=11))
    _guarded(messages.check_body, data.draw(st.sampled_from(sorted(messages.BODY))), body)


@settings(PROPS, max_examples=300)
@given(obj=cbor_values, meter=st.integers(0, 3), d=st.integers(0, 1))
def test_fuzz_check_header(obj, meter, d):
    """Any decoded value as an inner message (the arrays start like one)."""
    for candidate in (obj, [VERSION, meter, d, 16 if d == DOWN else 3, 0, obj],
                      [VERSION, meter, d, obj, obj, obj], [obj] * 5):
        got = _guarded(messages.check_header, candidate, meter, d)
        if got is not None:
            _guarded(messages.check_body, got[0], candidate[5:])


ascii_topics = st.text(alphabet="md0123456789/+#upownreqacksta x", max_size=24)


@PROPS
@given(topic=ascii_topics | st.builds(
    lambda a, b, c: "/".join(x for x in (a, b, c) if x is not None),
    st.sampled_from(["m", "d"]).flatmap(lambda p: st.integers(0, 2**34).map(lambda n: p + str(n))),
    st.none() | st.sampled_from(["up", "down", "req", "ack", "state", "m5"]),
    st.none() | st.sampled_from(["up", "down", "req"])))
def test_fuzz_topics_parse_ascii(topic):
    got = _guarded(topics.parse, topic)
    if got is not None:
        leaf, meter, dap = got
        rebuilt = ("m%d/%s" % (meter, leaf) if dap is None else
                   "d%d/%s" % (dap, leaf) if meter is None else "d%d/m%d/%s" % (dap, meter, leaf))
        assert rebuilt == topic  # one name per id: the parse is exact


@PROPS
@example(topic="m\u00b2/up")
@given(topic=st.text(max_size=24))
def test_fuzz_topics_parse_any_text(topic):
    _guarded(topics.parse, topic)


@pytest.fixture(scope="module")
def meter_dir():
    d = tempfile.mkdtemp(prefix="meter-flash-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def new_meter(backend, root, meter=METER, seed=None, key=None):
    return Meter(meter, key or pairwise(backend), backend, Flash(root),
                 SimulatedLoad(seed if seed is not None else meter % 1000))


@settings(PROPS, max_examples=150)
@given(data=st.data())
def test_fuzz_meter_handle_never_raises(backend, data):
    m = Meter(METER, pairwise(backend), backend, CutFlash(), SimulatedLoad(7))
    he = Channel(backend, pairwise(backend), METER, DOWN, Seq(data.draw(u32)))
    kind = data.draw(st.sampled_from(["random", "mutated", "authentic-garbage"]))
    if kind == "random":
        raw = data.draw(st.binary(max_size=200))
    elif kind == "mutated":
        raw = _mutate(he.seal(*data.draw(st.sampled_from(SAMPLES[5:]))[1:], nonce())[1],
                      data.draw)
    else:  # authentic and fresh, any inner bytes
        raw = seal_plain(backend, he.key, METER, _mutate(_valid_inners(backend)[5], data.draw))
    out = m.handle(raw, NOW, os.urandom)
    assert isinstance(out, list)
    assert m.stats["requests"] + m.stats["rejected"] == 1
    for wire in out:  # whatever it answered is authentic and well-formed
        mtype, _, body = Channel(backend, he.key, METER, DOWN, Seq()).open(wire)
        assert mtype in messages.UPLINK


# --------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------

SIZES: dict = {}


@pytest.fixture(scope="module", autouse=True)
def size_report(request):
    """After the module: every measured size on the terminal, even when
    output is captured."""
    yield
    if SIZES:
        lines = ["", "wire sizes measured by tests/test_protocol.py:"]
        lines += [f"  {name}: {n} bytes (limit {limit})" for name, (n, limit) in SIZES.items()]
        capman = request.config.pluginmanager.getplugin("capturemanager")
        if capman is None:
            print("\n".join(lines))
        else:
            with capman.global_and_fixture_disabled():
                print("\n".join(lines))


def _report(name, n, limit):
    SIZES[name] = (n, limit)
    print(f"\n[size] {name}: {n} bytes (limit {limit})")


def test_size_current_response(backend):
    top = MAX_U32
    worst = Link(backend, meter=top, up=top - 1)
    wire = worst.meter.seal(T_CURRENT, [top, top - 15, [1, top - 2, 2, top - 3, 3, top - 4,
                                                        4, top - 5]], nonce())[1]
    _report(f"current response, worst ({backend.name})", len(wire), 96)
    assert len(wire) == 94
    assert len(wire) <= 96
    typical = Link(backend, meter=1001, up=42)
    wire = typical.meter.seal(*SAMPLES[0][1:], nonce())[1]
    _report(f"current response, typical ({backend.name})", len(wire), 96)
    assert len(wire) <= 96


def test_size_current_response_from_the_meter(backend, meter_dir):
    """The meter core's own answer, with ids and counters near 2**32."""
    top = MAX_U32
    m = new_meter(backend, os.path.join(meter_dir, backend.name + "-size"), meter=top, seed=5)
    m.channel.counter._next = top - 1
    he = Channel(backend, pairwise(backend), top, DOWN, Seq(top - 3))
    (wire,) = m.handle(he.seal(T_READ_CURRENT, [top, top - 1, 0], nonce())[1], top - 1000,
                       os.urandom)
    _report(f"current response from Meter.handle, ids near 2**32 ({backend.name})", len(wire), 96)
    assert len(wire) <= 96


def test_size_on_demand_request(backend):
    top = MAX_U32
    for tol in (0, 0xFFFF):
        worst = Link(backend, meter=top, down=top - 1)
        wire = worst.headend.seal(T_READ_CURRENT, [top, top - 15, tol], nonce())[1]
        _report(f"on-demand request, worst, tolerance {tol} ({backend.name})", len(wire), 72)
        assert len(wire) <= 72
    typical = Link(backend, meter=1001, down=1000)
    wire = typical.headend.seal(T_READ_CURRENT, ReadSpec("current").body(7, NOW + 10), nonce())[1]
    _report(f"on-demand request, typical ({backend.name})", len(wire), 72)
    assert len(wire) <= 72


def test_size_on_demand_request_max_tolerance(backend):
    top = MAX_U32
    spec = ReadSpec("current", tolerance=MAX_TOLERANCE)
    wire = Link(backend, meter=top, down=top - 1).headend.seal(
        T_READ_CURRENT, spec.body(top, top - 15), nonce())[1]
    _report(f"on-demand request, worst, tolerance {MAX_TOLERANCE} ({backend.name})",
            len(wire), 72)
    assert len(wire) <= 72
    with pytest.raises(ValueError):
        ReadSpec("current", tolerance=MAX_TOLERANCE + 1)


def test_size_interval_response_6h(backend, meter_dir):
    """From the meter core: 24 rows of 15 minutes of a simulated household."""
    for seed, label in ((1001, "household"), (1002, "household with solar")):
        root = os.path.join(meter_dir, f"{backend.name}-6h-{seed}")
        m = new_meter(backend, root, meter=seed, seed=seed)
        m.catch_up(NOW, history_from=NOW - 86400)
        he = Channel(backend, pairwise(backend), seed, DOWN, Seq(1))
        req = he.seal(T_READ_INTERVAL, [5, NOW + 60, 0, NOW - 6 * 3600, NOW], nonce())[1]
        (wire,) = m.handle(req, NOW, os.urandom)
        mtype, _, body = he.open(wire)
        assert mtype == T_INTERVAL and len(body[7]) == 24
        _report(f"6 h interval response, {label} ({backend.name})", len(wire), 300)
        assert len(wire) <= 300
    # Worst case for the same rows: ids, counter and registers near 2**32,
    # every row flagged, deltas of a heavy household (up to 2.5 kWh per row).
    top = MAX_U32
    rng = random.Random(6)
    rows = [rng.randrange(256, 2500) for _ in range(24)]
    flags = [x for r in range(24) for x in (r, Q_OVERFLOW | Q_CLOCK)]
    link = Link(backend, meter=top, up=top - 1)
    wire = link.meter.seal(T_INTERVAL, [top, 0, 1, (top // 900) * 900 - 86400, 900, top - 10,
                                        top - 10, rows, rows, flags], nonce())[1]
    _report(f"6 h interval response, worst ({backend.name})", len(wire), 300)
    assert len(wire) <= 300


def test_size_largest_interval_part_fits(backend):
    """96 rows, deltas at the meter's clamp (65535), every row flagged:
    still within MAX_INNER and MAX_ENVELOPE."""
    top = MAX_U32
    rows = [0xFFFF] * MAX_ROWS
    flags = [x for r in range(MAX_ROWS) for x in (r, 0xF)]
    link = Link(backend, meter=top, up=top - 1)
    wire = link.meter.seal(T_INTERVAL, [top, MAX_PARTS - 1, MAX_PARTS, 0, 900, top, top, rows,
                                        rows, flags], nonce())[1]
    _report(f"96-row interval part, worst ({backend.name})", len(wire), MAX_ENVELOPE)
    assert len(wire) - ENV_HEADER - MAC_BYTES <= MAX_INNER
    assert Link(backend, meter=top).headend.open(wire)[0] == T_INTERVAL


# --------------------------------------------------------------------------
# padding: a sealed length does not tell the relay how much power a home draws
# --------------------------------------------------------------------------


@PROPS
@given(a=st.lists(u32, min_size=4, max_size=4), b=st.lists(u32, min_size=4, max_size=4))
def test_padding_hides_register_values(backend, a, b):
    """Two current readings of one meter for one request, whatever their
    register values (an idle home or a busy one, with or without export):
    sealed, they are the same length."""
    link = Link(backend, meter=1001, up=42)
    lengths = set()
    for values in (a, b):
        regs = [x for tag, v in zip(obis.CURRENT_REGISTERS, values) for x in (tag, v)]
        link.meter.counter = Seq(42)
        lengths.add(len(link.meter.seal(T_CURRENT, [7, NOW, regs], nonce())[1]))
    assert len(lengths) == 1


@PROPS
@given(rows=st.integers(0, MAX_ROWS), data=st.data())
def test_padding_hides_interval_values(backend, rows, data):
    """Two interval responses with the same number of rows, whatever the
    registers at their start, the values of their rows (the meter clamps a
    row at 65,535 Wh and flags it) and which rows carry which quality
    flags: the same length."""
    link = Link(backend, meter=1001, up=43)
    deltas = st.lists(st.integers(0, 0xFFFF), min_size=rows, max_size=rows)
    flagged = st.lists(st.tuples(st.integers(0, max(rows - 1, 0)), st.integers(1, 15)),
                       max_size=rows, unique_by=lambda f: f[0]).map(
        lambda fs: [x for f in sorted(fs) for x in f] if rows else [])
    lengths = set()
    for _ in range(2):
        body = [8, 0, 1, NOW, 900, data.draw(u32), data.draw(u32), data.draw(deltas),
                data.draw(deltas), data.draw(flagged)]
        link.meter.counter = Seq(43)
        wire = link.meter.seal(T_INTERVAL, body, nonce())[1]
        lengths.add(len(wire))
        assert link.headend.open(wire)[2] == body
        link.headend.window = type(link.headend.window)()  # the same counter again
    assert len(lengths) == 1


def test_padding_is_zero_bytes_and_only_on_readings(backend):
    """What follows the inner message: zero bytes, as many as the vector
    generator counts with cbor2; none on the messages without readings."""
    for _, mtype, body in SAMPLES:
        direction = messages.direction_of(mtype)
        pt = messages.encode(backend, METER, direction, mtype, 5, body)
        bare = cbor2.dumps([VERSION, METER, direction, mtype, 5] + body)
        assert pt == bare + reference_padding(mtype, body)
        assert (len(pt) > len(bare)) == (mtype in (T_CURRENT, T_INTERVAL))


def test_padding_is_accepted_from_a_sender_that_pads_more_or_not_at_all(backend):
    """A receiver takes any run of zero bytes after the item: a meter with
    an earlier firmware (no padding) and a future policy (more) both open."""
    link = Link(backend)
    for _, mtype, body in SAMPLES:
        sender = link.meter if messages.direction_of(mtype) == UP else link.headend
        receiver = link.headend if sender is link.meter else link.meter
        for extra in (None, 0, 40):
            ctr = sender.counter.next()
            pt = cbor2.dumps([VERSION, METER, sender.sends, mtype, ctr] + body)
            if extra is not None:
                pt += bytes(messages.padding(mtype, body) + extra)
            assert receiver.open(seal_plain(backend, link.key, METER, pt)) == (mtype, ctr, body)


# --------------------------------------------------------------------------
# the will rule
# --------------------------------------------------------------------------


def _session(link, session, now=NOW):
    """What Meter.connect does: seal the will, then the birth naming it."""
    will_ctr, will = link.meter.seal(T_DEATH, [session, DEATH_WILL], nonce())
    _, birth = link.meter.seal(T_BIRTH, [session, will_ctr, now, 900, 0], nonce())
    return will_ctr, will, birth


def test_will_older_than_window_accepted_once(backend):
    link = Link(backend)
    he = link.headend
    will_ctr, will, birth = _session(link, 1)
    assert he.open(birth)[0] == T_BIRTH and he.pending_will == will_ctr
    for _ in range(REPLAY_WINDOW + 10):  # the session goes on; the will falls out of the window
        he.open(link.meter.seal(*SAMPLES[0][1:], nonce())[1])
    expect(StaleError, he.window.check, will_ctr)
    assert he.open(will) == (T_DEATH, will_ctr, [1, DEATH_WILL])
    assert he.pending_will is None
    before = snapshot(he)
    expect(StaleError, he.open, will)  # once
    assert snapshot(he) == before


def test_will_inside_window_accepted_once(backend):
    link = Link(backend)
    he = link.headend
    will_ctr, will, birth = _session(link, 1)
    he.open(birth)
    he.open(link.meter.seal(*SAMPLES[0][1:], nonce())[1])
    assert he.open(will)[0] == T_DEATH
    expect(DuplicateError, he.open, will)


def test_will_of_an_earlier_session_older_than_window_rejected(backend):
    link = Link(backend)
    he = link.headend
    old_ctr, old_will, birth1 = _session(link, 1)
    he.open(birth1)
    for _ in range(REPLAY_WINDOW):
        he.open(link.meter.seal(*SAMPLES[0][1:], nonce())[1])
    new_ctr, new_will, birth2 = _session(link, 2)
    he.open(birth2)
    before = snapshot(he)
    expect(StaleError, he.open, old_will)
    assert snapshot(he) == before and he.pending_will == new_ctr
    assert he.open(new_will) == (T_DEATH, new_ctr, [2, DEATH_WILL])


def test_will_of_an_earlier_session_inside_window_rejected(backend):
    link = Link(backend)
    he = link.headend
    _, old_will, birth1 = _session(link, 1)
    he.open(birth1)
    _, _, birth2 = _session(link, 2)
    he.open(birth2)
    before = snapshot(he)
    with pytest.raises(ProtocolError):
        he.open(old_will)
    assert snapshot(he) == before


def test_will_rule_with_the_meter_core(backend, meter_dir):
    """Meter.connect seals will and birth; the head-end accepts the will
    however late it comes, after the meter has gone on talking."""
    root = os.path.join(meter_dir, backend.name + "-will")
    m = new_meter(backend, root)
    he = Channel(backend, pairwise(backend), METER, DOWN, Seq(1))
    will, birth = m.connect(NOW, os.urandom)
    mtype, _, body = he.open(birth)
    assert mtype == T_BIRTH and body[0] == m.state.session and body[3] == 900
    for i in range(REPLAY_WINDOW + 2):
        req = he.seal(T_READ_CURRENT, [i, NOW + 100, 0], nonce())[1]
        for wire in m.handle(req, NOW, os.urandom):
            assert he.open(wire)[0] == T_CURRENT
    assert he.open(will) == (T_DEATH, body[1], [m.state.session, DEATH_WILL])
    expect(StaleError, he.open, will)
    top = he.window.top
    assert top - body[1] >= REPLAY_WINDOW
    assert he.open(m.goodbye(os.urandom)) == (T_DEATH, top + 1, [m.state.session, DEATH_ORDERLY])


# --------------------------------------------------------------------------
# the meter core answering requests
# --------------------------------------------------------------------------


def _expected_registers(seed, now, history_from=None, period=900):
    """What a SimulatedLoad meter must report at `now`, computed here."""
    src = SimulatedLoad(seed, period)
    k_now = now // period
    start = k_now if history_from is None else min(k_now, history_from // period)
    imp, exp = src.initial()
    for k in range(start, k_now):
        di, de = src.interval(k)
        imp, exp = (imp + di) & MAX_U32, (exp + de) & MAX_U32
    di, de = src.peek(k_now, now - k_now * period)
    return [obis.ENERGY_IMPORT, (imp + di) & MAX_U32, obis.ENERGY_EXPORT, (exp + de) & MAX_U32,
            obis.POWER, src.power(now), obis.VOLTAGE, src.voltage(now)]


def test_meter_answers_requests(backend, meter_dir):
    root = os.path.join(meter_dir, backend.name + "-answers")
    seed = 3  # a home with solar: export too
    m = new_meter(backend, root, seed=seed)
    history = NOW - 2 * 86400
    m.catch_up(NOW - 3600, history_from=history)
    he = Channel(backend, pairwise(backend), METER, DOWN, Seq(1))
    now = NOW + 437
    (wire,) = m.handle(he.seal(T_READ_CURRENT, [1, now + 10, 0], nonce())[1], now, os.urandom)
    assert he.open(wire)[2] == [1, now, _expected_registers(seed, now, history)]
    # interval rows, values from the metrology
    src = SimulatedLoad(seed)
    frm, to = NOW - 18 * 3600, NOW - 12 * 3600  # 06:00 to 12:00 UTC: the sun is up
    (wire,) = m.handle(he.seal(T_READ_INTERVAL, [2, now + 10, 0, frm, to], nonce())[1], now,
                       os.urandom)
    mtype, _, body = he.open(wire)
    k0 = frm // 900
    assert mtype == T_INTERVAL and body[:5] == [2, 0, 1, frm, 900]
    assert body[7] == [src.interval(k)[0] for k in range(k0, k0 + 24)]
    assert body[8] == [src.interval(k)[1] for k in range(k0, k0 + 24)]
    assert any(body[8]) and body[9] == []
    # two days: two parts of 96 rows, the second based where the first ended
    out = m.handle(he.seal(T_READ_INTERVAL, [3, now + 10, 0, history, NOW], nonce())[1], now,
                   os.urandom)
    parts = [he.open(w)[2] for w in out]
    assert [p[:5] for p in parts] == [[3, 0, 2, history, 900], [3, 1, 2, history + 86400, 900]]
    assert [len(p[7]) for p in parts] == [MAX_ROWS, MAX_ROWS]
    assert parts[1][5] == parts[0][5] + sum(parts[0][7])
    assert parts[1][6] == parts[0][6] + sum(parts[0][8])
    # nothing held: S_NO_DATA with the oldest interval held
    (wire,) = m.handle(he.seal(T_READ_INTERVAL, [4, now + 10, 0, 0, 900], nonce())[1], now,
                       os.urandom)
    assert he.open(wire)[2] == [4, S_NO_DATA, m.profile.oldest_start()]
    assert m.profile.oldest_start() == history
    # expired
    (wire,) = m.handle(he.seal(T_READ_CURRENT, [5, now - 1, 0], nonce())[1], now, os.urandom)
    assert he.open(wire)[2] == [5, S_EXPIRED, now]
    # authentic but malformed: answered with S_MALFORMED, and counted as a request
    (wire,) = m.handle(he.seal(T_READ_INTERVAL, [6, now + 10, 0, to, frm], nonce())[1], now,
                       os.urandom)
    assert he.open(wire)[2] == [6, S_MALFORMED, 0]
    assert m.stats["rejected"] == 0 and m.stats["requests"] == 6


def test_meter_answers_a_group_item(backend, meter_dir):
    root = os.path.join(meter_dir, backend.name + "-group")
    m = new_meter(backend, root, seed=1001)
    key = pairwise(backend)
    n = nonce()
    body, entries = group.build(backend, 77, T_READ_CURRENT, 500, [21, NOW + 30, 15],
                                [(METER, key), (METER + 1, pairwise(backend, STRANGER_SK))], n)
    msg = gateway.group(backend, 15, 77, n, body, entries)
    split = inbound.request(backend, 3, msg)
    mine = [d for d in split.deliveries if d.meter == METER]
    (wire,) = m.handle(mine[0].payload, NOW, os.urandom)
    he = Channel(backend, key, METER, DOWN, Seq())
    mtype, _, got = he.open(wire)
    assert mtype == T_CURRENT and got[:2] == [21, NOW]
    assert got[2] == _expected_registers(1001, NOW)
    theirs = [d for d in split.deliveries if d.meter != METER]
    assert m.handle(theirs[0].payload, NOW, os.urandom) == []
    assert m.handle(mine[0].payload, NOW, os.urandom) == []  # a replay
    assert m.stats["rejected:mismatch"] == 1 and m.stats["rejected:duplicate"] == 1


def test_meter_rejects_leave_its_state_unchanged(backend, meter_dir):
    root = os.path.join(meter_dir, backend.name + "-rejects")
    m = new_meter(backend, root)
    he = Channel(backend, pairwise(backend), METER, DOWN, Seq(1))
    req = he.seal(T_READ_CURRENT, [1, NOW + 10, 0], nonce())[1]
    assert len(m.handle(req, NOW, os.urandom)) == 1

    def state():
        files = {n: Flash(root).read(n) for n in sorted(os.listdir(root))}
        return m.channel.window.state(), m.channel.counter.peek(), files

    own = m.channel.seal(T_STATUS, [1, S_NO_DATA, 0], nonce())[1]  # the meter's own, reflected
    before = state()
    stranger = Channel(backend, pairwise(backend, STRANGER_SK), METER, DOWN, Seq(50))
    bad = {
        "duplicate": req,
        "tampered": flip(req, 40, 1),
        "forged": envelope.header(ENV_SEALED, METER, nonce()) + os.urandom(40),
        "reflected": own,
        "wrong-key": stranger.seal(T_READ_CURRENT, [1, NOW + 10, 0], nonce())[1],
        "other-meter": Channel(backend, pairwise(backend), OTHER_METER, DOWN, Seq(60)).seal(
            T_READ_CURRENT, [1, NOW + 10, 0], nonce())[1],
        "truncated": req[:30],
        "oversized": req + bytes(MAX_ENVELOPE),
        "version": bytes([0x21]) + req[1:],
    }
    for name, wire in bad.items():
        assert m.handle(wire, NOW, os.urandom) == [], name
        assert state() == before, name
    assert {k: v for k, v in m.stats.items() if k.startswith("rejected:")} == {
        "rejected:duplicate": 1, "rejected:auth": 3, "rejected:direction": 1,
        "rejected:mismatch": 1, "rejected:malformed": 1, "rejected:oversized": 1,
        "rejected:version": 1}


def test_meter_reboot_refuses_replayed_requests(backend):
    """After a reboot, every request at or below the saved top is refused,
    seen before or not; newer ones are answered."""
    flash = CutFlash()
    key = pairwise(backend)
    m = Meter(METER, key, backend, flash, SimulatedLoad(1))
    he = Channel(backend, key, METER, DOWN, Seq(1))
    r0, r1, r2 = (he.seal(T_READ_CURRENT, [i, NOW + 10, 0], nonce())[1] for i in range(3))
    assert len(m.handle(r1, NOW, os.urandom)) == 1 and len(m.handle(r2, NOW, os.urandom)) == 1
    rebooted = Meter(METER, key, backend, flash, SimulatedLoad(1))
    for old in (r2, r1, r0):
        assert rebooted.handle(old, NOW, os.urandom) == []
    assert rebooted.stats["rejected"] == 3
    r3 = he.seal(T_READ_CURRENT, [3, NOW + 10, 0], nonce())[1]
    (wire,) = rebooted.handle(r3, NOW, os.urandom)
    assert he.open(wire)[2][0] == 3


def test_meter_reboot_keeps_its_profile(backend, tmp_path):
    key = pairwise(backend)
    m = Meter(METER, key, backend, Flash(str(tmp_path)), SimulatedLoad(1))
    m.catch_up(NOW, history_from=NOW - 30 * 3600)  # more than one 96-row segment file
    rebooted = Meter(METER, key, backend, Flash(str(tmp_path)), SimulatedLoad(1))
    assert (rebooted.profile.first, rebooted.profile.last) == (m.profile.first, m.profile.last)
    for k in range(m.profile.first, m.profile.last + 1):
        assert rebooted.profile.row(k) == m.profile.row(k)
    he = Channel(backend, key, METER, DOWN, Seq(1))
    req = he.seal(T_READ_INTERVAL, [1, NOW + 10, 0, NOW - 6 * 3600, NOW], nonce())[1]
    (wire,) = rebooted.handle(req, NOW, os.urandom)
    src = SimulatedLoad(1)
    assert he.open(wire)[2][7] == [src.interval(k)[0] for k in range(NOW // 900 - 24, NOW // 900)]


def test_meter_counter_survives_reboot(backend, tmp_path):
    """Uplink counters after a reboot are all above those before it: the
    head-end accepts every birth and goodbye of three boots."""
    key = pairwise(backend)
    he = Channel(backend, key, METER, DOWN, Seq(1))
    seen = []
    for boot in range(3):
        m = Meter(METER, key, backend, Flash(str(tmp_path)), SimulatedLoad(1))
        _, birth = m.connect(NOW, os.urandom)
        mtype, ctr, body = he.open(birth)
        assert body[0] == boot + 1  # the session number survives too
        seen.append(ctr)
        for _ in range(5 + 20 * boot):
            seen.append(he.open(m.goodbye(os.urandom))[1])
    assert seen == sorted(set(seen))


def test_two_requesters_on_one_store(backend, tmp_path):
    db = tmp_path / "store.db"
    Store(db).add_meters([(METER, backend.public_key(METER_SK), None, None, 900)])
    a = Requester(Store(db), HEADEND_SK, backend)
    b = Requester(Store(db), HEADEND_SK, backend)
    m = Meter(METER, pairwise(backend), backend, CutFlash(), SimulatedLoad(1))
    for requester in (a, b, a):
        (out,) = requester.unicast(METER, ReadSpec("current"), NOW).messages
        assert len(m.handle(out.payload, NOW + 1, os.urandom)) == 1, m.stats
