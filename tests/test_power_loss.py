"""Counters, profile, replay state and outbox across a power cut at every
flash write step, on CPython at full size. The engine (a cut-able flash, the
meter's run, the checks) is tests/mpy/mpytest_power_loss.py, which
tests/test_micropython.py also runs, shorter, under MicroPython.

The run: three simulated days in 300 s steps from interval 80 of a profile
segment (so it closes 288 intervals across three segment boundaries), a
request on three steps in seven (current and interval reads), a replayed
request now and then, a reconnect every 40 steps, and a stretch with the
broker away while the outbox fills past its bound. For every write step,
and every prefix length of each write of up to 40 bytes (the state,
profile and outbox-forget records; five lengths of longer ones), a fresh
meter boots from the flash a cut there leaves and must show: no uplink
counter reused, every profile row equal to what the simulated load
produced and at most the row being written missing, the downlink replay
top and the session not gone back and every accepted request refused, the
outbox holding exactly its entries from before or after the operation
under way. Then it must go on: a new session and a fresh request served.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "mpy"))

import mpytest_power_loss as pl  # noqa: E402

DAYS = 3
STEPS = DAYS * 96 * 3  # 300 s steps


@pytest.fixture(scope="module")
def full_sweep():
    t0 = time.monotonic()
    life, steps, checks, seen = pl.sweep(STEPS, 2, sample=29)
    return life, steps, checks, seen, time.monotonic() - t0


def test_power_loss_at_every_write_step(full_sweep) -> None:
    life, steps, checks, _, took = full_sweep
    m = life.meter
    closed = m.profile.last - pl.T0 // pl.PERIOD
    print(f"\npower loss: {steps} write steps, {checks} cuts checked in {took:.1f} s; "
          f"{closed} intervals closed, {len(life.sealed)} messages sealed, "
          f"{len(life.accepted)} requests accepted, outbox generation {life.ob.gen}, "
          f"{life.ob.dropped} entries dropped")
    assert checks >= steps
    assert closed >= 280  # crosses the segment boundaries at +16, +112 and +208
    assert len(life.sealed) >= 4 * 32  # several counter blocks
    assert life.ob.dropped > 0  # the outbox overflowed while the broker was away
    assert life.ob.gen >= 3  # and was compacted along the way
    assert m.state.session >= DAYS * 96 * 3 // 40


def test_power_loss_plain_cuts_match_the_sweep(full_sweep) -> None:
    """Rerun to the cut for a sample of write steps: the flash a real power
    cut leaves is the flash the sweep checked."""
    _, _, _, seen, _ = full_sweep
    assert len(seen) >= 40
    assert pl.cut_runs(STEPS, seen) >= 200


def test_power_loss_flash_writes_per_day() -> None:
    writes, nbytes = pl.writes_per_day()
    print(f"\nflash writes per simulated day (96 intervals, 4 current reads, 1 daily interval "
          f"read, 1 reconnect): {writes} write calls, {nbytes} bytes "
          f"(budget {pl.WRITES_PER_DAY_BUDGET} calls, {pl.BYTES_PER_DAY_BUDGET} bytes)")
    assert writes <= pl.WRITES_PER_DAY_BUDGET
    assert nbytes <= pl.BYTES_PER_DAY_BUDGET
    assert writes >= 96  # every interval is one append, never fewer


def test_power_loss_a_cut_flash_cuts() -> None:
    """The stand-in flash itself: a cut keeps a prefix and raises."""
    f = pl.CutFlash(cut_at=2, keep=3)
    f.append("x", b"abcdef")
    with pytest.raises(pl.PowerCut):
        f.append("x", b"ghijkl")
    assert f.files["x"] == b"abcdefghi"
    f = pl.CutFlash(cut_at=1, keep=2)
    with pytest.raises(pl.PowerCut):
        f.write("y", b"hello")
    assert f.files["y"] == b"he"
    f = pl.CutFlash({"z": b"1"}, cut_at=1)
    with pytest.raises(pl.PowerCut):
        f.remove("z")
    assert f.files == {"z": b"1"}
