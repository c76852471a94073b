"""The DAP's I/O shell: MQTT connections, the disk queue and one loop.

One loop (the caller's thread, normally the main thread) drives the
network (dap/links.py) and does everything else, in batches: check each
message, store meter envelopes, apply head-end acks, deliver requests to
meters, close due bundles; then commit, and only then acknowledge the
batch to the broker (QoS 1, manual) and publish the new bundles. A crash
at any point loses nothing that was acknowledged.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import Counter
from typing import Any

from dap import inbound
from dap.aggregator import Aggregator
from dap.config import ITEM_OVERHEAD, Config
from dap.errors import DapError
from dap.hints import DelayHints
from dap.links import Item, Links
from dap.queue import DiskQueue
from dap.stats import Stats
from shared import gateway, topics
from shared.backend import Backend
from shared.errors import ProtocolError

log = logging.getLogger("dap")

BATCH_MAX = 500  # messages per commit
BATCH_LINGER = 0.010  # seconds a batch may wait to fill up
BATCH_GAP = 0.002  # ...but it closes once nothing arrives for this long
SHUTDOWN_GRACE = 5.0  # seconds to wait for the head-end's last acks
LOG_PER_REASON = 10  # rejection lines logged per reason and stats interval


class Dap:
    def __init__(self, config: Config, backend: Backend = inbound.CBOR) -> None:
        self.cfg = config
        self.backend = backend
        self.stats = Stats(config.dap, config.mode)
        a = config.aggregate
        self.agg: Aggregator[tuple[int, bytes]] = Aggregator(
            config.mode, a.window, a.max_items, a.max_bytes, a.min_gap)
        self.hints = DelayHints()
        self.queue: DiskQueue | None = None
        self._stop = False
        q = config.queue
        self._rate = q.drain_rate
        self._tokens = self._burst = max(1.0, q.drain_rate)
        self._refilled = time.monotonic()
        self._next_stats = 0.0
        self._logged: Counter[str] = Counter()
        self._warned = False
        self._announce = False
        self.links = Links(config, self._head_end_connected)
        self.meters, self.up = self.links.meters, self.links.up
        self.state_topic = self.links.state_topic

    def _head_end_connected(self) -> None:
        """The loop publishes the status after this round."""
        self._announce = True

    # -- lifecycle -------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask run() to stop: safe from a signal handler or another thread."""
        self._stop = True
        self.links.wake()

    def run(self) -> None:
        """Recover the queue, connect, and serve until request_stop()."""
        try:
            self.setup()
            while not self._stop:
                self._step(self._collect(self._wait_time()))
            self._shutdown()
        finally:
            self.close()

    def setup(self) -> None:
        """Open and recover the queue, connect and subscribe."""
        cfg = self.cfg
        q = cfg.queue
        self.queue = DiskQueue(cfg.db_path, q.disk_budget_bytes, q.warn_fraction, q.sync)
        now, wall = time.monotonic(), time.time()
        pending = self.queue.unbundled()
        for p in pending:  # back into the buffer, due when their window would have ended
            end = p.received + cfg.aggregate.window
            if p.flush_by is not None:
                end = min(end, p.flush_by)
            self.agg.add((p.id, p.env), len(p.env) + ITEM_OVERHEAD, now,
                         now + min(max(end - wall, 0.0), cfg.aggregate.window))
        log.info("DAP d%d (%s mode) queue %s: %d envelopes, %d of them not in a bundle, "
                 "%d bundles to (re)send", cfg.dap, cfg.mode, cfg.db_path, self.queue.depth,
                 len(pending), self.queue.unacked)
        self.links.connect()
        self._announce = True  # online only once subscribed

    def close(self) -> None:
        self.links.close()
        if self.queue is not None:
            self.queue.close()
            self.queue = None

    # -- the loop --------------------------------------------------------------

    def _wait_time(self) -> float:
        now = time.monotonic()
        t = self._next_stats
        due = self.agg.next_due()
        if due is not None:
            t = min(t, due)
        if self.queue is not None and self.queue.unacked:
            t = min(t, now + 0.1)  # re-sends are polled
        return max(0.0, t - now)

    def _collect(self, timeout: float) -> list[Item]:
        """A batch: everything that arrives within BATCH_LINGER of the first
        message, up to about BATCH_MAX, closed early by a quiet gap."""
        batch = self.links.poll(timeout)
        if not batch:
            return batch
        end = time.monotonic() + BATCH_LINGER
        while len(batch) < BATCH_MAX and not self._stop:
            left = end - time.monotonic()
            if left <= 0:
                break
            more = self.links.poll(min(left, BATCH_GAP))
            if not more:
                break
            batch += more
        return batch

    def _step(self, batch: list[Item]) -> None:
        """One round: handle a batch, close due bundles, commit, then
        acknowledge the batch and publish; re-sends; status."""
        assert self.queue is not None
        now, wall = time.monotonic(), time.time()
        to_ack = [item for item in batch if self._handle(item, now, wall, acks_only=False)]
        bundles = []
        while self.agg.due(now):
            bundles.append(self._bundle(self.agg.take(now), now, wall))
        self.queue.commit()
        for c, mid, qos, _, _ in to_ack:
            if qos:
                c.ack(mid, qos)
        for seq, envs in bundles:
            if envs:
                self._publish_bundle(seq, envs, first=True)
        self._resend(now)
        self._check_budget()
        if now >= self._next_stats:
            self._tick(now)
        elif self._announce:
            self._gauges()
            self.up.publish(self.state_topic, self.stats.status(), qos=1, retain=True)
        self._announce = False
        self.links.flush()

    def _handle(self, item: Item, now: float, wall: float, acks_only: bool) -> bool:
        """Process one message; False if it must stay unacknowledged."""
        c, _, _, topic, payload = item
        try:
            kind, meter = inbound.classify(self.cfg.dap, topic)
            if acks_only and kind != inbound.ACK:
                return False
            if kind == inbound.UPLINK:
                assert meter is not None
                self.stats.add("received")
                self._uplink(meter, inbound.check_uplink(meter, payload), now, wall)
            elif kind == inbound.REQUEST:
                self._request(inbound.request(self.backend, self.cfg.dap, payload), now)
            else:
                self._ack(inbound.ack(self.backend, self.cfg.dap, payload))
        except ProtocolError as e:
            self.stats.add(f"rejected:{e.reason}")
            self._log_bad(e.reason, "rejected a message on %s: %s", topic, e)
        except (DapError, sqlite3.Error):
            raise
        except Exception:  # a bug must not stop the DAP: count, log, go on
            self.stats.add("rejected:internal")
            log.exception("failed to process a message on %s", topic)
        return True

    def _uplink(self, meter: int, env: bytes, now: float, wall: float) -> None:
        assert self.queue is not None
        if not self.queue.has_room(env):
            self.stats.add("dropped:budget")
            self._log_bad("budget", "disk budget full (%d bytes): dropped an envelope from "
                          "meter %d; the head-end re-reads the gap later",
                          self.queue.budget, meter)
            return
        flush_by = self.hints.flush_by(meter, now)
        rid = self.queue.put(env, wall, None if flush_by is None else wall + flush_by - now)
        if rid is None:
            self.stats.add("dropped:duplicate")
            return
        self.agg.add((rid, env), len(env) + ITEM_OVERHEAD, now, flush_by)

    def _request(self, req: inbound.Request, now: float) -> None:
        for reason, n in req.rejected.items():
            self.stats.add(f"rejected:{reason}", n)
            self._log_bad(reason, "refused %d envelope(s) of a forward message (%s)", n, reason)
        for d in req.deliveries:
            self.meters.publish(d.topic, d.payload, qos=1)
            self.hints.note(d.meter, now, req.tolerance)
        if req.group is None:
            self.stats.add("requests_delivered", len(req.deliveries))
        else:
            self.stats.add("group_fanouts")
            self.stats.add("group_items", len(req.deliveries))
            log.debug("group %d fanned out to %d meters", req.group, len(req.deliveries))

    def _ack(self, ranges: list[list[int]]) -> None:
        assert self.queue is not None
        done = self.queue.ack(ranges)
        self.stats.add("bundles_acked", done.bundles)
        if not done.bundles:
            log.debug("ack for bundles no longer queued: %s", ranges)

    def _bundle(self, items: list[tuple[int, bytes]], now: float,
                wall: float) -> tuple[int, list[bytes]]:
        """Assign a sequence number (committed with the batch); the bundle is
        published after the commit if the head-end link is up, else later."""
        assert self.queue is not None
        if not items:
            return 0, []
        online = self.links.head_end_online()
        seq = self.queue.bundle(items, wall, now if online else 0.0)
        return seq, [env for _, env in items] if online else []

    def _publish_bundle(self, seq: int, envs: list[bytes], first: bool) -> None:
        payload = gateway.bundle(self.backend, self.cfg.dap, seq, envs)
        self.up.publish(topics.dap_up(self.cfg.dap), payload, qos=1)
        if first:
            self.stats.add("bundles_sent")
            self.stats.add("forwarded", len(envs))
        else:
            self.stats.add("resent")

    def _resend(self, now: float) -> None:
        """Bundles never sent, or not acknowledged within ack_timeout, are
        sent (again) oldest first, at most drain_rate per second."""
        assert self.queue is not None
        if not self.queue.unacked or not self.links.head_end_online():
            return
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens < 1:
            return
        for seq, attempts in self.queue.due(now - self.cfg.queue.ack_timeout, int(self._tokens)):
            envs = self.queue.envelopes_of(seq)
            self.queue.mark_sent(seq, now)
            self._tokens -= 1
            if envs:
                self._publish_bundle(seq, envs, first=attempts == 0)
        self.queue.commit()

    # -- status ------------------------------------------------------------------

    def _gauges(self) -> None:
        q = self.queue
        if q is None:
            return
        self.stats.gauges.update(queue_depth=q.depth, queue_bytes=q.bytes,
                                 queue_fill=round(q.fill, 4), budget_warning=q.warning,
                                 unacked_bundles=q.unacked, buffered=len(self.agg))

    def _tick(self, now: float) -> None:
        assert self.queue is not None
        self._next_stats = now + self.cfg.log.stats_interval
        self.hints.prune(now)
        self._gauges()
        for reason, n in self._logged.items():
            if n > LOG_PER_REASON:
                log.warning("%d more messages %s not logged", n - LOG_PER_REASON,
                            "dropped (budget)" if reason == "budget" else f"rejected ({reason})")
        self._logged.clear()
        self.up.publish(self.state_topic, self.stats.status(), qos=1, retain=True)
        log.info("stats: %s", self.stats.summary())

    def _check_budget(self) -> None:
        q = self.queue
        assert q is not None
        if q.warning == self._warned:
            return
        self._warned = q.warning
        if q.warning:
            log.warning("disk queue at %.0f%% of its budget (%d of %d bytes): the head-end is "
                        "not acknowledging bundles; at 100%% new readings are dropped",
                        100 * q.fill, q.bytes, q.budget)
        else:
            log.info("disk queue back below %.0f%% of its budget", 100 * q.warn_fraction)

    def _log_bad(self, reason: str, msg: str, *args: Any) -> None:
        self._logged[reason] += 1
        if self._logged[reason] <= LOG_PER_REASON:
            log.warning(msg, *args)

    def _shutdown(self) -> None:
        """Stop intake, send the buffer as a bundle, wait briefly for acks."""
        assert self.queue is not None
        log.info("stopping: sending %d buffered envelopes", len(self.agg))
        end = time.monotonic() + min(SHUTDOWN_GRACE, self.cfg.queue.ack_timeout)
        now, wall = time.monotonic(), time.time()
        bundles = []
        while len(self.agg):
            bundles.append(self._bundle(self.agg.take(), now, wall))
        self.queue.commit()
        for seq, envs in bundles:
            if envs:
                self._publish_bundle(seq, envs, first=True)
        self.links.flush()
        left = 0  # whatever else arrives stays with the broker
        while self.queue.unacked and time.monotonic() < end:
            batch = self.links.poll(0.05)
            left += sum(1 for item in batch if not self._step_ack_only(item))
            self.links.flush()
        if left:
            log.info("left %d messages unacknowledged: the broker redelivers them "
                     "after a restart", left)
        self._gauges()
        if self.queue.unacked:
            log.info("%d bundles not yet acknowledged: they are sent again after a restart",
                     self.queue.unacked)
        log.info("stats at shutdown: %s", self.stats.summary())
        info = self.up.publish(self.state_topic, self.stats.status("offline"), qos=1, retain=True)
        self.links.pump_until(info.is_published, 2.0)  # what arrives stays unacknowledged

    def _step_ack_only(self, item: Item) -> bool:
        assert self.queue is not None
        handled = self._handle(item, time.monotonic(), time.time(), acks_only=True)
        self.queue.commit()
        if handled and item[2]:
            item[0].ack(item[1], item[2])
        return handled
