"""Generate tests/vectors/envelope.json: test vectors for the sealed envelope.

    .venv/bin/python tools/make_envelope_vectors.py [OUTPUT]   (default: the vector file)

Deterministic: the same PyNaCl and cbor2 give the same bytes on every run
(tests/test_envelope_vectors.py regenerates the file and compares).

The reference here is deliberately independent of shared/: inner messages
are encoded with cbor2.dumps, boxes made with nacl.public.Box, the envelope
header packed with struct, following docs and shared/envelope.py's layout:

    kind (1) | meter id, big-endian (4) | nonce (24) | box = tag (16) || ciphertext

    kind 0x11  sealed message: box = Box(sender_sk, recipient_pk).encrypt(plaintext, nonce)
    kind 0x12  group-request item (as the DAP delivers it):
               box (32) = Box(headend_sk, meter_pk).encrypt(SHA-256(body)[:16], nonce),
               followed by the clear group body (CBOR).

Inner message (CBOR array): [version 1, meter id (group id in a group body),
direction (0 down, 1 up), type, counter, body...]. The plaintext of a
response carrying readings is that array followed by zero bytes: for each
register value, 5 less the bytes cbor2 takes for it; for each interval row
value, 3 less its bytes, or none if it takes more; and for the quality
flags, what they take less than a one-byte flag on every row would
(docs/protocol.md, "Padding").

KEYS: every key here is a TEST-VECTOR key, public by construction: a secret
key is SHA-256 of its seed string, e.g.
    SHA-256("sealed-meter test vector: meter 1001")
and every nonce is the first 24 bytes of SHA-256 of its own seed string.
They are the only keys allowed in the repository; never provision them.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from importlib.metadata import version
from pathlib import Path

import cbor2
import nacl
from nacl.public import Box, PrivateKey

OUT = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "envelope.json"

SEED_PREFIX = "sealed-meter test vector: "
HEADEND_SEED = SEED_PREFIX + "head-end"

# Wire constants, written out here on purpose (not imported from shared/).
VERSION = 1
ENV_SEALED = 0x11
ENV_GROUP_ITEM = 0x12
DOWN, UP = 0, 1
T_BIRTH, T_DEATH, T_CURRENT, T_INTERVAL, T_STATUS = 1, 2, 3, 4, 5
T_READ_CURRENT, T_READ_INTERVAL = 16, 17
K_GROUP = 2

HEADER_FIELDS = ["version", "meter", "direction", "type", "counter"]
BODY_FIELDS = {
    T_READ_CURRENT: ["request id", "deadline", "tolerance"],
    T_READ_INTERVAL: ["request id", "deadline", "tolerance", "from", "to"],
    T_CURRENT: ["request id", "time", "registers [tag, value, ...]"],
    T_INTERVAL: ["request id", "part", "parts", "start", "period", "import at start",
                 "export at start", "import per row (Wh)", "export per row (Wh)",
                 "quality flags [row, flags, ...]"],
    T_STATUS: ["request id", "status", "detail"],
    T_BIRTH: ["session", "will counter", "time", "period", "oldest interval start"],
    T_DEATH: ["session", "reason"],
}

T0 = 1767225600  # 2026-01-01T00:00:00Z, a period boundary

# 24 rows of 15 minutes (6 hours) of a household without solar, Wh per row:
# what firmware.metrology.SimulatedLoad(1001) gives from T0 + 10 h.
SIX_HOURS_IMPORT = [52, 51, 94, 75, 51, 81, 55, 50, 64, 86, 87, 100,
                    55, 80, 72, 88, 94, 86, 70, 53, 56, 99, 97, 77]


def secret(seed: str) -> PrivateKey:
    return PrivateKey(hashlib.sha256(seed.encode()).digest())


def meter_seed(meter: int) -> str:
    return f"{SEED_PREFIX}meter {meter}"


def nonce_for(name: str) -> tuple[str, bytes]:
    seed = f"{SEED_PREFIX}nonce for {name}"
    return seed, hashlib.sha256(seed.encode()).digest()[:24]


def padding(mtype: int, body: list) -> bytes:
    """The zero bytes after the inner message, measured with cbor2."""
    def short(values: list, width: int) -> int:
        return sum(max(0, width - len(cbor2.dumps(v))) for v in values)

    if mtype == T_CURRENT:
        return bytes(short(body[2][1::2], 5))
    if mtype == T_INTERVAL:
        every_row = cbor2.dumps([x for row in range(len(body[7])) for x in (row, 1)])
        flags = max(0, len(every_row) - len(cbor2.dumps(body[9])))
        return bytes(short(body[5:7], 5) + short(body[7] + body[8], 3) + flags)
    return b""


def header(kind: int, meter: int, nonce: bytes) -> bytes:
    return struct.pack(">BI", kind, meter) + nonce


def sealed_case(name: str, kind: str, description: str, meter: int, direction: int,
                mtype: int, counter: int, body: list) -> dict:
    """One sealed message between meter `meter` and the head-end."""
    if direction == UP:
        sender_seed, recipient_seed = meter_seed(meter), HEADEND_SEED
    else:
        sender_seed, recipient_seed = HEADEND_SEED, meter_seed(meter)
    sender, recipient = secret(sender_seed), secret(recipient_seed)
    nonce_seed, nonce = nonce_for(name)
    decoded = [VERSION, meter, direction, mtype, counter] + body
    plaintext = cbor2.dumps(decoded) + padding(mtype, body)
    box = Box(sender, recipient.public_key).encrypt(plaintext, nonce).ciphertext
    return {
        "kind": kind,
        "description": description,
        "meter": meter,
        "direction": "up" if direction == UP else "down",
        "sender_seed": sender_seed,
        "recipient_seed": recipient_seed,
        "nonce_seed": nonce_seed,
        "sender_secret_key": bytes(sender).hex(),
        "sender_public_key": bytes(sender.public_key).hex(),
        "recipient_secret_key": bytes(recipient).hex(),
        "recipient_public_key": bytes(recipient.public_key).hex(),
        "nonce": nonce.hex(),
        "plaintext": plaintext.hex(),
        "box": box.hex(),
        "wire": (header(ENV_SEALED, meter, nonce) + box).hex(),
        "decoded": decoded,
        "fields": HEADER_FIELDS + BODY_FIELDS[mtype],
    }


def group_case(name: str, description: str, group: int, tolerance: int, mtype: int,
               counter: int, body: list, members: list[int], member: int) -> dict:
    """A group request to `members`; `wire` is `member`'s item."""
    headend = secret(HEADEND_SEED)
    nonce_seed, nonce = nonce_for(name)
    decoded = [VERSION, group, DOWN, mtype, counter] + body
    group_body = cbor2.dumps(decoded)
    tag = hashlib.sha256(group_body).digest()[:16]
    entries = []
    listed = []
    for m in members:
        pk = secret(meter_seed(m)).public_key
        box = Box(headend, pk).encrypt(tag, nonce).ciphertext
        entries.append([m, box])
        listed.append({"meter": m, "seed": meter_seed(m), "public_key": bytes(pk).hex(),
                       "box": box.hex()})
    mine = secret(meter_seed(member))
    box = dict(entries)[member]
    gateway = cbor2.dumps([VERSION, K_GROUP, tolerance, group, nonce, group_body, entries])
    return {
        "kind": "group-request",
        "description": description,
        "meter": member,
        "group": group,
        "tolerance": tolerance,
        "direction": "down",
        "sender_seed": HEADEND_SEED,
        "recipient_seed": meter_seed(member),
        "nonce_seed": nonce_seed,
        "sender_secret_key": bytes(headend).hex(),
        "sender_public_key": bytes(headend.public_key).hex(),
        "recipient_secret_key": bytes(mine).hex(),
        "recipient_public_key": bytes(mine.public_key).hex(),
        "nonce": nonce.hex(),
        "body": group_body.hex(),
        "plaintext": tag.hex(),
        "box": box.hex(),
        "wire": (header(ENV_GROUP_ITEM, member, nonce) + box + group_body).hex(),
        "gateway": gateway.hex(),
        "members": listed,
        "decoded": decoded,
        "fields": ["version", "group", "direction", "type", "counter"] + BODY_FIELDS[mtype],
    }


