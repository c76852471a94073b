"""Several head-end ingest workers on one store (docs/scaling.md, "Past one
process"): `[ingest] workers = N` in headend.toml, `headend serve` plus
`headend serve --worker K`, all on the shared subscription
$share/headend/+/up, so Mosquitto hands each uplink to one of them.

Each worker caches the meters' replay state. A meter's messages reach
either worker, so a worker must never trust a window the other one may
have moved: Ingest re-reads the batch's windows under the write lock
whenever another connection has committed (Ingest._refresh). The first
tests hold two Ingest objects on one SQLite file to exactly that, with the
replays a malicious DAP would send; the last ones run the real CLI
processes on real brokers."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from firmware.flash import Flash
from headend import provision
from headend.ingest import Ingest
from headend.store import Store
from shared import gateway, topics
from shared.backend import NATIVE
from shared.channel import Channel
from shared.const import T_BIRTH, T_CURRENT, T_DEATH, T_STATUS, UP
from sim.fleet import Fleet
from sim.procs import Proc
from tests.brokers import start_broker
from tests.dap_helpers import Counter, close, connect, headend_cli
from tests.waits import wait_until

ROOT = Path(__file__).resolve().parent.parent
T = 1767229200


class Meter:
    """One meter's sealing side, with its own counter."""

    def __init__(self, meter: int, he: PrivateKey, sk: PrivateKey) -> None:
        self.ch = Channel(NATIVE, NATIVE.beforenm(bytes(he.public_key), bytes(sk)), meter, UP,
                          Counter(1))

    def seal(self, mtype: int, body: list) -> bytes:
        return self.ch.seal(mtype, body, os.urandom(24))[1]

    def reading(self, req: int, wh: int) -> bytes:
        return self.seal(T_CURRENT, [req, T + req, [1, wh, 2, 0, 3, 100, 4, 2301]])


@pytest.fixture
def two_workers(tmp_path: Path):
    """Meters 1-3 behind DAP 1, and two ingest workers (each an Ingest with
    its own connection) on one store file."""
    he = PrivateKey.generate()
    secrets = {m: PrivateKey.generate() for m in (1, 2, 3)}
    db = tmp_path / "headend.db"
    setup = Store(db)
    setup.add_dap(1, "aggregate")
    setup.add_meters([(m, bytes(sk.public_key), 1, 1, 900) for m, sk in secrets.items()])
    setup.add_requests([(r, m, "current", "B", None, None, 0, 0, 0.0)
                        for r in range(1, 10) for m in secrets])
    a, b = Ingest(Store(db), bytes(he), NATIVE), Ingest(Store(db), bytes(he), NATIVE)
    meters = {m: Meter(m, he, sk) for m, sk in secrets.items()}
    yield a, b, meters, setup
    for s in (a.store, b.store, setup):
        s.close()


seq = iter(range(1, 10**6))


def via_dap(*envs: bytes) -> list[tuple[str, bytes]]:
    return [(topics.dap_up(1), gateway.bundle(NATIVE, 1, next(seq), list(envs)))]


def test_a_reading_replayed_to_the_other_worker_is_refused(two_workers) -> None:
    a, b, meters, store = two_workers
    m1 = meters[1]
    first, second = m1.reading(1, 1000), m1.reading(2, 1010)
    assert b.process(via_dap(first), T).accepted == 1  # b caches meter 1's window
    assert a.process(via_dap(second), T).accepted == 1  # a moves it; b's copy is old
    replay = b.process(via_dap(second), T)  # the DAP sends a's envelope again, to b
    assert replay.accepted == 0 and dict(replay.rejected) == {"duplicate": 1}
    assert replay.answers == [] and replay.stored == 0
    # and the other way round, after b took the meter's next reading
    third = m1.reading(3, 1020)
    assert b.process(via_dap(third), T).accepted == 1
    again = a.process(via_dap(third, first), T)
    assert again.accepted == 0 and dict(again.rejected) == {"duplicate": 2}
    assert store.counts()["accepted"] == 3
    assert [r[2] for r in store.readings(1, 1)] == [1000, 1010, 1020]


