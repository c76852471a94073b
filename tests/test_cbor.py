"""shared/cbor.py (the meter's pure-Python CBOR codec) against cbor2, on CPython.

Every RFC 8949 vector goes through both implementations (the `codec`
fixture); hypothesis then checks that the pure encoder writes cbor2's bytes,
that the pure decoder reads cbor2's output as cbor2 does, and that no input
makes `loads` raise anything but the protocol's own errors.
"""

from __future__ import annotations

import datetime
import json
import struct
from pathlib import Path

import cbor2
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shared import cbor as pure
from shared.errors import DecodeError, ProtocolError, TooLarge

VECTOR_FILE = Path(__file__).resolve().parent / "vectors" / "rfc8949_appendix_a.json"
VECTORS = json.loads(VECTOR_FILE.read_text(encoding="utf-8"))
CASES = VECTORS["cases"]
MALFORMED = VECTORS["malformed"]

U64 = 2**64 - 1


def typed(v: object) -> object:
    """A decoded value (from either implementation) in the vector file's
    unambiguous JSON form: bool, int and float kept apart, floats by their
    bits, maps as ordered pairs."""
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "null"
    if v is pure.undefined or v is cbor2.undefined:
        return "undefined"
    if isinstance(v, int):
        return f"int:{v}"
    if isinstance(v, float):
        return "float:nan" if v != v else "float:" + struct.pack(">d", v).hex()
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "bytes:" + bytes(v).hex()
    if isinstance(v, str):
        return "text:" + v
    if isinstance(v, list):
        return [typed(x) for x in v]
    if isinstance(v, tuple):
        return {"tuple": [typed(x) for x in v]}
    if isinstance(v, dict):
        return {"map": [[typed(k), typed(x)] for k, x in v.items()]}
    if isinstance(v, pure.Tag):
        return {"tag": v.tag, "value": typed(v.value)}
    if isinstance(v, cbor2.CBORTag):
        return {"tag": v.tag, "value": typed(v.value)}
    if isinstance(v, pure.Simple):
        return f"simple:{v.value}"
    if isinstance(v, cbor2.CBORSimpleValue):
        return f"simple:{v.value}"
    if isinstance(v, datetime.datetime):
        return {"datetime": v.isoformat()}
    if isinstance(v, cbor2.frozendict):
        return {"frozenmap": [[typed(k), typed(x)] for k, x in v.items()]}
    raise TypeError(f"typed: {v!r}")


def as_decoded(v: object) -> object:
    """What decoding an encoding of v gives: arrays come back as lists
    (tuples stay tuples only as map keys) and byte-likes as bytes."""
    if isinstance(v, (list, tuple)):
        return [as_decoded(x) for x in v]
    if isinstance(v, dict):
        return {as_key(k): as_decoded(x) for k, x in v.items()}
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    return v


def as_key(k: object) -> object:
    if isinstance(k, (list, tuple)):
        return tuple(as_key(x) for x in k)
    return k


def depth(v: object) -> int:
    if isinstance(v, (list, tuple)):
        return 1 + max((depth(x) for x in v), default=0)
    if isinstance(v, dict):
        return 1 + max((max(depth(k), depth(x)) for k, x in v.items()), default=0)
    return 0


class Impl:
    def __init__(self, name, dumps, loads, errors):
        self.name = name
        self.dumps = dumps
        self.loads = loads
        self.errors = errors  # what its decoder raises for malformed input

    def expect(self, case: dict, field: str) -> object:
        """The vector's expectation for this implementation."""
        if self.name == "cbor2" and isinstance(case.get("cbor2"), dict):
            return case["cbor2"].get(field, case[field])
        return case[field]


IMPLS = {
    "pure": Impl("pure", pure.dumps, pure.loads, (DecodeError,)),
    "cbor2": Impl("cbor2", cbor2.dumps, cbor2.loads, (cbor2.CBORDecodeError,)),
}


@pytest.fixture(params=sorted(IMPLS))
def codec(request) -> Impl:
    return IMPLS[request.param]


# ------------------------------------------------------------------ vectors


@pytest.mark.parametrize("case", CASES, ids=[c["hex"] for c in CASES])
def test_vector_decodes(codec: Impl, case: dict) -> None:
    raw = bytes.fromhex(case["hex"])
    assert case["decode"] == "ok"
    got = codec.loads(raw)
    assert typed(got) == codec.expect(case, "value")
    if "decoded" in case and codec.expect(case, "value") == case["value"]:
        assert typed(got) == typed(case["decoded"])


@pytest.mark.parametrize("case", CASES, ids=[c["hex"] for c in CASES])
def test_vector_roundtrip(codec: Impl, case: dict) -> None:
    raw = bytes.fromhex(case["hex"])
    value = codec.loads(raw)
    if codec.expect(case, "roundtrip"):
        assert codec.dumps(value) == raw
        return
    try:
        again = codec.dumps(value)
    except TypeError:
        assert codec.name == "pure" and isinstance(value, int) and abs(value) > U64
        return
    assert again != raw
    assert typed(codec.loads(again)) == codec.expect(case, "value")


