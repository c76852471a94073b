"""The head-end's command line: provision, broker, serve, read, meters,
export. Every command has --help; every error says what to do next."""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from headend import provision
from headend.config import HeadEndConfig
from headend.errors import ConfigError, HeadEndError, RequestFailed, UnknownMeterError
from headend.requests import ReadSpec
from headend.service import HeadEnd
from headend.store import Store
from headend.timeparse import parse_time, show_time
from shared import obis, topics
from shared.hostmqtt import MqttSetupError

DEFAULT_SITE = os.environ.get("HEADEND_SITE", "site")


@contextlib.contextmanager
def _lock(site: Path, wait: bool = False, name: str = "headend.lock") -> Iterator[bool]:
    """Hold one of the site's head-end locks if we can: `headend.lock` is
    the main head-end's (one per site), `headend-w<K>.lock` ingest worker
    K's."""
    site.mkdir(parents=True, exist_ok=True)
    with open(site / name, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- provision -----------------------------------------------------------------

def cmd_provision(args: argparse.Namespace) -> int:
    site = Path(args.site)
    if args.what == "init":
        cfg = provision.init(site, host=args.broker_host, port=args.broker_port,
                             tls_ca=Path(args.tls_ca) if args.tls_ca else None)
        print(f"site created in {site}: head-end key in {cfg.secret_key_file} (0600), "
              f"store {cfg.db}, broker files in {site / 'broker'}")
    elif args.what == "dap":
        path = provision.add_dap(site, args.id, args.mode, args.operator)
        print(f"DAP {args.id} ({args.mode}, {args.operator}): config {path}")
    else:
        wifi = None
        if args.wifi_ssid:
            if not args.wifi_password_file:
                raise ConfigError("--wifi-ssid needs --wifi-password-file (a file holding the "
                                  "Wi-Fi password; it is never taken on the command line)")
            wifi = (args.wifi_ssid, Path(args.wifi_password_file).read_text().strip())
        ids = provision.parse_ids(args.ids)
        paths = provision.add_meters(site, ids, dap=args.dap, group=args.group,
                                     period=args.period, wifi=wifi)
        where = f"behind DAP {args.dap}" if args.dap is not None else "direct (flow A)"
        print(f"{len(paths)} meter(s) {where}, group {args.group}: configs in "
              f"{site / 'meters'} (0600; each holds that meter's secret key)")
    return 0


# -- broker --------------------------------------------------------------------

def cmd_broker(args: argparse.Namespace) -> int:
    from headend import broker

    site = Path(args.site)
    conf = site / "broker" / "amqtt" / "amqtt.json"
    if not conf.exists():
        raise ConfigError(f"{conf} not found: run "
                          f"`python -m headend provision init --site {site}` first")
    argv = ["--config", str(conf)]
    if args.port:
        argv += ["--port", str(args.port)]
    return broker.main(argv)


# -- serve ---------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    cfg = HeadEndConfig.load(args.site)
    k = args.worker
    if k and not 0 < k < cfg.workers:
        raise ConfigError(
            f"--worker {k}: {cfg.site / 'headend.toml'} has [ingest] workers = {cfg.workers}, "
            f"so the extra ingest workers are 1 to {cfg.workers - 1}"
            + ("" if cfg.workers > 1 else "; set workers = 2 or more there first"))
    lock = f"headend-w{k}.lock" if k else "headend.lock"
    with _lock(cfg.site, name=lock) as mine:
        if not mine:
            raise HeadEndError(f"another head-end process is serving {cfg.site}"
                               + (f" as ingest worker {k}" if k else "") + "; stop it first")
        # Several workers: each takes its share of the uplinks. The main
        # head-end (no --worker) also collects.
        he = HeadEnd(cfg.db, cfg.secret_key, cfg.broker, retries=cfg.retries,
                     client_id=f"{topics.HEADEND}-w{k}" if k else topics.HEADEND,
                     collect=None if k else cfg.collect, subscriptions=cfg.uplinks).start()
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        logging.getLogger("headend").info("serving %s", cfg.site)
        last = 0.0
        while not stop.wait(1.0):
            if time.time() - last >= args.stats_interval:
                last = time.time()
                t = he.ingest.totals
                logging.getLogger("headend").info(
                    "received %d, accepted %d, stored %d readings, rejected %d",
                    he.received, t["accepted"], t["stored"],
                    sum(v for k, v in t.items() if k.startswith("rejected:")))
        he.stop()
    return 0


# -- read ----------------------------------------------------------------------

def _spec(args: argparse.Namespace) -> ReadSpec:
    if (args.from_ is None) != (args.to is None):
        raise ConfigError("give both --from and --to for an interval read, or neither")
    if args.from_ is not None:
        return ReadSpec("interval", parse_time(args.from_), parse_time(args.to), args.tolerance)
    return ReadSpec("current", tolerance=args.tolerance)


def cmd_read(args: argparse.Namespace) -> int:
    cfg = HeadEndConfig.load(args.site)
    spec = _spec(args)
    if (args.meter is None) == (args.group is None):
        raise ConfigError("say what to read: --meter ID or --group ID")
    store = Store(cfg.db)
    if args.meter is not None:
        row = store.meter(args.meter)
        if row is None:
            raise UnknownMeterError(f"meter {args.meter} is not provisioned in {cfg.site}")
        if args.via_dap and row.dap is None:
            raise ConfigError(f"meter {args.meter} is not behind a DAP (flow A); drop --via-dap")
    with _lock(cfg.site) as mine:
        he = HeadEnd(cfg.db, cfg.secret_key, cfg.broker, retries=cfg.retries, ingest=mine,
                     client_id="headend" if mine else f"headend-cli-{os.getpid()}",
                     subscriptions=cfg.uplinks)
        he.start()
        try:
            if args.meter is not None:
                h = he.read(args.meter, spec)
            else:
                h = he.read_group(args.group, spec, "router" if args.router else "fanout")
            statuses = h.wait(args.timeout)
        finally:
            he.stop()
    rows = []
    for meter in h.meters:
        status = statuses.get(meter) or store.request_status(h.request, meter) or "pending"
        if spec.kind == "interval":
            # the rows of the range, whichever read stored them first: a
            # re-read of stored intervals stores nothing twice
            readings = [r for r in store.readings(meter, None, spec.start, spec.end)
                        if r[0] in (obis.INTERVAL_IMPORT, obis.INTERVAL_EXPORT)
                        or r[1] == spec.start]
        else:
            readings = [r for r in store.readings(meter) if r[4] == h.request]
        rows.append({"meter": meter, "status": status, "request": h.request,
                     "latency_s": round(h.latency[meter], 3) if meter in h.latency else None,
                     "readings": [{"obis": obis.CODES[q][0], "unit": obis.CODES[q][1],
                                   "time": t, "value": v, "quality": qual}
                                  for q, t, v, qual, _ in readings]})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            lat = f"{r['latency_s']:.2f} s" if r["latency_s"] is not None else "-"
            print(f"meter {r['meter']}: {r['status']} (request {r['request']}, {lat})")
            for x in r["readings"][: args.show]:
                print(f"  {x['obis']:<11} {show_time(x['time'])}  {x['value']:>10} {x['unit']}"
                      + (f"  quality {x['quality']:#x}" if x["quality"] else ""))
            if len(r["readings"]) > args.show:
                print(f"  ... {len(r['readings']) - args.show} more (use --json for all)")
    failed = [r for r in rows if r["status"] != "answered"]
    if failed:
        raise RequestFailed(f"{len(failed)} of {len(rows)} meter(s) did not answer "
                            f"({', '.join(sorted({r['status'] for r in failed}))}); is the meter "
                            "online (`python -m headend meters`)? Try a larger --timeout.")
    return 0


# -- meters --------------------------------------------------------------------

def cmd_meters(args: argparse.Namespace) -> int:
    cfg = HeadEndConfig.load(args.site)
    store = Store(cfg.db)
    db = store.db
    out = []
    for m in store.meters():
        last = store.latest(m.meter, obis.ENERGY_IMPORT)
        online, seen, session = db.execute(
            "SELECT online, last_seen, session FROM meters WHERE meter = ?", (m.meter,)).fetchone()
        total, ok = db.execute(
            "SELECT count(*), coalesce(sum(status = 'answered'), 0) FROM requests "
            "WHERE meter = ?", (m.meter,)).fetchone()
        out.append({"meter": m.meter, "dap": m.dap, "group": m.group, "online": bool(online),
                    "session": session, "last_seen": seen,
                    "last_reading": None if last is None else {"time": last[0], "wh": last[1]},
                    "reads": total, "answered": ok,
                    "read_success": None if not total else round(ok / total, 4)})
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{'meter':>10} {'dap':>5} {'group':>5} {'state':<8} {'last seen':<21} "
          f"{'last +A reading':<32} {'read success':>12}")
    for r in out:
        lr = r["last_reading"]
        reading = f"{lr['wh']} Wh at {show_time(lr['time'])}" if lr else "-"
        success = f"{r['answered']}/{r['reads']}" if r["reads"] else "-"
        print(f"{r['meter']:>10} {r['dap'] if r['dap'] is not None else '-':>5} "
              f"{r['group'] if r['group'] is not None else '-':>5} "
              f"{'online' if r['online'] else 'offline':<8} {show_time(r['last_seen']):<21} "
              f"{reading:<32} {success:>12}")
    return 0