def test_a_replayed_will_cannot_take_a_meter_offline_through_the_other_worker(
        two_workers) -> None:
    """The will of an old session, replayed to the worker whose cache still
    holds that session, must not mark the reconnected meter offline."""
    a, b, meters, store = two_workers
    m2 = meters[2]

    def state() -> tuple:
        return store.db.execute("SELECT session, online FROM meters WHERE meter = 2").fetchone()

    # each session: the meter seals its will (the broker holds it), then its
    # birth, which names the will's counter
    will_ctr, will = m2.ch.seal(T_DEATH, [1, 0], os.urandom(24))
    birth1 = m2.seal(T_BIRTH, [1, will_ctr, T, 900, T - 86400])
    assert b.process(via_dap(birth1), T).accepted == 1  # b caches session 1, its will pending
    assert state() == (1, 1)
    # the connection drops: the broker publishes the will; the meter comes back
    assert a.process(via_dap(will), T + 60).accepted == 1
    assert state() == (1, 0)
    will2_ctr, _ = m2.ch.seal(T_DEATH, [2, 0], os.urandom(24))
    birth2 = m2.seal(T_BIRTH, [2, will2_ctr, T + 61, 900, T - 86400])
    assert a.process(via_dap(birth2), T + 61).accepted == 1
    assert state() == (2, 1)
    replay = b.process(via_dap(will), T + 62)
    assert replay.accepted == 0 and replay.deaths == []
    assert sum(replay.rejected.values()) == 1
    assert state() == (2, 1)


def test_a_status_replayed_across_workers_does_not_count_twice(two_workers) -> None:
    a, b, meters, store = two_workers
    m3 = meters[3]
    warm = m3.reading(4, 500)
    assert a.process(via_dap(warm), T).accepted == 1
    assert b.process(via_dap(m3.reading(5, 510)), T).accepted == 1
    status = m3.seal(T_STATUS, [6, 1, 0])  # request 6: no data
    assert b.process(via_dap(status), T).answers == [(6, 3, "no-data")]
    again = a.process(via_dap(status), T)
    assert again.answers == [] and dict(again.rejected) == {"duplicate": 1}
    assert store.counts()["accepted"] == 3


def test_an_envelope_refused_by_its_replay_check_stores_nothing(two_workers) -> None:
    """Rows are staged before the replay checks; an envelope that fails its
    check inside the transaction must leave none of its rows behind."""
    a, _, meters, store = two_workers
    m1 = meters[1]
    late = m1.reading(1, 111)  # counter 1, held back by the DAP
    m1.ch.counter.value = 100
    assert a.process(via_dap(m1.reading(2, 222)), T).accepted == 1
    batch = a.process(via_dap(m1.reading(3, 333), late), T)
    assert batch.accepted == 1 and dict(batch.rejected) == {"stale": 1}
    assert batch.stored == 4 and batch.duplicate_rows == 0
    assert [r[2] for r in store.readings(1, 1)] == [222, 333]


def test_a_prepared_batch_is_checked_for_replays_only_when_committed(two_workers) -> None:
    """Ingest.process is prepare() then commit(). prepare() opens and checks
    with nothing written and no window moved, so the replay check belongs
    to commit(): a batch prepared before the other worker stored the same
    envelope is refused when it is committed, and stores nothing."""
    a, b, meters, store = two_workers
    env = meters[1].reading(1, 111)
    prepared = a.prepare(via_dap(env), T)
    assert len(prepared.opened) == 1 and prepared.batch.accepted == 0
    assert store.reading_count() == 0 and store.counts() == {}
    assert a.channel(1)[0].window.state() == (-1, 0)
    assert b.process(via_dap(env), T).accepted == 1  # the other worker, meanwhile
    batch = a.commit(prepared)
    assert batch.accepted == 0 and dict(batch.rejected) == {"duplicate": 1}
    assert batch.stored == 0 and store.reading_count() == 4
    assert store.counts()["accepted"] == 1


