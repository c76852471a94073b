"""shared/cbor.py under real MicroPython, cross-checked against cbor2 here.

Values are generated on CPython at run time (hypothesis, a batch per
MicroPython run since each run starts Node), sent over in the typed JSON form
of the vector file, and:
  - encoded by MicroPython: the bytes must equal cbor2.dumps, and decode
    with cbor2 to the same value;
  - encoded by cbor2, decoded by MicroPython: the value must match cbor2's
    reading, and MicroPython must re-encode it to the very same bytes.
The typed JSON is itself shipped as hex: MicroPython's json module reads a
"\\ud83d\\ude00" escape as two lone surrogates, so astral characters must
arrive as raw UTF-8.
"""

from __future__ import annotations

import json
import math

import cbor2
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.mpy_harness import run_json
from tests.test_cbor import U64, as_decoded, depth, typed, values

ENCODE_ON_MPY = """
import json, binascii
from shared import cbor
import mpytest_cbor as t
with open("/proj/in.json") as f:
    payload = json.load(f)
items = json.loads(binascii.unhexlify(payload["typed"]).decode())
out = []
for item in items:
    try:
        out.append(binascii.hexlify(cbor.dumps(t.untyped(item))).decode())
    except TypeError as e:
        out.append("TypeError")
with open("/proj/out.json", "w") as f:
    json.dump({"hex": out}, f)
"""

DECODE_ON_MPY = """
import json, binascii
from shared import cbor
from shared.errors import DecodeError
import mpytest_cbor as t
with open("/proj/in.json") as f:
    payload = json.load(f)
seen, again = [], []
for h in payload["hex"]:
    try:
        value = cbor.loads(binascii.unhexlify(h), max_size=1 << 20)
    except DecodeError as e:
        seen.append("DecodeError")
        again.append(None)
        continue
    seen.append(t.typed(value))
    try:
        again.append(binascii.hexlify(cbor.dumps(value)).decode())
    except TypeError:
        again.append("TypeError")
doc = json.dumps({"typed": seen, "hex": again})
with open("/proj/out.json", "w") as f:
    json.dump({"doc": binascii.hexlify(doc.encode()).decode()}, f)
"""

# Boundaries that random generation may miss, always sent along.
EDGES: list[object] = [
    0, 23, 24, 255, 256, 65535, 65536, 2**30 - 1, 2**30, 2**31, 2**32 - 1, 2**32, 2**63, U64,
    -1, -24, -25, -256, -257, -(2**30), -(2**31) - 1, -(2**32) - 1, -(2**64),
    2**64, -(2**64) - 1, 2**200,
    "", "a" * 23, "a" * 24, "\u00fc" * 12, "\U0001f600", "x\x00y", "\u6c34" * 100,
    b"", b"\x00" * 24, bytearray(b"\xff" * 300),
    [], [[[[]]]], (1, "a", b"b"), {}, {"a": {"b": {"c": []}}}, {(1, 2): "t", 3: None, b"k": True},
    {"z": 1, "a": 2, "m": 3, "b": 4},  # insertion order, not sorted, not hash order
    {f"k{i}": i for i in range(30)},
    1.5, -0.0, math.inf, -math.inf, math.nan, 1e300, 5e-324,
    True, False, None,
]

CROSS = settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
batches = st.lists(values, min_size=20, max_size=60)


def shippable(items: list[object]) -> str:
    return json.dumps([typed(x) for x in items], ensure_ascii=False).encode().hex()


def encode_on_micropython(items: list[object]) -> list[str]:
    return run_json(ENCODE_ON_MPY, {"typed": shippable(items)})["hex"]


def decode_on_micropython(encodings: list[bytes]) -> tuple[list[object], list[str | None]]:
    reply = run_json(DECODE_ON_MPY, {"hex": [e.hex() for e in encodings]})
    doc = json.loads(bytes.fromhex(reply["doc"]).decode(), strict=False)
    return doc["typed"], doc["hex"]


def check_encoded_by_micropython(items: list[object]) -> None:
    got = encode_on_micropython(items)
    assert len(got) == len(items)
    for x, h in zip(items, got):
        if isinstance(x, int) and not isinstance(x, bool) and not -(2**64) <= x <= U64:
            assert h == "TypeError", x
            continue
        raw = bytes.fromhex(h)
        assert raw == cbor2.dumps(x), (x, h)
        assert typed(cbor2.loads(raw)) == typed(as_decoded(x))


def check_decoded_by_micropython(items: list[object]) -> None:
    encodings = [cbor2.dumps(x) for x in items]
    seen, again = decode_on_micropython(encodings)
    assert len(seen) == len(items)
    for x, raw, t, h in zip(items, encodings, seen, again):
        assert t == typed(cbor2.loads(raw)), (x, raw.hex())
        if h == "TypeError":
            assert isinstance(x, int) and abs(x) > U64
        else:
            assert bytes.fromhex(h) == raw, (x, raw.hex(), h)


def test_edges_encoded_by_micropython() -> None:
    check_encoded_by_micropython(EDGES)


def test_edges_decoded_by_micropython() -> None:
    check_decoded_by_micropython(EDGES)


@CROSS
@given(batches)
def test_random_values_encoded_by_micropython(items: list[object]) -> None:
    assume(all(depth(x) <= 16 for x in items))
    check_encoded_by_micropython(items)


@CROSS
@given(batches)
def test_random_values_decoded_by_micropython(items: list[object]) -> None:
    assume(all(depth(x) <= 16 for x in items))
    check_decoded_by_micropython(items)


def test_malformed_rejected_by_micropython() -> None:
    from tests.test_cbor import MALFORMED

    encodings = [bytes.fromhex(c["hex"]) for c in MALFORMED]
    seen, _ = decode_on_micropython(encodings)
    # max_size is lifted in the script, so oversize cases are not among these
    assert seen == ["DecodeError"] * len(encodings)