# -- success -------------------------------------------------------------------

def cmd_success(args: argparse.Namespace) -> int:
    from headend.collect import DAY, Collector

    cfg = HeadEndConfig.load(args.site)
    store = Store(cfg.db)
    now = time.time()
    day = parse_time(args.day) // DAY * DAY if args.day else int(now) // DAY * DAY
    per_meter = Collector(store).success(day, now)
    groups: dict[int | None, list[int]] = {}
    for m in store.meters():
        groups.setdefault(m.group, []).append(m.meter)
    out = {"day": show_time(day)[:10], "meters": {}, "groups": {}}
    for meter, (held, expected) in per_meter.items():
        out["meters"][meter] = {"stored": held, "expected": expected,
                                "rate": round(held / expected, 5) if expected else None}
    for g, members in groups.items():
        held = sum(per_meter[m][0] for m in members)
        exp = sum(per_meter[m][1] for m in members)
        out["groups"][g] = {"stored": held, "expected": exp,
                            "rate": round(held / exp, 5) if exp else None}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"read success on {out['day']} (intervals stored / expected so far; "
          "contracts ask for 98-99.5 %)")
    for g, r in sorted(out["groups"].items(), key=lambda x: (x[0] is None, x[0] or 0)):
        rate = f"{100 * r['rate']:.2f} %" if r["rate"] is not None else "-"
        print(f"  group {g if g is not None else '-':>5}: {r['stored']:>7}/{r['expected']:<7} {rate}")
    if args.meters:
        for meter, r in sorted(out["meters"].items()):
            rate = f"{100 * r['rate']:.2f} %" if r["rate"] is not None else "-"
            print(f"  meter {meter:>10}: {r['stored']:>5}/{r['expected']:<5} {rate}")
    return 0


