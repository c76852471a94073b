# shared/cbor.py checked against the RFC 8949 vectors, under MicroPython and
# CPython alike (tests/test_micropython.py runs every test_* here on both).
# typed()/untyped() are also used by tests/test_cbor_cross.py to carry values
# across the JSON boundary between CPython and MicroPython.
import binascii
import gc
import json
import struct
import sys

from shared import cbor
from shared.errors import DecodeError, TooLarge

MICROPYTHON = sys.implementation.name == "micropython"

# MicroPython's dict forgets insertion order, so ordered maps (what loads()
# returns there, and what a meter must encode to match cbor2's bytes) are
# OrderedDicts; on CPython a dict is already ordered.
if MICROPYTHON:
    from collections import OrderedDict as ordered
else:
    ordered = dict

if MICROPYTHON:
    VECTORS = "/proj/tests/vectors/rfc8949_appendix_a.json"
else:
    import os

    VECTORS = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        "vectors",
        "rfc8949_appendix_a.json",
    )

_vectors = None


def vectors():
    global _vectors
    if _vectors is None:
        with open(VECTORS) as f:
            _vectors = json.load(f)
    return _vectors


def unhex(s):
    return binascii.unhexlify(s)


def tohex(b):
    return binascii.hexlify(b).decode()


def typed(v):
    """A decoded value as unambiguous JSON (format described in the vector file)."""
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "null"
    if v is cbor.undefined:
        return "undefined"
    if isinstance(v, int):
        return "int:%d" % v
    if isinstance(v, float):
        if v != v:
            return "float:nan"
        return "float:" + tohex(struct.pack(">d", v))
    if isinstance(v, bytes):
        return "bytes:" + tohex(v)
    if isinstance(v, str):
        return "text:" + v
    if isinstance(v, list):
        return [typed(x) for x in v]
    if isinstance(v, tuple):
        return {"tuple": [typed(x) for x in v]}
    if isinstance(v, dict):
        return {"map": [[typed(k), typed(v[k])] for k in v]}
    if isinstance(v, cbor.Tag):
        return {"tag": v.tag, "value": typed(v.value)}
    if isinstance(v, cbor.Simple):
        return "simple:%d" % v.value
    raise TypeError("typed: %r" % (v,))


def untyped(t):
    """Inverse of typed()."""
    if isinstance(t, list):
        return [untyped(x) for x in t]
    if isinstance(t, dict):
        if "map" in t:
            d = ordered()
            for k, v in t["map"]:
                d[untyped(k)] = untyped(v)
            return d
        if "tuple" in t:
            return tuple([untyped(x) for x in t["tuple"]])
        return cbor.Tag(t["tag"], untyped(t["value"]))
    if t == "true":
        return True
    if t == "false":
        return False
    if t == "null":
        return None
    if t == "undefined":
        return cbor.undefined
    kind, _, rest = t.partition(":")
    if kind == "int":
        return int(rest)
    if kind == "bytes":
        return unhex(rest)
    if kind == "text":
        return rest
    if kind == "simple":
        return cbor.Simple(int(rest))
    if kind == "float":
        if rest == "nan":
            return float("nan")
        return struct.unpack(">d", unhex(rest))[0]
    raise ValueError("untyped: %r" % (t,))


def same(a, b):
    """Equal as data, with maps compared as unordered mappings (a MicroPython
    OrderedDict never equals a dict) and bool, int and float kept apart."""
    if isinstance(a, dict) and isinstance(b, dict):
        if len(a) != len(b):
            return False
        for k in a:
            if k not in b or not same(a[k], b[k]):
                return False
        return True
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return False
        for i in range(len(a)):
            if not same(a[i], b[i]):
                return False
        return True
    if isinstance(a, cbor.Tag) and isinstance(b, cbor.Tag):
        return a.tag == b.tag and same(a.value, b.value)
    return typed(a) == typed(b)


