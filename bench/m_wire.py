"""wire_bytes_*: sealed sizes on the wire (deterministic), next to the same
data as a plain JSON message of the shape typical of meter telemetry over
MQTT (compact separators, OBIS codes as keys, no encryption and no
authentication at all).

The sealed messages are built with the protocol code itself (Channel.seal
with the native backend) from the typical values of docs/protocol.md §10
(the test vectors); ids, counters and times are the same as there, so the
sizes are the documented ones. Targets are the limits docs/protocol.md §9
asserts.
"""

from __future__ import annotations

import json
import os

from shared import obis
from shared.backend import NATIVE
from shared.channel import Channel
from shared.const import DOWN, T_CURRENT, T_INTERVAL, T_READ_CURRENT, UP
from tests.dap_helpers import Counter

NAMES = ("wire_bytes_current_response", "wire_bytes_request", "wire_bytes_interval_6h")

TS = 1767229200
REGS = [1, 3304512, 2, 0, 3, 412, 4, 2301]
IMPORTS = [52, 51, 94, 75, 51, 81, 55, 50, 64, 86, 87, 100, 55, 80, 72, 88, 94, 86, 70, 53,
           56, 99, 97, 77]


def _json(obj: object) -> int:
    return len(json.dumps(obj, separators=(",", ":")).encode())


KEY = bytes(range(32))


def current_response() -> bytes:
    """The sealed current reading of docs/protocol.md §10 (padded): what
    the baselines of other benchmarks send as many bytes of."""
    return Channel(NATIVE, KEY, 1001, UP, Counter(42)).seal(
        T_CURRENT, [7, TS, REGS], os.urandom(24))[1]


def run(quick: bool, workdir, only) -> dict:
    up = Channel(NATIVE, KEY, 1001, UP, Counter(43))
    down = Channel(NATIVE, KEY, 1001, DOWN, Counter(1000))
    nonce = os.urandom(24)
    cur = current_response()
    req = down.seal(T_READ_CURRENT, [7, TS + 10, 0], nonce)[1]
    start = 1767261600
    iv = up.seal(T_INTERVAL, [8, 0, 1, start, 900, 3330000, 0, IMPORTS, [0] * 24, [5, 4]],
                 nonce)[1]
    code = {t: obis.CODES[t][0] for t in obis.CODES}
    j_cur = {"meter": "m1001", "ts": TS, "readings": {code[REGS[i]]: REGS[i + 1]
                                                      for i in range(0, 8, 2)}}
    j_req = {"meter": "m1001", "request": 7, "read": "current", "deadline": TS + 10,
             "tolerance": 0}
    j_iv_rows = {"meter": "m1001", "request": 8, "readings": [
        {"ts": start + 900 * i, code[5]: IMPORTS[i], code[6]: 0,
         **({"quality": 4} if i == 5 else {})} for i in range(24)]}
    j_iv_cols = {"meter": "m1001", "request": 8, "start": start, "period": 900,
                 "base": {code[1]: 3330000, code[2]: 0},
                 "readings": {code[5]: IMPORTS, code[6]: [0] * 24}, "quality": {"5": 4}}
    out = {}
    for name, sealed, plain, limit, what, extra in (
        ("wire_bytes_current_response", cur, _json(j_cur), 96,
         "current registers (+A, -A, P, U) answering a request", {}),
        ("wire_bytes_request", req, _json(j_req), 72, "on-demand read request", {}),
        ("wire_bytes_interval_6h", iv, _json(j_iv_rows), 300,
         "24 rows of 15 min, import and export, one flagged row",
         {"json_column_form_bytes": _json(j_iv_cols)}),
    ):
        out[name] = {
            "value": len(sealed), "unit": "bytes", "target": limit, "better": "lower",
            "baseline": f"the same data as plain JSON telemetry: {plain} bytes "
                        f"(sealed/JSON = {len(sealed) / plain:.2f})",
            "details": {"json_bytes": plain, "sealed_over_json": round(len(sealed) / plain, 3),
                        "envelope_overhead_bytes": 45, "what": what, **extra},
        }
    return out
