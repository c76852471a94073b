# shared/x25519.py and shared/box.py checked against the vector files, under
# MicroPython and CPython alike (tests/test_micropython.py runs every test_*
# here on both). The byte-for-byte comparison with PyNaCl on random input is
# in tests/test_box.py, tests/test_x25519.py and tests/test_crypto_cross.py.
import binascii
import gc
import json
import os
import sys

from shared import box, x25519
from shared.errors import AuthError, BadKeyError, DecodeError, ProtocolError

MICROPYTHON = sys.implementation.name == "micropython"

if MICROPYTHON:
    VECTORS = "/proj/tests/vectors/"
else:
    VECTORS = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vectors", ""
    )

# Heap budget for one seal of a 50-byte reading (see docs/meter-crypto.md).
SEAL_HEAP_BUDGET = 4096


def load(name):
    with open(VECTORS + name) as f:
        return json.load(f)


def unhex(s):
    return binascii.unhexlify(s)


def tohex(b):
    return binascii.hexlify(b).decode()


def cases(doc, kind):
    out = [c for c in doc["cases"] if c.get("kind") == kind]
    if not out:
        raise AssertionError(f"no {kind} cases")
    return out


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def raises(exc, fn, *args):
    try:
        fn(*args)
    except exc:
        return
    raise AssertionError(f"{fn} did not raise {exc.__name__}")


def test_x25519_rfc7748_vectors():
    doc = load("x25519_rfc7748.json")
    for c in cases(doc, "scalarmult"):
        got = x25519.scalarmult(unhex(c["scalar"]), unhex(c["u"]))
        check(tohex(got) == c["output"], "RFC 7748 5.2 " + c["u"][:8])
    (c,) = cases(doc, "dh")
    a, b = unhex(c["alice_private"]), unhex(c["bob_private"])
    check(tohex(x25519.scalarmult_base(a)) == c["alice_public"], "alice public")
    check(tohex(x25519.scalarmult_base(b)) == c["bob_public"], "bob public")
    check(tohex(x25519.scalarmult(a, unhex(c["bob_public"]))) == c["shared"], "shared a")
    check(tohex(x25519.scalarmult(b, unhex(c["alice_public"]))) == c["shared"], "shared b")


def test_x25519_rfc7748_iterated():
    # Both the 1- and the 1,000-iteration vectors run on MicroPython too: one
    # X25519 takes about 8 ms under the WebAssembly port, so 1,000 take ~8 s,
    # well inside the test's time. (1,000,000 is left out everywhere.)
    doc = load("x25519_rfc7748.json")
    for c in cases(doc, "iterated"):
        k = u = unhex(c["start"])
        for _ in range(c["iterations"]):
            k, u = x25519.scalarmult(k, u), k
        check(tohex(k) == c["output"], "RFC 7748 5.2 after {}".format(c["iterations"]))


def test_x25519_low_order_points_refused():
    doc = load("x25519_wycheproof_low_order.json")
    check(len(doc["cases"]) > 20, "low-order cases")
    for c in doc["cases"]:
        scalar, point = unhex(c["private"]), unhex(c["public"])
        if c["expected"] == "reject":
            raises(BadKeyError, x25519.scalarmult, scalar, point)
            raises(BadKeyError, box.beforenm, point, scalar)
        else:
            check(tohex(x25519.scalarmult(scalar, point)) == c["expected"], c["tcId"])


def test_x25519_bad_lengths():
    good = os.urandom(32)
    pk = x25519.scalarmult_base(good)
    for n in (0, 1, 31, 33, 64):
        raises(BadKeyError, x25519.scalarmult, bytes(n), pk)
        raises(BadKeyError, x25519.scalarmult, good, bytes(n))
        raises(BadKeyError, x25519.scalarmult_base, bytes(n))


def test_x25519_random_keys_agree():
    a, b = os.urandom(32), os.urandom(32)
    pa, pb = x25519.scalarmult_base(a), x25519.scalarmult_base(b)
    check(x25519.scalarmult(a, pb) == x25519.scalarmult(b, pa), "DH symmetric")
    check(box.beforenm(pb, a) == box.beforenm(pa, b), "beforenm symmetric")


