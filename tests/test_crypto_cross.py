"""The box across the runtime boundary: PyNaCl on CPython against shared/box.py
running under the real MicroPython (WebAssembly port).

One MicroPython run per module takes a batch of jobs as JSON and answers in
JSON (tests/mpy_harness.run_json). All keys and messages are drawn here, at
run time, with PyNaCl and os.urandom; the MicroPython side draws its nonces
from its own os.urandom.
"""

from __future__ import annotations

import os

import nacl.bindings
import nacl.exceptions
import pytest
from nacl.public import Box, PrivateKey

from tests.mpy_harness import run_json

# Message sizes around the Salsa20 block edges (the first block carries only
# 32 message bytes) and a typical 50-byte reading.
SIZES = [0, 1, 15, 16, 31, 32, 33, 50, 63, 64, 95, 96, 97, 160, 300]

MPY_SCRIPT = r"""
import binascii, json, os
from shared import box
from shared.errors import ProtocolError

def unhex(s):
    return binascii.unhexlify(s)

def tohex(b):
    return binascii.hexlify(b).decode()

with open("/proj/in.json") as f:
    req = json.load(f)
out = {"opened": [], "sealed": [], "beforenm": []}

for job in req["open"]:
    try:
        key = box.beforenm(unhex(job["peer_public"]), unhex(job["secret"]))
        msg = box.open(key, unhex(job["nonce"]), unhex(job["box"]))
        out["opened"].append({"ok": tohex(msg)})
    except ProtocolError as e:
        out["opened"].append({"error": e.reason})

for job in req["seal"]:
    key = box.beforenm(unhex(job["peer_public"]), unhex(job["secret"]))
    nonce = os.urandom(box.NONCE_BYTES)
    sealed = box.seal(key, nonce, unhex(job["message"]))
    out["sealed"].append({"nonce": tohex(nonce), "box": tohex(sealed)})

for job in req["beforenm"]:
    try:
        key = box.beforenm(unhex(job["public"]), unhex(job["secret"]))
        out["beforenm"].append({"ok": tohex(key)})
    except ProtocolError as e:
        out["beforenm"].append({"error": e.reason})

with open("/proj/out.json", "w") as f:
    json.dump(out, f)
"""


def _pair() -> tuple[PrivateKey, PrivateKey]:
    return PrivateKey.generate(), PrivateKey.generate()


@pytest.fixture(scope="module")
def exchange():
    """Build every job, run MicroPython once, return (jobs, answers)."""
    jobs: dict = {"open": [], "seal": [], "beforenm": []}
    expect: dict = {"open": [], "seal": [], "beforenm": []}

    # PyNaCl seals (the head-end's side); MicroPython opens (the meter's side).
    for n in SIZES:
        headend, meter = _pair()
        msg, nonce = os.urandom(n), os.urandom(24)
        sealed = Box(headend, meter.public_key).encrypt(msg, nonce).ciphertext
        job = {
            "secret": bytes(meter).hex(),
            "peer_public": bytes(headend.public_key).hex(),
            "nonce": nonce.hex(),
        }
        jobs["open"].append({**job, "box": sealed.hex()})
        expect["open"].append({"ok": msg.hex()})
        # The same box with one byte changed must be refused over there too.
        bad = bytearray(sealed)
        bad[os.urandom(1)[0] % len(bad)] ^= 1 << (os.urandom(1)[0] % 8)
        jobs["open"].append({**job, "box": bytes(bad).hex()})
        expect["open"].append({"error": "auth"})

    # MicroPython seals with a nonce of its own; PyNaCl opens.
    for n in SIZES:
        headend, meter = _pair()
        msg = os.urandom(n)
        jobs["seal"].append(
            {
                "secret": bytes(meter).hex(),
                "peer_public": bytes(headend.public_key).hex(),
                "message": msg.hex(),
            }
        )
        expect["seal"].append((headend, meter, msg))

    # beforenm on fresh key pairs, and refusals of small-order keys.
    for _ in range(8):
        a, b = _pair()
        jobs["beforenm"].append({"public": bytes(b.public_key).hex(), "secret": bytes(a).hex()})
        expect["beforenm"].append(
            {"ok": nacl.bindings.crypto_box_beforenm(bytes(b.public_key), bytes(a)).hex()}
        )
    for bad_public in (bytes(32), b"\x01" + bytes(31), bytes.fromhex("ec" + "ff" * 31)):
        secret = os.urandom(32)
        with pytest.raises(nacl.exceptions.RuntimeError):
            nacl.bindings.crypto_box_beforenm(bad_public, secret)
        jobs["beforenm"].append({"public": bad_public.hex(), "secret": secret.hex()})
        expect["beforenm"].append({"error": "bad-key"})

    answers = run_json(MPY_SCRIPT, jobs)
    return expect, answers


def test_pynacl_seals_micropython_opens(exchange) -> None:
    expect, answers = exchange
    assert answers["opened"] == expect["open"]


def test_micropython_seals_pynacl_opens(exchange) -> None:
    expect, answers = exchange
    got = answers["sealed"]
    assert len(got) == len(expect["seal"])
    nonces = set()
    for (headend, meter, msg), sealed in zip(expect["seal"], got):
        nonce, boxed = bytes.fromhex(sealed["nonce"]), bytes.fromhex(sealed["box"])
        assert len(nonce) == 24 and len(boxed) == len(msg) + 16
        assert Box(headend, meter.public_key).decrypt(boxed, nonce) == msg
        # Byte for byte what PyNaCl makes from the same key and nonce.
        assert Box(meter, headend.public_key).encrypt(msg, nonce).ciphertext == boxed
        nonces.add(nonce)
    assert len(nonces) == len(got), "MicroPython repeated a nonce"


def test_micropython_beforenm_matches_pynacl(exchange) -> None:
    expect, answers = exchange
    assert answers["beforenm"] == expect["beforenm"]
