"""The DAP's aggregation policy (dap/aggregator.py) and delay-tolerance
hints (dap/hints.py): pure, time passed in."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dap.aggregator import Aggregator
from dap.hints import DelayHints


def agg(**kw) -> Aggregator:
    args = dict(mode="aggregate", window=10.0, max_items=100, max_bytes=10_000)
    args.update(kw)
    return Aggregator(**args)


def test_empty_has_nothing_due():
    a = agg()
    assert a.next_due() is None
    assert not a.due(1e9)
    assert a.take() == []
    assert len(a) == 0


def test_window_counts_from_the_first_item():
    a = agg(window=10.0)
    assert a.add("a", 100, now=100.0) is False
    assert a.add("b", 100, now=105.0) is False
    assert a.next_due() == 110.0
    assert not a.due(109.99)
    assert a.due(110.0)
    assert a.take() == ["a", "b"]
    assert a.next_due() is None
    # The next window starts with the next item, not at the last flush.
    a.add("c", 100, now=200.0)
    assert a.next_due() == 210.0


def test_max_items_closes_the_bundle_at_once():
    a = agg(max_items=3)
    assert not a.add(1, 10, now=0.0)
    assert not a.add(2, 10, now=0.1)
    assert a.add(3, 10, now=0.2) is True
    assert a.due(0.2)
    assert a.take() == [1, 2, 3]
    assert not a.due(0.2)


def test_max_bytes_reached_exactly():
    a = agg(max_bytes=300)
    assert not a.add("a", 100, 0.0)
    assert not a.add("b", 100, 0.0)
    assert a.add("c", 100, 0.0)
    assert a.take() == ["a", "b", "c"]


def test_bundle_never_exceeds_max_bytes():
    a = agg(max_bytes=250)
    a.add("a", 100, 0.0)
    a.add("b", 100, 0.0)
    # "c" does not fit: the buffer closes first, "c" starts the next one.
    assert a.add("c", 100, 1.0) is True
    assert a.take() == ["a", "b"]
    assert len(a) == 1
    assert a.next_due() == 11.0
    assert a.take() == ["c"]


def test_oversized_item_goes_alone():
    a = agg(max_bytes=250)
    a.add("small", 10, 0.0)
    assert a.add("huge", 1000, 0.0)
    assert a.take() == ["small"]
    assert a.take() == ["huge"]


def test_earliest_flush_by_wins():
    a = agg(window=60.0)
    a.add("a", 10, now=0.0)
    assert a.next_due() == 60.0
    a.add("b", 10, now=1.0, flush_by=30.0)
    assert a.next_due() == 30.0
    a.add("c", 10, now=2.0, flush_by=20.0)
    assert a.next_due() == 20.0
    a.add("d", 10, now=3.0, flush_by=50.0)  # later than the earliest: no change
    assert a.next_due() == 20.0
    assert not a.due(19.9)
    assert a.due(20.0)
    assert a.take() == ["a", "b", "c", "d"]


def test_flush_by_later_than_window_is_ignored():
    a = agg(window=10.0)
    a.add("a", 10, now=0.0, flush_by=1000.0)
    assert a.next_due() == 10.0


def test_flush_by_in_the_past_is_due_now():
    a = agg(window=10.0)
    assert a.add("a", 10, now=5.0, flush_by=4.0) is True
    assert a.take() == ["a"]


def test_router_mode_every_item_at_once():
    a = Aggregator(mode="router")
    for i in range(5):
        assert a.add(i, 10, now=float(i)) is True
    assert len(a) == 5
    assert [a.take() for _ in range(5)] == [[0], [1], [2], [3], [4]]
    assert a.next_due() is None


def test_take_flushes_open_buffer_early():
    a = agg()
    a.add("a", 10, 0.0)
    assert not a.due(1.0)
    assert a.take() == ["a"]  # shutdown: send what is buffered


def test_bad_arguments():
    with pytest.raises(ValueError):
        Aggregator(mode="bus")
    with pytest.raises(ValueError):
        Aggregator(window=0)


def _late_stream(min_gap: float) -> list[tuple[float, list[int]]]:
    """50 responses, one every 0.1 s, each already past its flush-by time:
    (when it left, items) of every bundle."""
    a = agg(min_gap=min_gap)
    out = []
    now = 0.0
    for i in range(50):
        a.add(i, 50, now, now - 1.0)
        while a.due(now):
            out.append((now, a.take(now)))
        now += 0.1
    while len(a):  # the rest, when due
        now = max(now, a.next_due())
        out.append((now, a.take(now)))
    return out


def test_min_gap_coalesces_responses_that_arrive_late():
    """Without the gap a late stream leaves one bundle per response (the DAP
    becomes a router); with it, one bundle per min_gap, none held longer."""
    assert len(_late_stream(0.0)) == 50
    bundles = _late_stream(0.5)
    assert [i for _, b in bundles for i in b] == list(range(50))
    assert len(bundles) <= 11
    times = [t for t, _ in bundles]
    assert all(b - a >= 0.5 - 1e-9 for a, b in zip(times, times[1:]))
    for t, b in bundles:  # item i arrived at 0.1 i, already late
        assert all(t - 0.1 * i <= 0.5 + 1e-9 for i in b)


def test_min_gap_never_holds_a_full_bundle():
    """A full bundle leaves at once and does not restart the gap: a burst
    goes out as fast as it fills bundles."""
    a = agg(max_items=3, min_gap=30.0)
    a.add(0, 10, 0.0, 0.0)  # late, alone: leaves at once
    assert a.due(0.0) and a.take(0.0) == [0]
    a.add(1, 10, 0.1, 0.0)  # late again: held for the gap
    assert not a.due(0.1) and a.next_due() == pytest.approx(30.0)
    a.add(2, 10, 0.2)
    a.add(3, 10, 0.3)  # full: leaves at once
    assert a.due(0.3) and a.take(0.3) == [1, 2, 3]
    a.add(4, 10, 0.4, 0.0)  # the gap still counts from the bundle at 0.0
    assert not a.due(0.4) and a.next_due() == pytest.approx(30.0)
    with pytest.raises(ValueError):
        agg(min_gap=-1)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 400), st.floats(0, 5),
                          st.one_of(st.none(), st.floats(-1, 100))), max_size=60),
       st.integers(1, 7), st.integers(400, 1500), st.sampled_from([0.0, 0.5, 3.0]))
def test_properties(ops, max_items, max_bytes, min_gap):
    """Nothing lost or reordered, no bundle over a limit, and the next due
    time never later than any held item's window end or flush-by time, or
    min_gap after the last bundle that was not full left, if that is later;
    those bundles leave at least min_gap apart."""
    window = 10.0
    a = agg(window=window, max_items=max_items, max_bytes=max_bytes, min_gap=min_gap)
    now = 0.0
    out: list[list[int]] = []
    deadline: dict[int, float] = {}  # latest time each held item may leave
    sizes = {}
    held: list[int] = []
    added: dict[int, int] = {}  # item -> step at which it was added
    left: list[tuple[float, int]] = []  # (time, step) each bundle left
    step = 0

    def take():
        b = a.take(now)
        out.append(b)
        left.append((now, step))
        for i in b:
            held.remove(i)

    def full(k: int) -> bool:
        """Was bundle k closed for its size? Full in items or bytes, or
        closed by the next item, which did not fit - added before bundle k
        left. Known once that next item is added."""
        b = out[k]
        n = sum(sizes[i] for i in b)
        nxt = out[k + 1][0] if k + 1 < len(out) else (held[0] if held else None)
        return (len(b) == max_items or n >= max_bytes
                or (nxt is not None and added[nxt] < left[k][1]
                    and n + sizes[nxt] > max_bytes))

    for i, (size, dt, fb) in enumerate(ops):
        now += dt
        step += 1
        while a.due(now):
            take()
        step += 1
        sizes[i] = size
        added[i] = step
        flush_by = None if fb is None else now + fb
        a.add(i, size, now, flush_by)
        held.append(i)
        deadline[i] = min(now + window, flush_by if flush_by is not None else now + window)
        due = a.next_due()
        assert due is not None
        partial = [t for k, (t, _) in enumerate(left) if not full(k)]
        gap_end = partial[-1] + min_gap if partial else now
        assert due <= max(now, min(deadline[j] for j in held), gap_end)
    while len(a):
        now = max(now, a.next_due())
        step += 1
        take()
    assert not held
    partial = [t for k, (t, _) in enumerate(left) if not full(k)]
    assert all(t2 - t1 >= min_gap - 1e-9 for t1, t2 in zip(partial, partial[1:])), (out, left)
    flat = [i for b in out for i in b]
    assert flat == list(range(len(ops)))
    for b in out:
        assert 1 <= len(b) <= max_items
        assert sum(sizes[i] for i in b) <= max_bytes or len(b) == 1


# -- delay-tolerance hints -----------------------------------------------------


def test_hint_gives_flush_by():
    h = DelayHints(keep=120)
    assert h.flush_by(7, 0.0) is None
    h.note(7, now=100.0, tolerance=30)
    assert h.flush_by(7, 105.0) == 130.0
    assert h.flush_by(8, 105.0) is None  # another meter: normal window


def test_hint_kept_for_tolerance_plus_keep():
    h = DelayHints(keep=120)
    h.note(7, now=0.0, tolerance=30)
    assert h.flush_by(7, 149.0) == 30.0  # late answers still leave at once
    assert h.flush_by(7, 150.0) is None
    assert len(h) == 0


def test_earliest_live_hint_applies():
    h = DelayHints(keep=10)
    h.note(7, now=0.0, tolerance=100)
    h.note(7, now=1.0, tolerance=5)
    assert h.flush_by(7, 2.0) == 6.0
    assert h.flush_by(7, 16.5) == 100.0  # the short one expired at 16


def test_prune_and_bound():
    h = DelayHints(keep=1, max_meters=3)
    for m in range(3):
        h.note(m, now=0.0, tolerance=0)
    assert h.prune(0.5) == 0
    h.note(3, now=0.5, tolerance=0)  # over the bound: the oldest goes
    assert len(h) == 3
    assert h.flush_by(0, 0.6) is None
    assert h.prune(10.0) == 3
    assert len(h) == 0


def test_many_requests_to_one_meter_stay_bounded():
    h = DelayHints(keep=1000)
    for i in range(100):
        h.note(1, now=float(i), tolerance=1000 - i)
    assert h.flush_by(1, 100.0) <= 1000.0
    assert len(h._hints[1]) <= 8


def test_new_request_replaces_a_hint_whose_deadline_passed():
    # A read with no tolerance, answered; then one with 6 s of tolerance:
    # the new response may wait 6 s, it is not pulled back to the old
    # (already passed) deadline.
    h = DelayHints(keep=120)
    h.note(7, now=0.0, tolerance=0)
    assert h.flush_by(7, now=0.05) == 0.0
    h.note(7, now=10.0, tolerance=6)
    assert h.flush_by(7, now=10.5) == 16.0
    # Two requests in flight at once: the earlier deadline still wins.
    h.note(7, now=11.0, tolerance=30)
    assert h.flush_by(7, now=11.5) == 16.0
