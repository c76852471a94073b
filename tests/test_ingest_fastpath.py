"""The head-end's ingest fast path (headend/ingest.py: Ingest._open and
_body_ok) must give exactly the verdicts of the general path
(Ingest._open_checked, messages.check_body): it exists for speed only
(make bench, ingest_vs_raw_open)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey

from headend.ingest import Ingest, _body_ok
from headend.store import Store
from shared import gateway, messages
from shared.backend import NATIVE
from shared.channel import Channel
from shared.const import DOWN, T_BIRTH, T_CURRENT, T_INTERVAL, T_STATUS, UP
from shared.errors import DecodeError
from tests import dap_helpers

U32 = 0xFFFFFFFF
ints = st.one_of(st.integers(0, 20), st.sampled_from([0, 1, 4, 5, 6, 7, 95, 96, 97, U32, U32 + 1]),
                 st.integers(-3, -1), st.integers(0, 2**40))
atoms = st.one_of(ints, st.booleans(), st.none(), st.floats(allow_nan=False, width=32),
                  st.text(max_size=2), st.binary(max_size=2))
small_lists = st.lists(st.one_of(ints, atoms), max_size=12)


def pairs():
    keys = st.lists(st.integers(0, 8), max_size=8, unique=True).map(sorted)
    good = keys.flatmap(lambda ks: st.lists(ints, min_size=len(ks), max_size=len(ks)).map(
        lambda vs: [x for kv in zip(ks, vs) for x in kv]))
    return st.one_of(good, small_lists, atoms)


def current_bodies():
    return st.one_of(
        st.tuples(ints, ints, pairs()).map(list),
        st.tuples(atoms, ints, pairs()).map(list),
        st.lists(st.one_of(ints, pairs()), max_size=5),
    )


def interval_bodies():
    head = st.tuples(ints, st.integers(0, 3), st.integers(0, 34),
                     st.sampled_from([0, 900, 1800, 1767229200, 1767229201, U32]),
                     st.sampled_from([0, 1, 900, 7]), ints, ints)
    rows = st.lists(ints, max_size=6)
    flags = st.one_of(st.lists(st.integers(0, 7), max_size=6), pairs())
    return st.one_of(
        st.tuples(head, rows, rows, flags).map(lambda t: [*t[0], t[1], t[2], t[3]]),
        st.tuples(head, st.one_of(rows, atoms), st.one_of(rows, atoms), flags).map(
            lambda t: [*t[0], t[1], t[2], t[3]]),
        st.lists(st.one_of(ints, rows, atoms), max_size=11),
    )


def general(mtype: int, body: list) -> bool:
    try:
        messages.check_body(mtype, body)
        return True
    except DecodeError:
        return False


@settings(max_examples=1500, deadline=None)
@given(current_bodies())
def test_current_body_verdicts_match(body: list) -> None:
    assert _body_ok(T_CURRENT, body) == general(T_CURRENT, body)


@settings(max_examples=1500, deadline=None)
@given(interval_bodies())
def test_interval_body_verdicts_match(body: list) -> None:
    assert _body_ok(T_INTERVAL, body) == general(T_INTERVAL, body)


def test_other_types_always_take_the_general_path() -> None:
    for mtype in (T_BIRTH, T_STATUS, 16, 17):
        assert not _body_ok(mtype, [1, 2, 3, 4, 5])


def _messages(he: PrivateKey, secrets: dict[int, PrivateKey]) -> list[tuple[str, bytes]]:
    """A batch mixing good envelopes with every kind of bad one."""
    chans = {m: Channel(NATIVE, NATIVE.beforenm(bytes(he.public_key), bytes(sk)), m, UP,
                        dap_helpers.Counter())
             for m, sk in secrets.items()}
    t = 1767229200
    good = [chans[m].seal(T_CURRENT, [7, t, [1, 5, 2, 0, 3, 4, 4, 2301]], os.urandom(24))[1]
            for m in (1, 2, 3)]
    interval = chans[1].seal(T_INTERVAL, [8, 0, 1, t, 900, 10, 0, [1, 2], [0, 0], [1, 4]],
                             os.urandom(24))[1]
    tampered = bytearray(good[1])
    tampered[-1] ^= 1
    wrong_hint = good[2][:1] + (2).to_bytes(4, "big") + good[2][5:]
    bad_body = chans[2].seal(T_CURRENT, [7, t + 1, [1, 5, 2, 0, 3, 4]], os.urandom(24))[1]
    reflected = Channel(NATIVE, chans[3].key, 3, DOWN, dap_helpers.Counter()).seal(16, [1, t, 0],
                                                                    os.urandom(24))[1]
    wrong_meter_inside = messages.encode(NATIVE, 2, UP, T_CURRENT, 50,
                                         [7, t, [1, 5, 2, 0, 3, 4, 4, 2301]])
    from shared import envelope
    swapped = envelope.seal(NATIVE, chans[3].key, 3, os.urandom(24), wrong_meter_inside)
    trailing = envelope.seal(NATIVE, chans[3].key, 3, os.urandom(24),
                             messages.encode(NATIVE, 3, UP, T_CURRENT, 51,
                                             [7, t + 2, [1, 5, 2, 0, 3, 4, 4, 2301]])
                             + b"\x00\x01")  # after the padding: not padding
    direct = chans[9].seal(T_CURRENT, [7, t, [1, 5, 2, 0, 3, 4, 4, 2301]], os.urandom(24))[1]
    unknown = good[0][:1] + (77).to_bytes(4, "big") + good[0][5:]
    envs = [*good, interval, bytes(tampered), wrong_hint, bad_body, reflected, swapped,
            trailing, unknown, good[0]]
    return [("d1/up", gateway.bundle(NATIVE, 1, 5, envs)),
            ("d1/up", gateway.bundle(NATIVE, 1, 7, [good[1][:44]])),
            ("d1/up", gateway.bundle(NATIVE, 1, 6, [direct, good[2]])),
            ("m9/up", direct), ("m9/up", good[0])]


def _run(tmp: Path, name: str, slow: bool, he: PrivateKey,
         secrets: dict[int, PrivateKey], msgs: list[tuple[str, bytes]]):
    store = Store(tmp / f"{name}.db")
    store.add_dap(1, "aggregate")
    store.add_meters([(m, bytes(sk.public_key), None if m == 9 else 1, 1, 900)
                      for m, sk in secrets.items()])
    store.add_requests([(7, m, "current", "B", None, None, 0, 0, 0.0) for m in secrets])
    ing = Ingest(store, bytes(he), NATIVE)
    if slow:
        ing._open = ing._open_checked  # the general path only
    b = ing.process(msgs, 1767229300.0)
    b2 = ing.process(msgs, 1767229301.0)  # everything again: duplicates
    db = store.db
    state = (list(db.execute("SELECT * FROM readings ORDER BY 1, 2, 3")),
             list(db.execute("SELECT meter, win_top, win_bits, pending_will, last_seen "
                             "FROM meters ORDER BY 1")),
             list(db.execute("SELECT * FROM requests ORDER BY 1, 2")),
             store.counts())
    return ((b.accepted, b.stored, Counter(b.rejected), b.answers),
            (b2.accepted, b2.stored, Counter(b2.rejected)), state)


def test_fast_and_general_paths_store_and_refuse_the_same(tmp_path: Path) -> None:
    he = PrivateKey.generate()
    secrets = {m: PrivateKey.generate() for m in (1, 2, 3, 9)}
    msgs = _messages(he, secrets)
    fast = _run(tmp_path, "fast", False, he, secrets, msgs)
    slow = _run(tmp_path, "slow", True, he, secrets, msgs)
    assert fast == slow
    (accepted, stored, rejected, _), _, _ = fast
    # meters 1-3 and 9: 4 registers each; the interval: 2 x 2 rows, its 2 base
    # registers being meter 1's current registers at the same time already
    assert accepted == 5 and stored == 4 * 4 + 2 * 2
    assert len(rejected) >= 4, rejected
