# The protocol core with the PURE backend, under MicroPython and CPython
# alike (tests/test_micropython.py runs every test_* here on both):
#   - every case of tests/vectors/envelope.json byte for byte (seal with the
#     case's nonce gives its wire, open gives its plaintext, decode works);
#   - the replay window, the skip-ahead counter across power loss, Channel
#     round trips and rejections, a group item;
#   - the firmware Meter core answering requests, on firmware.flash.Flash
#     (under /flash on MicroPython, a temporary directory on CPython).
# The full properties, both backends, are in tests/test_protocol.py.
import binascii
import json
import os
import sys

from shared import envelope, gateway, group, messages
from shared.backend import PURE
from shared.channel import Channel, digest
from shared.const import (
    DEATH_ORDERLY,
    DEATH_WILL,
    DOWN,
    ENV_GROUP_ITEM,
    ENV_SEALED,
    K_GROUP,
    MAX_INNER,
    REPLAY_WINDOW,
    S_EXPIRED,
    S_NO_DATA,
    T_BIRTH,
    T_CURRENT,
    T_DEATH,
    T_INTERVAL,
    T_READ_CURRENT,
    T_READ_INTERVAL,
    T_STATUS,
    UP,
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
)
from shared.replay import ReplayWindow

MICROPYTHON = sys.implementation.name == "micropython"

if MICROPYTHON:
    VECTORS = "/proj/tests/vectors/envelope.json"
else:
    VECTORS = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vectors", "envelope.json"
    )

B = PURE
NOW = 1767225600  # 2026-01-01T00:00:00Z
WRAP = 0xFFFFFFFF
_doc = []
_keys = {}


def load():
    if not _doc:
        with open(VECTORS) as f:
            _doc.append(json.load(f))
    return _doc[0]


def unhex(s):
    return binascii.unhexlify(s)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def raises(exc, fn, *args):
    """fn(*args) raises exactly `exc`; returns it."""
    try:
        fn(*args)
    except ProtocolError as e:
        if type(e) is not exc or e.reason != exc.reason:
            raise AssertionError("%s raised %s(%s), not %s" % (fn, type(e).__name__, e,
                                                              exc.__name__))
        return e
    raise AssertionError("%s did not raise %s" % (fn, exc.__name__))


class Fixed:
    def __init__(self, value):
        self.value = value

    def next(self):
        return self.value


class Seq:
    def __init__(self, start=0):
        self.value = start

    def next(self):
        v = self.value
        self.value += 1
        return v


class Lcg:
    """A small deterministic generator, the same on both runtimes."""

    def __init__(self, seed):
        self.x = seed & 0x3FFFFFFF

    def below(self, n):
        self.x = (self.x * 1103515245 + 12345) & 0x3FFFFFFF
        return (self.x >> 8) % n

    def shuffle(self, items):
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]
        return items


def case_key(case):
    k = case["sender_secret_key"] + case["recipient_public_key"]
    if k not in _keys:
        _keys[k] = B.beforenm(unhex(case["recipient_public_key"]),
                              unhex(case["sender_secret_key"]))
    return _keys[k]


def cases(kind=None):
    out = [c for c in load()["cases"] if kind is None or c["kind"] == kind]
    check(out, "no %s cases in the vector file" % kind)
    return out


def link_key():
    """The pairwise key of test-vector meter 1001 and the head-end."""
    return case_key(cases("current-response")[0])


# -- the vector file ---------------------------------------------------------


def test_vectors_cover_every_kind():
    kinds = set(c["kind"] for c in cases())
    for k in ("current-response", "interval-response-6h", "request", "group-request", "birth",
              "death", "status-no-data", "interval-request"):
        check(k in kinds, "missing kind " + k)


