"""The DAP's disk queue (dap/queue.py): persistence across reopen and
kill -9, sequence numbers never reused, deletion on ack, the budget."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dap.errors import QueueError
from dap.queue import ENTRY_OVERHEAD, DiskQueue, entry_size

REPO = Path(__file__).resolve().parent.parent


def env(n: int, size: int = 100) -> bytes:
    """A fake envelope with a distinct header (meter hint + nonce)."""
    head = bytes([0x11]) + (n % 1000).to_bytes(4, "big") + n.to_bytes(24, "big")
    return head + bytes(size - len(head))


@pytest.fixture
def qpath(tmp_path: Path) -> Path:
    return tmp_path / "state" / "queue.sqlite3"


def open_q(path: Path, budget: int = 1 << 20, **kw) -> DiskQueue:
    return DiskQueue(path, budget, **kw)


def test_put_commit_reopen(qpath):
    q = open_q(qpath)
    ids = [q.put(env(i), 1000.0 + i, None if i % 2 else 2000.0) for i in range(5)]
    assert all(isinstance(i, int) for i in ids)
    q.commit()
    assert q.depth == 5 and q.bytes == sum(entry_size(env(i)) for i in range(5))
    q.close()
    q = open_q(qpath)
    pend = q.unbundled()
    assert [p.env for p in pend] == [env(i) for i in range(5)]
    assert pend[0].flush_by == 2000.0 and pend[1].flush_by is None
    assert pend[3].received == 1003.0
    assert q.depth == 5 and q.bytes == 5 * (100 + ENTRY_OVERHEAD)
    q.close()


def test_uncommitted_is_lost_on_reopen(qpath):
    q = open_q(qpath)
    q.put(env(1), 0.0)
    q.commit()
    q.put(env(2), 0.0)
    q.close()  # without commit: as a crash before the commit
    q = open_q(qpath)
    assert [p.env for p in q.unbundled()] == [env(1)]
    q.close()


def test_duplicate_envelope_stored_once(qpath):
    """A broker redelivery of an envelope stored recently is recognised:
    in the same run (even after its bundle was acked and deleted) and after
    a reopen (while it is still queued)."""
    q = open_q(qpath)
    i = q.put(env(1), 0.0)
    assert i is not None
    assert q.put(env(1), 0.0) is None
    q.commit()
    assert q.depth == 1
    s = q.bundle([(i, env(1))], 0.0, 1.0)
    q.ack([[s, s]])
    q.commit()
    assert q.depth == 0 and q.put(env(1), 0.0) is None
    q.put(env(2), 0.0)
    q.commit()
    q.close()
    q = open_q(qpath)
    assert q.put(env(2), 0.0) is None
    assert q.put(env(3), 0.0) is not None
    q.commit()
    assert q.depth == 2
    q.close()


def test_dedup_window_is_bounded(qpath, monkeypatch):
    import dap.queue as dq

    monkeypatch.setattr(dq, "DEDUP_WINDOW", 3)
    q = open_q(qpath)
    for n in range(5):
        q.put(env(n), 0.0)
    assert len(q._recent) == 3
    assert q.put(env(0), 0.0) is not None  # forgotten: beyond the window
    assert q.put(env(4), 0.0) is None
    q.close()


def test_bundle_and_ack_delete(qpath):
    q = open_q(qpath)
    ids = [q.put(env(i), 0.0) for i in range(6)]
    s1 = q.bundle([(ids[0], env(0)), (ids[1], env(1))], 0.0, sent_at=5.0)
    s2 = q.bundle([(ids[2], env(2)), (ids[3], env(3))], 0.0, sent_at=5.0)
    s3 = q.bundle([(ids[4], env(4))], 0.0, sent_at=5.0)
    q.commit()
    assert s1 < s2 < s3 and q.unacked == 3
    assert q.envelopes_of(s2) == [env(2), env(3)]
    assert [p.env for p in q.unbundled()] == [env(5)]
    done = q.ack([[s1, s2]])
    q.commit()
    assert (done.bundles, done.envelopes) == (2, 4)
    assert done.bytes == 4 * entry_size(env(0))
    assert q.unacked == 1 and q.depth == 2
    assert q.envelopes_of(s1) == [] and q.envelopes_of(s3) == [env(4)]
    # Acks for unknown or already deleted bundles change nothing.
    assert q.ack([[s1, s1], [0, 0], [s3 + 100, (1 << 64) - 1]]).bundles == 0
    q.close()
    q = open_q(qpath)
    assert q.depth == 2 and q.unacked == 1
    assert q.ack([[0, (1 << 64) - 1]]).bundles == 1
    q.commit()
    assert q.depth == 1 and q.unacked == 0
    q.close()


def test_seq_never_reused_across_reopen(qpath):
    q = open_q(qpath)
    i = q.put(env(1), 0.0)
    s1 = q.bundle([(i, env(1))], 0.0, 1.0)
    q.commit()
    q.ack([[s1, s1]])
    q.commit()
    # Allocated but not committed: the number is still never handed out twice
    # by this process, and after a reopen the persisted counter is used.
    j = q.put(env(2), 0.0)
    s2 = q.bundle([(j, env(2))], 0.0, 1.0)
    assert s2 == s1 + 1
    q.close()
    q = open_q(qpath)
    k = q.put(env(3), 0.0)
    s3 = q.bundle([(k, env(3))], 0.0, 1.0)
    q.commit()
    assert s3 > s1  # the queue is empty of bundles, yet numbers go on
    q.close()
    q = open_q(qpath)
    assert q.next_seq > s3
    q.close()


def test_new_queue_starts_sequence_at_the_clock(qpath):
    import time

    q = open_q(qpath)
    assert q.next_seq >= int(time.time() * 1e6) - 10_000_000
    q.close()


def test_seq_survives_kill_9(qpath):
    """A child process commits bundles and is killed with SIGKILL; the next
    open hands out only larger numbers and keeps every committed envelope."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from dap.queue import DiskQueue
        from tests.test_dap_queue import env
        q = DiskQueue({str(qpath)!r}, 1 << 20)
        seqs = []
        for n in range(20):
            i = q.put(env(n), 0.0)
            if n % 3 == 0:
                seqs.append(q.bundle([(i, env(n))], 0.0, 1.0))
            q.commit()
        q.put(env(99), 0.0)  # never committed
        print(max(seqs), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert r.returncode == -9, r.stderr
    top = int(r.stdout.strip())
    q = open_q(qpath)
    assert q.next_seq > top
    assert q.depth == 20 and q.unacked == 7
    assert len(q.unbundled()) == 13
    assert env(99) not in [p.env for p in q.unbundled()]
    # Every unacked bundle is due for a re-send after the restart, oldest first.
    due = q.due(before=0.0, limit=100)
    assert [s for s, _ in due] == sorted(s for s, _ in due) and len(due) == 7
    assert all(attempts == 1 for _, attempts in due)
    q.close()


def test_resend_order_and_marking(qpath):
    q = open_q(qpath)
    seqs = []
    for n in range(4):
        i = q.put(env(n), 0.0)
        seqs.append(q.bundle([(i, env(n))], 0.0, sent_at=10.0 + n if n else 0.0))
    q.commit()
    # Never sent first, then by send time; only those sent at or before `before`.
    assert [s for s, _ in q.due(before=11.5, limit=10)] == [seqs[0], seqs[1]]
    assert q.due(before=11.5, limit=10)[0][1] == 0  # never sent: attempts 0
    assert [s for s, _ in q.due(before=100, limit=2)] == seqs[:2]
    q.mark_sent(seqs[0], 50.0)
    q.commit()
    assert [s for s, _ in q.due(before=100, limit=10)] == seqs[1:] + [seqs[0]]
    q.close()


def test_budget_and_warning(qpath):
    budget = 10 * entry_size(env(0))
    q = open_q(qpath, budget=budget, warn_fraction=0.5)
    for n in range(4):
        assert q.has_room(env(n))
        q.put(env(n), 0.0)
    assert not q.warning
    q.put(env(4), 0.0)
    assert q.warning and q.fill == 0.5
    for n in range(5, 10):
        assert q.has_room(env(n))
        q.put(env(n), 0.0)
    assert not q.has_room(env(10))
    q.commit()
    q.close()
    q = open_q(qpath, budget=budget, warn_fraction=0.5)
    assert not q.has_room(env(10)) and q.warning
    ids = [p.id for p in q.unbundled()]
    s = q.bundle([(i, b"x" * 100) for i in ids], 0.0, 1.0)
    q.ack([[s, s]])
    q.commit()
    assert q.has_room(env(10)) and not q.warning and q.bytes == 0
    q.close()


def test_rollback_restores_counters(qpath):
    q = open_q(qpath)
    q.put(env(1), 0.0)
    q.commit()
    q.put(env(2), 0.0)
    assert q.depth == 2
    q.rollback()
    assert q.depth == 1
    q.close()


def test_second_process_refused(qpath):
    q = open_q(qpath)
    try:
        with pytest.raises(QueueError, match="another DAP"):
            open_q(qpath)
    finally:
        q.close()
    open_q(qpath).close()  # free again once closed


def test_unwritable_state_dir(tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        with pytest.raises(QueueError, match="state_dir"):
            open_q(blocker / "queue.sqlite3")
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(QueueError, match="state_dir"):
            open_q(ro / "sub" / "queue.sqlite3")


def test_wal_mode(qpath):
    q = open_q(qpath)
    assert q.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert q.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    q.close()
    q = open_q(qpath, sync="normal")
    assert q.db.execute("PRAGMA synchronous").fetchone()[0] == 1
    q.close()
