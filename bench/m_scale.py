"""scale_out_2_workers: two head-end ingest workers sharing a Mosquitto
shared subscription ($share/headend/+/up: headend.config.SHARED_UPLINKS) divided by
one worker on the same subscription, same load, same run.

Method: the load is DAP bundles (500 sealed current readings each, as an
aggregating DAP sends them) on d1/up. For each run:
1. the workers' persistent sessions are made (each worker connects once,
   subscribes $share/headend/+/up, and leaves);
2. the broker's queue is filled: every bundle is published (QoS 1) while
   the workers are offline; Mosquitto hands each message of a shared
   subscription to one member's session, in turn, at publish time, so the
   queues split evenly;
3. the worker processes (bench/worker.py: the real headend.service.HeadEnd,
   each its own process, already built) are told to connect at once and
   drain; the rate is readings over the time from "go" to the last reading
   committed (the stores polled every 20 ms), so the load generator and
   process start-up (imports, opening the store) are outside the
   measurement; connecting and subscribing are inside it, for both sides.
Every run starts from a fresh copy of the same registry and gets the same
envelopes. The backlog holds 50 readings of each of 8,000 meters: fewer
than a replay window (64), because the workers drain it in parallel, so a
meter's readings are stored out of order across workers, and the replay
windows are shared through the store (Ingest._refresh): a reading more than
a window older than one already accepted is refused as stale, as it must
be. A real meter has a handful of messages in flight, not 64.
The three configurations run in turn, three times; a ratio is the median
of the three repetitions' own ratios (each against the one-worker run just
before it, so that the shared machine's drift between repetitions stays
out of it); the rates are the medians of their runs.

Two stores:
- shared: both workers on one SQLite file (WAL) - the deployment as it is;
  SQLite has one writer at a time, so commits serialise;
- sharded (`scale_out_2_workers_sharded_store`): each worker its own
  SQLite file - a store without the single-writer limit, standing in for a
  store that takes concurrent writers (PostgreSQL; docs/scaling.md).
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

from bench.common import (
    ChildLines,
    Site,
    clear_session,
    create_session,
    log,
    publish_all,
    start_mosquitto,
    wait_for,
)
from bench.loadgen import Sealer, bundles
from headend.config import SHARED_UPLINKS

NAMES = ("scale_out_2_workers", "scale_out_2_workers_sharded_store")


def _fresh(template: Path, path: Path) -> Path:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    shutil.copyfile(template, path)
    return path


def _rows(dbs: list[Path]) -> int:
    import sqlite3

    n = 0
    for db in set(dbs):
        con = sqlite3.connect(db, timeout=30)
        try:
            n += con.execute("SELECT coalesce(sum(value), 0) FROM counts WHERE name = 'stored'"
                             ).fetchone()[0]
        finally:
            con.close()
    return n


def _run(site: Site, host: str, port: int, msgs, n_env: int, dbs: list[Path],
         logs: Path, tag: str) -> dict:
    keyfile = site.root / "headend.key"
    cids = [f"headend-{tag}-{i}" for i in range(len(dbs))]
    # 1. sessions
    for cid in cids:
        create_session(host, port, cid, list(SHARED_UPLINKS))
    # 2. fill
    publish_all(host, port, msgs)
    # 3. drain
    workers = [ChildLines(cid, "bench.worker", [str(db), str(keyfile), host, str(port), cid],
                          logs) for cid, db in zip(cids, dbs)]
    try:
        for w in workers:
            w.expect("built", 60)
        t_go = time.time()
        for w in workers:
            w.send("go")
        for w in workers:
            w.expect("subscribed", 60)
        t_sub = time.time()
        wait_for(lambda: _rows(dbs) >= 4 * n_env, 900, "the workers to store everything", 0.02)
        t_done = time.time()
        per = []
        for w in workers:
            w.send("stats")
            per.append(w.expect("stats", 30)["stats"])
        return {"rate": n_env / (t_done - t_go), "seconds": t_done - t_go,
                "connect_s": t_sub - t_go,
                "per_worker_received": [p["received"] for p in per]}
    finally:
        for w in workers:
            w.stop()
        for cid in cids:
            clear_session(host, port, cid)


def run(quick: bool, workdir: Path, only) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    broker = start_mosquitto(workdir)
    host, port = broker.host, broker.port
    meters, rounds = (500, 20) if quick else (8000, 50)  # rounds < REPLAY_WINDOW: see above
    try:
        site = Site(workdir / "site", port)
        site.add_dap(1, "aggregate")
        ids = list(range(1, meters + 1))
        site.add_meters(ids, dap=1, group=1)
        site.close()
        template = workdir / "template.db"
        shutil.copyfile(site.db, template)
        log(f"sealing {meters * rounds:,} readings from {meters} meters")
        items = Sealer(site, ids).current_rounds(rounds)
        msgs = bundles(items, 1)
        n = len(items)
        runs: dict[str, list[dict]] = {"one": [], "two": [], "two-sharded": []}
        for rep in range(1 if quick else 3):
            for tag, k, sharded in (("one", 1, False), ("two", 2, False),
                                    ("two-sharded", 2, True)):
                name = f"{tag}-{rep}"
                dbs = [_fresh(template, workdir / f"{name}-{i if sharded else 0}.db")
                       for i in range(k)]
                if not sharded:
                    dbs = [dbs[0]] * k
                log(f"{k} worker(s), {'sharded' if sharded else 'shared'} store: {n:,} "
                    f"readings in {len(msgs)} bundles")
                r = _run(site, host, port, msgs, n, dbs, logs, name)
                runs[tag].append(r)
                log(f"  {r['rate']:,.0f} readings/s, per worker {r['per_worker_received']} "
                    "messages")
                for db in set(dbs):
                    for suffix in ("", "-wal", "-shm"):
                        Path(str(db) + suffix).unlink(missing_ok=True)
        med = {tag: statistics.median(r["rate"] for r in rs) for tag, rs in runs.items()}
        one = med["one"]
        # each repetition's configurations ran back to back: the ratio is
        # the median of each repetition's own ratio, so that the machine's
        # drift between repetitions (it is shared) does not enter it
        per_rep = {tag: [r["rate"] / o["rate"] for r, o in zip(rs, runs["one"])]
                   for tag, rs in runs.items() if tag != "one"}
        ratio = {tag: statistics.median(rs) for tag, rs in per_rep.items()}
        details = {tag: [{"readings_per_s": round(r["rate"]), "seconds": round(r["seconds"], 2),
                          "connect_s": round(r["connect_s"], 3),
                          "messages_per_worker": r["per_worker_received"]} for r in rs]
                   for tag, rs in runs.items()}
        common = {"readings": n, "bundles": len(msgs), "bundle_size": 500, "meters": meters,
                  "one_worker_readings_per_s (median)": round(one),
                  "two_workers_shared_store_readings_per_s (median)": round(med["two"]),
                  "two_workers_sharded_store_readings_per_s (median)":
                      round(med["two-sharded"]),
                  "ratio_per_repetition": {tag: [round(x, 3) for x in rs]
                                           for tag, rs in per_rep.items()}}
        return {
            "scale_out_2_workers": {
                "value": round(ratio["two"], 3), "unit": "ratio (2 workers / 1)",
                "target": 1.6, "baseline": f"one worker, same subscription: {one:,.0f} readings/s",
                "details": {**common, "store": "one SQLite file (WAL) shared by the workers",
                            "runs": details}},
            "scale_out_2_workers_sharded_store": {
                "value": round(ratio["two-sharded"], 3),
                "unit": "ratio (2 workers / 1)", "target": 1.6,
                "baseline": f"one worker, same subscription: {one:,.0f} readings/s",
                "details": {**common, "store": "one SQLite file per worker (no single writer)",
                            "runs": details}},
        }
    finally:
        broker.stop()
