"""The benchmark suite's smoke test: `python -m bench --quick` runs every
benchmark at small sizes and writes out/bench.json. Only the report's shape
is checked - every metric present, with a number - never a threshold: the
numbers of a quick run on a shared CI machine mean nothing (make bench runs
the full sizes; docs/scaling.md)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

METRICS = (
    "ingest_vs_raw_open", "ingest_vs_raw_open_interval_6h",
    "headend_cpu_router_vs_aggregate_amqtt", "headend_cpu_router_vs_aggregate_mosquitto",
    "upstream_messages_per_reading_aggregate", "upstream_bytes_per_reading_aggregate",
    "upstream_bytes_per_reading_router",
    "router_vs_raw_relay_mosquitto", "dap_aggregate_vs_raw_subscribe_mosquitto",
    "group_read_10k",
    "wire_bytes_current_response", "wire_bytes_request", "wire_bytes_interval_6h",
    "mpy_seal_us", "mpy_open_us", "mpy_x25519_ms", "mpy_heap_bytes_per_seal",
    "mpy_meter_idle_heap_bytes",
    "scale_out_2_workers", "scale_out_2_workers_sharded_store",
)


def test_quick_bench_writes_every_metric(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out),
                           "--workdir", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"bench crashed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    report = json.loads(out.read_text())
    assert set(report) >= {"machine", "metrics"}
    mach = report["machine"]
    for key in ("cores_logical", "python", "libraries", "brokers", "date"):
        assert mach.get(key), f"machine.{key} missing"
    assert mach["brokers"]["mosquitto"] and mach["brokers"]["amqtt"]
    metrics = report["metrics"]
    assert set(METRICS) <= set(metrics), f"missing: {sorted(set(METRICS) - set(metrics))}"
    for name, m in metrics.items():
        assert isinstance(m, dict), name
        assert isinstance(m.get("value"), (int, float)) and not isinstance(m["value"], bool), \
            f"{name}: value {m.get('value')!r} ({m.get('error')})"
        assert math.isfinite(m["value"]), name
        assert isinstance(m.get("unit"), str) and m["unit"], name
        assert "target" in m and (m["target"] is None or isinstance(m["target"], (int, float)))
        assert isinstance(m.get("baseline"), str) and m["baseline"], name
    # the table is printed for people
    assert "metric" in proc.stdout and "group_read_10k" in proc.stdout
