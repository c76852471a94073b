"""The seed's scenarios, played against a running system, and the scan of
everything the third-party DAP handled."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import cbor2

from headend.requests import ReadSpec
from headend.service import HeadEnd, ReadHandle
from headend.store import Store
from shared import obis


@dataclass
class Scenario:
    name: str
    flow: str   # "A", "B-aggregate", "B-router"
    kind: str   # "current", "interval", "group-fanout", "group-router", "tolerance"
    handles: list[ReadHandle] = field(default_factory=list)
    response_bytes_max: int = 0
    bundles: int | None = None
    started: float = 0.0

    def report(self) -> dict:
        lat = sorted(v * 1000 for h in self.handles for v in h.latency.values())
        requests = sum(len(h.meters) for h in self.handles)
        answered = sum(h.answered for h in self.handles)

        def pct(p: float) -> float | None:
            if not lat:
                return None
            return round(lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))], 1)

        out = {
            "name": self.name, "flow": self.flow, "kind": self.kind,
            "requests": requests, "answered": answered,
            "latency_ms": {"p50": round(statistics.median(lat), 1) if lat else None,
                           "p99": pct(0.99), "max": round(lat[-1], 1) if lat else None},
            "request_bytes_max": max((h.request_bytes for h in self.handles), default=0),
            "response_bytes_max": self.response_bytes_max,
        }
        if self.bundles is not None:
            out["bundles_upstream"] = self.bundles
        return out


def yesterday(hour_from: int, hour_to: int, now: float) -> tuple[int, int]:
    day = int(now) // 86400 * 86400 - 86400
    return day + hour_from * 3600, day + hour_to * 3600


def run_reads(he: HeadEnd, sc: Scenario, meters: list[int], spec: ReadSpec,
              timeout: float) -> None:
    sc.started = time.time()
    for m in meters:
        sc.handles.append(he.read(m, spec))
    for h in sc.handles:
        h.wait(max(0.1, sc.started + timeout - time.time()))


def run_group(he: HeadEnd, sc: Scenario, group: int, spec: ReadSpec, mode: str,
              timeout: float) -> None:
    sc.started = time.time()
    h = he.read_group(group, spec, mode)
    sc.handles.append(h)
    h.wait(timeout)


# -- the third-party DAP scan ---------------------------------------------------

def plaintext_patterns(store: Store, meters: list[int]) -> list[bytes]:
    """Byte strings that would give a reading away if they appeared in clear:
    the CBOR encodings of the register lists and interval-value lists the
    meters sent (long, distinctive), every value's own CBOR encoding when it
    is at least 5 bytes, and the decimal text of values of 5 digits or more.
    Shorter encodings are left out: they occur in random ciphertext by
    chance and prove nothing."""
    pats: set[bytes] = set()
    for m in meters:
        rows = store.readings(m)
        by_req: dict[tuple[int | None, int], list[tuple[int, int]]] = {}
        for q, t, v, _, req in rows:
            if v >= 1 << 16:
                pats.add(cbor2.dumps(v))
            if v >= 10000:
                pats.add(str(v).encode())
            by_req.setdefault((req, q), []).append((t, v))
        for (req, q), vals in by_req.items():
            if q in (obis.INTERVAL_IMPORT, obis.INTERVAL_EXPORT) and len(vals) >= 4:
                seq = [v for _, v in sorted(vals)]
                for n in range(4, min(len(seq), 24) + 1, 4):
                    pats.add(cbor2.dumps(seq[:n])[1:])  # the items, without the array head
        cur: dict[int, dict[int, int]] = {}
        for q, t, v, _, _ in rows:
            if q in obis.CURRENT_REGISTERS:
                cur.setdefault(t, {})[q] = v
        for regs in cur.values():
            if len(regs) == 4:
                flat = [x for tag in sorted(regs) for x in (tag, regs[tag])]
                pats.add(cbor2.dumps(flat))
    return sorted(pats, key=len, reverse=True)


def scan(captured: list[bytes], patterns: list[bytes]) -> int:
    blob = b"\x00".join(captured)
    return sum(blob.count(p) for p in patterns)
