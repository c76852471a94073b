"""mpy_*: the meter's crypto and request loop under the real MicroPython
WebAssembly port (tests/mpy_harness.py: Node runs the official port with
the project's shared/ and firmware/ on its file system), next to the same
operations in CPython with PyNaCl.

- mpy_seal_us, mpy_open_us: shared.box seal/open of a 50-byte message
  (a current reading's plaintext is 32 bytes, an interval response ~100),
  best of 3 runs of N calls (the port's clock only advances in whole
  milliseconds, so single calls cannot be timed).
- mpy_x25519_ms: one shared.x25519.scalarmult (once per peer per boot).
- mpy_heap_bytes_per_seal: gc.mem_alloc() growth over one seal of 50 bytes
  with the collector disabled: the transient heap a seal needs.
- mpy_meter_idle_heap_bytes: the steady-state heap of the meter's request
  loop: firmware.meter.Meter with one day of profile on a Flash stand-in
  answers current and 6-hour interval reads (sealed by a head-end Channel in
  the same interpreter); after the loop and gc.collect(), the heap held
  above what was held right after the modules were imported (module code is
  not counted: on the board it is .mpy bytecode loaded once at boot; it is
  reported next to it). The peak transient heap of one request is reported
  too.
- The profile of a seal (where the time goes) is in the details:
  HSalsa20, one Salsa20 block, the 50-byte XOR, Poly1305 over 50 bytes.
  docs/meter-crypto.md discusses it.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import timeit
from pathlib import Path

# The one runner the tests use too; it runs a script's "#@@ part"s as
# separate runPython calls, so gc.collect() can free between them.
RUNNER = Path(__file__).resolve().parent.parent / "tests" / "mpy" / "runner.mjs"

NAMES = ("mpy_seal_us", "mpy_open_us", "mpy_x25519_ms", "mpy_heap_bytes_per_seal",
         "mpy_meter_idle_heap_bytes")

SCRIPT = r"""
import gc, json, os, time
from shared import box, x25519
from shared.backend import PURE as B
from shared.channel import Channel
from shared.const import DOWN, T_READ_CURRENT, T_READ_INTERVAL
from firmware.flash import Flash
from firmware.meter import Meter
from firmware.metrology import SimulatedLoad

P = json.load(open("/proj/in.json"))
N = P["n"]
out = {}

def best(fn, n, runs=3):
    b = None
    for _ in range(runs):
        t = time.ticks_ms()
        for _ in range(n):
            fn()
        dt = time.ticks_diff(time.ticks_ms(), t) * 1000.0 / n
        b = dt if b is None or dt < b else b
    return b

def heap(fn):
    # allocation during one call, collector off (the port frees nothing
    # inside a run anyway): the transient heap the call needs
    gc.disable()
    try:
        before = gc.mem_alloc()
        fn()
        return gc.mem_alloc() - before
    finally:
        gc.enable()

