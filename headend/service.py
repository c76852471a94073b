"""The head-end's I/O shell: paho-mqtt, a thread that ingests in batches,
and a timer that re-sends unanswered requests.

Messages are acknowledged to the broker (QoS 1 PUBACK, manual) and bundles
to their DAP only after the batch carrying them is committed to SQLite.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from headend.collect import Collector, CollectPolicy
from headend.errors import BrokerError
from headend.ingest import Batch, Ingest
from headend.requests import BUDGET, Issued, ReadSpec, Requester
from headend.store import Store
from shared import gateway, topics
from shared.backend import DEFAULT, Backend
from shared.hostmqtt import BrokerSettings, client, connect

log = logging.getLogger("headend")

DONE = ("answered", "no-data", "expired", "malformed", "unsupported", "timeout")


@dataclass
class _Pending:
    request: int
    meter: int
    spec: ReadSpec
    flow: str
    due: float
    issued: float
    attempts: int = 1
    status: str = "pending"
    answered_at: float | None = None


@dataclass
class ReadHandle:
    """A request in flight to one or more meters."""

    request: int
    meters: tuple[int, ...]
    issued: float
    request_bytes: int
    _done: threading.Event = field(default_factory=threading.Event)
    statuses: dict[int, str] = field(default_factory=dict)
    latency: dict[int, float] = field(default_factory=dict)  # seconds to answer
    on_done: Callable[[ReadHandle], None] | None = None

    def wait(self, timeout: float | None = None) -> dict[int, str]:
        """Status of every meter once all are final (or on timeout)."""
        self._done.wait(timeout)
        return dict(self.statuses)

    @property
    def answered(self) -> int:
        return sum(1 for s in self.statuses.values() if s == "answered")


def _ranges(seqs: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s in sorted(set(seqs)):
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


class HeadEnd:
    def __init__(self, db: Path, secret_key: bytes, broker: BrokerSettings, *,
                 client_id: str = topics.HEADEND, backend: Backend = DEFAULT,
                 retries: int = 2, batch_max: int = 2000, batch_bytes: int = 4 << 20,
                 subscriptions: tuple[str, ...] = topics.HEADEND_SUBSCRIPTIONS,
                 on_batch: Callable[[Batch], None] | None = None,
                 delay_per_message: float = 0.0, ingest: bool = True,
                 collect: CollectPolicy | None = None,
                 clock: Callable[[], float] = time.time,
                 budget: dict[str, int] | None = None) -> None:
        """`ingest=False`: only send requests, and learn their outcome from
        the store, which another head-end process (`serve`) is filling."""
        self.db_path = Path(db)
        self.broker = broker
        self.backend = backend
        self.retries = retries
        self.batch_max = batch_max
        self.batch_bytes = batch_bytes
        self.on_batch = on_batch
        self.delay_per_message = delay_per_message  # fault tests: a slow head-end
        self.clock = clock
        self.ingest = Ingest(Store(db), secret_key, backend)
        self.requester = Requester(Store(db), secret_key, backend, budget=budget or BUDGET)
        # Collection runs on the timer thread, with its own connection;
        # births and read outcomes are handed to it through this queue.
        self.collector = Collector(Store(db), collect) if collect is not None and ingest else None
        self._collect_events: queue.SimpleQueue = queue.SimpleQueue()
        self.collect_reads: dict[str, int] = {}
        self._inbox: queue.Queue = queue.Queue()
        self._pending: dict[tuple[int, int], _Pending] = {}
        self._handles: dict[int, ReadHandle] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.subscriptions = subscriptions  # HeadEndConfig.uplinks: shared with several workers
        self.ingesting = ingest
        self.mqtt = client(broker, client_id, clean_session=not ingest, manual_ack=ingest)
        self.mqtt.on_message = self._on_message
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_subscribe = self._on_subscribe
        self._subscribed = threading.Event()
        self.refused: list[str] = []  # subscriptions the broker refused
        self.received = 0
        self.acked = 0

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = 15.0) -> HeadEnd:
        self._stop.clear()
        loops = [(self._timer_loop, "timer")]
        if self.ingesting:
            loops.append((self._ingest_loop, "ingest"))
        for target, name in loops:
            t = threading.Thread(target=target, name=f"headend-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        connect(self.mqtt, self.broker, timeout)  # _on_connect subscribes
        if self.ingesting:
            if not self._subscribed.wait(timeout):
                self.stop()
                raise BrokerError(f"no SUBACK from {self.broker.host}:{self.broker.port} in "
                                  f"{timeout:.0f} s: is the broker overloaded?")
            if self.refused:
                self.stop()
                raise BrokerError(
                    f"the broker refused the subscription {', '.join(self.refused)}: "
                    + ("shared subscriptions need Mosquitto (amqtt has none); with amqtt "
                       "set [ingest] workers = 1 in headend.toml"
                       if any(t.startswith("$share/") for t in self.refused) else
                       "check the head-end account's ACL (python -m headend provision init "
                       "writes it)"))
        return self

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        for t in self._threads:
            t.join(timeout=10)
        self._threads.clear()
        self.mqtt.disconnect()
        self.mqtt.loop_stop()

    def _on_connect(self, c, userdata, flags, reason, properties) -> None:
        if not reason.is_failure and self.ingesting:
            c.subscribe([(t, 1) for t in self.subscriptions])
            log.info("connected to %s:%d", self.broker.host, self.broker.port)

    def _on_subscribe(self, c, userdata, mid, reasons, properties) -> None:
        refused = [t for t, r in zip(self.subscriptions, reasons) if r.is_failure]
        if refused:
            log.error("the broker refused the subscription %s", ", ".join(refused))
        self.refused = refused
        self._subscribed.set()

    def _on_message(self, c, userdata, msg) -> None:
        self.received += 1
        self._inbox.put((msg.mid, msg.qos, msg.topic, msg.payload))

    # -- ingest --------------------------------------------------------------

    def _ingest_loop(self) -> None:
        while not self._stop.is_set():
            item = self._inbox.get()
            if item is None:
                break
            items = [item]
            size = len(item[3])
            # one transaction per batch: bounded in messages and in bytes (a
            # backlog of bundles would otherwise become one huge transaction)
            while len(items) < self.batch_max and size < self.batch_bytes:
                try:
                    nxt = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._stop.set()
                    break
                items.append(nxt)
                size += len(nxt[3])
            if self.delay_per_message and not self._slow_down(len(items)):
                break  # stopped: the batch is left unacknowledged, for redelivery
            batch = None
            wait = 0.5
            while batch is None and not self._stop.is_set():
                try:
                    batch = self.ingest.process([(t, p) for _, _, t, p in items], self.clock())
                except Exception:
                    # nothing of it is stored or acknowledged: try the same batch
                    # again rather than leave it to a redelivery that only comes
                    # with a reconnect
                    log.exception("storing a batch of %d message(s) failed; retrying in %.0f s "
                                  "(is the disk full or the store locked?)", len(items), wait)
                    self._stop.wait(wait)
                    wait = min(wait * 2, 30.0)
            if batch is None:
                break  # stopped while the store was failing: redelivered after restart
            for mid, qos, _, _ in items:
                if qos:
                    self.mqtt.ack(mid, qos)
            self.acked += len(items)
            for dap, seqs in batch.acks.items():
                self.mqtt.publish(topics.dap_ack(dap),
                                  gateway.ack(self.backend, dap, _ranges(seqs)), qos=1)
            self._resolve(batch)
            if self.on_batch is not None:
                self.on_batch(batch)

    def _slow_down(self, n: int) -> bool:
        """Fault injection (a slow head-end): wait n * delay_per_message, in
        short steps, so that a change of delay_per_message takes effect at
        once and stop() is not held up. False if stop() was called."""
        start = time.monotonic()
        while not self._stop.is_set():
            left = start + self.delay_per_message * n - time.monotonic()
            if left <= 0:
                return True
            self._stop.wait(min(left, 0.1))
        return False

    def _resolve(self, batch: Batch) -> None:
        now = self.clock()
        if self.collector is not None:
            for birth in batch.births:
                self._collect_events.put(("birth", birth, now))
        store = self.requester.store
        with self._lock:
            for req, meter, status in batch.answers:
                p = self._pending.get((req, meter))
                if p is None:
                    continue
                if status == "part":
                    status = store.request_status(req, meter) or "partial"
                    if status != "answered":
                        continue
                self._finish(p, status, now)

    def _finish(self, p: _Pending, status: str, now: float) -> None:
        p.status = status
        del self._pending[(p.request, p.meter)]
        h = self._handles.get(p.request)
        if h is None:
            return
        h.statuses[p.meter] = status
        if status == "answered":
            h.latency[p.meter] = now - h.issued
        if len(h.statuses) == len(h.meters):
            del self._handles[p.request]
            h._done.set()
            if h.on_done is not None:
                h.on_done(h)

    # -- requests ------------------------------------------------------------

    def _track(self, issued: Issued, spec: ReadSpec, flow: str, now: float) -> ReadHandle:
        size = max(len(m.payload) for m in issued.messages) if issued.messages else 0
        h = ReadHandle(issued.request, issued.meters, now, size)
        with self._lock:
            self._handles[issued.request] = h
            for m in issued.meters:
                self._pending[(issued.request, m)] = _Pending(
                    issued.request, m, spec, flow, issued.due, now)
        return h

    def _send(self, issued: Issued) -> None:
        for out in issued.messages:
            self.mqtt.publish(out.topic, out.payload, qos=1)

    def read(self, meter: int, spec: ReadSpec,
             on_done: Callable[[ReadHandle], None] | None = None) -> ReadHandle:
        now = self.clock()
        reqid = self.requester.new_request_id()
        with self._lock:  # tracked before it is sent: answers can be quick
            issued = self.requester.unicast(meter, spec, now, reqid)
            h = self._track(issued, spec, "unicast", now)
            h.on_done = on_done
        self._send(issued)
        return h

    def read_group(self, grp: int, spec: ReadSpec, mode: str = "fanout") -> ReadHandle:
        now = self.clock()
        with self._lock:
            if mode == "fanout":
                issued = self.requester.group_fanout(grp, spec, now)
            elif mode == "router":
                issued = self.requester.group_router(grp, spec, now)
            else:
                raise ValueError(f"group mode {mode!r}: use 'fanout' or 'router'")
            h = self._track(issued, spec, f"group-{mode}", now)
        self._send(issued)
        return h

    # -- collection ----------------------------------------------------------

    def _collect(self, now: float) -> None:
        col = self.collector
        assert col is not None
        while True:
            try:
                kind, data, at = self._collect_events.get_nowait()
            except queue.Empty:
                break
            if kind == "birth":
                meter, prev, session, oldest = data
                col.on_birth(meter, prev, session, oldest, at)
            else:
                meter, status, detail = data
                col.on_result(meter, status == "answered", at,
                              detail if status == "no-data" else None)
        for plan in col.due(now):
            self.collect_reads[plan.reason] = self.collect_reads.get(plan.reason, 0) + 1
            self.read(plan.meter, ReadSpec("interval", plan.start, plan.end,
                                           col.policy.tolerance),
                      on_done=self._collected)

    def _collected(self, h: ReadHandle) -> None:
        store = self.requester.store
        for meter, status in h.statuses.items():
            detail = store.request_detail(h.request, meter) if status == "no-data" else None
            self._collect_events.put(("result", (meter, status, detail), self.clock()))

    # -- timeouts and retries ------------------------------------------------

    def _poll_store(self, now: float) -> None:
        store = self.requester.store
        with self._lock:
            for p in list(self._pending.values()):
                status = store.request_status(p.request, p.meter)
                if status in DONE and status != "timeout":
                    self._finish(p, status, now)

    def _timer_loop(self) -> None:
        last_collect = 0.0
        while not self._stop.wait(0.25):
            now = self.clock()
            if self.collector is not None and time.monotonic() - last_collect >= 1.0:
                last_collect = time.monotonic()
                self._collect(now)
            resend: list[Issued] = []
            timed_out: list[_Pending] = []
            if not self.ingesting:
                self._poll_store(now)
            with self._lock:
                for p in list(self._pending.values()):
                    if now < p.due + 1:
                        continue
                    if p.attempts > self.retries:
                        timed_out.append(p)
                        continue
                    p.attempts += 1
                    try:
                        issued = self.requester.unicast(p.meter, p.spec, now, p.request, p.flow)
                    except Exception:
                        log.exception("re-sending request %d to meter %d failed", p.request, p.meter)
                        timed_out.append(p)
                        continue
                    p.due = issued.due
                    resend.append(issued)
                for p in timed_out:
                    self._finish(p, "timeout", now)
            if timed_out:
                by_req: dict[int, list[int]] = {}
                for p in timed_out:
                    by_req.setdefault(p.request, []).append(p.meter)
                for req, meters in by_req.items():
                    self.requester.store.set_request_status(req, meters, "timeout")
                    log.warning("request %d: no answer from %d meter(s) after %d attempts",
                                req, len(meters), self.retries + 1)
            for issued in resend:
                self._send(issued)
