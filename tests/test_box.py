"""shared/box.py (the meter's pure-Python NaCl box) against PyNaCl, byte for byte.

The `impl` fixture gives both implementations behind one interface, so every
vector checks libsodium as well as our code. HSalsa20, the XSalsa20 stream and
Poly1305 on their own are not in PyNaCl's Python API; the PyNaCl side calls
them in the libsodium that PyNaCl ships, through ctypes.

Keys other than the published test-vector keys are drawn at run time.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
from pathlib import Path

import nacl._sodium
import nacl.bindings
import nacl.exceptions
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.public import Box, PrivateKey, PublicKey

from shared import box, x25519
from shared.errors import AuthError, BadKeyError, DecodeError, ProtocolError

VECTORS = Path(__file__).resolve().parent / "vectors"
NACL_BOX = json.loads((VECTORS / "nacl_box.json").read_text())
LOW_ORDER = json.loads((VECTORS / "x25519_wycheproof_low_order.json").read_text())


def _x(h: str) -> bytes:
    return bytes.fromhex(h)


def _cases(kind: str) -> list:
    cases = [c for c in NACL_BOX["cases"] if c["kind"] == kind]
    assert cases, f"no {kind} cases in nacl_box.json"
    return cases


@functools.cache
def _libsodium():
    lib = ctypes.CDLL(nacl._sodium.__file__)
    names = ("crypto_core_hsalsa20", "crypto_stream_xsalsa20_xor", "crypto_onetimeauth_poly1305")
    missing = [n for n in names if not hasattr(lib, n)]
    if missing:  # a PyNaCl build that hides libsodium's symbols
        pytest.fail(f"PyNaCl's libsodium does not export {missing}")
    return lib


class Pure:
    key_error = BadKeyError
    auth_error = AuthError
    beforenm = staticmethod(box.beforenm)
    seal = staticmethod(box.seal)
    open = staticmethod(box.open)
    hsalsa20 = staticmethod(box.hsalsa20)
    xsalsa20_xor = staticmethod(box.xsalsa20_xor)
    poly1305 = staticmethod(box.poly1305)


class PyNaCl:
    key_error = nacl.exceptions.RuntimeError
    auth_error = nacl.exceptions.CryptoError

    @staticmethod
    def beforenm(pk: bytes, sk: bytes) -> bytes:
        return nacl.bindings.crypto_box_beforenm(pk, sk)

    @staticmethod
    def seal(key: bytes, nonce: bytes, msg: bytes) -> bytes:
        return nacl.bindings.crypto_box_easy_afternm(msg, nonce, key)

    @staticmethod
    def open(key: bytes, nonce: bytes, boxed: bytes) -> bytes:
        return nacl.bindings.crypto_box_open_easy_afternm(boxed, nonce, key)

    @staticmethod
    def hsalsa20(key: bytes, inp: bytes) -> bytes:
        out = ctypes.create_string_buffer(32)
        assert _libsodium().crypto_core_hsalsa20(out, bytes(inp), bytes(key), None) == 0
        return out.raw

    @staticmethod
    def xsalsa20_xor(key: bytes, nonce: bytes, data: bytes) -> bytes:
        out = ctypes.create_string_buffer(len(data))
        rc = _libsodium().crypto_stream_xsalsa20_xor(
            out, bytes(data), ctypes.c_ulonglong(len(data)), bytes(nonce), bytes(key)
        )
        assert rc == 0
        return out.raw[: len(data)]

    @staticmethod
    def poly1305(key: bytes, msg: bytes) -> bytes:
        out = ctypes.create_string_buffer(16)
        rc = _libsodium().crypto_onetimeauth_poly1305(
            out, bytes(msg), ctypes.c_ulonglong(len(msg)), bytes(key)
        )
        assert rc == 0
        return out.raw


@pytest.fixture(params=[Pure, PyNaCl], ids=["pure", "pynacl"])
def impl(request):
    return request.param


IMPLS = [Pure, PyNaCl]
keys32 = st.binary(min_size=32, max_size=32)
nonces = st.binary(min_size=24, max_size=24)
messages = st.binary(max_size=300)


# ------------------------------------------------------------------ vectors


def test_constants() -> None:
    assert (box.KEY_BYTES, box.NONCE_BYTES, box.MAC_BYTES) == (32, 24, 16)
    assert box.KEY_BYTES == nacl.bindings.crypto_box_BEFORENMBYTES
    assert box.NONCE_BYTES == nacl.bindings.crypto_box_NONCEBYTES


def test_nacl_box_vector(impl) -> None:
    (c,) = _cases("box")
    k = impl.beforenm(_x(c["bob_public"]), _x(c["alice_private"]))
    assert k == impl.beforenm(_x(c["alice_public"]), _x(c["bob_private"]))
    assert impl.seal(k, _x(c["nonce"]), _x(c["plaintext"])).hex() == c["ciphertext"]
    assert impl.open(k, _x(c["nonce"]), _x(c["ciphertext"])).hex() == c["plaintext"]


def test_nacl_box_vector_through_pynacl_box_class() -> None:
    # What the rest of the project calls on CPython: Box(sk, pk).encrypt().ciphertext.
    (c,) = _cases("box")
    sealed = Box(PrivateKey(_x(c["bob_private"])), PublicKey(_x(c["alice_public"])))
    assert sealed.encrypt(_x(c["plaintext"]), _x(c["nonce"])).ciphertext.hex() == c["ciphertext"]
    k = box.beforenm(_x(c["alice_public"]), _x(c["bob_private"]))
    assert box.seal(k, _x(c["nonce"]), _x(c["plaintext"])).hex() == c["ciphertext"]


@pytest.mark.parametrize("case", _cases("hsalsa20"), ids=lambda c: c["output"][:8])
def test_hsalsa20_vectors(impl, case) -> None:
    assert impl.hsalsa20(_x(case["key"]), _x(case["input"])).hex() == case["output"]


@pytest.mark.parametrize("case", _cases("xsalsa20"), ids=lambda c: c["output"][:8])
def test_xsalsa20_vectors(impl, case) -> None:
    got = impl.xsalsa20_xor(_x(case["key"]), _x(case["nonce"]), _x(case["input"]))
    assert got.hex() == case["output"]


@pytest.mark.parametrize("case", _cases("poly1305"), ids=lambda c: c["source"][-12:])
def test_poly1305_vectors(impl, case) -> None:
    assert impl.poly1305(_x(case["key"]), _x(case["message"])).hex() == case["tag"]


# --------------------------------------------------- pure against libsodium


@given(sk=keys32, peer=keys32)
@settings(max_examples=60)
def test_beforenm_matches_pynacl(sk: bytes, peer: bytes) -> None:
    pk = nacl.bindings.crypto_scalarmult_base(peer)
    assert box.beforenm(pk, sk) == nacl.bindings.crypto_box_beforenm(pk, sk)


@given(key=keys32, nonce=nonces, msg=messages, sealer=st.sampled_from(IMPLS))
@settings(max_examples=300)
def test_sealed_by_one_opened_by_the_other(key, nonce, msg, sealer) -> None:
    opener = PyNaCl if sealer is Pure else Pure
    boxed = sealer.seal(key, nonce, msg)
    assert len(boxed) == len(msg) + box.MAC_BYTES
    assert boxed == opener.seal(key, nonce, msg)
    assert opener.open(key, nonce, boxed) == msg


@given(a=keys32, b=keys32, nonce=nonces, msg=messages)
@settings(max_examples=40)
def test_meter_to_pynacl_box_class(a: bytes, b: bytes, nonce: bytes, msg: bytes) -> None:
    # The meter (pure, its secret a) seals to the head-end (PyNaCl, secret b).
    meter, headend = PrivateKey(a), PrivateKey(b)
    k = box.beforenm(bytes(headend.public_key), a)
    boxed = box.seal(k, nonce, msg)
    assert Box(headend, meter.public_key).decrypt(boxed, nonce) == msg
    assert Box(meter, headend.public_key).encrypt(msg, nonce).ciphertext == boxed


@given(key=keys32, inp=st.binary(min_size=16, max_size=16))
@settings(max_examples=100)
def test_hsalsa20_matches_libsodium(key: bytes, inp: bytes) -> None:
    assert box.hsalsa20(key, inp) == PyNaCl.hsalsa20(key, inp)


@given(key=keys32, nonce=nonces, data=st.binary(max_size=400))
@settings(max_examples=100)
def test_xsalsa20_matches_libsodium(key: bytes, nonce: bytes, data: bytes) -> None:
    assert box.xsalsa20_xor(key, nonce, data) == PyNaCl.xsalsa20_xor(key, nonce, data)


@given(key=keys32, msg=st.binary(max_size=200))
@settings(max_examples=200)
def test_poly1305_matches_libsodium(key: bytes, msg: bytes) -> None:
    assert box.poly1305(key, msg) == PyNaCl.poly1305(key, msg)


@given(
    key=st.sampled_from([b"\xff" * 32, b"\xff" * 16 + bytes(16), bytes(16) + b"\xff" * 16]),
    msg=st.binary(max_size=100).map(lambda m: m.replace(b"\x00", b"\xff")),
)
def test_poly1305_extreme_keys_match_libsodium(key: bytes, msg: bytes) -> None:
    assert box.poly1305(key, msg) == PyNaCl.poly1305(key, msg)


def test_long_message_crosses_many_blocks() -> None:
    key, nonce, msg = os.urandom(32), os.urandom(24), os.urandom(64 * 70 + 5)
    boxed = box.seal(key, nonce, msg)
    assert boxed == PyNaCl.seal(key, nonce, msg)
    assert box.open(key, nonce, boxed) == msg


def test_accepts_bytearray_and_memoryview() -> None:
    key, nonce, msg = os.urandom(32), os.urandom(24), os.urandom(77)
    boxed = box.seal(bytearray(key), memoryview(nonce), bytearray(msg))
    assert isinstance(boxed, bytes) and boxed == PyNaCl.seal(key, nonce, msg)
    out = box.open(memoryview(key), bytearray(nonce), memoryview(boxed))
    assert isinstance(out, bytes) and out == msg


# --------------------------------------------------------------- rejections


@given(key=keys32, nonce=nonces, msg=st.binary(max_size=80), data=st.data())
@settings(max_examples=200)
def test_flipping_any_byte_fails_to_open(key, nonce, msg, data) -> None:
    boxed = bytearray(box.seal(key, nonce, msg))
    i = data.draw(st.integers(0, len(boxed) - 1), label="position")
    boxed[i] ^= data.draw(st.integers(1, 255), label="xor")
    with pytest.raises(AuthError):
        box.open(key, nonce, bytes(boxed))
    with pytest.raises(nacl.exceptions.CryptoError):
        PyNaCl.open(key, nonce, bytes(boxed))


def test_every_single_bit_flip_fails_to_open() -> None:
    key, nonce, msg = os.urandom(32), os.urandom(24), os.urandom(50)
    boxed = box.seal(key, nonce, msg)
    for i in range(len(boxed)):
        for bit in range(8):
            bad = bytearray(boxed)
            bad[i] ^= 1 << bit
            with pytest.raises(AuthError):
                box.open(key, nonce, bad)


def test_wrong_key_or_nonce_fails_to_open() -> None:
    key, nonce, msg = os.urandom(32), os.urandom(24), b"meter 42: 1234.5 kWh"
    boxed = box.seal(key, nonce, msg)
    with pytest.raises(AuthError):
        box.open(os.urandom(32), nonce, boxed)
    with pytest.raises(AuthError):
        box.open(key, os.urandom(24), boxed)


@given(key=keys32, nonce=nonces, msg=st.binary(max_size=60))
@settings(max_examples=100)
def test_truncated_boxes(key: bytes, nonce: bytes, msg: bytes) -> None:
    boxed = box.seal(key, nonce, msg)
    for n in range(len(boxed)):
        cut = boxed[:n]
        with pytest.raises(DecodeError if n < box.MAC_BYTES else AuthError):
            box.open(key, nonce, cut)


def test_empty_message() -> None:
    key, nonce = os.urandom(32), os.urandom(24)
    boxed = box.seal(key, nonce, b"")
    assert len(boxed) == 16 and boxed == PyNaCl.seal(key, nonce, b"")
    assert box.open(key, nonce, boxed) == b""


@given(key=st.binary(max_size=40), nonce=st.binary(max_size=30), boxed=st.binary(max_size=200))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_random_input_raises_only_protocol_errors(key, nonce, boxed) -> None:
    try:
        box.open(key, nonce, boxed)
    except ProtocolError:
        pass
    else:  # 2**-128 for random bytes: only if hypothesis built a real box
        raise AssertionError("random bytes opened")


@given(key=st.binary(max_size=40), nonce=st.binary(max_size=30), msg=st.binary(max_size=40))
@settings(max_examples=100)
def test_seal_with_bad_sizes_raises_protocol_errors(key, nonce, msg) -> None:
    try:
        box.seal(key, nonce, msg)
    except ProtocolError:
        assert len(key) != 32 or len(nonce) != 24
    else:
        assert len(key) == 32 and len(nonce) == 24


@pytest.mark.parametrize("n", [0, 16, 31, 33])
def test_wrong_key_length_is_bad_key(n: int) -> None:
    nonce = os.urandom(24)
    for call in (
        lambda: box.seal(bytes(n), nonce, b"x"),
        lambda: box.open(bytes(n), nonce, bytes(17)),
        lambda: box.beforenm(bytes(n), os.urandom(32)),
        lambda: box.beforenm(x25519.scalarmult_base(os.urandom(32)), bytes(n)),
    ):
        with pytest.raises(BadKeyError):
            call()


@pytest.mark.parametrize("n", [0, 16, 23, 25])
def test_wrong_nonce_length_is_decode_error(n: int) -> None:
    with pytest.raises(DecodeError):
        box.seal(os.urandom(32), bytes(n), b"x")
    with pytest.raises(DecodeError):
        box.open(os.urandom(32), bytes(n), bytes(40))


@pytest.mark.parametrize("case", LOW_ORDER["cases"], ids=lambda c: f"tc{c['tcId']}")
def test_low_order_public_keys_refused_by_beforenm(impl, case) -> None:
    assert case["expected"] == "reject"
    with pytest.raises(impl.key_error):
        impl.beforenm(_x(case["public"]), _x(case["private"]))


def test_zero_public_key_refused() -> None:
    with pytest.raises(BadKeyError):
        box.beforenm(bytes(32), os.urandom(32))
    with pytest.raises(nacl.exceptions.RuntimeError):
        nacl.bindings.crypto_box_beforenm(bytes(32), os.urandom(32))


def test_state_is_wiped_after_use() -> None:
    key, nonce = os.urandom(32), os.urandom(24)
    box.open(key, nonce, box.seal(key, nonce, b"reading"))
    assert not any(box._ST) and not any(box._KS)
    with pytest.raises(AuthError):
        box.open(key, nonce, bytes(40))
    assert not any(box._ST) and not any(box._KS)
