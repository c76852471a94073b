"""When a bundle goes out: the aggregation policy, sans-IO.

No clock, no I/O: the caller passes the time in (any monotonic clock, in
seconds) and asks what is due. In aggregate mode a bundle goes out at the
earliest of:

- the end of the buffer window, measured from the first buffered item;
- the earliest flush-by deadline among the buffered items (a delay
  tolerance hint: see dap/hints.py);
- the moment the buffer reaches max_items items or max_bytes bytes.

A bundle that is not full leaves at least `min_gap` seconds after the
previous one that was not full (take(now) records when). Without that, a
stream of responses that arrive already late - each one past its flush-by
time, as when the broker or the meters fall behind - went out one bundle
each: the DAP turned into a router just when the link upstream was
busiest. With it, such a stream leaves in one bundle per min_gap, each
response at most min_gap after its flush-by time. Full bundles are never
held, and do not hold the next one: a burst (a group read answered at
once) goes out as fast as it fills bundles.

A bundle never exceeds max_items or max_bytes: an item that would push the
buffer over max_bytes closes the buffer first and starts the next one. (An
item larger than max_bytes on its own goes out alone.) In router mode every
item is its own bundle, due at once.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Aggregator(Generic[T]):
    def __init__(self, mode: str = "aggregate", window: float = 10.0, max_items: int = 1000,
                 max_bytes: int = 256 * 1024, min_gap: float = 0.0) -> None:
        if mode not in ("aggregate", "router"):
            raise ValueError(f"mode {mode!r}: use 'aggregate' or 'router'")
        if window <= 0 or max_items < 1 or max_bytes < 1:
            raise ValueError("window, max_items and max_bytes must be positive")
        if min_gap < 0:
            raise ValueError("min_gap must not be negative")
        self.mode = mode
        self.window = window
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.min_gap = min_gap
        self._last_out: float | None = None  # when take(now) last took one not full
        self._items: list[T] = []
        self._bytes = 0
        self._deadline: float | None = None  # of the open buffer
        # Closed bundles waiting to be taken: (time closed, items).
        self._ready: deque[tuple[float, list[T]]] = deque()
        self._ready_items = 0

    def __len__(self) -> int:
        """Items held, in the open buffer and in closed bundles."""
        return len(self._items) + self._ready_items

    @property
    def buffered_bytes(self) -> int:
        """Bytes in the open buffer."""
        return self._bytes

    def add(self, item: T, size: int, now: float, flush_by: float | None = None) -> bool:
        """Buffer one item of `size` bytes. `flush_by`: the latest time it may
        leave (None: the normal window). Returns True if a bundle is due now."""
        if self.mode == "router":
            self._close_with([item], now)
            return True
        if self._items and self._bytes + size > self.max_bytes:
            self._close(now)
        if not self._items:
            self._deadline = now + self.window
        self._items.append(item)
        self._bytes += size
        if flush_by is not None and self._deadline is not None and flush_by < self._deadline:
            self._deadline = flush_by
        if len(self._items) >= self.max_items or self._bytes >= self.max_bytes:
            self._close(now)
        return self.due(now)

    def next_due(self) -> float | None:
        """When the next bundle is due (possibly in the past), or None if
        nothing is held."""
        if self._ready:
            return self._ready[0][0]
        if self._items:
            if self._last_out is None:
                return self._deadline
            return max(self._deadline, self._last_out + self.min_gap)
        return None

    def due(self, now: float) -> bool:
        """Is a bundle due at `now`?"""
        t = self.next_due()
        return t is not None and now >= t

    def take(self, now: float | None = None) -> list[T]:
        """The next bundle's items: the oldest closed bundle, or else the
        whole open buffer (whether due or not: use it to flush at shutdown).
        Empty if nothing is held. `now`: when it leaves; for the open
        buffer, the next one's min_gap counts from it (None: not counted)."""
        if self._ready:
            _, items = self._ready.popleft()
            self._ready_items -= len(items)
            return items
        items = self._items
        if now is not None and items:
            self._last_out = now
        self._items = []
        self._bytes = 0
        self._deadline = None
        return items

    def _close(self, now: float) -> None:
        items = self._items
        self._items = []
        self._bytes = 0
        self._deadline = None
        self._close_with(items, now)

    def _close_with(self, items: list[T], now: float) -> None:
        self._ready.append((now, items))
        self._ready_items += len(items)
