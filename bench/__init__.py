"""The benchmark suite: `python -m bench [--quick] [--out out/bench.json] [--only NAME...]`.

Every metric is a ratio measured side by side in the same run (the machine
is shared and noisy), next to the absolute figures it was computed from.
The method of each metric is in the docstring of its module:

    bench.m_ingest   ingest_vs_raw_open*              head-end ingest vs bare Box.decrypt
    bench.m_cpu      headend_cpu_router_vs_aggregate_*, upstream_*   (amqtt and Mosquitto)
    bench.m_relay    router_vs_raw_relay_mosquitto, dap_aggregate_vs_raw_subscribe_mosquitto
    bench.m_group    group_read_10k                    10,000 meters behind one DAP
    bench.m_wire     wire_bytes_*                      sealed sizes vs plain JSON
    bench.m_mpy      mpy_*                             the meter under real MicroPython
    bench.m_scale    scale_out_2_workers*              shared subscription, 1 vs 2 workers

docs/scaling.md has the method notes and the path past one process and one
machine. No number here ever fails a test: tests/test_bench_smoke.py only
checks that a quick run produces every metric.
"""