def raises(exc, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except exc as e:
        return e
    except Exception as e:
        raise AssertionError("%r raised %r, not %s" % (args[:1], e, exc.__name__))
    raise AssertionError("%r did not raise %s" % (args[:1], exc.__name__))


def only_decode_error(data, **kw):
    """loads() either succeeds or raises DecodeError: nothing else escapes."""
    try:
        cbor.loads(data, **kw)
    except DecodeError:
        pass
    except Exception as e:
        raise AssertionError("loads(%s) raised %r" % (tohex(bytes(data)), e))


# A typical meter message: a 20-entry map of short keys, ints, text and bytes.
MESSAGE = ordered(
    [
        ("v", 1),
        ("t", "reading"),
        ("m", "ESP32-00a1b2"),
        ("c", 48211),
        ("ts", 1763952000),
        ("kwh", 12345678),
        ("kvarh", 234567),
        ("w", 532),
        ("va", 560),
        ("v1", 2311),
        ("v2", 2298),
        ("v3", 2330),
        ("a1", 1204),
        ("a2", 1187),
        ("a3", 1311),
        ("pf", 97),
        ("hz", 5001),
        ("st", 0),
        ("fw", "1.4.2"),
        ("n", b"\x5a" * 12),
    ]
)
# cbor2.dumps(MESSAGE), recorded once from cbor2 6.x
MESSAGE_HEX = (
    "b461760161746772656164696e67616d6c45535033322d303061316232616319"
    "bc536274731a6923c580636b77681a00bc614e656b766172681a000394476177"
    "1902146276611902306276311909076276321908fa62763319091a6261311904"
    "b46261321904a362613319051f627066186162687a1913896273740062667765"
    "312e342e32616e4c5a5a5a5a5a5a5a5a5a5a5a5a"
)


def test_vectors_decode():
    for case in vectors()["cases"]:
        raw = unhex(case["hex"])
        got = cbor.loads(raw)
        assert typed(got) == case["value"], (case["hex"], typed(got), case["value"])
        if "decoded" in case:
            assert same(got, case["decoded"]), (case["hex"], got)
        # every input type gives the same answer
        assert typed(cbor.loads(bytearray(raw))) == case["value"], case["hex"]
        assert typed(cbor.loads(memoryview(b"xy" + raw)[2:])) == case["value"], case["hex"]


def test_vectors_roundtrip():
    n = 0
    for case in vectors()["cases"]:
        raw = unhex(case["hex"])
        value = cbor.loads(raw)
        if case["roundtrip"]:
            n += 1
            assert cbor.dumps(value) == raw, (case["hex"], tohex(cbor.dumps(value)))
            continue
        try:
            again = cbor.dumps(value)
        except TypeError:
            assert isinstance(value, int), case["hex"]  # only ints past 64 bits
            continue
        assert again != raw, case["hex"]
        assert typed(cbor.loads(again)) == case["value"], case["hex"]
    assert n > 50, n


def test_malformed_rejected():
    for case in vectors()["malformed"]:
        raw = unhex(case["hex"])
        for data in (raw, bytearray(raw), memoryview(b"\x00" + raw)[1:]):
            e = raises(DecodeError, cbor.loads, data)
            assert not isinstance(e, TooLarge), case["hex"]


def test_encode_table():
    # Independent of the vectors: boundaries of every head size.
    table = [
        (0, "00"),
        (23, "17"),
        (24, "1818"),
        (255, "18ff"),
        (256, "190100"),
        (65535, "19ffff"),
        (65536, "1a00010000"),
        (4294967295, "1affffffff"),
        (4294967296, "1b0000000100000000"),
        (18446744073709551615, "1bffffffffffffffff"),
        (-1, "20"),
        (-24, "37"),
        (-25, "3818"),
        (-256, "38ff"),
        (-257, "390100"),
        (-4294967297, "3b0000000100000000"),
        (-18446744073709551616, "3bffffffffffffffff"),
        (False, "f4"),
        (True, "f5"),
        (None, "f6"),
        (cbor.undefined, "f7"),
        (cbor.Simple(0), "e0"),
        (cbor.Simple(19), "f3"),
        (cbor.Simple(32), "f820"),
        ("", "60"),
        ("\u00fc\u6c34\U00010151", "69c3bce6b0b4f0908591"),
        ("x" * 24, "7818" + "78" * 24),
        (b"", "40"),
        (bytearray(b"\x01\x02"), "420102"),
        (memoryview(b"\x00\x01\x02\x03")[1:3], "420102"),
        (b"\xff" * 256, "590100" + "ff" * 256),
        ((), "80"),
        ((1, "a"), "82016161"),
        ([[[]]], "818180"),
        (list(range(24)), "9818" + "".join(["%02x" % i for i in range(24)])),
        ({}, "a0"),
        (ordered([("b", 1), ("a", 2)]), "a2616201616102"),
        (ordered([(3, None), ((1, 2), b"")]), "a203f682010240"),
        ({"only": 1}, "a1646f6e6c7901"),
        (cbor.Tag(1, 0), "c100"),
        (cbor.Tag(258, []), "d9010280"),
        (1.5, "fb3ff8000000000000"),
        (-0.0, "fb8000000000000000"),
        (float("nan"), "f97e00"),
        (float("inf"), "f97c00"),
        (float("-inf"), "f9fc00"),
        (MESSAGE, MESSAGE_HEX),
    ]
    for value, hx in table:
        got = cbor.dumps(value)
        assert got == unhex(hx), (value, tohex(got), hx)
        assert isinstance(got, bytes)


def test_encode_refuses():
    a = []
    a.append(a)
    deep = 0
    for _ in range(17):
        deep = [deep]
    for value in (
        2**64,
        -(2**64) - 1,
        {1, 2},
        object(),
        a,
        deep,
        cbor.Simple(20),
        cbor.Simple(24),
        cbor.Simple(256),
        cbor.Tag(-1, 0),
        cbor.Tag(2**64, 0),
        cbor.Tag(True, 0),
    ):
        raises(TypeError, cbor.dumps, value)
    # 16 levels is fine, and max_depth can be raised
    deep = deep[0]
    assert cbor.loads(cbor.dumps(deep)) == deep
    assert cbor.dumps([deep], max_depth=17)[:2] == b"\x81\x81"


def test_message_roundtrip():
    raw = cbor.dumps(MESSAGE)
    back = cbor.loads(raw)
    assert back == MESSAGE and same(back, MESSAGE)
    assert list(back) == list(MESSAGE)  # insertion order kept
    assert cbor.dumps(back) == raw
    # a plain dict decodes back to an equal map on every interpreter
    plain = {}
    for k in MESSAGE:
        plain[k] = MESSAGE[k]
    assert same(cbor.loads(cbor.dumps(plain)), plain)


def test_truncations():
    samples = [unhex(c["hex"]) for c in vectors()["cases"]]
    samples.append(unhex(MESSAGE_HEX))
    for raw in samples:
        for n in range(len(raw)):
            raises(DecodeError, cbor.loads, raw[:n])


def test_trailing_bytes():
    for c in vectors()["cases"]:
        raw = unhex(c["hex"])
        raises(DecodeError, cbor.loads, raw + b"\x00")
        raises(DecodeError, cbor.loads, raw + b"\xff")
        # with pad, zero bytes may follow (a sealed message's padding); nothing else
        assert typed(cbor.loads(raw + bytes(9), pad=True)) == c["value"], c["hex"]
        raises(DecodeError, cbor.loads, raw + b"\x00\x00\xff", pad=True)


def test_size_limit():
    ok = b"\x59\x0f\xfd" + b"\x00" * 4093  # a 4096-byte byte string item
    assert len(cbor.loads(ok)) == 4093
    raises(TooLarge, cbor.loads, ok + b"\x00")
    raises(TooLarge, cbor.loads, bytearray(4097))
    raises(TooLarge, cbor.loads, b"\x00\x00", max_size=1)
    # checked before parsing: garbage over the limit is TooLarge, not malformed
    raises(TooLarge, cbor.loads, b"\xff" * 5000)
    raises(DecodeError, cbor.loads, ok + ok[3:], max_size=8192)  # trailing bytes


def test_depth_limit():
    for opener, closer in ((b"\x81", b""), (b"\x9f", b"\xff"), (b"\xa1\x00", b""), (b"\xc6", b"")):
        ok = opener * 16 + b"\x00" + closer * 16
        cbor.loads(ok)
        deep = opener * 17 + b"\x00" + closer * 17
        raises(DecodeError, cbor.loads, deep)
        cbor.loads(deep, max_depth=17)
        raises(DecodeError, cbor.loads, ok, max_depth=15)
    assert cbor.loads(b"\x00", max_depth=0) == 0
    raises(DecodeError, cbor.loads, b"\x80", max_depth=0)
    # far deeper than any stack: refused at max_depth, long before recursion
    raises(DecodeError, cbor.loads, b"\x81" * 3000 + b"\x00")


def test_huge_claimed_lengths():
    for hx in (
        "5bffffffffffffffff",
        "7bffffffffffffffff",
        "9bffffffffffffffff",
        "bbffffffffffffffff",
        "9a7fffffff00",
        "ba7fffffff0000",
        "5a00100000" + "00" * 16,
        "a3000000",
    ):
        raises(DecodeError, cbor.loads, unhex(hx))


def test_map_keys():
    assert same(cbor.loads(unhex("a1820102f6")), {(1, 2): None})
    key = list(cbor.loads(unhex("a182018102f6")))[0]
    assert key == (1, (2,)) and isinstance(key[1], tuple)
    assert same(cbor.loads(unhex("a1c1820102f5")), {cbor.Tag(1, (1, 2)): True})
    assert cbor.loads(unhex("a2f97e0001f97e0002")) is not None  # NaN keys never collide
    raises(DecodeError, cbor.loads, unhex("a1a000"))  # map as key
    raises(DecodeError, cbor.loads, unhex("a181a00000"))  # map inside an array key
    raises(DecodeError, cbor.loads, unhex("a2616101616102"))  # duplicate key
    raises(DecodeError, cbor.loads, unhex("bf616101616102ff"))  # duplicate, indefinite
    raises(DecodeError, cbor.loads, unhex("a2f400f400"))  # duplicate false


def test_strings():
    assert cbor.loads(unhex("7f60ff")) == ""
    assert cbor.loads(unhex("5fff")) == b""
    assert cbor.loads(unhex("7f62c3bc63e6b0b4ff")) == "\u00fc\u6c34"
    assert cbor.loads(unhex("64f48fbfbf")) == "\U0010ffff"
    assert cbor.loads(unhex("63efbfbf")) == "\uffff"
    assert cbor.loads(unhex("6100")) == "\x00"
    for hx in ("61ff", "62e6b0", "63f09085", "62c1bf", "64f8888080", "63edbfbf", "64f0808080"):
        raises(DecodeError, cbor.loads, unhex(hx))


def test_inputs():
    assert cbor.loads(b"\x18\x64") == 100
    assert cbor.loads(bytearray(b"\x18\x64")) == 100
    assert cbor.loads(memoryview(b"\x00\x18\x64\x00")[1:3]) == 100
    raises(TypeError, cbor.loads, "\x00")
    raises(TypeError, cbor.loads, None)
    assert isinstance(cbor.loads(bytearray(b"\x41\x00")), bytes)
    raises(DecodeError, cbor.loads, b"")


def test_values():
    assert cbor.loads(b"\xf9\x7c\x00") == float("inf")
    assert cbor.loads(b"\xf9\x80\x00") == 0.0 and str(cbor.loads(b"\xf9\x80\x00")) == "-0.0"
    assert cbor.loads(b"\xf9\x03\xff") == 1023 * 2.0**-24  # largest subnormal half
    assert cbor.loads(b"\xf9\x7f\xff") != cbor.loads(b"\xf9\x7f\xff")  # NaN with payload
    assert cbor.loads(b"\xe0") == cbor.Simple(0)
    assert cbor.loads(b"\xf8\x20") == cbor.Simple(32)
    assert cbor.loads(b"\xf7") is cbor.undefined
    assert cbor.loads(b"\xc2\x40") == 0
    assert cbor.loads(b"\xc3\x40") == -1
    assert cbor.loads(b"\xc2\x5f\x41\x01\x41\x00\xff") == 256
    assert cbor.loads(b"\xdb\xff\xff\xff\xff\xff\xff\xff\xff\x00") == cbor.Tag(2**64 - 1, 0)
    assert cbor.Tag(1, 2) != cbor.Tag(1, 3) and cbor.Tag(1, 2) == cbor.Tag(1, 2)
    assert cbor.Simple(1) != cbor.Simple(2) and repr(cbor.Simple(1)) == "Simple(1)"


def _prng(seed):
    # Deterministic on both interpreters (31-bit LCG).
    state = [seed]

    def nxt(n):
        state[0] = (state[0] * 1103515245 + 12345) & 0x7FFFFFFF
        return (state[0] >> 8) % n

    return nxt


def test_mutations_only_raise_decode_error():
    rnd = _prng(8949)
    seeds = [unhex(c["hex"]) for c in vectors()["cases"]]
    seeds.append(unhex(MESSAGE_HEX))
    rounds = 1500 if MICROPYTHON else 6000
    for _ in range(rounds):
        b = seeds[rnd(len(seeds))]
        for _ in range(1 + rnd(3)):
            op = rnd(4)
            pos = rnd(len(b) + 1)
            if op == 0 and b:  # overwrite a byte
                pos %= len(b)
                b = b[:pos] + bytes([rnd(256)]) + b[pos + 1 :]
            elif op == 1:  # insert a byte
                b = b[:pos] + bytes([rnd(256)]) + b[pos:]
            elif op == 2 and b:  # drop a byte
                pos %= len(b)
                b = b[:pos] + b[pos + 1 :]
            else:  # insert a container head
                b = b[:pos] + bytes([0x80 | rnd(0x80)]) + b[pos:]
        only_decode_error(b)
    for _ in range(rounds // 3):
        only_decode_error(bytes([rnd(256) for _ in range(rnd(24))]))


def _alloc(fn, arg):
    gc.collect()
    gc.disable()
    try:
        before = gc.mem_alloc()
        result = fn(arg)
        after = gc.mem_alloc()
    finally:
        gc.enable()
    return result, after - before


def test_heap_use():
    if not MICROPYTHON:
        return  # gc.mem_alloc is MicroPython's
    raw = unhex(MESSAGE_HEX)
    cbor.dumps(MESSAGE)  # warm up (interned names, first-call caches)
    cbor.loads(raw)
    out, enc = _alloc(cbor.dumps, MESSAGE)
    value, dec = _alloc(cbor.loads, raw)
    assert out == raw and same(value, MESSAGE)
    extra = enc - len(out)
    print("@@HEAP dumps %d bytes out, %d allocated, %d beyond the output" % (len(out), enc, extra))
    print("@@HEAP loads %d bytes in, %d allocated" % (len(raw), dec))
    assert extra < 384, extra
    assert dec < 1280, dec
