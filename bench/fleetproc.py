"""A child process holding many MQTT connections, driven by JSON lines.

    python -m bench.fleetproc SPEC.json

SPEC: {"host", "port", "mode": "fleet" | "raw", ...}

- "fleet": sim.fleet.Fleet with the meter configs in SPEC["meters"] (the
  firmware's meter core behind one paho client and MQTT session per meter,
  one selector thread). Answers whatever requests arrive.
- "raw": one plain paho client per id in SPEC["ids"] (client id
  "raw<id>", clean session), the same selector-loop design as the fleet;
  on "go" every client publishes one message of SPEC["size"] random bytes
  to SPEC["topic"] % id at QoS 1. The baseline of group_read_10k.

Events (stdout): {"online": n} once every connection is up, {"done": ...}
after a "go" has been acknowledged, {"stats": ...}, {"stopped": true}.
Commands (stdin): go, stats, stop.
"""

from __future__ import annotations

import json
import os
import selectors
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def emit(**ev) -> None:
    sys.stdout.write(json.dumps(ev) + "\n")
    sys.stdout.flush()


class RawFleet:
    def __init__(self, host: str, port: int, ids: list[int], topic: str, size: int) -> None:
        self.host, self.port, self.topic, self.size = host, port, topic, size
        self.sel = selectors.DefaultSelector()
        self.clients: dict[int, mqtt.Client] = {}
        self.connected = 0
        self.acked = 0
        self.want = 0
        self.t_go = 0.0
        self.t_done = 0.0
        self.calls: list = []
        self.stop = threading.Event()
        self.ids = ids
        self.wr, self.ww = os.pipe()
        os.set_blocking(self.wr, False)
        self.sel.register(self.wr, selectors.EVENT_READ, None)

    def _client(self, i: int) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw{i}", clean_session=True,
                        protocol=mqtt.MQTTv311)
        c.on_socket_open = lambda c, u, s: self.sel.register(s, selectors.EVENT_READ, c)
        c.on_socket_close = lambda c, u, s: self._unreg(s)
        c.on_socket_register_write = lambda c, u, s: self._mod(s, c, True)
        c.on_socket_unregister_write = lambda c, u, s: self._mod(s, c, False)
        c.on_connect = self._on_connect
        c.on_publish = self._on_publish
        return c

    def _unreg(self, s) -> None:
        try:
            self.sel.unregister(s)
        except (KeyError, ValueError):
            pass

    def _mod(self, s, c, write: bool) -> None:
        try:
            self.sel.modify(s, selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0), c)
        except (KeyError, ValueError):
            pass

    def _on_connect(self, c, u, flags, reason, props) -> None:
        if not reason.is_failure:
            self.connected += 1

    def _on_publish(self, c, u, mid, reason, props) -> None:
        self.acked += 1
        if self.acked == self.want:
            self.t_done = time.time()
            emit(done=True, published=self.acked, t_go=self.t_go, t_done=self.t_done)

    def go(self) -> None:
        payload = os.urandom(self.size)
        self.t_go = time.time()
        self.want += len(self.clients)
        for i, c in self.clients.items():
            c.publish(self.topic % i, payload, qos=1)

    def call(self, fn) -> None:
        self.calls.append(fn)
        os.write(self.ww, b"x")

    def run(self) -> None:
        for i in self.ids:
            c = self.clients[i] = self._client(i)
            for attempt in range(20):
                try:
                    c.connect(self.host, self.port, 300)
                    break
                except OSError:
                    time.sleep(0.2 * (attempt + 1))
            else:
                raise RuntimeError(f"raw client {i} could not connect")
            if len(self.clients) % 200 == 0:
                self._pump(0)
        announced = False
        last = time.monotonic()
        while not self.stop.is_set():
            self._pump(0.05)
            while self.calls:
                self.calls.pop(0)()
            if not announced and self.connected == len(self.clients):
                announced = True
                emit(online=self.connected)
            if time.monotonic() - last > 1.0:
                last = time.monotonic()
                for c in self.clients.values():
                    c.loop_misc()
        for c in self.clients.values():
            c.disconnect()
            c.loop_write()

    def _pump(self, timeout: float) -> None:
        for key, mask in self.sel.select(timeout):
            if key.data is None:
                try:
                    os.read(self.wr, 4096)
                except BlockingIOError:
                    pass
                continue
            c = key.data
            if mask & selectors.EVENT_READ:
                c.loop_read()
            if mask & selectors.EVENT_WRITE:
                c.loop_write()


def run_fleet(spec: dict) -> None:
    from sim.fleet import Fleet

    fleet = Fleet(host=spec["host"], port=spec["port"], keepalive=300)
    for text in spec["meters"]:
        fleet.add(text, history_days=spec.get("history_days", 0.05))
    fleet.start()
    n = len(fleet.meters)
    end = time.monotonic() + spec.get("timeout", 300)
    while sum(1 for m in fleet.meters.values() if m.connected) < n:
        if time.monotonic() > end:
            emit(error="not all meters connected",
                 connected=sum(1 for m in fleet.meters.values() if m.connected))
            break
        time.sleep(0.1)
    else:
        emit(online=n)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "stats":
            ms = list(fleet.meters.values())
            emit(stats={"published": sum(m.published for m in ms),
                        "up_bytes": sum(m.up_bytes for m in ms),
                        "down_bytes": sum(m.down_bytes for m in ms),
                        "dropped": sum(m.dropped for m in ms),
                        "connected": sum(1 for m in ms if m.connected),
                        "requests": sum(m.core.stats["requests"] for m in ms),
                        "rejected": sum(m.core.stats["rejected"] for m in ms)})
        elif cmd == "stop":
            break
    fleet.stop(goodbye=False)
    emit(stopped=True)


def run_raw(spec: dict) -> None:
    raw = RawFleet(spec["host"], spec["port"], spec["ids"], spec["topic"], spec["size"])
    t = threading.Thread(target=raw.run, daemon=True)
    t.start()
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "go":
            raw.call(raw.go)
        elif cmd == "stop":
            break
    raw.stop.set()
    t.join(10)
    emit(stopped=True)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    if spec["mode"] == "fleet":
        run_fleet(spec)
    else:
        run_raw(spec)


if __name__ == "__main__":
    main()
