"""shared/x25519.py against PyNaCl (libsodium), vector by vector and on random input.

Every vector runs against both implementations through the `impl` fixture, so
a vector file that libsodium disagrees with fails too. Keys in the vector files
are the published test keys; every other key here is drawn at run time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nacl.bindings
import nacl.exceptions
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import x25519
from shared.errors import BadKeyError, ProtocolError

VECTORS = Path(__file__).resolve().parent / "vectors"


def _load(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


RFC7748 = _load("x25519_rfc7748.json")
LOW_ORDER = _load("x25519_wycheproof_low_order.json")

# libsodium's has_small_order() list, as u-coordinates below 2**255.
SMALL_ORDER = [
    bytes(32),
    b"\x01" + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    bytes.fromhex("ec" + "ff" * 30 + "7f"),  # p - 1
    bytes.fromhex("ed" + "ff" * 30 + "7f"),  # p
    bytes.fromhex("ee" + "ff" * 30 + "7f"),  # p + 1
]


def _with_top_bit(u: bytes) -> bytes:
    return u[:31] + bytes([u[31] | 0x80])


class Pure:
    rejected = BadKeyError
    scalarmult = staticmethod(x25519.scalarmult)
    scalarmult_base = staticmethod(x25519.scalarmult_base)


class PyNaCl:
    # libsodium returns -1 for a refused point; PyNaCl turns that into this.
    rejected = nacl.exceptions.RuntimeError
    scalarmult = staticmethod(nacl.bindings.crypto_scalarmult)
    scalarmult_base = staticmethod(nacl.bindings.crypto_scalarmult_base)


@pytest.fixture(params=[Pure, PyNaCl], ids=["pure", "pynacl"])
def impl(request):
    return request.param


def _cases(doc: dict, kind: str | None = None) -> list:
    cases = [c for c in doc["cases"] if kind is None or c.get("kind") == kind]
    assert cases, f"no {kind} cases in {doc['source']}"
    return cases


def _x(h: str) -> bytes:
    return bytes.fromhex(h)


def test_vector_files_cite_their_source() -> None:
    for doc in (RFC7748, LOW_ORDER):
        assert doc["source"] and doc["cases"]


@pytest.mark.parametrize("case", _cases(RFC7748, "scalarmult"), ids=lambda c: c["u"][:8])
def test_rfc7748_scalarmult(impl, case) -> None:
    assert impl.scalarmult(_x(case["scalar"]), _x(case["u"])).hex() == case["output"]


@pytest.mark.parametrize("case", _cases(RFC7748, "iterated"), ids=lambda c: f"{c['iterations']}x")
def test_rfc7748_iterated(impl, case) -> None:
    k = u = _x(case["start"])
    for _ in range(case["iterations"]):
        k, u = impl.scalarmult(k, u), k
    assert k.hex() == case["output"]


def test_rfc7748_diffie_hellman(impl) -> None:
    (case,) = _cases(RFC7748, "dh")
    a, b = _x(case["alice_private"]), _x(case["bob_private"])
    assert impl.scalarmult_base(a).hex() == case["alice_public"]
    assert impl.scalarmult_base(b).hex() == case["bob_public"]
    assert impl.scalarmult(a, _x(case["bob_public"])).hex() == case["shared"]
    assert impl.scalarmult(b, _x(case["alice_public"])).hex() == case["shared"]


@pytest.mark.parametrize("case", _cases(LOW_ORDER), ids=lambda c: f"tc{c['tcId']}")
def test_wycheproof_low_order(impl, case) -> None:
    scalar, point = _x(case["private"]), _x(case["public"])
    if case["expected"] == "reject":
        with pytest.raises(impl.rejected):
            impl.scalarmult(scalar, point)
    else:
        assert impl.scalarmult(scalar, point).hex() == case["expected"]


def test_low_order_file_covers_every_flagged_point() -> None:
    # The file holds each small-order u-coordinate, plain and with bit 255 set.
    points = {c["public"] for c in LOW_ORDER["cases"]}
    for u in SMALL_ORDER:
        assert u.hex() in points
        assert _with_top_bit(u).hex() in points


@pytest.mark.parametrize("top", [False, True], ids=["plain", "bit255"])
@pytest.mark.parametrize("point", SMALL_ORDER, ids=lambda u: u.hex()[:8])
def test_small_order_points_refused(impl, point: bytes, top: bool) -> None:
    for _ in range(10):
        with pytest.raises(impl.rejected):
            impl.scalarmult(os.urandom(32), _with_top_bit(point) if top else point)


@given(scalar=st.binary(min_size=32, max_size=32), point=st.binary(min_size=32, max_size=32))
@settings(max_examples=150)
def test_random_points_agree_with_pynacl(scalar: bytes, point: bytes) -> None:
    # Any 32 bytes: off-curve (twist) points, unreduced values, bit 255 set.
    try:
        want = nacl.bindings.crypto_scalarmult(scalar, point)
    except nacl.exceptions.RuntimeError:
        with pytest.raises(BadKeyError):
            x25519.scalarmult(scalar, point)
    else:
        assert x25519.scalarmult(scalar, point) == want


@given(point=st.sampled_from(SMALL_ORDER), delta=st.integers(-3, 3))
def test_points_next_to_small_order_ones_agree(point: bytes, delta: int) -> None:
    u = (int.from_bytes(point, "little") + delta) % (1 << 256)
    near = u.to_bytes(32, "little")
    scalar = bytes(range(1, 33))
    try:
        want = nacl.bindings.crypto_scalarmult(scalar, near)
    except nacl.exceptions.RuntimeError:
        want = None
    if want is None:
        with pytest.raises(BadKeyError):
            x25519.scalarmult(scalar, near)
    else:
        assert x25519.scalarmult(scalar, near) == want


@given(scalar=st.binary(min_size=32, max_size=32))
@settings(max_examples=100)
def test_public_keys_agree_with_pynacl(scalar: bytes) -> None:
    assert x25519.scalarmult_base(scalar) == nacl.bindings.crypto_scalarmult_base(scalar)


@given(a=st.binary(min_size=32, max_size=32), b=st.binary(min_size=32, max_size=32))
@settings(max_examples=50)
def test_diffie_hellman_is_symmetric(a: bytes, b: bytes) -> None:
    shared = x25519.scalarmult(a, x25519.scalarmult_base(b))
    assert shared == x25519.scalarmult(b, x25519.scalarmult_base(a))
    assert shared == nacl.bindings.crypto_scalarmult(a, nacl.bindings.crypto_scalarmult_base(b))


@pytest.mark.parametrize("n", [0, 1, 16, 31, 33, 64])
def test_wrong_lengths_are_bad_keys(n: int) -> None:
    good = bytes(range(32))
    with pytest.raises(BadKeyError):
        x25519.scalarmult(bytes(n), x25519.scalarmult_base(good))
    with pytest.raises(BadKeyError):
        x25519.scalarmult(good, b"\x09" * n)
    with pytest.raises(BadKeyError):
        x25519.scalarmult_base(bytes(n))


@given(scalar=st.binary(max_size=40), point=st.binary(max_size=40))
@settings(max_examples=200)
def test_any_bytes_raise_only_protocol_errors(scalar: bytes, point: bytes) -> None:
    try:
        out = x25519.scalarmult(scalar, point)
    except ProtocolError:
        return
    assert len(out) == 32 and any(out)


def test_accepts_bytearray_and_memoryview() -> None:
    a = bytes(range(32))
    b = nacl.bindings.crypto_scalarmult_base(bytes(range(1, 33)))
    want = nacl.bindings.crypto_scalarmult(a, b)
    assert x25519.scalarmult(bytearray(a), memoryview(b)) == want