def test_vectors_keys():
    for c in cases("request") + cases("current-response")[:1]:
        check(B.public_key(unhex(c["sender_secret_key"])) == unhex(c["sender_public_key"]),
              "sender public key " + c["kind"])
        check(B.public_key(unhex(c["recipient_secret_key"])) == unhex(c["recipient_public_key"]),
              "recipient public key " + c["kind"])
        other_end = B.beforenm(unhex(c["sender_public_key"]), unhex(c["recipient_secret_key"]))
        check(other_end == case_key(c), "both ends derive one key " + c["kind"])


def test_vectors_sealed_byte_for_byte():
    for c in cases():
        if c["kind"] == "group-request":
            continue
        what = c["kind"] + ": " + c["description"]
        key = case_key(c)
        nonce, pt, wire = unhex(c["nonce"]), unhex(c["plaintext"]), unhex(c["wire"])
        d = c["decoded"]
        meter, direction, mtype, ctr, body = d[1], d[2], d[3], d[4], d[5:]
        check(messages.encode(B, meter, direction, mtype, ctr, body) == pt, "encode " + what)
        check(B.seal(key, nonce, pt) == unhex(c["box"]), "box " + what)
        check(envelope.seal(B, key, meter, nonce, pt) == wire, "wire " + what)
        got = Channel(B, key, meter, direction, Fixed(ctr)).seal(mtype, body, nonce)
        check(got == (ctr, wire), "Channel.seal " + what)
        check(envelope.peek(wire) == (ENV_SEALED, meter), "peek " + what)
        check(envelope.open(B, key, wire) == pt, "open " + what)
        check(B.loads(pt, MAX_INNER, True) == d, "decode " + what)
        pad = messages.padding(mtype, body)
        check(pt[len(pt) - pad:] == bytes(pad), "padding is zero bytes " + what)
        receiver = Channel(B, key, meter, UP if direction == DOWN else DOWN, Fixed(0))
        check(receiver.open(wire) == (mtype, ctr, body), "Channel.open " + what)


def test_vectors_group_byte_for_byte():
    for c in cases("group-request"):
        nonce, tag, body = unhex(c["nonce"]), unhex(c["plaintext"]), unhex(c["body"])
        d = c["decoded"]
        gid, mtype, ctr, fields = d[1], d[3], d[4], d[5:]
        check(messages.encode(B, gid, DOWN, mtype, ctr, fields) == body, "group body")
        check(digest(body) == tag, "digest")
        check(B.seal(case_key(c), nonce, tag) == unhex(c["box"]), "member box")
        sk = unhex(c["sender_secret_key"])
        keyed = [(m["meter"], B.beforenm(unhex(m["public_key"]), sk)) for m in c["members"]]
        built, entries = group.build(B, gid, mtype, ctr, fields, keyed, nonce)
        check(built == body, "group.build body")
        check(entries == [[m["meter"], unhex(m["box"])] for m in c["members"]], "entries")
        msg = gateway.group(B, c["tolerance"], gid, nonce, body, entries)
        check(msg == unhex(c["gateway"]), "gateway message")
        check(gateway.decode(B, msg) == (K_GROUP, c["tolerance"], gid, nonce, body, entries),
              "gateway decode")
        wire = group.item(c["meter"], nonce, unhex(c["box"]), body)
        check(wire == unhex(c["wire"]), "group item")
        check(envelope.peek(wire) == (ENV_GROUP_ITEM, c["meter"]), "peek item")
        check(B.loads(body, MAX_INNER) == d, "decode body")
        member = Channel(B, case_key(c), c["meter"], UP, Fixed(0))
        check(member.open_group_item(wire) == (mtype, ctr, fields, gid), "open item")