# -- export --------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    cfg = HeadEndConfig.load(args.site)
    store = Store(cfg.db)
    if store.meter(args.meter) is None:
        raise UnknownMeterError(f"meter {args.meter} is not provisioned in {cfg.site}")
    start, end = parse_time(args.from_), parse_time(args.to)
    rows = [r for r in store.readings(args.meter, None, start, end)
            if r[0] in (obis.INTERVAL_IMPORT, obis.INTERVAL_EXPORT)]
    out = open(args.out, "w", newline="") if args.out else sys.stdout
    try:
        w = csv.writer(out)
        w.writerow(["meter", "obis", "unit", "interval_start_utc", "interval_start", "value",
                    "quality", "request"])
        for q, t, v, qual, req in sorted(rows, key=lambda r: (r[1], r[0])):
            code, unit = obis.CODES[q]
            w.writerow([args.meter, code, unit, show_time(t), t, v, qual, req])
    finally:
        if args.out:
            out.close()
    if args.out:
        print(f"{len(rows)} interval readings of meter {args.meter} written to {args.out}",
              file=sys.stderr)
    return 0


# -- the parser ----------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m headend",
                                description="Head-end for sealed smart-meter reading over MQTT.")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", required=True)

    def site(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--site", default=DEFAULT_SITE,
                        help="the deployment directory (default: $HEADEND_SITE or ./site)")

    pr = sub.add_parser("provision", help="create keys, configs and broker accounts")
    psub = pr.add_subparsers(dest="what", required=True)
    pi = psub.add_parser("init", help="create a site: head-end key pair, store, broker files")
    site(pi)
    pi.add_argument("--broker-host", default="127.0.0.1")
    pi.add_argument("--broker-port", type=int, default=1883)
    pi.add_argument("--tls-ca", help="CA file: clients connect with TLS (docs/brokers.md)")
    pd = psub.add_parser("dap", help="register a DAP and write its dap.toml")
    site(pd)
    pd.add_argument("--id", type=int, required=True)
    pd.add_argument("--mode", choices=("aggregate", "router"), required=True)
    pd.add_argument("--operator", default="utility",
                    help="who runs it; anything but 'utility' is a third party (router only)")
    pm = psub.add_parser("meters", help="create meter identities and their meter.json")
    site(pm)
    pm.add_argument("--ids", required=True, help="e.g. 1001-1020,1050")
    pm.add_argument("--dap", type=int, help="the DAP they sit behind (flow B); omit for flow A")
    pm.add_argument("--group", type=int, help="their group (a block of meters)")
    pm.add_argument("--period", type=int, default=900, help="load-profile interval, s")
    pm.add_argument("--wifi-ssid")
    pm.add_argument("--wifi-password-file")
    pr.set_defaults(func=cmd_provision)

    pb = sub.add_parser("broker", help="run the embedded amqtt broker with the site's accounts")
    site(pb)
    pb.add_argument("--port", type=int, help="listen here instead of the provisioned port")
    pb.set_defaults(func=cmd_broker)

    ps = sub.add_parser("serve", help="ingest continuously")
    site(ps)
    ps.add_argument("--stats-interval", type=float, default=60.0)
    ps.add_argument("--worker", type=int, default=0, metavar="K",
                    help="run extra ingest worker K (1 to workers-1, with [ingest] workers "
                         "in headend.toml; Mosquitto only); without it: the main head-end")
    ps.set_defaults(func=cmd_serve)

    prd = sub.add_parser("read", help="read one meter or a group")
    site(prd)
    prd.add_argument("--meter", type=int)
    prd.add_argument("--group", type=int)
    prd.add_argument("--from", dest="from_", help="interval read start (ISO 8601 UTC or epoch)")
    prd.add_argument("--to", help="interval read end (exclusive)")
    prd.add_argument("--via-dap", action="store_true",
                     help="require flow B: fail if the meter is not behind a DAP")
    prd.add_argument("--router", action="store_true",
                     help="group read as per-meter copies through the DAP (default: fan-out)")
    prd.add_argument("--tolerance", type=int, default=0, help="delay tolerance, s")
    prd.add_argument("--timeout", type=float, default=90.0, help="give up after this many s")
    prd.add_argument("--show", type=int, default=12, help="readings to print per meter")
    prd.add_argument("--json", action="store_true")
    prd.set_defaults(func=cmd_read)

    pme = sub.add_parser("meters", help="last seen, last reading and read success per meter")
    site(pme)
    pme.add_argument("--json", action="store_true")
    pme.set_defaults(func=cmd_meters)

    psu = sub.add_parser("success", help="read success rate per group (and meter) for a day")
    site(psu)
    psu.add_argument("--day", help="the UTC day, e.g. 2026-11-23 (default: today)")
    psu.add_argument("--meters", action="store_true", help="also list every meter")
    psu.add_argument("--json", action="store_true")
    psu.set_defaults(func=cmd_success)

    pe = sub.add_parser("export", help="CSV of a meter's interval data over a range")
    site(pe)
    pe.add_argument("--meter", type=int, required=True)
    pe.add_argument("--from", dest="from_", required=True)
    pe.add_argument("--to", required=True)
    pe.add_argument("--out", help="file to write (default: stdout)")
    pe.set_defaults(func=cmd_export)
    pf = sub.add_parser("firmware", add_help=False,
                        help="build the meter firmware bundle (.mpy) into out/firmware")
    pf.add_argument("rest", nargs=argparse.REMAINDER)
    pf.set_defaults(func=lambda a: _flashing().main_build(a.rest))
    pfl = sub.add_parser("flash", add_help=False,
                         help="flash a provisioned meter onto an ESP32 (mpremote)")
    pfl.add_argument("rest", nargs=argparse.REMAINDER)
    pfl.set_defaults(func=lambda a: _flashing().main_flash(a.rest))
    return p


def _flashing():
    from headend import flashing

    return flashing


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("firmware", "flash"):  # they parse their own options
        fl = _flashing()
        return (fl.main_build if argv[0] == "firmware" else fl.main_flash)(argv[1:])
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (HeadEndError, MqttSetupError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