@pytest.mark.parametrize("case", CASES, ids=[c["hex"] for c in CASES])
def test_vector_reencoding_matches_cbor2(case: dict) -> None:
    # Whatever the pure encoder writes for a decoded vector is what cbor2
    # writes for its own decoding of it (where both carry the same value).
    raw = bytes.fromhex(case["hex"])
    mine, theirs = pure.loads(raw), cbor2.loads(raw)
    if typed(mine) != typed(theirs):
        assert "cbor2" in case  # a documented difference (datetime tags)
        return
    try:
        ours = pure.dumps(mine)
    except TypeError:
        return  # ints past 64 bits
    assert ours == cbor2.dumps(theirs)


@pytest.mark.parametrize("case", MALFORMED, ids=[c["hex"] or "empty" for c in MALFORMED])
def test_malformed(codec: Impl, case: dict) -> None:
    raw = bytes.fromhex(case["hex"])
    assert case["decode"] == "reject"
    if codec.name == "cbor2" and case.get("cbor2") == "accepts":
        codec.loads(raw)  # documented: cbor2 is more lenient here
        return
    with pytest.raises(codec.errors):
        codec.loads(raw)


def test_malformed_are_plain_decode_errors() -> None:
    for case in MALFORMED:
        with pytest.raises(DecodeError) as info:
            pure.loads(bytes.fromhex(case["hex"]))
        assert type(info.value) is DecodeError, case["hex"]


def test_vector_file_covers_table_6() -> None:
    assert VECTORS["source"] == "RFC 8949 Appendix A, Table 6"
    assert len(CASES) == 81
    assert len({c["hex"] for c in CASES}) == len(CASES)
    assert all(c["decode"] == "ok" for c in CASES)
    assert all(m["decode"] == "reject" for m in MALFORMED)


# ----------------------------------------------------------------- encoding


def test_memoryview_is_a_byte_string() -> None:
    # cbor2 encodes a memoryview as an array of its items; the protocol means
    # bytes, so the pure encoder treats it like bytes(view).
    view = memoryview(b"\x00\x01\xff")
    assert pure.dumps(view) == cbor2.dumps(b"\x00\x01\xff")
    assert pure.dumps(memoryview(b"abcdef")[1:4]) == cbor2.dumps(b"bcd")


def test_encoder_refusals_are_type_errors() -> None:
    loop: list = []
    loop.append(loop)
    for bad in (2**64, -(2**64) - 1, {1}, frozenset(), object(), loop, 1j, "\ud800"):
        with pytest.raises(TypeError):
            pure.dumps(bad)


# --------------------------------------------------------------- properties

keys = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=U64)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3).map(tuple),
    max_leaves=4,
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=U64)
    | st.sampled_from([0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, U64, -(2**64)])
    | st.text()
    | st.binary()
    | st.binary(max_size=30).map(bytearray)
    | st.floats()
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6)
    | st.lists(inner, max_size=6).map(tuple)
    | st.dictionaries(keys, inner, max_size=6),
    max_leaves=30,
)

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(values)
def test_dumps_equals_cbor2(x: object) -> None:
    assume(depth(x) <= 16)
    assert pure.dumps(x) == cbor2.dumps(x)


@SETTINGS
@given(values)
def test_loads_reads_cbor2_like_cbor2(x: object) -> None:
    raw = cbor2.dumps(x)
    assume(depth(x) <= 16 and len(raw) <= 4096)
    assert typed(pure.loads(raw)) == typed(cbor2.loads(raw))


@SETTINGS
@given(values)
def test_round_trip(x: object) -> None:
    assume(depth(x) <= 16)
    raw = pure.dumps(x)
    back = pure.loads(raw, max_size=len(raw))
    assert typed(back) == typed(as_decoded(x))
    assert pure.dumps(back) == raw


@SETTINGS
@given(st.integers())
def test_ints_of_any_size(n: int) -> None:
    raw = cbor2.dumps(n)  # past 64 bits: bignum tags 2 and 3
    assert pure.loads(raw) == n
    if -(2**64) <= n <= U64:
        assert pure.dumps(n) == raw
    else:
        with pytest.raises(TypeError):
            pure.dumps(n)


def only_protocol_errors(data: bytes, **kw) -> object:
    try:
        return pure.loads(data, **kw)
    except ProtocolError:
        return None


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=80))
def test_random_bytes_only_raise_protocol_errors(data: bytes) -> None:
    only_protocol_errors(data)
    only_protocol_errors(bytearray(data), max_size=40, max_depth=3)


def contains_tag(v: object) -> bool:
    if isinstance(v, pure.Tag):
        return True
    if isinstance(v, (list, tuple)):
        return any(contains_tag(x) for x in v)
    if isinstance(v, dict):
        return any(contains_tag(k) or contains_tag(x) for k, x in v.items())
    return False


