"""headend_cpu_router_vs_aggregate_{amqtt,mosquitto}: the head-end's own
process CPU seconds per 10,000 stored readings with its DAP in router mode,
divided by the same with the DAP in aggregate mode; same broker, same
meters, same requests, same run. Also the upstream cost of each mode
(MQTT messages and bytes the DAP sends to the head-end per reading).

Method, per broker (the embedded amqtt, then Mosquitto):
- a site with M = 1,000 meters behind DAP 1, all in group 1; the head-end
  as `python -m headend serve --site ...` (its own process; scheduled
  collection off, so only the benchmark's reads run); the DAP as
  `python -m dap`; the meters as sim.fleet.Fleet (the firmware's meter core,
  one MQTT session and client id per meter) in child processes.
- router phase, then aggregate phase (the DAP is restarted with the other
  mode; everything else stays up): K group reads of the current registers
  are issued 2 s apart (fanned out by the DAP; delay tolerance 8 s, so an
  aggregating DAP may hold responses that long). The requests are built and
  published by the benchmark process (headend.requests.Requester on the
  same store, as `python -m headend read` does), so the head-end process
  only ingests.
- Measured over each phase: psutil user+system CPU of the head-end process,
  the readings it took in (4 register values per accepted response, from the
  store's `accepted` count; the new rows are reported too), and every
  message on d1/up seen by an observer client (count and bytes). On
  Mosquitto the router/aggregate pair of phases runs twice (8 reads each)
  and the phases of a mode are added up.
A "reading" in the per-reading upstream figures is one meter response (a
sealed current reading, 4 register values).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from bench.common import (
    ChildLines,
    Site,
    close,
    connect_wait,
    cpu_seconds,
    headend_serve,
    log,
    mqtt_client,
    start_broker,
    start_dap,
    wait_for,
)
from bench.m_wire import current_response
from headend.requests import ReadSpec, Requester
from shared import topics
from shared.backend import NATIVE

NAMES = ("headend_cpu_router_vs_aggregate_amqtt", "headend_cpu_router_vs_aggregate_mosquitto",
         "upstream_messages_per_reading_aggregate", "upstream_bytes_per_reading_aggregate",
         "upstream_bytes_per_reading_router")
TOLERANCE = 8


class Observer:
    def __init__(self, host: str, port: int, topic: str) -> None:
        self.n = 0
        self.bytes = 0
        self.lock = threading.Lock()
        self.c = mqtt_client(f"bench-observer-{time.monotonic_ns()}")
        self.c.on_message = self._msg
        connect_wait(self.c, host, port, [topic])

    def _msg(self, c, u, msg) -> None:
        with self.lock:
            self.n += 1
            self.bytes += len(msg.payload)

    def snap(self) -> tuple[int, int]:
        with self.lock:
            return self.n, self.bytes

    def stop(self) -> None:
        close(self.c)


def start_fleets(site: Site, ids: list[int], procs: int, workdir: Path, logs: Path,
                 host: str, port: int) -> list[ChildLines]:
    fleets = []
    for i in range(procs):
        part = ids[i::procs]
        spec = workdir / f"fleet{i}.json"
        spec.write_text(json.dumps({"host": host, "port": port, "mode": "fleet",
                                    "meters": [site.meter_json[m] for m in part],
                                    "history_days": 0.05, "timeout": 600}))
        fleets.append(ChildLines(f"fleet{i}", "bench.fleetproc", [str(spec)], logs))
    for f in fleets:
        f.expect("online", 600)
    return fleets


def _phase(site: Site, he_pid: int, req: Requester, pub, obs: Observer, reads: int,
           meters: int, procs, tolerance: int) -> dict:
    stored0 = site.stored()
    accepted0 = site.accepted()
    cpu0 = cpu_seconds(he_pid)
    n0, b0 = obs.snap()
    t0 = time.time()
    for i in range(reads):
        if i:
            time.sleep(2.0)  # readings are keyed by the meter's time in seconds
        issued = req.group_fanout(1, ReadSpec("current", tolerance=tolerance), time.time())
        for out in issued.messages:
            pub.publish(out.topic, out.payload, qos=1)
    want = accepted0 + meters * reads
    wait_for(lambda: site.accepted() >= want, 180, "every response to be stored", 0.1, procs)
    time.sleep(0.3)  # the last ack and the observer catch up
    cpu = cpu_seconds(he_pid) - cpu0
    stored = site.stored() - stored0
    responses = site.accepted() - accepted0
    readings = 4 * responses  # register values received, checked and stored (or found stored)
    n, b = obs.snap()
    return {"cpu_s": cpu, "readings": readings, "stored_rows": stored,
            "cpu_per_10k": cpu / readings * 10000,
            "up_messages": n - n0, "up_bytes": b - b0,
            "messages_per_reading": (n - n0) / responses, "bytes_per_reading": (b - b0) / responses,
            "seconds": time.time() - t0}


def _one_broker(kind: str, quick: bool, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    meters, reads, nfleet = (200, 2, 1) if quick else (1000, 5 if kind == "amqtt" else 8, 2)
    reps = 1 if quick or kind == "amqtt" else 2
    broker = start_broker(kind, workdir)
    host, port = broker.host, broker.port
    he = dap = obs = pub = None
    fleets: list[ChildLines] = []
    try:
        site = Site(workdir / "site", port)
        site.add_dap(1, "router")
        ids = list(range(1, meters + 1))
        site.add_meters(ids, dap=1, group=1)
        he = headend_serve(site, logs)
        dap = start_dap(site, 1, logs)
        log(f"{kind}: {meters} meters connecting ({nfleet} fleet process(es))")
        fleets = start_fleets(site, ids, nfleet, workdir, logs, host, port)
        wait_for(lambda: site.store.online_count() >= meters, 300, "every birth at the head-end",
                 0.2, [he, dap])
        obs = Observer(host, port, topics.dap_up(1))
        pub = connect_wait(mqtt_client("headend-bench-requests"), host, port)
        req = Requester(site.store, site.secret_key, NATIVE)
        runs: dict[str, list[dict]] = {"router": [], "aggregate": []}
        mode = "router"
        for rep in range(reps):
            for want in ("router", "aggregate"):
                if want != mode:
                    dap.stop()
                    mode = want
                    site.write_dap_config(1, mode)
                    dap = start_dap(site, 1, logs)
                    time.sleep(1.0)
                log(f"{kind}: {mode} phase, {reads} group reads of {meters} meters")
                r = _phase(site, he.p.pid, req, pub, obs, reads, meters, [he, dap],
                           2 if quick else TOLERANCE)
                runs[mode].append(r)
                log(f"  head-end {r['cpu_s']:.2f} CPU s for {r['readings']} readings "
                    f"({r['stored_rows']} rows new); {r['up_messages']} upstream messages, "
                    f"{r['up_bytes']} bytes")
        res = {}
        for m, rs in runs.items():  # the phases of a mode, added up
            tot = {k: sum(r[k] for r in rs) for k in rs[0]}
            tot["cpu_per_10k"] = tot["cpu_s"] / tot["readings"] * 10000
            tot["messages_per_reading"] = tot["up_messages"] / (tot["readings"] / 4)
            tot["bytes_per_reading"] = tot["up_bytes"] / (tot["readings"] / 4)
            tot["phases"] = len(rs)
            res[m] = tot
        return {"router": res["router"], "aggregate": res["aggregate"], "meters": meters,
                "reads": reads, "per_phase_cpu_per_10k": {
                    m: [round(r["cpu_per_10k"], 3) for r in rs] for m, rs in runs.items()}}
    finally:
        for f in fleets:
            f.stop()
        for x in (obs,):
            if x is not None:
                x.stop()
        if pub is not None:
            close(pub)
        if dap is not None:
            dap.stop()
        if he is not None:
            he.stop()
        broker.stop()


def run(quick: bool, workdir: Path, only) -> dict:
    out = {}
    agg = {}
    for kind in ("amqtt", "mosquitto"):
        name = f"headend_cpu_router_vs_aggregate_{kind}"
        r = _one_broker(kind, quick, workdir / kind)
        ro, ag = r["router"], r["aggregate"]
        agg[kind] = r
        out[name] = {
            "value": round(ro["cpu_per_10k"] / ag["cpu_per_10k"], 2),
            "unit": "ratio (CPU per reading)", "target": 5,
            "baseline": f"aggregate mode: {ag['cpu_per_10k']:.2f} CPU s per 10k readings "
                        f"(router {ro['cpu_per_10k']:.2f})",
            "details": {
                "router_cpu_s_per_10k_readings": round(ro["cpu_per_10k"], 3),
                "aggregate_cpu_s_per_10k_readings": round(ag["cpu_per_10k"], 3),
                "router": {k: round(v, 4) for k, v in ro.items()},
                "aggregate": {k: round(v, 4) for k, v in ag.items()},
                "meters": r["meters"], "group_reads_per_phase": r["reads"],
                "per_phase_cpu_s_per_10k": r["per_phase_cpu_per_10k"],
                "reading": "a register value received in an accepted response (4 per "
                           "response), checked and stored (a repeat of a stored reading "
                           "is found stored: stored_rows counts the new rows)",
                "tolerance_s": TOLERANCE},
        }
    m = agg["mosquitto"]
    a = agg["amqtt"]
    out["upstream_messages_per_reading_aggregate"] = {
        "value": round(m["aggregate"]["messages_per_reading"], 4),
        "unit": "MQTT messages per response", "target": 0.02, "better": "lower",
        "baseline": f"router mode: {m['router']['messages_per_reading']:.3f}",
        "details": {"mosquitto": round(m["aggregate"]["messages_per_reading"], 4),
                    "amqtt": round(a["aggregate"]["messages_per_reading"], 4),
                    "meters": m["meters"], "max_items": 500, "window_s": 10.0,
                    "tolerance_s": TOLERANCE}}
    out["upstream_bytes_per_reading_aggregate"] = {
        "value": round(m["aggregate"]["bytes_per_reading"], 1), "unit": "bytes per response",
        "target": None, "better": "lower",
        "baseline": f"router mode: {m['router']['bytes_per_reading']:.1f} bytes",
        "details": {"mosquitto": round(m["aggregate"]["bytes_per_reading"], 1),
                    "amqtt": round(a["aggregate"]["bytes_per_reading"], 1),
                    "note": "MQTT payload bytes; each router message also pays its own "
                            "MQTT header, topic and PUBACK"}}
    out["upstream_bytes_per_reading_router"] = {
        "value": round(m["router"]["bytes_per_reading"], 1), "unit": "bytes per response",
        "target": None, "better": "lower",
        "baseline": f"the sealed envelope: {len(current_response())} bytes",
        "details": {"mosquitto": round(m["router"]["bytes_per_reading"], 1),
                    "amqtt": round(a["router"]["bytes_per_reading"], 1)}}
    return out