def test_box_nacl_vector():
    doc = load("nacl_box.json")
    (c,) = cases(doc, "box")
    k = box.beforenm(unhex(c["bob_public"]), unhex(c["alice_private"]))
    check(k == box.beforenm(unhex(c["alice_public"]), unhex(c["bob_private"])), "beforenm")
    nonce = unhex(c["nonce"])
    check(tohex(box.seal(k, nonce, unhex(c["plaintext"]))) == c["ciphertext"], "seal")
    check(tohex(box.open(k, nonce, unhex(c["ciphertext"]))) == c["plaintext"], "open")


def test_box_primitive_vectors():
    doc = load("nacl_box.json")
    for c in cases(doc, "hsalsa20"):
        got = box.hsalsa20(unhex(c["key"]), unhex(c["input"]))
        check(tohex(got) == c["output"], "hsalsa20 " + c["output"][:8])
    for c in cases(doc, "xsalsa20"):
        got = box.xsalsa20_xor(unhex(c["key"]), unhex(c["nonce"]), unhex(c["input"]))
        check(tohex(got) == c["output"], "xsalsa20 " + c["output"][:8])
    for c in cases(doc, "poly1305"):
        got = box.poly1305(unhex(c["key"]), unhex(c["message"]))
        check(tohex(got) == c["tag"], c["source"])


def test_box_round_trip_and_tamper():
    key = os.urandom(32)
    for n in (0, 1, 15, 16, 17, 31, 32, 33, 50, 63, 64, 65, 96, 97, 130):
        nonce = os.urandom(24)
        msg = os.urandom(n)
        sealed = box.seal(key, nonce, msg)
        check(len(sealed) == n + 16, f"length {n}")
        check(box.open(key, nonce, sealed) == msg, f"round trip {n}")
        # One flipped byte anywhere (tag or ciphertext) must fail to open.
        for i in (0, 15, 16, len(sealed) - 1):
            if i < len(sealed):
                bad = bytearray(sealed)
                bad[i] ^= 0x01
                raises(AuthError, box.open, key, nonce, bytes(bad))
        raises(AuthError, box.open, key, os.urandom(24), sealed)


def test_box_short_and_malformed_input():
    key, nonce = os.urandom(32), os.urandom(24)
    for n in range(16):
        raises(DecodeError, box.open, key, nonce, bytes(n))
    sealed = box.seal(key, nonce, b"0123456789")
    for n in range(16, len(sealed)):
        raises(AuthError, box.open, key, nonce, sealed[:n])
    for n in (0, 31, 33):
        raises(BadKeyError, box.seal, bytes(n), nonce, b"x")
        raises(BadKeyError, box.open, bytes(n), nonce, sealed)
    for n in (0, 23, 25):
        raises(DecodeError, box.seal, key, bytes(n), b"x")
        raises(DecodeError, box.open, key, bytes(n), sealed)
    # Random bytes of random length: only the protocol's own errors.
    for _ in range(40):
        junk = os.urandom(os.urandom(1)[0] % 80)
        try:
            box.open(key, nonce, junk)
        except ProtocolError:
            pass
        else:
            raise AssertionError("random bytes opened")


def _worst_case_state():
    # Every half 0xFFFF: the first additions hit the largest sums the core
    # can see, (2**17 - 2) shifted left by 13.
    return [0xFFFF] * 32


def test_core_allocates_nothing():
    # Under MicroPython any intermediate of 2**30 or more would be a heap
    # bigint and show up here. On CPython there is no gc.mem_alloc; the
    # vectors above already check the same code.
    if not MICROPYTHON:
        return
    ks = bytearray(64)
    states = [_worst_case_state()]
    for _ in range(4):
        r = os.urandom(64)
        states.append([r[2 * i] | (r[2 * i + 1] << 8) for i in range(32)])
    for st in states:
        gc.collect()
        gc.disable()
        try:
            before = gc.mem_alloc()
            box._core(st, ks)
            box._core(st, None)
            used = gc.mem_alloc() - before
        finally:
            gc.enable()
        check(used == 0, f"Salsa20 core allocated {used} bytes")


def test_seal_heap_budget():
    if not MICROPYTHON:
        return
    key, nonce, msg = os.urandom(32), os.urandom(24), os.urandom(50)
    sealed = box.seal(key, nonce, msg)
    for fn, args in ((box.seal, (key, nonce, msg)), (box.open, (key, nonce, sealed))):
        gc.collect()
        gc.disable()
        try:
            before = gc.mem_alloc()
            fn(*args)
            used = gc.mem_alloc() - before
        finally:
            gc.enable()
        check(used <= SEAL_HEAP_BUDGET, f"{fn} of 50 bytes allocated {used} bytes")
