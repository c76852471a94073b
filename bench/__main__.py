"""python -m bench [--quick] [--out out/bench.json] [--only NAME...]

Runs the benchmarks, prints a table and writes the JSON report:

    {"machine": {...},
     "metrics": {NAME: {"value": x, "unit": "...", "target": y,
                        "baseline": "what it was compared to", ...}}}

--quick is the CI smoke run (well under a minute, small sizes, no
thresholds: the numbers are not meant to be read). A full run takes a few
minutes. --only takes metric names or prefixes (e.g. --only mpy_ wire_).
The exit status is 0 whatever the numbers; 1 only if a benchmark crashed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.common import REPO, machine, raise_nofile, wanted

# Cheap and deterministic first, the long multi-process runs last.
MODULES = ("m_wire", "m_mpy", "m_ingest", "m_relay", "m_scale", "m_cpu", "m_group")


def status(m: dict) -> str:
    v, t = m.get("value"), m.get("target")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "ERROR"
    if t is None:
        return "info"
    ok = v <= t if m.get("better") == "lower" else v >= t
    return "met" if ok else "MISSED"


def fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(report: dict) -> str:
    mach = report["machine"]
    lines = [f"bench {'(quick) ' if report['quick'] else ''}{mach['date']}  "
             f"{mach['cores_logical']} cores {mach['cpu_model']}  Python {mach['python']}  "
             f"{mach['brokers']['mosquitto']}  amqtt {mach['brokers']['amqtt']}",
             f"{'metric':<46} {'value':>10} {'unit':<26} {'target':>8} {'':<7} baseline"]
    for name, m in report["metrics"].items():
        t = m.get("target")
        tt = "-" if t is None else ("<= " if m.get("better") == "lower" else ">= ") + fmt(t)
        lines.append(f"{name:<46} {fmt(m.get('value')):>10} {m.get('unit', ''):<26} "
                     f"{tt:>8} {status(m):<7} {m.get('baseline', '')}")
        if m.get("error"):
            lines.append(f"{'':<46} error: {m['error']}")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """The report as a Markdown table (for docs/scaling.md)."""
    mach = report["machine"]
    out = [f"{mach['date'][:10]}, {mach['cores_logical']} cores ({mach['cpu_model']}), "
           f"{mach['memory_bytes'] / 2**30:.0f} GiB, Python {mach['python']}, SQLite "
           f"{mach['sqlite']}, {mach['brokers']['mosquitto']}, amqtt "
           f"{mach['brokers']['amqtt']}, paho-mqtt {mach['libraries']['paho-mqtt']}, PyNaCl "
           f"{mach['libraries']['PyNaCl']}, cbor2 {mach['libraries']['cbor2']}, MicroPython "
           f"{mach['micropython_webassembly']} (WebAssembly, Node {mach['node']}); "
           f"{'quick run' if report['quick'] else 'full run'}, {report['elapsed_s']} s.",
           "", "| metric | value | unit | target | | compared with |",
           "| --- | ---: | --- | ---: | --- | --- |"]
    for name, m in report["metrics"].items():
        t = m.get("target")
        tt = "" if t is None else ("<= " if m.get("better") == "lower" else ">= ") + fmt(t)
        out.append(f"| `{name}` | {fmt(m.get('value'))} | {m.get('unit', '')} | {tt} | "
                   f"{status(m)} | {m.get('baseline', '')} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: the CI smoke run")
    ap.add_argument("--out", default=str(REPO / "out" / "bench.json"))
    ap.add_argument("--only", nargs="+", metavar="NAME", help="metric names or prefixes")
    ap.add_argument("--workdir", help="where sites, brokers and logs go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--markdown", metavar="REPORT",
                    help="print an existing report (out/bench.json) as Markdown, run nothing")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0

    # A SIGTERM (a CI timeout, `timeout`) unwinds like Ctrl-C, so that every
    # broker, DAP, head-end and fleet process started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    raise_nofile()  # before machine(), which records the limits in force
    report = {"machine": machine(), "quick": args.quick, "metrics": {}, "elapsed_s": None}
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    crashed = False
    try:
        for modname in MODULES:
            try:
                mod = importlib.import_module(f"bench.{modname}")
            except ImportError:
                if args.only:
                    continue
                raise
            if not wanted(mod.NAMES, args.only):
                continue
            print(f"== {modname} ({', '.join(mod.NAMES)})", file=sys.stderr, flush=True)
            t = time.monotonic()
            try:
                got = mod.run(args.quick, work / modname, args.only)
            except Exception as e:  # noqa: BLE001 - recorded, the others still run
                crashed = True
                traceback.print_exc()
                got = {n: {"value": None, "unit": "", "target": None,
                           "baseline": "", "error": f"{type(e).__name__}: {e}"}
                       for n in mod.NAMES}
            for name, m in got.items():
                if wanted((name,), args.only):
                    m.setdefault("module", modname)
                    report["metrics"][name] = m
            print(f"   {modname}: {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
    finally:
        report["elapsed_s"] = round(time.monotonic() - t0, 1)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(table(report))
    print(f"\n{len(report['metrics'])} metrics in {report['elapsed_s']} s; report: {args.out}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