def test_staging_waits_for_no_other_writer(two_workers) -> None:
    """A worker stages its batch's rows while another holds the write lock
    (the staging table is private to its connection): only the short
    transaction that follows waits."""
    a, b, meters, store = two_workers
    done = threading.Event()
    t = threading.Thread(target=lambda: (a.store.stage_readings([(1, 1, T, 5, 0, T, 1)]),
                                         done.set()))
    with b.store.transaction():
        t.start()
        staged = done.wait(20)
    t.join(30)  # the lock is released: done either way, before the stores close
    assert staged, "staging waited for the other connection's write lock"


def test_a_worker_alone_reads_no_window_twice(two_workers) -> None:
    """While no other connection commits, a worker's cache is the store:
    the windows are not read again for every batch (the fast path)."""
    a, _, meters, store = two_workers
    reads = []
    orig = a.store.channel_states
    a.store.channel_states = lambda db, ms: reads.append(sorted(ms)) or orig(db, ms)
    a.process(via_dap(*(m.reading(1, 1) for m in meters.values())), T)
    a.process(via_dap(*(m.reading(2, 2) for m in meters.values())), T)
    assert reads == [[1, 2, 3]]  # loaded once, inside the first batch's transaction
    store.add_requests([(99, 1, "current", "B", None, None, 0, 0, 0.0)])  # another connection
    a.process(via_dap(meters[1].reading(3, 3)), T)
    assert reads == [[1, 2, 3], [1]]


def test_a_failed_commit_leaves_no_window_moved(two_workers) -> None:
    """A batch whose transaction fails is not remembered: its envelopes are
    accepted when the batch comes again."""
    a, _, meters, store = two_workers
    batch = via_dap(meters[1].reading(1, 7), meters[2].reading(1, 8))
    orig = a.store.add_staged_readings

    def fail(db):
        raise OSError("disk full")

    a.store.add_staged_readings = fail
    with pytest.raises(OSError):
        a.process(batch, T)
    a.store.add_staged_readings = orig
    assert a.process(batch, T).accepted == 2
    assert store.counts()["accepted"] == 2


# -- the real processes -------------------------------------------------------------------------


def _site(tmp_path: Path, kind: str, workers: int, meters: int):
    site = tmp_path / "site"
    provision.init(site)
    provision.add_dap(site, 1, "router")
    provision.add_meters(site, list(range(1, meters + 1)), dap=1, group=1)
    broker = start_broker(kind, tmp_path / "broker", layout=provision.layout(site),
                          accounts=provision.accounts(site))
    toml = site / "headend.toml"
    text = re.sub(r"^port = \d+$", f"port = {broker.port}", toml.read_text(), flags=re.M)
    text = text.replace("workers = 1 ", f"workers = {workers} ")
    toml.write_text(text.replace("[collect]", "[collect]\nenabled = false", 1)
                    .replace("enabled = true\n", ""))
    dap_toml = site / "daps" / "d1" / "dap.toml"
    dap_toml.write_text(re.sub(r"^port = \d+$", f"port = {broker.port}", dap_toml.read_text(),
                               flags=re.M))
    return site, broker


def _serve(site: Path, tmp_path: Path, *extra: str) -> Proc:
    name = "serve" + "".join(extra).replace("-", "")
    return Proc(name, [sys.executable, "-m", "headend", "serve", "--site", str(site),
                       "--stats-interval", "0.5", *extra],
                cwd=ROOT, log=tmp_path / f"{name}.log", ready="serving")


def _accepted(proc: Proc) -> int:
    found = re.findall(r"accepted (\d+)", proc.log.read_text())
    return int(found[-1]) if found else 0


