"""The DAP's counters, its retained status message and its log summary.

Counters (all since the process started):

  received            meter uplink messages taken off the broker
  forwarded           envelopes sent to the head-end (first send of their bundle)
  bundles_sent        bundles published for the first time
  bundles_acked       bundles the head-end acknowledged (then deleted)
  resent              bundles published again (no ack in time, or after a restart)
  requests_delivered  sealed requests delivered to meters (forward messages)
  group_fanouts       group messages fanned out
  group_items         group items delivered to member meters
  rejected:<reason>   input refused and dropped: topic, malformed, oversized,
                      version, kind, mismatch (and internal: a bug, logged
                      with its traceback)
  dropped:<reason>    valid envelopes not kept: budget (the disk budget is
                      full), duplicate (a broker redelivery of one stored
                      already)

Messages that arrive while the DAP stops are left unacknowledged, for the
broker to redeliver after the restart; they are logged, not counted.

Gauges: queue_depth (envelopes held), queue_bytes (as counted against the
budget), queue_fill (fraction of the budget), unacked_bundles, buffered
(envelopes waiting in the aggregator).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

COUNTERS = ("received", "forwarded", "bundles_sent", "bundles_acked", "resent",
            "requests_delivered", "group_fanouts", "group_items")

OFFLINE = json.dumps({"state": "offline"}).encode()


class Stats:
    def __init__(self, dap: int, mode: str) -> None:
        self.dap = dap
        self.mode = mode
        self.counts: Counter[str] = Counter({k: 0 for k in COUNTERS})
        self.gauges: dict[str, float | int | bool] = {}
        self.started = time.time()

    def __getitem__(self, key: str) -> int:
        return self.counts[key]

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(sorted(self.counts.items()))
        out.update(self.gauges)
        return out

    def status(self, state: str = "online") -> bytes:
        """The retained JSON published on d<id>/state."""
        return json.dumps({
            "state": state, "dap": self.dap, "mode": self.mode,
            "time": round(time.time(), 3), "since": round(self.started, 3),
            "counters": self.snapshot(),
        }, separators=(",", ":")).encode()

    def summary(self) -> str:
        """One log line."""
        c = self.counts
        g = self.gauges
        line = (f"received={c['received']} forwarded={c['forwarded']} "
                f"bundles_sent={c['bundles_sent']} acked={c['bundles_acked']} "
                f"resent={c['resent']} requests={c['requests_delivered']} "
                f"group_fanouts={c['group_fanouts']} group_items={c['group_items']} "
                f"queue={g.get('queue_depth', 0)} envelopes/{g.get('queue_bytes', 0)} bytes "
                f"({100 * float(g.get('queue_fill', 0)):.1f}% of budget) "
                f"unacked={g.get('unacked_bundles', 0)}")
        bad = [f"{k}={v}" for k, v in sorted(c.items())
               if k.startswith(("rejected:", "dropped:")) and v]
        return line + (" " + " ".join(bad) if bad else "")
