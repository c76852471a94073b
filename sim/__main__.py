"""`make sim`: the whole system on one machine.

Provisions a site, starts the embedded broker (amqtt, with the generated
accounts and ACLs), a head-end, a utility DAP in aggregate mode, a
third-party DAP in router mode and 60 simulated meters running the firmware's
meter core, then plays the seed's scenarios and writes out/sim-report.json.
Exits non-zero if any request went unanswered or any reading's plaintext was
seen by the third-party DAP.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from headend import provision
from headend.config import HeadEndConfig
from headend.requests import ReadSpec
from headend.service import HeadEnd
from headend.store import Store
from shared import topics
from shared.hostmqtt import BrokerSettings
from sim.fleet import Fleet
from sim.procs import PYTHON, Proc, free_port, wait_port
from sim.scenarios import Scenario, plaintext_patterns, run_group, run_reads, scan, yesterday

GROUPS = {1: (range(1001, 1021), None), 2: (range(2001, 2021), 1), 3: (range(3001, 3021), 2)}
UTILITY_DAP, THIRD_PARTY_DAP = 1, 2
TOLERANCE = 6  # seconds, for the delay-tolerance scenario
AGGREGATE_WINDOW = 12.0


def say(msg: str) -> None:
    print(msg, flush=True)


class Observer:
    """Captures every byte on a set of topics, with one account's rights."""

    def __init__(self, settings: BrokerSettings, client_id: str, subs: list[str]) -> None:
        self.captured: list[bytes] = []
        self.topics: dict[str, int] = {}
        self.lock = threading.Lock()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv311)
        self.c.username_pw_set(settings.username, settings.password)
        self.c.on_message = self._msg
        self.c.on_connect = lambda c, *_: c.subscribe([(s, 1) for s in subs])
        self.c.connect(settings.host, settings.port, 30)
        self.c.loop_start()

    def _msg(self, c, u, msg) -> None:
        with self.lock:
            self.captured.append(bytes(msg.payload))
            self.topics[msg.topic] = self.topics.get(msg.topic, 0) + 1

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def provision_site(site: Path, port: int) -> None:
    if site.exists():
        shutil.rmtree(site)
    provision.init(site, port=port)
    provision.add_dap(site, UTILITY_DAP, "aggregate")
    provision.add_dap(site, THIRD_PARTY_DAP, "router", operator="fieldnet-contractor")
    for group, (ids, dap) in GROUPS.items():
        provision.add_meters(site, list(ids), dap=dap, group=group)
    # a wider buffer window for the utility DAP, so the delay tolerance is
    # what decides when its bundles leave
    toml = site / "daps" / topics.dap_name(UTILITY_DAP) / "dap.toml"
    toml.write_text(toml.read_text().replace("window = 10.0", f"window = {AGGREGATE_WINDOW}"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out", help="where the site, logs and report go")
    ap.add_argument("--port", type=int, default=0, help="broker port (default: a free one)")
    ap.add_argument("--timeout", type=float, default=45.0, help="per-scenario timeout, s")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out = Path(args.out).resolve()
    site = out / "sim-site"
    port = args.port or free_port()
    t_start = time.time()
    procs: list[Proc] = []
    he = fleet = None
    observers: list[Observer] = []
    try:
        say(f"[1/9] provisioning {site}: head-end, 2 DAPs, 60 meters in 3 groups")
        provision_site(site, port)
        cfg = HeadEndConfig.load(site)

        say(f"[2/9] starting the embedded broker (amqtt) on 127.0.0.1:{port} "
            "with per-device accounts and ACLs")
        procs.append(Proc("broker", [PYTHON, "-m", "headend", "broker", "--site", str(site)],
                          cwd=out, log=out / "logs" / "broker.log", ready="listening"))
        if not wait_port("127.0.0.1", port):
            raise RuntimeError("the broker is not accepting connections")

        say("[3/9] starting the head-end, DAP 1 (utility, aggregate) and DAP 2 "
            "(third party, router)")
        responses: list[tuple[float, int, int]] = []
        he = HeadEnd(cfg.db, cfg.secret_key, cfg.broker, retries=cfg.retries).start()
        he_obs = Observer(cfg.broker, "headend-observer",
                          [topics.dap_up(THIRD_PARTY_DAP), "+/state", topics.dap_up(UTILITY_DAP)])
        observers.append(he_obs)
        for dap in (UTILITY_DAP, THIRD_PARTY_DAP):
            home = site / "daps" / topics.dap_name(dap)
            procs.append(Proc(f"dap{dap}", [PYTHON, "-m", "dap", "--config", str(home / "dap.toml")],
                              cwd=home, log=out / "logs" / f"dap{dap}.log"))
        d2 = site / "daps" / topics.dap_name(THIRD_PARTY_DAP)
        dap2_settings = BrokerSettings(port=port, username=topics.dap_name(THIRD_PARTY_DAP),
                                       password=(d2 / "password").read_text().strip())
        tp_obs = Observer(dap2_settings, "d2-observer",
                          [topics.dap_meters_up(THIRD_PARTY_DAP), topics.dap_req(THIRD_PARTY_DAP),
                           topics.dap_ack(THIRD_PARTY_DAP)])
        observers.append(tp_obs)
        deadline = time.time() + 30
        while time.time() < deadline:
            states = [t for t in he_obs.topics if t.endswith("/state")]
            if len(states) >= 2:
                break
            for p in procs:
                if not p.alive():
                    raise RuntimeError(f"{p.name} exited:\n{p.tail()}")
            time.sleep(0.2)
        else:
            raise RuntimeError("the DAPs did not report online within 30 s: see out/logs")

        say("[4/9] booting 60 meters (firmware meter core, 8 days of load profile each)")
        fleet = Fleet(on_response=lambda m, w: responses.append((time.time(), m.id, len(w))))
        for p in sorted((site / "meters").glob("m*/meter.json")):
            fleet.add(p.read_text(), base=p.parent)
        fleet.start()
        store = Store(cfg.db)
        deadline = time.time() + 60
        while time.time() < deadline:
            online = store.online_count()
            if online == 60:
                break
            time.sleep(0.2)
        say(f"      {online}/60 meters online (births verified by the head-end)")

        scenarios: list[Scenario] = []
        direct = list(GROUPS[1][0])
        behind1 = list(GROUPS[2][0])
        behind2 = list(GROUPS[3][0])
        now = time.time()
        f14, t20 = yesterday(14, 20, now)

        def play(sc: Scenario, fn, *a) -> None:
            n0 = len(responses)
            b0 = he_obs.topics.get(topics.dap_up(UTILITY_DAP), 0)
            fn(*a)
            time.sleep(0.3)
            sc.response_bytes_max = max((s for _, _, s in responses[n0:]), default=0)
            if sc.flow == "B-aggregate":
                sc.bundles = he_obs.topics.get(topics.dap_up(UTILITY_DAP), 0) - b0
            r = sc.report()
            scenarios.append(sc)
            lat = r["latency_ms"]
            say(f"      {sc.name}: {r['answered']}/{r['requests']} answered, "
                f"p50 {lat['p50']} ms, max {lat['max']} ms, request <= {r['request_bytes_max']} B,"
                f" response <= {r['response_bytes_max']} B"
                + (f", {sc.bundles} bundle(s) upstream" if sc.bundles is not None else ""))

        cur = ReadSpec("current")
        say("[5/9] on-demand reads: flow A (direct) and flow B through each DAP")
        sc = Scenario("on-demand, flow A", "A", "current")
        play(sc, run_reads, he, sc, direct, cur, args.timeout)
        sc = Scenario("on-demand, flow B via utility DAP", "B-aggregate", "current")
        play(sc, run_reads, he, sc, behind1[:10], cur, args.timeout)
        sc = Scenario("on-demand, flow B via third-party DAP", "B-router", "current")
        play(sc, run_reads, he, sc, behind2[:10], cur, args.timeout)

        say("[6/9] interval reads, yesterday 14:00 to 20:00 UTC (24 rows of 15 min)")
        iv = ReadSpec("interval", f14, t20)
        sc = Scenario("interval 14:00-20:00, flow A", "A", "interval")
        play(sc, run_reads, he, sc, direct[:5], iv, args.timeout)
        sc = Scenario("interval 14:00-20:00, via utility DAP", "B-aggregate", "interval")
        play(sc, run_reads, he, sc, behind1[10:15], iv, args.timeout)
        sc = Scenario("interval 14:00-20:00, via third-party DAP", "B-router", "interval")
        play(sc, run_reads, he, sc, behind2[10:15], iv, args.timeout)

        say("[7/9] group reads: one request fanned out by the DAP; per-meter copies "
            "through the router DAP")
        sc = Scenario("group 2 fan-out by utility DAP", "B-aggregate", "group-fanout")
        play(sc, run_group, he, sc, 2, cur, "fanout", args.timeout)
        sc = Scenario("group 3 fan-out by third-party DAP", "B-router", "group-fanout")
        play(sc, run_group, he, sc, 3, cur, "fanout", args.timeout)
        sc = Scenario("group 3 per meter via router DAP", "B-router", "group-router")
        play(sc, run_group, he, sc, 3, cur, "router", args.timeout)

        say(f"[8/9] delay tolerance: group 2 interval read with {TOLERANCE} s tolerance; the "
            f"aggregating DAP (window {AGGREGATE_WINDOW:.0f} s) bundles and sends by the deadline")
        sc = Scenario(f"group 2 with {TOLERANCE} s tolerance", "B-aggregate", "tolerance")
        play(sc, run_group, he, sc, 2, ReadSpec("interval", f14, t20, TOLERANCE), "fanout",
             args.timeout)

        say("[9/9] scanning everything the third-party DAP handled for reading plaintext")
        time.sleep(0.5)
        with tp_obs.lock, he_obs.lock:
            captured = list(tp_obs.captured)
            captured += [b for b in he_obs.captured]  # includes what DAP 2 sent upstream
        patterns = plaintext_patterns(store, behind2)
        found = scan(captured, patterns)
        # the scanner must find the same patterns when they are in clear
        control = scan([p for p in patterns[:50]], patterns[:50])
        if control < min(50, len(patterns)):
            raise RuntimeError("the plaintext scanner failed its own control check")
        third = {"messages_seen": len(tp_obs.captured) + he_obs.topics.get(
                     topics.dap_up(THIRD_PARTY_DAP), 0),
                 "bytes_seen": sum(len(b) for b in captured),
                 "patterns_checked": len(patterns),
                 "plaintext_found": found}
        counts = store.counts()
        report = {
            "scenarios": [s.report() for s in scenarios],
            "third_party_dap": third,
            "stored_readings": store.reading_count(),
            "rejected": sum(v for k, v in counts.items() if k.startswith("rejected:")),
            "budgets_ms": {"A": 5000, "B": 30000},
            "meters": 60,
            "elapsed_s": round(time.time() - t_start, 1),
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "sim-report.json").write_text(json.dumps(report, indent=1) + "\n")
        unanswered = sum(s["requests"] - s["answered"] for s in report["scenarios"])
        say("")
        say(f"{'scenario':<46} {'flow':<12} {'kind':<13} {'answered':>9} {'p50 ms':>8} "
            f"{'max ms':>8} {'req B':>6} {'resp B':>6}")
        for s in report["scenarios"]:
            say(f"{s['name']:<46} {s['flow']:<12} {s['kind']:<13} "
                f"{s['answered']:>4}/{s['requests']:<4} {s['latency_ms']['p50']!s:>8} "
                f"{s['latency_ms']['max']!s:>8} {s['request_bytes_max']:>6} "
                f"{s['response_bytes_max']:>6}")
        say(f"budgets: flow A a few seconds, flow B 15-30 s. stored readings: "
            f"{report['stored_readings']}, rejected: {report['rejected']}")
        say(f"third-party DAP: {third['messages_seen']} messages, {third['bytes_seen']} bytes "
            f"scanned for {len(patterns)} plaintext patterns: {found} found")
        say(f"report: {out / 'sim-report.json'} ({report['elapsed_s']} s)")
        if unanswered or found:
            say(f"FAILED: {unanswered} unanswered request(s), {found} plaintext hit(s)")
            return 1
        return 0
    finally:
        if fleet is not None:
            fleet.stop()
        if he is not None:
            he.stop()
        for o in observers:
            o.stop()
        for p in reversed(procs):
            p.stop()


if __name__ == "__main__":
    raise SystemExit(main())