@st.composite
def mutated(draw) -> bytes:
    raw = bytearray(cbor2.dumps(draw(values)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "insert", "delete", "head"]))
        pos = draw(st.integers(0, len(raw)))
        byte = draw(st.integers(0, 255))
        if op == "set" and raw:
            raw[pos % len(raw)] = byte
        elif op == "insert":
            raw.insert(pos, byte)
        elif op == "delete" and raw:
            del raw[pos % len(raw)]
        else:  # a container, tag or break byte where data was
            raw.insert(pos, draw(st.sampled_from([0x9F, 0xBF, 0xFF, 0x5F, 0x7F, 0x81, 0xA1, 0xC2])))
    return bytes(raw)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_encodings_only_raise_protocol_errors(data: bytes) -> None:
    got = only_protocol_errors(data, max_size=1 << 20)
    if got is None or contains_tag(got):
        return
    # The pure decoder is the stricter one: whatever it accepts (tags
    # aside: cbor2 gives some of them meaning), cbor2 reads the same way.
    assert typed(cbor2.loads(data)) == typed(got)


@SETTINGS
@given(values, st.data())
def test_truncations_raise_decode_error(x: object, data) -> None:
    raw = cbor2.dumps(x)
    assume(depth(x) <= 16 and len(raw) <= 4096)
    cuts = range(len(raw)) if len(raw) <= 64 else [data.draw(st.integers(0, len(raw) - 1))]
    for n in cuts:
        with pytest.raises(DecodeError):
            pure.loads(raw[:n])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.integers(min_value=4097, max_value=70_000))
def test_oversize_raises_too_large(head: bytes, size: int) -> None:
    # any bytes at all, well-formed or not: the size is checked first
    data = (head * (size // max(len(head), 1) + 1) if head else bytes(size))[:size]
    assert len(data) == size
    with pytest.raises(TooLarge):
        pure.loads(data)
    with pytest.raises(TooLarge):
        pure.loads(data[:100], max_size=99)


def test_size_limit_is_inclusive() -> None:
    item = cbor2.dumps(b"\x00" * 4093)
    assert len(item) == 4096
    assert pure.loads(item) == b"\x00" * 4093
    with pytest.raises(TooLarge):
        pure.loads(item + b"\x00")


@pytest.mark.parametrize(
    ("opener", "closer"),
    [(b"\x81", b""), (b"\x9f", b"\xff"), (b"\xa1\x00", b""), (b"\xd8\x20", b"")],
)
def test_deep_nesting_raises_decode_error(opener: bytes, closer: bytes) -> None:
    assert pure.loads(opener * 16 + b"\x00" + closer * 16) is not None
    with pytest.raises(DecodeError):
        pure.loads(opener * 17 + b"\x00" + closer * 17)
    # far past Python's own recursion limit
    huge = opener * 50_000 + b"\x00" + closer * 50_000
    with pytest.raises(DecodeError):
        pure.loads(huge, max_size=len(huge))
    # even when the caller lifts max_depth beyond what the stack can take
    with pytest.raises(DecodeError):
        pure.loads(huge, max_size=len(huge), max_depth=10**9)


def test_deep_values_refused_by_encoder() -> None:
    x: object = 0
    for _ in range(17):
        x = [x]
    with pytest.raises(TypeError):
        pure.dumps(x)
    assert pure.dumps(x, max_depth=17) == cbor2.dumps(x)


def test_typed_memoryview_input() -> None:
    import array

    # a view with another item format is read as its raw bytes
    signed = array.array("b")
    signed.frombytes(bytes.fromhex("821864f5"))  # 0x82 reads as -126 through the view
    assert pure.loads(memoryview(signed)) == [100, True]
    words = array.array("H")
    words.frombytes(bytes.fromhex("83010203"))
    assert pure.loads(memoryview(words)) == [1, 2, 3]
    with pytest.raises(TooLarge):
        pure.loads(memoryview(words), max_size=3)  # counted in bytes, not items


def test_map_key_policy() -> None:
    assert pure.loads(cbor2.dumps({(1, (2, b"x")): 3})) == {(1, (2, b"x")): 3}
    with pytest.raises(DecodeError):
        pure.loads(bytes.fromhex("a1a000"))  # a map as a key
    with pytest.raises(DecodeError):
        pure.loads(bytes.fromhex("a2616101616102"))  # duplicate key
    assert cbor2.loads(bytes.fromhex("a2616101616102"), allow_duplicate_keys=True) == {"a": 2}
    with pytest.raises(cbor2.CBORDecodeError):
        cbor2.loads(bytes.fromhex("a2616101616102"), allow_duplicate_keys=False)


def test_micropython_message_constant_is_cbor2s() -> None:
    # tests/mpy/mpytest_cbor.py carries cbor2's encoding of its sample message
    # as a constant (MicroPython has no cbor2 to ask); keep it honest.
    import sys

    mpy_dir = str(Path(__file__).resolve().parent / "mpy")
    if mpy_dir not in sys.path:
        sys.path.insert(0, mpy_dir)
    import mpytest_cbor

    assert cbor2.dumps(mpytest_cbor.MESSAGE).hex() == mpytest_cbor.MESSAGE_HEX
    assert len(mpytest_cbor.MESSAGE) == 20