def cases() -> list[dict]:
    top = 0xFFFFFFFF
    out = [
        sealed_case(
            "current-response", "current-response",
            "a current reading: import, export, power, voltage, answering request 7",
            1001, UP, T_CURRENT, 42,
            [7, T0 + 3600, [1, 3_304_512, 2, 0, 3, 412, 4, 2301]]),
        sealed_case(
            "current-response-idle", "current-response",
            "the same meter and request with the home nearly idle (8 W): the padding makes"
            " it as long as the reading above",
            1001, UP, T_CURRENT, 42,
            [7, T0 + 3600, [1, 3_304_512, 2, 0, 3, 8, 4, 2301]]),
        sealed_case(
            "current-response-worst", "current-response",
            "worst-case size: every id, counter, time and register near 2**32",
            top, UP, T_CURRENT, top - 1,
            [top, top - 15, [1, top - 2, 2, top - 3, 3, top - 4, 4, top - 5]]),
        sealed_case(
            "interval-response-6h", "interval-response-6h",
            "6 hours of 15-minute rows (24), one part, no export, one clock-set flag",
            1001, UP, T_INTERVAL, 43,
            [8, 0, 1, T0 + 36000, 900, 3_330_000, 0, SIX_HOURS_IMPORT, [0] * 24, [5, 4]]),
        sealed_case(
            "request", "request",
            "on-demand read of the current registers: request 7, deadline, tolerance 0",
            1001, DOWN, T_READ_CURRENT, 1000, [7, T0 + 3610, 0]),
        sealed_case(
            "request-worst", "request",
            "worst-case on-demand read: ids, counter, deadline near 2**32, "
            "tolerance 65535 (the most a request may carry)",
            top, DOWN, T_READ_CURRENT, top - 1, [top, top - 15, 65535]),
        sealed_case(
            "interval-request", "interval-request",
            "read of the interval rows in [from, to): 6 hours, tolerance 600",
            1001, DOWN, T_READ_INTERVAL, 1001, [8, T0 + 40000, 600, T0 + 36000, T0 + 57600]),
        group_case(
            "group-request", "a current read to group 77 (meters 1001-1003), tolerance 300;"
            " wire is meter 1001's item, gateway the head-end's message to the DAP",
            77, 300, T_READ_CURRENT, 1002, [9, T0 + 4000, 300], [1001, 1002, 1003], 1001),
        sealed_case(
            "birth", "birth",
            "session 3 starts; its last will was sealed with counter 40",
            1001, UP, T_BIRTH, 41, [3, 40, T0, 900, T0 - 8 * 86400]),
        sealed_case(
            "death-will", "death",
            "the last will of session 3 (reason 0: connection lost)",
            1001, UP, T_DEATH, 40, [3, 0]),
        sealed_case(
            "death-orderly", "death",
            "an orderly goodbye of session 3 (reason 1)",
            1001, UP, T_DEATH, 44, [3, 1]),
        sealed_case(
            "status-no-data", "status-no-data",
            "no rows held for request 10's range; detail is the oldest interval held",
            1001, UP, T_STATUS, 45, [10, 1, T0 - 8 * 86400]),
    ]
    return out


def document() -> dict:
    return {
        "source": (f"generated by tools/make_envelope_vectors.py with PyNaCl {nacl.__version__}"
                   f" and cbor2 {version('cbor2')}; keys derived from the seed strings given"
                   " per case"),
        "keys": "TEST-VECTOR KEYS ONLY: secret key = SHA-256(seed string), nonce ="
                " SHA-256(seed string)[:24]; public by construction, never provision them",
        "cases": cases(),
    }


def render() -> str:
    return json.dumps(document(), indent=1) + "\n"


def main(argv: list[str]) -> None:
    out = Path(argv[1]) if len(argv) > 1 else OUT
    out.write_text(render())


if __name__ == "__main__":
    main(sys.argv)
