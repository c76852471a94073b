"""Many simulated meters in one process: each runs the firmware's meter core
(firmware.meter.Meter) behind its own paho-mqtt client and MQTT session, and
one thread drives all their sockets with a selector (paho's external-loop
API), so thousands of meters need no thousands of threads.

This is the host stand-in for firmware/app.py: same core, same outbox
(firmware/outbox.py, on the meter's flash, so it survives a reboot), same
birth/will handshake (what the outbox holds goes before the birth),
reconnect with backoff.
"""

from __future__ import annotations

import logging
import os
import random
import selectors
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from firmware.config import parse as parse_config
from firmware.meter import Meter
from firmware.metrology import SimulatedLoad
from firmware.outbox import Outbox
from shared import topics
from shared.backend import DEFAULT, Backend

log = logging.getLogger("sim.fleet")

class MemoryFlash:
    """Flash in RAM (same calls as firmware.flash.Flash), for large fleets."""

    def __init__(self) -> None:
        self.files: dict[str, bytearray] = {}
        self.writes = 0
        self.bytes_written = 0

    def read(self, name: str) -> bytes | None:
        data = self.files.get(name)
        return None if data is None else bytes(data)

    def write(self, name: str, data: bytes) -> None:
        self.writes += 1
        self.bytes_written += len(data)
        self.files[name] = bytearray(data)

    def append(self, name: str, data: bytes) -> None:
        self.writes += 1
        self.bytes_written += len(data)
        self.files.setdefault(name, bytearray()).extend(data)

    def remove(self, name: str) -> None:
        self.files.pop(name, None)

    def names(self) -> list[str]:
        return list(self.files)


@dataclass
class SimMeter:
    """One simulated meter: its config, core, flash and MQTT client."""

    cfg: dict
    flash: object
    source: SimulatedLoad
    core: Meter | None = None
    client: mqtt.Client | None = None
    connected: bool = False
    retry_at: float = 0.0
    backoff: float = 1.0
    outbox: Outbox | None = None
    inflight: tuple[int, int] | None = None   # (outbox seq, MQTT mid) awaiting PUBACK
    birth: bytes | None = None                # sent once the outbox is empty
    hello: tuple[bytes, bytes] | None = None  # (will, birth) no broker has seen yet
    published: int = 0
    up_bytes: int = 0
    down_bytes: int = 0

    @property
    def id(self) -> int:
        return self.cfg["meter"]

    @property
    def dropped(self) -> int:
        return self.outbox.dropped if self.outbox is not None else 0

    @property
    def uplink(self) -> str:
        return topics.meter_up(self.cfg["meter"], self.cfg["dap"])

    @property
    def downlink(self) -> str:
        return topics.meter_down(self.cfg["meter"], self.cfg["dap"])


