"""router_vs_raw_relay_mosquitto and dap_aggregate_vs_raw_subscribe_mosquitto.

Both on Mosquitto, each side measured in the same run, one after the other,
on the same pre-sealed load: N current readings from M meters (valid,
sealed and padded envelopes, 82-84 bytes, published at QoS 1 on d1/m<id>/up).

The broker's queue is filled first: the consumer's persistent session
exists (subscribed) but is offline while the load is published, then the
consumer starts and drains it. So the load generator does not compete for
the two cores during the measurement, identically for both sides. Rates are
first-to-last arrival at the destination, from the destination's own
timestamps (the head-end's received_at, the DAP queue's received column,
the bare sink's clock).

- router_vs_raw_relay_mosquitto: readings/s end to end through the real
  system - broker -> DAP (`python -m dap`, router mode: disk queue with
  synchronous=FULL, one bundle per envelope) -> broker -> head-end
  (`python -m headend serve`: opens, checks, stores, commits, acks) -
  divided by messages/s through a bare relay in the same topology: broker ->
  plain paho subscriber republishing each message untouched (QoS 1) ->
  broker -> plain paho subscriber (bench/relayproc.py). Each relay and
  endpoint is its own process, as the DAP and the head-end are.
- dap_aggregate_vs_raw_subscribe_mosquitto: the DAP's intake in aggregate
  mode (messages taken off the broker and committed to its disk queue, then
  acknowledged) divided by a bare paho subscriber's intake of the same
  stream (persistent session, automatic PUBACK).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from bench.common import (
    ChildLines,
    Site,
    clear_session,
    create_session,
    dap_queue_span,
    headend_serve,
    log,
    publish_all,
    start_dap,
    start_mosquitto,
    stored_span,
    wait_for,
    wanted,
)
from bench.loadgen import Sealer, uplinks
from shared import topics

NAMES = ("router_vs_raw_relay_mosquitto", "dap_aggregate_vs_raw_subscribe_mosquitto")

# DAP 1's persistent session, as its links subscribe (dap/links.py), made
# before the load is published so that the broker queues it.
DAP = topics.dap_name(1)
DAP_SUBS = [topics.dap_meters_up(1), topics.dap_req(1), topics.dap_ack(1)]
UPLINKS = topics.dap_meters_up(1)


def _router(site: Site, host: str, port: int, msgs, logs: Path) -> dict:
    n = len(msgs)
    create_session(host, port, DAP, DAP_SUBS)
    he = headend_serve(site, logs)
    dap = None
    try:
        before = site.stored()
        publish_all(host, port, msgs)
        t0 = time.time()
        dap = start_dap(site, 1, logs)
        wait_for(lambda: site.stored() >= before + 4 * n, 600, "the head-end to store all",
                 0.1, [he, dap])
        _, lo, hi, last = stored_span(site.db, since=t0)
        return {"rate": (n - last / 4) / (hi - lo), "seconds": hi - lo,
                "from_dap_start_s": hi - t0}
    finally:
        if dap is not None:
            dap.stop()
        he.stop()
        clear_session(host, port, DAP)


def _relay(host: str, port: int, msgs, logs: Path) -> dict:
    n = len(msgs)
    create_session(host, port, "bench-relay", [UPLINKS])
    sink = ChildLines("sink", "bench.relayproc",
                      ["sink", host, str(port), "bench-sink", "1", "relay/out", str(n)], logs)
    relay = None
    try:
        sink.expect("ready", 60)
        publish_all(host, port, msgs)
        relay = ChildLines("relay", "bench.relayproc",
                           ["relay", host, str(port), "bench-relay", UPLINKS, "relay/out"], logs)
        ev = sink.expect("done", 600)
        return {"rate": (n - 1) / (ev["last"] - ev["first"]),
                "seconds": ev["last"] - ev["first"]}
    finally:
        if relay is not None:
            relay.stop()
        sink.stop()
        clear_session(host, port, "bench-relay")


def _dap_intake(site: Site, host: str, port: int, msgs, logs: Path) -> dict:
    n = len(msgs)
    site.write_dap_config(1, "aggregate")
    create_session(host, port, DAP, DAP_SUBS)
    t0 = time.time()
    publish_all(host, port, msgs)
    dap = start_dap(site, 1, logs)
    try:
        wait_for(lambda: dap_queue_span(site, 1, t0)[0] >= n, 600, "the DAP to take all",
                 0.1, [dap])
        _, lo, hi, last = dap_queue_span(site, 1, t0)
        return {"rate": (n - last) / (hi - lo), "seconds": hi - lo}
    finally:
        dap.stop()
        clear_session(host, port, DAP)
        site.write_dap_config(1, "router")


def _subscribe(host: str, port: int, msgs, logs: Path) -> dict:
    n = len(msgs)
    create_session(host, port, "bench-sub", [UPLINKS])
    publish_all(host, port, msgs)
    sink = ChildLines("subscriber", "bench.relayproc",
                      ["sink", host, str(port), "bench-sub", "0", UPLINKS, str(n)], logs)
    try:
        ev = sink.expect("done", 600)
        return {"rate": (n - 1) / (ev["last"] - ev["first"]),
                "seconds": ev["last"] - ev["first"]}
    finally:
        sink.stop()
        clear_session(host, port, "bench-sub")


def _paired(reps: int, make_msgs, what: str, a, b_what: str, b) -> tuple[list, list, list]:
    """`reps` rounds, each on fresh load: a(msgs), then b(msgs) on the same
    load. Returns (a's runs, b's runs, the ratios a/b)."""
    a_runs, b_runs = [], []
    for _ in range(reps):
        msgs = make_msgs()
        log(f"{what}: {len(msgs)} messages")
        a_runs.append(a(msgs))
        log(f"  {a_runs[-1]['rate']:,.0f}/s; {b_what}, same load")
        b_runs.append(b(msgs))
        log(f"  {b_runs[-1]['rate']:,.0f}/s")
    return a_runs, b_runs, [x["rate"] / y["rate"] for x, y in zip(a_runs, b_runs)]


def _metric(a_key: str, a_runs: list, b_key: str, b_runs: list, ratios: list, *, unit: str,
            target: float, baseline: str, **details) -> dict:
    """The metric: the median ratio, next to the baseline's median rate."""
    return {
        "value": round(statistics.median(ratios), 3), "unit": unit, "target": target,
        "baseline": f"{baseline}: {statistics.median(r['rate'] for r in b_runs):,.0f} msg/s",
        "details": {a_key: [round(r["rate"]) for r in a_runs],
                    b_key: [round(r["rate"]) for r in b_runs],
                    "ratios": [round(r, 3) for r in ratios], **details},
    }


