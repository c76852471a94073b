"""Delay tolerance, sans-IO: when a meter's response must leave the DAP.

Forward and group messages carry the request's delay tolerance T in clear.
When the DAP delivers a request to meter M at time t, M's answer should
leave by t + T. The DAP keeps that hint for T + `keep` seconds (the meter
may answer late, or in several parts), and a response from M is given the
earliest flush-by time among M's live hints. A new request replaces hints
whose deadline has already passed. Taking the earliest is never
late; at worst a response leaves earlier than it had to. A response with
no live hint gets the normal buffer window.

Hints live in memory only: after a restart, recovered responses go out at
the end of their window (dap/queue.py keeps each one's flush-by time).
"""

from __future__ import annotations

DEFAULT_KEEP = 120.0
DEFAULT_MAX_METERS = 200_000


class DelayHints:
    def __init__(self, keep: float = DEFAULT_KEEP, max_meters: int = DEFAULT_MAX_METERS) -> None:
        self.keep = keep
        self.max_meters = max_meters
        # meter -> [(flush_by, expires), ...]: a short list, usually one.
        self._hints: dict[int, list[tuple[float, float]]] = {}

    def __len__(self) -> int:
        return len(self._hints)

    def note(self, meter: int, now: float, tolerance: float) -> None:
        """A request with delay tolerance `tolerance` (s) was delivered to
        `meter` at `now`."""
        entry = (now + tolerance, now + tolerance + self.keep)
        # A hint whose deadline has passed has served its purpose: a
        # response to that older request is already late and goes out with
        # this one's deadline, and it must not hold a newer request's
        # response to the old, already passed, deadline.
        live = [h for h in self._hints.pop(meter, ()) if h[0] > now]
        live.append(entry)
        if len(live) > 8:  # a meter flooded with requests: keep the earliest deadlines
            live = sorted(live)[:8]
        self._hints[meter] = live  # re-inserted: the dict stays in order of last use
        if len(self._hints) > self.max_meters:
            self.prune(now)
            while len(self._hints) > self.max_meters:
                del self._hints[next(iter(self._hints))]

    def flush_by(self, meter: int, now: float) -> float | None:
        """The time by which a response from `meter`, received at `now`,
        must leave; None when no live hint applies."""
        hints = self._hints.get(meter)
        if not hints:
            return None
        live = [h for h in hints if h[1] > now]
        if not live:
            del self._hints[meter]
            return None
        if len(live) != len(hints):
            self._hints[meter] = live
        return min(h[0] for h in live)

    def prune(self, now: float) -> int:
        """Forget expired hints; returns how many meters were dropped."""
        dead = []
        for meter, hints in self._hints.items():
            live = [h for h in hints if h[1] > now]
            if live:
                if len(live) != len(hints):
                    self._hints[meter] = live
            else:
                dead.append(meter)
        for meter in dead:
            del self._hints[meter]
        return len(dead)
