"""router_vs_raw_relay_mosquitto and dap_aggregate_vs_raw_subscribe_mosquitto.

Both on Mosquitto, each side measured in the same run, one after the other,
on the same pre-sealed load: N current readings from M meters (valid
envelopes of 77 bytes, published at QoS 1 on d1/m<id>/up).

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
)
from bench.loadgen import Sealer, uplinks

NAMES = ("router_vs_raw_relay_mosquitto", "dap_aggregate_vs_raw_subscribe_mosquitto")


def _router(site: Site, host: str, port: int, msgs, logs: Path) -> dict:
    n = len(msgs)
    create_session(host, port, "d1", ["d1/+/up", "d1/req", "d1/ack"])
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
        clear_session(host, port, "d1")


def _relay(host: str, port: int, msgs, logs: Path) -> dict:
    n = len(msgs)
    create_session(host, port, "bench-relay", ["d1/+/up"])
    sink = ChildLines("sink", "bench.relayproc",
                      ["sink", host, str(port), "bench-sink", "1", "relay/out", str(n)], logs)
    relay = None
    try:
        sink.expect("ready", 60)
        publish_all(host, port, msgs)
        relay = ChildLines("relay", "bench.relayproc",
                           ["relay", host, str(port), "bench-relay", "d1/+/up", "relay/out"], logs)
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
    create_session(host, port, "d1", ["d1/+/up", "d1/req", "d1/ack"])
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
        clear_session(host, port, "d1")
        site.write_dap_config(1, "router")


def _subscribe(host: str, port: int, msgs, logs: Path) -> dict:
    n = len(msgs)
    create_session(host, port, "bench-sub", ["d1/+/up"])
    publish_all(host, port, msgs)
    sink = ChildLines("subscriber", "bench.relayproc",
                      ["sink", host, str(port), "bench-sub", "0", "d1/+/up", str(n)], logs)
    try:
        ev = sink.expect("done", 600)
        return {"rate": (n - 1) / (ev["last"] - ev["first"]),
                "seconds": ev["last"] - ev["first"]}
    finally:
        sink.stop()
        clear_session(host, port, "bench-sub")


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
        def want(n: str) -> bool:
            return not only or any(n.startswith(o) or o.startswith(n) for o in only)

        if want(NAMES[0]):
            routers, relays = [], []
            for rep in range(reps):
                msgs = uplinks(sealer.current_rounds(rounds), 1)
                log(f"router end to end: {len(msgs)} readings from {meters} meters")
                routers.append(_router(site, host, port, msgs, logs))
                log(f"  {routers[-1]['rate']:,.0f}/s; bare relay, same load")
                relays.append(_relay(host, port, msgs, logs))
                log(f"  {relays[-1]['rate']:,.0f}/s")
            ratios = [a["rate"] / b["rate"] for a, b in zip(routers, relays)]
            out[NAMES[0]] = {
                "value": round(statistics.median(ratios), 3),
                "unit": "ratio (readings/s)", "target": 0.8,
                "baseline": "bare paho relay, same topology and load: "
                            f"{sum(r['rate'] for r in relays) / reps:,.0f} msg/s",
                "details": {"router_readings_per_s": [round(r["rate"]) for r in routers],
                            "relay_messages_per_s": [round(r["rate"]) for r in relays],
                            "ratios": [round(r, 3) for r in ratios],
                            "readings_per_run": meters * rounds, "meters": meters,
                            "payload_bytes": 77, "qos": 1,
                            "method": "queue pre-filled, consumers drain; first-to-last arrival"},
            }
        if want(NAMES[1]):
            daps, subs = [], []
            for rep in range(reps):
                msgs = uplinks(sealer.current_rounds(rounds), 1)
                log(f"DAP aggregate intake: {len(msgs)} messages")
                daps.append(_dap_intake(site, host, port, msgs, logs))
                log(f"  {daps[-1]['rate']:,.0f}/s; bare subscriber, same stream")
                subs.append(_subscribe(host, port, msgs, logs))
                log(f"  {subs[-1]['rate']:,.0f}/s")
            ratios = [a["rate"] / b["rate"] for a, b in zip(daps, subs)]
            out[NAMES[1]] = {
                "value": round(statistics.median(ratios), 3),
                "unit": "ratio (messages/s)", "target": 0.7,
                "baseline": "bare paho subscriber, same stream: "
                            f"{sum(r['rate'] for r in subs) / reps:,.0f} msg/s",
                "details": {"dap_messages_per_s": [round(r["rate"]) for r in daps],
                            "subscriber_messages_per_s": [round(r["rate"]) for r in subs],
                            "ratios": [round(r, 3) for r in ratios],
                            "messages_per_run": meters * rounds,
                            "dap_queue_sync": "full"},
            }
        site.close()
    finally:
        broker.stop()
    return out