def run(quick: bool, workdir: Path, only) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    broker = start_mosquitto(workdir)
    host, port = broker.host, broker.port
    meters, rounds, reps = (200, 5, 1) if quick else (1000, 20, 5)
    out = {}
    try:
        site = Site(workdir / "site", port)
        site.add_dap(1, "router")
        ids = list(range(1, meters + 1))
        site.add_meters(ids, dap=1, group=1)
        sealer = Sealer(site, ids)

        sizes: set[int] = set()  # of the envelopes: the bare relay carries the same

        def load() -> list:
            msgs = uplinks(sealer.current_rounds(rounds), 1)
            sizes.update(len(p) for _, p in msgs)
            return msgs

        if wanted(NAMES[:1], only):
            runs = _paired(reps, load, f"router end to end ({meters} meters)",
                           lambda m: _router(site, host, port, m, logs),
                           "bare relay", lambda m: _relay(host, port, m, logs))
            out[NAMES[0]] = _metric(
                "router_readings_per_s", runs[0], "relay_messages_per_s", runs[1], runs[2],
                unit="ratio (readings/s)", target=0.8,
                baseline="bare paho relay, same topology and load",
                readings_per_run=meters * rounds, meters=meters,
                payload_bytes=sorted(sizes), qos=1,
                method="queue pre-filled, consumers drain; first-to-last arrival")
        if wanted(NAMES[1:], only):
            runs = _paired(reps, load, "DAP aggregate intake",
                           lambda m: _dap_intake(site, host, port, m, logs),
                           "bare subscriber", lambda m: _subscribe(host, port, m, logs))
            out[NAMES[1]] = _metric(
                "dap_messages_per_s", runs[0], "subscriber_messages_per_s", runs[1], runs[2],
                unit="ratio (messages/s)", target=0.7,
                baseline="bare paho subscriber, same stream",
                messages_per_run=meters * rounds, dap_queue_sync="full")
        site.close()
    finally:
        broker.stop()
    return out