def test_two_serve_processes_share_a_dap_s_uplinks_on_mosquitto(tmp_path: Path) -> None:
    """`serve` and `serve --worker 1` with workers = 2, a router DAP and 24
    meters: every group read is answered, both workers took a share of the
    responses, and every response replayed by the DAP's account (a
    malicious DAP) is refused as a duplicate, whichever worker it reached."""
    site, broker = _site(tmp_path, "mosquitto", 2, 24)
    procs: list[Proc] = []
    fleet = spy = None
    try:
        procs.append(_serve(site, tmp_path))
        procs.append(_serve(site, tmp_path, "--worker", "1"))
        home = site / "daps" / "d1"
        procs.append(Proc("dap", [sys.executable, "-m", "dap", "--config", str(home / "dap.toml")],
                          cwd=home, log=tmp_path / "dap.log", ready="connected to the broker"))
        fleet = Fleet(host=broker.host, port=broker.port)
        for p in sorted((site / "meters").glob("m*/meter.json")):
            fleet.add(p.read_text(), Flash(str(p.parent / "flash")), history_days=1,
                      base=p.parent)
        fleet.start()
        store = Store(site / "headend.db")
        wait_until(lambda: store.online_count() == 24, 60, "24 meters online")
        ups: list[bytes] = []
        spy = connect(broker.host, broker.port, "spy",
                      lambda c, u, m: ups.append(bytes(m.payload)), (topics.dap_up(1),),
                      broker.accounts[topics.HEADEND])
        for _ in range(3):
            out = headend_cli("read", "--site", str(site), "--group", "1", "--json")
            assert [r["status"] for r in json.loads(out.stdout)] == ["answered"] * 24
        wait_until(lambda: sum(_accepted(p) for p in procs[:2]) >= 72 + 24, 20,
                   "both workers' stats", diagnose=lambda: str([p.tail() for p in procs[:2]]))
        shares = [_accepted(p) for p in procs[:2]]
        assert min(shares) > 0, f"one worker took every uplink: {shares}"
        before = store.counts()
        rows = store.reading_count()
        evil = connect(broker.host, broker.port, "d1-replay",
                       account=broker.accounts[topics.dap_name(1)])
        def singles() -> list[bytes]:
            return [p for p in list(ups) if len(gateway.decode(NATIVE, p)[3]) == 1]

        # the spy's own thread may still be behind the workers
        wait_until(lambda: len(singles()) >= 72, 30, "the spy to hold the DAP's 72 uplinks",
                   diagnose=lambda: f"{len(ups)} uplinks seen")
        replayed = singles()
        for p in replayed:
            evil.publish(topics.dap_up(1), p, qos=1).wait_for_publish(10)
        close(evil)
        wait_until(lambda: store.counts().get("rejected:duplicate", 0)
                   - before.get("rejected:duplicate", 0) >= len(replayed), 30,
                   "every replay refused", diagnose=lambda: str(store.counts()))
        after = store.counts()
        assert after["accepted"] == before["accepted"]
        assert store.reading_count() == rows
        assert all(p.alive() for p in procs)
    finally:
        if spy is not None:
            close(spy)
        if fleet is not None:
            fleet.stop()
        for p in reversed(procs):
            p.stop()
        broker.stop()


def test_workers_on_amqtt_stop_with_what_to_do(tmp_path: Path) -> None:
    """amqtt has no shared subscriptions: a head-end configured for several
    workers exits at once, saying so, instead of ingesting nothing."""
    site, broker = _site(tmp_path, "amqtt", 2, 1)
    try:
        out = headend_cli("serve", "--site", str(site), check=False)
        assert out.returncode == 1, out.stderr
        assert "shared subscriptions need Mosquitto" in out.stderr
        assert "workers = 1" in out.stderr and "Traceback" not in out.stderr
    finally:
        broker.stop()


def test_worker_numbers_are_checked_against_the_site(tmp_path: Path) -> None:
    site = tmp_path / "site"
    provision.init(site)
    out = headend_cli("serve", "--site", str(site), "--worker", "1", check=False)
    assert out.returncode == 1 and "set workers = 2 or more" in out.stderr, out.stderr
    toml = site / "headend.toml"
    toml.write_text(toml.read_text().replace("workers = 1 ", "workers = 3 "))
    out = headend_cli("serve", "--site", str(site), "--worker", "3", check=False)
    assert out.returncode == 1 and "extra ingest workers are 1 to 2" in out.stderr, out.stderr
    toml.write_text(toml.read_text().replace("workers = 3 ", "workers = 99 "))
    out = headend_cli("serve", "--site", str(site), check=False)
    assert out.returncode == 1 and "workers must be 1 to 16" in out.stderr, out.stderr
