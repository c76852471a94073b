"""ingest_vs_raw_open: the head-end's ingest rate on sealed readings that
arrive in DAP bundles, divided by the rate of a bare PyNaCl Box.decrypt
loop over the same envelopes, in the same process, side by side.

Method:
- A store on disk (SQLite, WAL, synchronous=FULL as the head-end runs it),
  N meters registered behind one DAP, HISTORY_DAYS of 15-minute interval
  readings of every meter already stored (a running head-end's store is
  not empty, and how a store's cost grows with its history is part of
  what this measures), one request row per meter per round (as a group
  read leaves them), and per round one sealed response per meter, sealed
  by the meter-side Channel (native backend).
- The envelopes travel as the DAP sends them: CBOR bundles of 500
  (provision's max_items). The ingest side is headend.ingest.Ingest.process,
  exactly what the service's ingest thread calls: 4 bundles (2,000
  envelopes) per call and per commit, called as its two phases
  (Ingest.prepare, then Ingest.commit) so that each is timed apart: where
  the time goes is in the details. It opens every box, checks every
  inner field, the path (meter behind that DAP), the replay window, decodes
  and stores the readings, the windows, last-seen and the request status,
  and commits. Channels (the pairwise key per meter) are warmed first, as
  in a running head-end; the raw loop likewise gets a precomputed
  nacl.public.Box per meter.
- Raw: `boxes[meter].decrypt(env[29:], env[5:29])` for each envelope (the
  meter id read from the envelope to pick the box).
- The store's floor (_store_floor), right after: the least SQLite could
  cost per current reading with a row for the reading, the meter's window
  and the answer, and the ratio ingest would reach with its store at that
  floor; in the details.
- Repeated: each repetition runs raw (best of 3) then ingest on fresh
  envelopes (new counters); the reported ratio is the median over
  repetitions.

Two envelope kinds, reported separately: current readings (4 registers,
82-84 bytes with their padding, 4 rows stored) - the headline
`ingest_vs_raw_open` - and 6-hour interval responses (24 rows of import and
export plus the two base registers: 270-272 bytes, 50 rows stored).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from nacl.public import Box, PrivateKey, PublicKey

from bench.common import log, wanted
from bench.loadgen import T0
from headend.ingest import Ingest
from headend.store import Store, _chunked
from shared import gateway, obis
from shared.backend import NATIVE
from shared.channel import Channel
from shared.const import T_CURRENT, T_INTERVAL, UP
from tests.dap_helpers import Counter

NAMES = ("ingest_vs_raw_open", "ingest_vs_raw_open_interval_6h")

BUNDLE = 500
BUNDLES_PER_BATCH = 4
# The store holds this much history of every meter before the run: a
# store's layout decides whether ingest slows down as it fills (store.py).
HISTORY_DAYS = 7


def _bodies(kind: str, m: int, r: int) -> tuple[int, list]:
    if kind == "current":
        return T_CURRENT, [r, T0 + 900 * r, [1, 3304512 + 37 * r + m, 2, m % 7, 3, 412 + r % 50,
                                             4, 2301]]
    start = T0 + 6 * 3600 * r
    deltas = [(m * 7 + i * 13 + r) % 120 for i in range(24)]
    return T_INTERVAL, [r, 0, 1, start, 900, 3330000 + r * 2000, 0, deltas, [0] * 24,
                        [5, 4] if m % 3 == 0 else []]


def _fill_history(store: Store, days: float) -> None:
    """What the store of a running head-end holds: `days` of 15-minute
    interval readings (import and export) of every meter, before T0. Made
    in SQL, in time order, through the same staging table ingest uses."""
    with store.transaction() as db:
        db.execute("DELETE FROM temp.staged_readings")
        db.execute(
            "WITH RECURSIVE t(s) AS (SELECT ?1 UNION ALL SELECT s + 900 FROM t WHERE s + 900 < ?2) "
            "INSERT INTO temp.staged_readings (meter, quantity, start, value, quality, "
            "received_at, request) SELECT m.meter, q.tag, t.s, (m.meter + t.s) % 120, 0, t.s, "
            "NULL FROM t, meters m, (SELECT ?3 AS tag UNION ALL SELECT ?4) q",
            (T0 - int(days * 86400), T0, obis.INTERVAL_IMPORT, obis.INTERVAL_EXPORT))
        store.add_staged_readings(db)
        db.execute("DELETE FROM temp.staged_readings")
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _new_store(workdir: Path, name: str) -> Store:
    """An empty store, as the head-end opens it, in workdir/name."""
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / name
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    return Store(db)


def _run_kind(kind: str, workdir: Path, meters: int, reps: int, rounds: int,
              history_days: float) -> dict:
    store = _new_store(workdir, f"ingest-{kind}.db")
    store.add_dap(1, "aggregate")
    he = PrivateKey.generate()
    ids = list(range(1, meters + 1))
    secrets = {m: PrivateKey.generate() for m in ids}
    store.add_meters([(m, bytes(secrets[m].public_key), 1, 1, 900) for m in ids])
    if history_days:
        _fill_history(store, history_days)
    chans = {m: Channel(NATIVE, NATIVE.beforenm(bytes(he.public_key), bytes(secrets[m])), m, UP,
                        Counter()) for m in ids}
    boxes = {m: Box(he, PublicKey(bytes(secrets[m].public_key))) for m in ids}
    ingest = Ingest(store, bytes(he), NATIVE)
    for m in ids:  # a running head-end has every channel cached
        ingest.channel(m)
    seq = [0]

    def make(rep: int) -> tuple[list[bytes], list[tuple[str, bytes]]]:
        envs = []
        reqs = []
        for r in range(rep * rounds, (rep + 1) * rounds):
            for m in ids:
                mtype, body = _bodies(kind, m, r)
                envs.append(chans[m].seal(mtype, body, os.urandom(24))[1])
                reqs.append((r, m, "current" if kind == "current" else "interval",
                             "group-fanout", None, None, 0, 0, 0.0))
        store.add_requests(reqs)
        msgs = []
        for i in range(0, len(envs), BUNDLE):
            seq[0] += 1
            msgs.append(("d1/up", gateway.bundle(NATIVE, 1, seq[0], envs[i:i + BUNDLE])))
        return envs, msgs

    def raw(envs: list[bytes]) -> float:
        t = time.perf_counter()
        for e in envs:
            boxes[int.from_bytes(e[1:5], "big")].decrypt(e[29:], e[5:29])
        return time.perf_counter() - t

    ratios, raw_rates, ing_rates, open_us, store_us = [], [], [], [], []
    stored = accepted = 0
    clock = time.perf_counter
    for rep in range(reps):
        envs, msgs = make(rep)
        t_raw = min(raw(envs) for _ in range(3))
        step = BUNDLES_PER_BATCH
        t_open = t_store = 0.0
        for i in range(0, len(msgs), step):
            t0 = clock()
            prepared = ingest.prepare(msgs[i:i + step], time.time())
            t1 = clock()
            b = ingest.commit(prepared)  # process() is these two calls
            t_open += t1 - t0
            t_store += clock() - t1
            stored += b.stored
            accepted += b.accepted
            if b.rejected:
                raise RuntimeError(f"ingest rejected envelopes: {dict(b.rejected)}")
        t_ing = t_open + t_store
        n = len(envs)
        raw_rates.append(n / t_raw)
        ing_rates.append(n / t_ing)
        ratios.append(t_raw / t_ing)
        open_us.append(t_open / n * 1e6)
        store_us.append(t_store / n * 1e6)
    rows_per_env = stored / accepted if accepted else 0
    store.close()
    return {
        "ratio": statistics.median(ratios),
        "ratios": [round(r, 3) for r in ratios],
        "ingest_per_s": statistics.median(ing_rates),
        "raw_per_s": statistics.median(raw_rates),
        "open_us": statistics.median(open_us),
        "store_us": statistics.median(store_us),
        "rows_per_envelope": rows_per_env,
        "accepted": accepted,
        "stored_rows": stored,
        "envelope_bytes": len(envs[0]),
    }


def _store_floor(workdir: Path, meters: int, rounds: int) -> float:
    """The least a current reading could cost to store in SQLite, in us,
    with what the head-end must keep of it - the reading, the meter's
    replay window, the request's answer - each a row, written as cheaply
    as SQLite writes them: one wide row per response (the registers as
    columns), narrow window and answer tables keyed for the update,
    multi-row statements of CHUNK rows, one commit per `meters` responses,
    on a Store's connection (WAL, synchronous=FULL). Python builds the rows
    beforehand; binding them is counted. Median over `rounds` rounds after
    one to warm up. The head-end's store does more per response (four
    rows, last-seen, a request's status, a partial index): this is its
    floor."""
    store = _new_store(workdir, "ingest-floor.db")  # for its connection and pragmas
    db = store.db
    db.executescript(
        "CREATE TABLE responses (hour INTEGER, meter INTEGER, start INTEGER, a INTEGER, "
        "b INTEGER, c INTEGER, d INTEGER, received_at REAL, request INTEGER, "
        "PRIMARY KEY (hour, meter, start)) WITHOUT ROWID;"
        "CREATE TABLE windows (meter INTEGER PRIMARY KEY, top INTEGER, bits BLOB);"
        "CREATE TABLE answers (request INTEGER, meter INTEGER, answered_at REAL, "
        "PRIMARY KEY (request, meter)) WITHOUT ROWID;")
    ids = range(1, meters + 1)
    with store.transaction():
        db.executemany("INSERT INTO windows VALUES (?, -1, x'')", [(m,) for m in ids])
    insert = "INSERT OR IGNORE INTO responses VALUES {values}"
    window = ("UPDATE windows SET top = v.column2, bits = v.column3 FROM (VALUES {values}) "
              "AS v WHERE windows.meter = v.column1")
    answer = ("UPDATE answers SET answered_at = v.column3 FROM (VALUES {values}) AS v "
              "WHERE answers.request = v.column1 AND answers.meter = v.column2")
    costs = []
    for r in range(rounds + 1):
        with store.transaction():  # the requests, as a group read leaves them
            db.executemany("INSERT INTO answers VALUES (?, ?, NULL)", [(r, m) for m in ids])
        ts, now = T0 + 900 * r, time.time()
        rows = [(ts // 3600, m, ts, 3304512 + m, m % 7, 412, 2301, now, r) for m in ids]
        wins = [(m, r, (r + 1).to_bytes(8, "big")) for m in ids]
        answered = [(r, m, now) for m in ids]
        t = time.perf_counter()
        with store.transaction():
            for sql, width, items in ((insert, 9, rows), (window, 3, wins),
                                      (answer, 3, answered)):
                _chunked(db, sql, width, items)
        costs.append((time.perf_counter() - t) / meters * 1e6)
    store.close()
    return statistics.median(costs[1:])


def run(quick: bool, workdir: Path, only) -> dict:
    out = {}
    plan = {
        "current": (300, 2, 2, 1) if quick else (2000, 5, 4, HISTORY_DAYS),
        "interval": (200, 2, 1, 1) if quick else (2000, 3, 2, HISTORY_DAYS),
    }
    for kind, name in (("current", "ingest_vs_raw_open"),
                       ("interval", "ingest_vs_raw_open_interval_6h")):
        if not wanted((name,), only):
            continue
        meters, reps, rounds, days = plan[kind]
        log(f"ingest {kind}: {meters} meters with {days} day(s) of history, "
            f"{reps} repetitions of {rounds} round(s)")
        r = _run_kind(kind, workdir, meters, reps, rounds, days)
        raw_us = 1e6 / r["raw_per_s"]
        floor_us = _store_floor(workdir, meters, 3 if quick else 8) if kind == "current" else None
        what = ("current readings (4 registers, %d B envelopes, 4 rows each)" % r["envelope_bytes"]
                if kind == "current" else
                "6-hour interval responses (%d B envelopes, %d rows each)"
                % (r["envelope_bytes"], r["rows_per_envelope"]))
        out[name] = {
            "value": round(r["ratio"], 3), "unit": "ratio (ingest / raw open)", "target": 0.33,
            "baseline": f"bare PyNaCl Box.decrypt loop, same envelopes: "
                        f"{r['raw_per_s']:,.0f} envelopes/s",
            "details": {
                "envelopes": what,
                "ingest_envelopes_per_s": round(r["ingest_per_s"]),
                "ingest_rows_per_s": round(r["ingest_per_s"] * r["rows_per_envelope"]),
                "raw_decrypt_envelopes_per_s": round(r["raw_per_s"]),
                "ratios_per_repetition": r["ratios"],
                # where an envelope's time goes: Ingest.prepare (opening and
                # checking, building the rows) and Ingest.commit (staging,
                # the replay checks, the write transaction), and the ratio
                # ingest would reach if storing cost nothing
                "us_per_envelope": {"raw_decrypt": round(raw_us, 2),
                                    "open_and_check": round(r["open_us"], 2),
                                    "store": round(r["store_us"], 2)},
                "ratio_if_storing_were_free": round(raw_us / r["open_us"], 3),
                "meters": meters, "envelopes_ingested": r["accepted"],
                "rows_stored": r["stored_rows"],
                "bundle_size": BUNDLE, "envelopes_per_commit": BUNDLE * BUNDLES_PER_BATCH,
                "store": "SQLite on disk, WAL, synchronous=FULL",
                "history_days_stored_before": days,
            },
        }
        if floor_us is not None:
            # the most ingest could reach with these checks and a store in
            # SQLite: opening and checking as measured, storing at the floor
            # (_store_floor), measured right after
            out[name]["details"].update({
                "store_floor_us_per_response": round(floor_us, 2),
                "ratio_with_the_store_at_its_floor": round(raw_us / (r["open_us"] + floor_us),
                                                           3)})
    return out