def bench_box():
    key, nonce, msg = os.urandom(32), os.urandom(24), os.urandom(50)
    sealed = box.seal(key, nonce, msg)
    out["seal_us"] = best(lambda: box.seal(key, nonce, msg), N)
    out["open_us"] = best(lambda: box.open(key, nonce, sealed), N)
    out["seal_empty_us"] = best(lambda: box.seal(key, nonce, b""), N)
    kib = os.urandom(1024)
    out["seal_1k_us"] = best(lambda: box.seal(key, nonce, kib), max(4, N // 8))
    sk, pk = os.urandom(32), x25519.scalarmult_base(os.urandom(32))
    out["x25519_ms"] = best(lambda: x25519.scalarmult(sk, pk), P["nx"]) / 1000.0
    # where the time of a seal goes
    st, ks = box._ST, box._KS
    out["hsalsa20_us"] = best(lambda: box._hsalsa(st, key, nonce), N)
    out["salsa20_block_us"] = best(lambda: box._core(st, ks), N)
    buf = bytearray(50)
    out["xor50_us"] = best(lambda: box._stream(st, ks, 0, msg, 0, buf, 0, 50), N)
    pk32 = os.urandom(32)
    out["poly1305_50_us"] = best(lambda: box.poly1305(pk32, msg), N * 4)
    box._wipe(st, ks)
    out["heap_seal"] = heap(lambda: box.seal(key, nonce, msg))
    out["heap_open"] = heap(lambda: box.open(key, nonce, sealed))

bench_box()

NOW = 1767225600
ROOT = "/flash/bench"
try:
    for f in os.listdir(ROOT):
        os.remove(ROOT + "/" + f)
except OSError:
    pass

class Seq:
    def __init__(self):
        self.v = 1
    def next(self):
        self.v += 1
        return self.v

he = Channel(B, os.urandom(32), 1001, DOWN, Seq())
clock = [NOW + 437]

def request(i):
    now = clock[0]
    if i % 4 == 3:
        frm = NOW - 18 * 3600
        return he.seal(T_READ_INTERVAL, [i, now + 30, 0, frm, frm + 6 * 3600], os.urandom(24))[1]
    return he.seal(T_READ_CURRENT, [i, now + 30, 0], os.urandom(24))[1]

def serve(meter, first, n):
    for i in range(first, first + n):
        clock[0] += 60
        if len(meter.handle(request(i), clock[0], os.urandom)) != 1:
            raise AssertionError("no answer")

#@@ part: modules loaded, nothing else held
gc.collect()
heap_base = gc.mem_alloc()
out["heap_modules"] = heap_base
meter = Meter(1001, he.key, B, Flash(ROOT), SimulatedLoad(1001))
meter.catch_up(NOW, history_from=NOW - 86400)
serve(meter, 0, P["requests"])

#@@ part: steady state after the first requests
gc.collect()
out["heap_idle"] = gc.mem_alloc() - heap_base
req_c = request(4000)
req_i = request(4003)
clock[0] += 1
out["heap_request_current"] = heap(lambda: meter.handle(req_c, clock[0], os.urandom))
out["heap_request_interval"] = heap(lambda: meter.handle(req_i, clock[0], os.urandom))
req_c = req_i = None
t = time.ticks_ms()
serve(meter, 1000, P["requests"])
out["request_ms"] = time.ticks_diff(time.ticks_ms(), t) / P["requests"]

#@@ part: and after as many again
gc.collect()
out["heap_idle_after"] = gc.mem_alloc() - heap_base
with open("/proj/out.json", "w") as f:
    json.dump(out, f)
"""


def _cpython() -> dict:
    import os

    from nacl import bindings as nb

    key, nonce, msg = os.urandom(32), os.urandom(24), os.urandom(50)
    sealed = nb.crypto_box_easy_afternm(msg, nonce, key)
    sk, pk = os.urandom(32), nb.crypto_scalarmult_base(os.urandom(32))

    def best(stmt, n):
        return min(timeit.repeat(stmt, number=n, repeat=5)) / n

    from shared import box as pure

    return {
        "seal_us": best(lambda: nb.crypto_box_easy_afternm(msg, nonce, key), 20000) * 1e6,
        "open_us": best(lambda: nb.crypto_box_open_easy_afternm(sealed, nonce, key), 20000) * 1e6,
        "x25519_ms": best(lambda: nb.crypto_scalarmult(sk, pk), 500) * 1e3,
        "pure_seal_us": best(lambda: pure.seal(key, nonce, msg), 200) * 1e6,
    }


def _run_mpy(params: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-mpy-") as tmp:
        t = Path(tmp)
        (t / "script.py").write_text(SCRIPT)
        (t / "in.json").write_text(json.dumps(params))
        p = subprocess.run(["node", str(RUNNER), str(t / "script.py"),
                            "--file", f"{t / 'in.json'}:/proj/in.json",
                            "--out", f"/proj/out.json:{t / 'out.json'}"],
                           capture_output=True, text=True, timeout=900,
                           env={**__import__("os").environ, "NODE_OPTIONS": ""})
        if p.returncode != 0:
            raise RuntimeError(f"MicroPython run failed ({p.returncode}):\n{p.stderr[-3000:]}")
        return json.loads((t / "out.json").read_text())


def run(quick: bool, workdir, only) -> dict:
    got = _run_mpy({"n": 20 if quick else 200, "nx": 2 if quick else 10,
                    "requests": 8 if quick else 48})
    cp = _cpython()
    r = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in got.items()}
    prof = {k: r[k] for k in ("hsalsa20_us", "salsa20_block_us", "xor50_us", "poly1305_50_us")}
    parts = sum(prof.values()) + r["salsa20_block_us"]  # a 50-byte seal runs block 0 and 1
    profile = {
        "seal_50B_us": r["seal_us"],
        "hsalsa20_us": r["hsalsa20_us"],
        "salsa20_block0_us (poly key + first 32 B)": r["salsa20_block_us"],
        "salsa20_block1_us (the other 18 B)": r["salsa20_block_us"],
        "xor_50B_us": r["xor50_us"],
        "poly1305_50B_us": r["poly1305_50_us"],
        "rest_us (checks, buffers, wipe, bytes())": round(r["seal_us"] - parts, 1),
        "seal_empty_us": r["seal_empty_us"], "seal_1KiB_us": r["seal_1k_us"],
    }
    cpy = {k: round(v, 3) for k, v in cp.items()}
    return {
        "mpy_seal_us": {"value": r["seal_us"], "unit": "us per 50-byte seal", "target": None,
                        "better": "lower",
                        "baseline": f"CPython+PyNaCl {cpy['seal_us']} us; pure box on CPython "
                                    f"{cpy['pure_seal_us']} us",
                        "details": {"profile": profile, "cpython_pynacl_us": cpy["seal_us"],
                                    "cpython_pure_us": cpy["pure_seal_us"]}},
        "mpy_open_us": {"value": r["open_us"], "unit": "us per 50-byte open", "target": None,
                        "better": "lower", "baseline": f"CPython+PyNaCl {cpy['open_us']} us",
                        "details": {"cpython_pynacl_us": cpy["open_us"]}},
        "mpy_x25519_ms": {"value": r["x25519_ms"], "unit": "ms per scalarmult", "target": None,
                          "better": "lower",
                          "baseline": f"CPython+PyNaCl {cpy['x25519_ms']} ms",
                          "details": {"cpython_pynacl_ms": cpy["x25519_ms"]}},
        "mpy_heap_bytes_per_seal": {
            "value": r["heap_seal"], "unit": "bytes (transient)", "target": 4096,
            "better": "lower", "baseline": "CPython+PyNaCl: not applicable (C)",
            "details": {"heap_per_open_bytes": r["heap_open"]}},
        "mpy_meter_idle_heap_bytes": {
            "value": r["heap_idle_after"], "unit": "bytes held by the meter", "target": 32768,
            "better": "lower",
            "baseline": f"modules loaded: {r['heap_modules']:,} bytes of heap (not counted)",
            "details": {"heap_after_warmup_bytes": r["heap_idle"],
                        "heap_modules_bytes": r["heap_modules"],
                        "peak_transient_current_read_bytes": r["heap_request_current"],
                        "peak_transient_interval_6h_read_bytes": r["heap_request_interval"],
                        "ms_per_request (incl. head-end sealing in the same interpreter)":
                            r["request_ms"],
                        "requests_per_phase": 8 if quick else 48}},
    }