class Fleet:
    def __init__(self, *, clock: Callable[[], float] = time.time, backend: Backend = DEFAULT,
                 host: str | None = None, port: int | None = None, keepalive: int = 60,
                 on_response: Callable[[SimMeter, bytes], None] | None = None) -> None:
        self.clock = clock
        self.backend = backend
        self.host = host
        self.port = port
        self.keepalive = keepalive
        self.on_response = on_response
        self.meters: dict[int, SimMeter] = {}
        self._down: set[int] = set()  # meters with no connection, waiting to (re)connect
        self._sel = selectors.DefaultSelector()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._calls: deque = deque()  # work handed in from other threads
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)

    # -- building ------------------------------------------------------------

    def add(self, cfg_text: str, flash=None, *, history_days: float = 8.0,
            seed: int | None = None, base: Path | None = None) -> SimMeter:
        """Add a meter from the text of its provisioned meter.json. It comes
        with `history_days` of load profile (the simulated metrology is a
        pure function of the seed, so the history is what it would have
        measured). `base`: the folder meter.json came from, where its TLS CA
        file (broker.ca) is, as on the board."""
        cfg = parse_config(cfg_text)
        if cfg["ca"] and base is not None and not Path(cfg["ca"]).is_absolute():
            cfg["ca"] = str(Path(base) / cfg["ca"])
        flash = flash if flash is not None else MemoryFlash()
        m = SimMeter(cfg, flash, SimulatedLoad(cfg["meter"] if seed is None else seed,
                                               cfg["period"]))
        self._boot(m, history_days)
        self.meters[m.id] = m
        self._down.add(m.id)
        return m

    def _boot(self, m: SimMeter, history_days: float = 0.0) -> None:
        key = self.backend.beforenm(m.cfg["headend_public_key"], m.cfg["secret_key"])
        m.core = Meter(m.id, key, self.backend, m.flash, m.source, m.cfg["period"])
        m.outbox = Outbox(m.flash)
        m.inflight = m.birth = m.hello = None
        now = int(self.clock())
        m.core.catch_up(now, history_from=now - int(history_days * 86400))

    # -- running -------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fleet", daemon=True)
        self._thread.start()

    def stop(self, goodbye: bool = True) -> None:
        def bye() -> None:
            for m in self.meters.values():
                if m.client is not None and m.connected and goodbye:
                    m.client.publish(m.uplink, m.core.goodbye(os.urandom), qos=1)
                    m.client.loop_write()
                if m.client is not None:
                    m.client.disconnect()
                    m.client.loop_write()
        self.call(bye)
        time.sleep(0.2)
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for m in self.meters.values():
            self._drop_client(m)

    def call(self, fn: Callable[[], None]) -> None:
        """Run fn on the fleet thread (paho clients are not thread-safe here)."""
        self._calls.append(fn)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _run(self) -> None:
        last_misc = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if self._down:  # only meters without a connection, not all of them
                for mid in list(self._down):
                    m = self.meters[mid]
                    if now >= m.retry_at:
                        self._connect(m)
            for key, mask in self._sel.select(timeout=0.05):
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                m = key.data
                c = m.client
                if c is None:
                    continue
                if mask & selectors.EVENT_READ:
                    c.loop_read()
                if mask & selectors.EVENT_WRITE and m.client is not None:
                    c.loop_write()
            while self._calls:
                try:
                    self._calls.popleft()()
                except Exception:
                    log.exception("fleet call failed")
            if now - last_misc >= 1.0:
                last_misc = now
                for m in list(self.meters.values()):
                    if m.client is not None:
                        m.client.loop_misc()

    # -- one meter's connection ---------------------------------------------

    def _connect(self, m: SimMeter) -> None:
        cfg = m.cfg
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=topics.meter_name(m.id),
                        clean_session=True, protocol=mqtt.MQTTv311)
        if cfg["username"]:
            c.username_pw_set(cfg["username"], cfg["password"])
        if cfg["tls"]:
            c.tls_set(ca_certs=cfg["ca"])
        if m.hello is None:  # a pair no broker saw is kept for the next attempt
            m.hello = m.core.connect(int(self.clock()), os.urandom)
        will, birth = m.hello
        c.will_set(m.uplink, will, qos=1)
        c.user_data_set(m)
        c.on_socket_open = self._sock_open
        c.on_socket_close = self._sock_close
        c.on_socket_register_write = self._want_write
        c.on_socket_unregister_write = self._no_write
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        m.client = c
        self._down.discard(m.id)
        try:
            c.connect(self.host or cfg["host"], self.port or cfg["port"], self.keepalive)
        except OSError as e:
            # a refused TLS handshake will not fix itself: say so loudly
            level = logging.WARNING if isinstance(e, ssl.SSLError) else logging.DEBUG
            log.log(level, "meter %d: connect failed (%s); retrying in %.0f s", m.id, e, m.backoff)
            self._drop_client(m)
            self._backoff(m)
            return
        # The broker now holds the will: the next connection is a new session.
        # What the outbox holds goes first (older counters), then the birth.
        m.hello = None
        m.birth = birth

    def _backoff(self, m: SimMeter) -> None:
        m.retry_at = time.monotonic() + m.backoff * (0.5 + random.random())
        m.backoff = min(m.backoff * 2, 30.0)

    def _drop_client(self, m: SimMeter) -> None:
        c, m.client, m.connected = m.client, None, False
        self._down.add(m.id)
        m.inflight = None  # re-sent from the outbox on the next connection
        if c is not None:
            sock = c.socket()
            if sock is not None:
                try:
                    self._sel.unregister(sock)
                except (KeyError, ValueError):
                    pass
                try:
                    sock.close()
                except OSError:
                    pass

    def _sock_open(self, c, m: SimMeter, sock) -> None:
        self._sel.register(sock, selectors.EVENT_READ, m)

    def _sock_close(self, c, m: SimMeter, sock) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _want_write(self, c, m: SimMeter, sock) -> None:
        try:
            self._sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, m)
        except (KeyError, ValueError):
            pass

    def _no_write(self, c, m: SimMeter, sock) -> None:
        try:
            self._sel.modify(sock, selectors.EVENT_READ, m)
        except (KeyError, ValueError):
            pass

    def _on_connect(self, c, m: SimMeter, flags, reason, props) -> None:
        if reason.is_failure:
            log.warning("meter %d refused by broker: %s", m.id, reason)
            return
        m.connected = True
        m.backoff = 1.0
        c.subscribe(m.downlink, qos=1)
        self._flush(m)

    def _on_disconnect(self, c, m: SimMeter, flags, reason, props) -> None:
        if m.client is c:
            self._drop_client(m)
            self._backoff(m)

    def _on_publish(self, c, m: SimMeter, mid, reason, props) -> None:
        m.published += 1
        if m.inflight is not None and m.inflight[1] == mid:
            m.outbox.ack(m.inflight[0])
            m.inflight = None
            self._flush(m)

    def _on_message(self, c, m: SimMeter, msg) -> None:
        m.down_bytes += len(msg.payload)
        for wire in m.core.handle(msg.payload, int(self.clock()), os.urandom):
            if self.on_response is not None:
                self.on_response(m, wire)
            self._publish(m, wire)

    def _publish(self, m: SimMeter, wire: bytes) -> None:
        m.outbox.push(wire)  # bounded: when full the oldest goes, counted
        self._flush(m)

    def _flush(self, m: SimMeter) -> None:
        """One response in flight at a time, oldest first, as on the board;
        the birth once the outbox is empty."""
        if not m.connected or m.client is None or m.inflight is not None:
            return
        head = m.outbox.peek()
        if head is not None:
            m.up_bytes += len(head[1])
            info = m.client.publish(m.uplink, head[1], qos=1)
            m.inflight = (head[0], info.mid)
        elif m.birth is not None:
            birth, m.birth = m.birth, None
            m.up_bytes += len(birth)
            m.client.publish(m.uplink, birth, qos=1)

    # -- faults --------------------------------------------------------------

    def reboot(self, meter: int) -> None:
        """Power-cycle a meter: its connection drops without a goodbye (the
        broker publishes its will), RAM is lost, and it boots again from
        what its flash holds."""
        def go() -> None:
            m = self.meters[meter]
            self._drop_client(m)
            self._boot(m)
            m.retry_at = time.monotonic()
        self.call(go)