def test_padding_hides_values():
    """On the meter: readings of an idle home and a busy one, sealed, are
    the same length; so are interval rows of 0 and 65,535 Wh, with quality
    flags on none, some or every row."""
    key = link_key()
    lengths = []
    for power, export in ((0, 0), (8, 0), (412, 7), (65535, 123456), (0xFFFFFFFF, 0xFFFFFFFF)):
        ch = Channel(B, key, 1001, UP, Fixed(42))
        regs = [1, 3304512, 2, export, 3, power, 4, 2301]
        lengths.append(len(ch.seal(T_CURRENT, [7, 1767229200, regs], os.urandom(24))[1]))
    check(len(set(lengths)) == 1, "current readings: lengths %r" % lengths)
    lengths = []
    flags = ([], [5, 4], [0, 1, 5, 4, 23, 8], [x for r in range(24) for x in (r, 15)])
    for i, v in enumerate((0, 23, 24, 255, 256, 65535)):
        ch = Channel(B, key, 1001, UP, Fixed(43))
        body = [8, 0, 1, 1767261600, 900, v, 0, [v] * 24, [v // 2] * 24, flags[i % 4]]
        wire = ch.seal(T_INTERVAL, body, os.urandom(24))[1]
        lengths.append(len(wire))
        got = Channel(B, key, 1001, DOWN, Fixed(0)).open(wire)
        check(got == (T_INTERVAL, 43, body), "padded interval response opens")
    check(len(set(lengths)) == 1, "interval responses: lengths %r" % lengths)


# -- the replay window ------------------------------------------------------


def test_replay_window_shuffle_accepted_once():
    rng = Lcg(7)
    for trial in range(40):
        base = rng.below(1 << 20) + (WRAP - (1 << 20) if trial % 2 else 0)
        n = 1 + rng.below(REPLAY_WINDOW)
        ctrs = rng.shuffle([base + i for i in range(REPLAY_WINDOW)])[:n]
        w = ReplayWindow()
        done = []
        for c in ctrs:
            w.accept(c)
            done.append(c)
            again = done[rng.below(len(done))]
            before = w.state()
            raises(DuplicateError, w.accept, again)
            check(w.state() == before, "a duplicate moved the window")
        for c in ctrs:
            raises(DuplicateError, w.check, c)
        top = max(ctrs)
        before = w.state()
        raises(StaleError, w.accept, top - REPLAY_WINDOW)
        check(w.state() == before, "a stale counter moved the window")
        w.accept(top + REPLAY_WINDOW + 5)  # a jump forward forgets everything older
        raises(StaleError, w.accept, top)


# -- the skip-ahead counter ------------------------------------------------


class PowerCut(Exception):
    pass


def test_counter_across_power_loss():
    rng = Lcg(11)
    for block in (1, 2, 5, 32):
        disk = [None]
        values = []
        for boot in range(30):
            fail_at = rng.below(4)
            how = rng.below(3)  # 0: write lost, 1: write durable, 2: error, carry on
            seen = [0]

            def persist(value, fail_at=fail_at, how=how, seen=seen):
                i = seen[0]
                seen[0] += 1
                if i == fail_at:
                    if how == 1:
                        disk[0] = value
                    if how == 2:
                        raise OSError("flash write failed")
                    raise PowerCut()
                disk[0] = value

            counter = SkipAheadCounter(disk[0], persist, block)
            for _ in range(rng.below(3 * block + 3)):
                try:
                    values.append(counter.next())
                except PowerCut:
                    break
                except OSError:
                    continue
        check(len(values) == len(set(values)), "a counter value repeated (block %d)" % block)
        check(values == sorted(values), "the counter went backwards (block %d)" % block)


# -- channels ---------------------------------------------------------------

SAMPLES = [
    (T_CURRENT, [7, NOW, [1, 3304512, 2, 0, 3, 412, 4, 2301]]),
    (T_INTERVAL, [8, 0, 1, NOW, 900, 3330000, 0, [52, 51, 94, 75], [0, 0, 3, 0], [2, 4]]),
    (T_STATUS, [9, S_NO_DATA, NOW - 86400]),
    (T_BIRTH, [3, 40, NOW, 900, NOW - 8 * 86400]),
    (T_DEATH, [3, DEATH_ORDERLY]),
    (T_READ_CURRENT, [7, NOW + 10, 0]),
    (T_READ_INTERVAL, [8, NOW + 10, 600, NOW - 21600, NOW]),
]


def test_channel_round_trips():
    key = link_key()
    meter = Channel(B, key, 1001, UP, Seq(0))
    headend = Channel(B, key, 1001, DOWN, Seq(1000))
    for mtype, body in SAMPLES + SAMPLES:
        if mtype in messages.DOWNLINK:
            sender, receiver = headend, meter
        else:
            sender, receiver = meter, headend
        ctr, wire = sender.seal(mtype, body, os.urandom(24))
        check(receiver.open(wire) == (mtype, ctr, body), "round trip of type %d" % mtype)
    check(meter.window.top == 1003 and headend.window.top == 9, "windows")


def test_channel_rejections_leave_window_unchanged():
    key = link_key()
    meter = Channel(B, key, 1001, UP, Seq(0))
    headend = Channel(B, key, 1001, DOWN, Seq(1000))
    _, wire = meter.seal(T_CURRENT, SAMPLES[0][1], os.urandom(24))
    headend.open(wire)
    before = (headend.window.state(), headend.pending_will)
    _, fresh = meter.seal(T_STATUS, SAMPLES[2][1], os.urandom(24))
    for pos in (0, 5, 20, 29, 44, 45, len(fresh) - 1):
        bad = bytearray(fresh)
        bad[pos] ^= 0x40
        try:
            headend.open(bytes(bad))
        except ProtocolError:
            pass
        else:
            raise AssertionError("flipped byte %d accepted" % pos)
    raises(DuplicateError, headend.open, wire)
    raises(DirectionError, headend.open, headend.seal(T_READ_CURRENT, [1, NOW, 0],
                                                      os.urandom(24))[1])
    raises(DirectionError, meter.open, meter.seal(T_STATUS, [1, 1, 0], os.urandom(24))[1])
    other = Channel(B, key, 1002, UP, Seq(5))
    raises(MismatchError, headend.open, other.seal(T_STATUS, [1, 1, 0], os.urandom(24))[1])
    stranger = Channel(B, bytes(range(32)), 1001, UP, Seq(5))  # not the pairwise key
    raises(AuthError, headend.open, stranger.seal(T_STATUS, [1, 1, 0], os.urandom(24))[1])
    raises(DecodeError, headend.open, meter.seal(T_STATUS, [1, 9, 0], os.urandom(24))[1])
    raises(DecodeError, headend.open, fresh[:40])
    check((headend.window.state(), headend.pending_will) == before, "the window moved")
    check(headend.open(fresh)[0] == T_STATUS, "the genuine message is still accepted")


def test_will_rule():
    key = link_key()
    meter = Channel(B, key, 1001, UP, Seq(0))
    headend = Channel(B, key, 1001, DOWN, Seq(1000))
    will_ctr, will = meter.seal(T_DEATH, [1, DEATH_WILL], os.urandom(24))
    _, birth = meter.seal(T_BIRTH, [1, will_ctr, NOW, 900, 0], os.urandom(24))
    headend.open(birth)
    for _ in range(REPLAY_WINDOW + 3):
        headend.open(meter.seal(T_DEATH, [1, DEATH_ORDERLY], os.urandom(24))[1])
    check(headend.open(will) == (T_DEATH, will_ctr, [1, DEATH_WILL]), "late will accepted")
    raises(StaleError, headend.open, will)


def test_group_item_open():
    key = link_key()
    nonce = os.urandom(24)
    body, entries = group.build(B, 77, T_READ_CURRENT, 500, [21, NOW + 30, 15],
                                [(1001, key), (1002, bytes(range(32)))], nonce)
    items = [group.item(m, nonce, box, body) for m, box in entries]
    ch = Channel(B, key, 1001, UP, Seq())
    raises(MismatchError, ch.open_group_item, items[1])  # another member's item
    tampered = items[0][:-1] + bytes([items[0][-1] ^ 1])
    raises(MismatchError, ch.open_group_item, tampered)
    check(ch.open_group_item(items[0]) == (T_READ_CURRENT, 500, [21, NOW + 30, 15], 77), "open")
    raises(DuplicateError, ch.open_group_item, items[0])


# -- the meter core ---------------------------------------------------------


def flash_dir(name):
    if MICROPYTHON:
        root = "/flash/" + name
        try:
            for f in os.listdir(root):
                os.remove(root + "/" + f)
        except OSError:
            pass
        return root, None
    import tempfile

    root = tempfile.mkdtemp(prefix=name + "-")
    return root, root


def cleanup(tmp):
    if tmp is not None:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def expected_registers(seed, now, history_from):
    from firmware.metrology import SimulatedLoad

    src = SimulatedLoad(seed)
    k_now = now // 900
    start = min(k_now, history_from // 900)
    imp, exp = src.initial()
    for k in range(start, k_now):
        di, de = src.interval(k)
        imp = (imp + di) & WRAP
        exp = (exp + de) & WRAP
    di, de = src.peek(k_now, now - k_now * 900)
    return [1, (imp + di) & WRAP, 2, (exp + de) & WRAP, 3, src.power(now), 4, src.voltage(now)]


def test_meter_answers_requests():
    from firmware.flash import Flash
    from firmware.meter import Meter
    from firmware.metrology import SimulatedLoad

    root, tmp = flash_dir("mpytest-protocol")
    try:
        key = link_key()
        seed = 1002  # a home with solar
        m = Meter(1001, key, B, Flash(root), SimulatedLoad(seed))
        history = NOW - 86400
        m.catch_up(NOW, history_from=history)
        he = Channel(B, key, 1001, DOWN, Seq(1))
        now = NOW + 437
        req = he.seal(T_READ_CURRENT, [1, now + 10, 0], os.urandom(24))[1]
        out = m.handle(req, now, os.urandom)
        check(len(out) == 1, "one answer")
        mtype, _, body = he.open(out[0])
        check(mtype == T_CURRENT, "a current reading")
        check(body == [1, now, expected_registers(seed, now, history)], "registers %r" % body)
        # six hours of rows
        src = SimulatedLoad(seed)
        frm = NOW - 18 * 3600
        req = he.seal(T_READ_INTERVAL, [2, now + 10, 0, frm, frm + 6 * 3600], os.urandom(24))[1]
        out = m.handle(req, now, os.urandom)
        mtype, _, body = he.open(out[0])
        k0 = frm // 900
        check(mtype == T_INTERVAL and body[:5] == [2, 0, 1, frm, 900], "interval header")
        check(body[7] == [src.interval(k)[0] for k in range(k0, k0 + 24)], "import rows")
        check(body[8] == [src.interval(k)[1] for k in range(k0, k0 + 24)], "export rows")
        check(len(out[0]) <= 300, "6 h response of %d bytes" % len(out[0]))
        # expired; replayed; reflected
        req = he.seal(T_READ_CURRENT, [3, now - 1, 0], os.urandom(24))[1]
        check(he.open(m.handle(req, now, os.urandom)[0])[2] == [3, S_EXPIRED, now], "expired")
        check(m.handle(req, now, os.urandom) == [], "a replay is not answered")
        check(m.handle(out[0], now, os.urandom) == [], "a reflection is not answered")
        check(m.stats["rejected:duplicate"] == 1 and m.stats["rejected:direction"] == 1, "stats")
        # a group item through the meter
        nonce = os.urandom(24)
        body, entries = group.build(B, 77, T_READ_CURRENT, 50, [4, now + 30, 15],
                                    [(1001, key)], nonce)
        out = m.handle(group.item(1001, nonce, entries[0][1], body), now, os.urandom)
        mtype, _, body = he.open(out[0])
        check(mtype == T_CURRENT and body[0] == 4, "group request answered")
        # connect: will and birth
        will, birth = m.connect(now, os.urandom)
        mtype, _, body = he.open(birth)
        check(mtype == T_BIRTH and body[0] == m.state.session and body[4] == history, "birth")
        check(he.open(will)[0] == T_DEATH, "the announced will")
    finally:
        cleanup(tmp)
