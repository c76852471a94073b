"""Bare paho baselines, each in a process of its own (as the DAP and the
head-end are), driven by JSON lines like bench.fleetproc.

    python -m bench.relayproc sink  HOST PORT CLIENT_ID CLEAN TOPIC N
    python -m bench.relayproc relay HOST PORT CLIENT_ID IN_TOPIC OUT_TOPIC

- sink: a plain paho subscriber (QoS 1, paho's automatic PUBACK) that
  counts messages; emits {"ready"} once subscribed and {"done", "first",
  "last", "n"} (wall-clock arrival of the first and the N-th message).
- relay: a plain paho subscriber on a persistent session that republishes
  every message untouched (same payload, QoS 1) to OUT_TOPIC, with the
  same paho settings as the DAP's connection (no in-flight window:
  dap/links.py METERS_INFLIGHT).
"""

from __future__ import annotations

import json
import sys
import threading
import time

from bench.common import connect_wait, mqtt_client


def emit(**ev) -> None:
    sys.stdout.write(json.dumps(ev) + "\n")
    sys.stdout.flush()


def sink(host: str, port: int, cid: str, clean: bool, topic: str, n: int) -> None:
    state = {"n": 0, "first": 0.0, "last": 0.0}
    done = threading.Event()

    def on_message(c, u, msg) -> None:
        now = time.time()
        if state["n"] == 0:
            state["first"] = now
        state["n"] += 1
        if state["n"] == n:
            state["last"] = now
            done.set()

    c = mqtt_client(cid, clean=clean)
    c.on_message = on_message
    connect_wait(c, host, port, [topic])
    emit(ready=True)
    done.wait()
    emit(done=True, **state)
    for line in sys.stdin:
        if line.strip() == "stop":
            break
    c.disconnect()
    c.loop_stop()


def relay(host: str, port: int, cid: str, in_topic: str, out_topic: str) -> None:
    c = mqtt_client(cid, clean=False, inflight=0)
    c.on_message = lambda c, u, msg: c.publish(out_topic, msg.payload, qos=1)
    connect_wait(c, host, port, [in_topic])
    emit(ready=True)
    for line in sys.stdin:
        if line.strip() == "stop":
            break
    c.disconnect()
    c.loop_stop()


def main() -> None:
    a = sys.argv[1:]
    if a[0] == "sink":
        sink(a[1], int(a[2]), a[3], a[4] == "1", a[5], int(a[6]))
    else:
        relay(a[1], int(a[2]), a[3], a[4], a[5])


if __name__ == "__main__":
    main()
