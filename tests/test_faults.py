"""Exactly-once under faults: every interval reading each meter produced is
in the head-end's store once, with the value the meter measured, after each
fault below was applied mid-stream under steady load from 210 meters (two
aggregating DAPs with 80 and 70 meters, 60 direct meters):

1. kill -9 of a DAP holding a partly filled aggregation buffer, then restart;
2. a broker restart;
3. the head-end stopped for a while, then restarted on the same store and
   client id (while a second, request-only head-end keeps the DAPs busy, so
   their disk queues grow and then drain);
4. meters rebooting mid-window (before their response's PUBACK, and while
   the DAP buffers their response);
5. a slow head-end behind Mosquitto with its default queue limits (the
   broker drops messages; gap detection and re-reads recover them).

Each runs on both brokers where it applies. The rig is tests/faults.py;
each case prints one row of the table at the end of the module (pytest -s
not needed: it goes to the terminal summary).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from firmware.meter import Meter
from firmware.metrology import SimulatedLoad
from headend.ingest import Batch, Ingest
from headend.service import HeadEnd
from headend.store import Store
from shared import gateway
from shared.backend import DEFAULT
from shared.channel import Channel
from shared.const import DOWN, T_INTERVAL
from shared.hostmqtt import BrokerSettings
from sim.fleet import MemoryFlash
from tests.brokers import KINDS
from tests.faults import (
    SIM_START,
    MeterLostOffline,
    Report,
    Requester,
    Rig,
    RigConfig,
    kill_dap_mid_buffer,
    processes_of,
    rate,
    replay_bundle,
    restart_broker,
    verify,
)
from tests.waits import wait_until

CONVERGE_TIMEOUT = 240.0  # real seconds; generous: nothing here asserts a duration


@pytest.fixture(scope="module")
def table(request: pytest.FixtureRequest) -> Iterator[list[Report]]:
    rows: list[Report] = []
    yield rows
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    if not rows:
        return
    lines = ["", "exactly-once under faults (succ@f: read success right after the fault; "
             "dropped: Mosquitto $SYS publish/messages/dropped)", Report.HEADER]
    lines += [r.line() for r in rows]
    for r in rows:
        for n in r.notes:
            lines.append(f"  {r.case}/{r.broker}: {n}")
    text = "\n".join(lines)
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        if tr is not None:
            tr.write_line(text)
        else:
            print(text)
    out = os.environ.get("FAULTS_REPORT")
    if out:
        Path(out).write_text(json.dumps([r.__dict__ for r in rows], indent=1, default=str))


@contextmanager
def case(tmp_path: Path, kind: str, name: str, table: list[Report], **cfg) -> Iterator[
        tuple[Rig, Report]]:
    t0 = time.monotonic()
    report = Report(name, kind)
    rig = Rig(tmp_path, RigConfig(kind=kind, **cfg))
    try:
        yield rig, report
    except MeterLostOffline as e:
        report.outcome = f"FAILED: a connected meter held offline: {str(e)[:60]}"
        raise
    except BaseException as e:
        report.outcome = f"FAILED: {type(e).__name__}: {str(e)[:200]}"
        raise
    finally:
        rig.close()
        report.case_s = time.monotonic() - t0
        table.append(report)
        left = processes_of(tmp_path)
        for line in left:  # never leave a broker or DAP of ours behind
            os.kill(int(line.split()[0]), signal.SIGKILL)
    assert not left, f"still running after the case: {left}"


def conclude(rig: Rig, report: Report) -> int:
    """After the fault: measure, converge, end the run, check exactly-once.
    Returns the end of the run (the meters closed the intervals before it)."""
    report.success_after = rate(rig.success())
    due = rig.last_closed()
    report.converge_s = rig.converge(due, CONVERGE_TIMEOUT)
    end = rig.finish()
    held, expected = rig.success()
    report.success_end = rate((held, expected))
    v = verify(rig, end)
    report.meters, report.expected, report.stored = v.meters, v.expected, v.stored
    report.lost, report.duplicated = v.lost, v.duplicated
    report.reads = rig.collect_reads()
    if rig.observer is not None and rig.observer.dropped() is not None:
        report.dropped = rig.observer.dropped()
    totals = rig.totals()
    report.notes.append(
        f"ingest: stored {totals['stored']} rows, {totals['duplicate_rows']} duplicate rows "
        f"ignored, rejected " + json.dumps({k[9:]: v for k, v in totals.items()
                                            if k.startswith("rejected:")}))
    assert v.exactly_once, f"not exactly once: {v}"
    assert held == expected, f"read success {held}/{expected} at the end, not 100 %"
    for d, p in rig.daps.items():
        wait_until(lambda p=p: p.queue_state() == {"envelopes": 0, "unbundled": 0,
                                                   "bundles": 0},
                   60, f"DAP {d}'s queue to empty (everything acknowledged)",
                   diagnose=lambda p=p: f"{p.queue_state()}\n{p.log()}")
    return end


# -- 1. kill -9 of a DAP with a partly filled buffer ------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_dap_kill9_mid_buffer(kind: str, tmp_path: Path, table: list[Report]) -> None:
    with case(tmp_path, kind, "dap-kill9", table) as (rig, report):
        rig.steady(2)
        got = kill_dap_mid_buffer(rig, dap=1, down=4.0)
        held, recovered = got["held_at_kill"], got["recovered"]
        report.notes.append(f"DAP 1 killed holding {held['unbundled']} envelopes in its buffer "
                            f"({held['envelopes']} queued, {held['bundles']} bundles unacked); "
                            f"restart recovered {recovered}")
        # What it had acknowledged to the broker survived the kill, buffer included.
        assert held["unbundled"] > 0
        assert recovered == (held["envelopes"], held["unbundled"], held["bundles"])
        conclude(rig, report)


# -- 2. broker restart ----------------------------------------------------------------------------


# After a Mosquitto restart (persistence on) the head-end gets, for most
# meters behind a DAP, the old session's will in the same bundle as the new
# session's birth; ingest applies them in arrival order, so the meter ends
# online (the two tests at the end of this file). amqtt keeps nothing across
# a restart (wills and queues included).
@pytest.mark.parametrize("kind", ["mosquitto", "amqtt"])
def test_broker_restart(kind: str, tmp_path: Path, table: list[Report]) -> None:
    with case(tmp_path, kind, "broker-restart", table) as (rig, report):
        rig.steady(2)
        restart_broker(rig, down=3.0)
        conclude(rig, report)


# -- 3. head-end down for a while, then back (same store, same client id) ------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_headend_restart(kind: str, tmp_path: Path, table: list[Report]) -> None:
    with case(tmp_path, kind, "headend-restart", table) as (rig, report):
        # Every bundle the head-end acknowledged, from its start to its stop:
        # those acks may still be on their way to the DAPs (or being applied)
        # when it is gone - amqtt has delivered one seconds late - so the
        # queues are judged only from the moment none of these bundles is left
        # in them. (Recording only from just before the stop missed an ack
        # sent earlier and delivered after it.)
        acked: dict[int, set[int]] = {d: set() for d in rig.daps}

        def record_acks(batch: Batch) -> None:
            for d, seqs in batch.acks.items():
                acked.setdefault(d, set()).update(seqs)

        assert rig.he is not None
        rig.he.on_batch = record_acks
        rig.steady(2)
        req = Requester(rig)
        samples: list[tuple[float, dict]] = []
        settled: dict[int, float] = {}
        t0 = time.monotonic()

        def while_down() -> None:
            req.tick()
            t = time.monotonic() - t0
            for d, p in rig.daps.items():  # looked at before the queue is sampled
                held = p.bundle_seqs()
                if d not in settled and held is not None and not held & acked[d]:
                    settled[d] = t
            samples.append((t, {d: p.queue_state() for d, p in rig.daps.items()}))

        try:
            rig.restart_headend(down=8.0, while_down=while_down)
        finally:
            req.stop()
        t_back = time.monotonic() - t0
        # The DAPs' queues grew while the head-end was away, and nothing left
        # them but what the head-end had acknowledged before it went: a bundle
        # is deleted only after the head-end's ack.
        for d in rig.daps:
            assert d in settled, f"DAP {d} still holds bundles the head-end acknowledged"
            depth = [s[d]["envelopes"] for t, s in samples if t >= settled[d] and s[d]]
            assert depth and max(depth) > depth[0], f"DAP {d}'s queue did not grow: {depth}"
            assert depth == sorted(depth), f"DAP {d}'s queue shrank with no head-end: {depth}"
        drain: list[tuple[float, dict]] = []

        def drained() -> bool:
            drain.append((time.monotonic() - t0, {d: p.queue_state()
                                                  for d, p in rig.daps.items()}))
            return all(q and q["envelopes"] == 0 for q in drain[-1][1].values())

        wait_until(drained, 60, "the DAPs' queues to drain", interval=0.1)
        t_drained = time.monotonic() - t0
        for d in rig.daps:
            down = [f"{t:.1f}:{s[d]['envelopes']}/{s[d]['bundles']}"
                    for t, s in samples[::5] if s[d]]
            up = [f"{t:.1f}:{s[d]['envelopes']}/{s[d]['bundles']}"
                  for t, s in drain[::3] + drain[-1:] if s[d]]
            report.notes.append(
                f"DAP {d} queue (real s:envelopes/unacked bundles), head-end down: "
                f"{' '.join(down)}; back at {t_back:.1f} s: {' '.join(up)}; drained "
                f"{t_drained - t_back:.1f} s after; resent "
                f"{rig.observer.state(d).get('counters', {}).get('resent')}")
        end = conclude(rig, report)
        # Every current read the request-only head-end sent while the
        # ingesting one was down was answered and stored once it was back.
        statuses = {rig.store.request_status(r, m) for r, m in req.requests()}
        assert statuses == {"answered"}, statuses

        # A redelivered bundle stores nothing twice, and is counted as a
        # duplicate, not as an attack: the last bundle DAP 1 sent, published
        # again to a freshly restarted head-end (its windows come from the
        # store), with everything else quiet.
        payload = rig.observer.last_bundle(1)
        assert payload is not None
        _, _, seq, envs = gateway.decode(DEFAULT, payload)
        rig.restart_headend(down=0.5)
        rows = rig.store.reading_count()
        before = dict(rig.he.ingest.totals)
        replay_bundle(rig, 1, payload)
        wait_until(lambda: rig.he.ingest.totals["rejected:duplicate"]
                   - before.get("rejected:duplicate", 0) >= len(envs), 30,
                   "the replayed bundle to be ingested")
        time.sleep(0.5)
        after = dict(rig.he.ingest.totals)
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        delta = {k: v for k, v in delta.items() if v}
        report.notes.append(f"bundle {seq} ({len(envs)} envelopes) replayed: {delta}")
        assert delta == {"rejected:duplicate": len(envs)}, delta
        assert rig.store.reading_count() == rows
        assert verify(rig, end).exactly_once


# -- 4. meters rebooting mid-window --------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_meter_reboots(kind: str, tmp_path: Path, table: list[Report]) -> None:
    with case(tmp_path, kind, "meter-reboot", table) as (rig, report):
        rig.steady(2)
        fleet = rig.fleet
        # Rebooted the moment they produce a response: it is in the outbox
        # (on flash) and not yet acknowledged by the broker.
        early = [1003, 1040, 1077, 2005, 2050, 3002, 3031, 3059]
        armed = set(early)
        caught: dict[int, dict] = {}

        def on_response(m, wire: bytes) -> None:
            if m.id not in armed:
                return
            armed.discard(m.id)
            ch = Channel(DEFAULT, m.core.channel.key, m.id, DOWN, None)
            _, _, body = ch.unseal(wire)
            caught[m.id] = {"request": body[0], "session": m.core.state.session}
            fleet.reboot(m.id)
            fleet.call(lambda m=m: caught[m.id].update(outbox=len(m.outbox),
                                                       booted=m.core.state.session))

        fleet.on_response = on_response
        try:
            wait_until(lambda: not armed and len(caught) == len(early)
                       and all("outbox" in c for c in caught.values()), 60,
                       "the armed meters to answer and reboot")
        finally:
            fleet.on_response = None
        # Rebooted while DAP 2 buffers their responses (acknowledged by the
        # broker, in the DAP's aggregation window).
        late = [2011, 2022, 2033, 2044, 2066]
        p = rig.daps[2]
        wait_until(lambda: (q := p.queue_state()) is not None and q["unbundled"] > 0, 60,
                   "DAP 2 to buffer responses", interval=0.01)
        for m in late:
            fleet.reboot(m)
        survived = {m: c["outbox"] for m, c in caught.items()}
        report.notes.append(f"rebooted before PUBACK (outbox entries after boot): {survived}; "
                            f"rebooted while buffered at DAP 2: {late}")
        # The meter's outbox survives a reboot: the unacknowledged response
        # is still there after boot, and is sent once the meter is back.
        assert all(n >= 1 for n in survived.values()), survived
        wait_until(lambda: all(len(fleet.meters[m].outbox) == 0 for m in early), 60,
                   "the rebooted meters' outboxes to empty")
        # ...and the responses that were in the outboxes reached the head-end.
        wait_until(lambda: all(rig.store.request_status(c["request"], m) == "answered"
                               for m, c in caught.items()), 60,
                   "the head-end to store the responses kept in the outboxes",
                   diagnose=lambda: str({m: rig.store.request_status(c["request"], m)
                                         for m, c in caught.items()}))
        assert all(fleet.meters[m].core.state.session > c["session"] for m, c in caught.items())
        conclude(rig, report)


# -- 5. slow head-end, Mosquitto with its default queue limits ------------------------------------


def test_slow_headend_default_queue_limits(tmp_path: Path, table: list[Report]) -> None:
    # retries=0: every request is sent once, so one that ends unanswered is
    # one whose response the broker dropped (and only a re-read recovers it)
    with case(tmp_path, "mosquitto", "slow-headend", table, default_queue_limits=True,
              retries=0) as (rig, report):
        rig.steady(2)
        obs = rig.observer
        base = obs.dropped() or 0
        # Which interval requests the direct meters answered (their responses
        # go to the head-end one message each, so the broker's drops hit them).
        answered: set[tuple[int, int]] = set()
        direct = set(rig.cfg.direct)

        def on_response(m, wire: bytes) -> None:
            if m.id in direct:
                mtype, _, body = Channel(DEFAULT, m.core.channel.key, m.id, DOWN,
                                         None).unseal(wire)
                if mtype == T_INTERVAL:
                    answered.add((body[0], m.id))

        rig.fleet.on_response = on_response
        rig.he.delay_per_message = 0.5
        t0 = time.monotonic()
        try:
            wait_until(lambda: (obs.dropped() or 0) >= base + 100, 180,
                       "Mosquitto to drop 100 messages for the slow head-end")
        finally:
            rig.he.delay_per_message = 0.0
        slow = time.monotonic() - t0
        dropped = (obs.dropped() or 0) - base
        log = rig.broker.log_path.read_text(errors="replace")
        assert "Outgoing messages are being dropped for client headend" in log
        conclude(rig, report)
        rig.fleet.on_response = None
        # A response the meter sent (the broker acknowledged it: it left the
        # outbox) for a request still not answered at the end never reached
        # the head-end: the broker dropped it. Its intervals are stored all
        # the same (verified above): gap detection read them again.
        lost = sorted((m, r) for r, m in answered
                      if rig.store.request_status(r, m) != "answered")
        resent = sum(int(obs.state(d).get("counters", {}).get("resent", 0)) for d in rig.daps)
        report.notes.append(
            f"slow for {slow:.0f} s (0.5 s per message); the broker dropped "
            f"{dropped} messages by then, {report.dropped} in all; {len(lost)} interval "
            f"responses of direct meters never arrived and were re-read, e.g. {lost[:5]}; "
            f"DAP bundles re-sent: {resent}")
        assert lost, "no response of a direct meter was dropped: nothing was recovered by re-reads"


# -- the will/birth order of a broker restart, on its own ----------------------------------------


def _meter_in_session_1(tmp_path: Path) -> tuple[Store, Meter, Ingest, bytes]:
    """Meter 7, known to a fresh store, whose first birth was ingested:
    (store, meter, ingest, the will of that session)."""
    he_sk, m_sk = PrivateKey.generate(), PrivateKey.generate()
    store = Store(tmp_path / "headend.db")
    store.add_meters([(7, bytes(m_sk.public_key), None, None, 900)])
    meter = Meter(7, DEFAULT.beforenm(bytes(he_sk.public_key), bytes(m_sk)), DEFAULT,
                  MemoryFlash(), SimulatedLoad(7), 900)
    meter.catch_up(SIM_START)
    ingest = Ingest(store, bytes(he_sk))
    will1, birth1 = meter.connect(SIM_START, os.urandom)
    ingest.process([("m7/up", birth1)], SIM_START)
    return store, meter, ingest, will1


def test_will_then_next_birth_in_one_batch_leaves_meter_online(tmp_path: Path) -> None:
    """A meter's connection drops (the broker publishes its sealed will) and
    it reconnects at once (a new session, a new birth). Both arrive in one
    ingest batch, will first, as they do in one DAP bundle. The meter is
    connected: the head-end must hold it online, in its new session."""
    store, meter, ingest, will1 = _meter_in_session_1(tmp_path)
    assert store.db.execute("SELECT session, online FROM meters").fetchone() == (1, 1)
    _, birth2 = meter.connect(SIM_START + 60, os.urandom)
    batch = ingest.process([("m7/up", will1), ("m7/up", birth2)], SIM_START + 60)
    assert batch.accepted == 2 and [b[2] for b in batch.births] == [2]
    assert store.db.execute("SELECT session, online FROM meters").fetchone() == (2, 1)


def test_will_and_next_birth_in_separate_batches_leave_meter_online(tmp_path: Path) -> None:
    """The same messages one batch apart: the meter ends up online (the
    control for the test above)."""
    store, meter, ingest, will1 = _meter_in_session_1(tmp_path)
    _, birth2 = meter.connect(SIM_START + 60, os.urandom)
    ingest.process([("m7/up", will1)], SIM_START + 60)
    ingest.process([("m7/up", birth2)], SIM_START + 60)
    assert store.db.execute("SELECT session, online FROM meters").fetchone() == (2, 1)


# -- the slow head-end's knob (headend/service.py) -----------------------------------------------


def test_slow_headend_delay_can_be_lifted_and_stopped(tmp_path: Path) -> None:
    """HeadEnd(delay_per_message=...) slows ingest down by that much per
    message of a batch. Lifting the delay takes effect at once (it used to
    be one time.sleep for the whole batch: behind Mosquitto a batch held
    hundreds of messages, so the head-end stayed 'slow' for minutes after
    the fault was over), and stop() ends the ingest thread at once, leaving
    the batch unacknowledged for the broker to redeliver."""
    Store(tmp_path / "headend.db").close()
    he = HeadEnd(tmp_path / "headend.db", bytes(32), BrokerSettings(), delay_per_message=100.0)
    t = threading.Thread(target=he._ingest_loop, daemon=True)
    he._threads.append(t)
    t.start()
    he._inbox.put((1, 0, "m1/up", b"not an envelope"))
    time.sleep(0.5)
    assert he.acked == 0  # still being slow
    he.delay_per_message = 0.0
    wait_until(lambda: he.acked == 1, 10, "the batch once the delay is lifted")
    he.delay_per_message = 100.0
    he._inbox.put((2, 0, "m1/up", b"not an envelope either"))
    time.sleep(0.3)
    he.stop()
    assert not t.is_alive(), "stop() left the ingest thread sleeping"
    assert he.acked == 1  # the second batch was not processed, nor acknowledged
