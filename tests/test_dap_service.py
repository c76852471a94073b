"""The DAP as a subprocess (`python -m dap --config ...`) against a real
broker of each kind, with fake meters sealing real envelopes (keys made at
run time) and a fake head-end that opens, checks and acknowledges bundles.
Plus the unit-level parts of the service: config, inbound checks, no keys.

Times are never asserted: every wait is for an event, with a deadline.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dap import inbound
from dap.config import Config
from dap.errors import BadTopic, ConfigError, WrongKind
from shared import gateway, group, topics
from shared.backend import DEFAULT
from shared.const import ENV_GROUP_ITEM, K_FORWARD, T_READ_CURRENT
from shared.errors import MismatchError, ProtocolError, TooLarge
from tests.brokers import free_port
from tests.dap_helpers import (
    DapProcess,
    HeadEnd,
    Keys,
    Meters,
    run_cli,
    wait_until,
    write_config,
)

ROOT = Path(__file__).resolve().parent.parent
DAP_DIR = ROOT / "dap"


# -- fixtures -------------------------------------------------------------------


class World:
    """One broker, keys, a fake head-end, fake meters and DAP processes."""

    def __init__(self, broker, tmp: Path) -> None:
        self.broker, self.tmp = broker, tmp
        self.keys = Keys()
        self.head = HeadEnd(broker.host, broker.port, self.keys)
        self.meters = Meters(broker.host, broker.port, self.keys)
        self.daps: list[DapProcess] = []
        self.state_dir = tmp / "state"

    def dap(self, start: bool = True, **cfg) -> DapProcess:
        n = len(self.daps)
        path = write_config(self.tmp / f"dap{n}.toml", self.broker.port, self.state_dir, **cfg)
        d = DapProcess(path, self.tmp / "dap.log")
        self.daps.append(d)
        return d.start(self.head) if start else d

    def close(self) -> None:
        for d in self.daps:
            d.kill()
        self.meters.close()
        self.head.close()


@pytest.fixture
def world(open_broker, tmp_path: Path) -> Iterator[World]:
    w = World(open_broker, tmp_path)
    try:
        yield w
    finally:
        w.close()


def log_of(w: World) -> str:
    return w.daps[-1].log() if w.daps else ""


# -- unit level: no keys, config, inbound checks ----------------------------------


def test_dap_never_imports_nacl_or_touches_keys():
    """No module of dap/ imports nacl or calls a crypto entry point, and the
    backend the DAP runs with refuses every key operation."""
    crypto = {"seal", "open", "beforenm", "public_key", "PrivateKey", "PublicKey", "Box",
              "secret_key", "open_group_item", "unseal"}
    for path in DAP_DIR.glob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "nacl" for a in node.names), path
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "nacl", path
                assert node.module not in ("shared.channel", "shared.box", "shared.x25519"), path
            if isinstance(node, ast.Attribute) and node.attr in crypto:
                if isinstance(node.value, ast.Name) and node.value.id == "os":
                    continue  # os.open: files, not boxes
                pytest.fail(f"{path.name}:{node.lineno} uses .{node.attr}")
    for op in (inbound.CBOR.seal, inbound.CBOR.open, inbound.CBOR.beforenm,
               inbound.CBOR.public_key):
        with pytest.raises(RuntimeError, match="no keys"):
            op(b"k" * 32, b"n" * 24, b"x")


def test_example_config_is_valid_and_lists_every_option(tmp_path):
    example = DAP_DIR / "dap.example.toml"
    cfg = Config.load(example)
    assert cfg.dap == 1 and cfg.mode == "aggregate" and cfg.headend_broker is None
    text = example.read_text()
    keys = ["mode", "state_dir", "host", "port", "username", "password", "password_file",
            "tls_ca", "keepalive", "[headend_broker]", "window", "max_items", "max_bytes",
            "min_gap", "disk_budget_bytes", "warn_fraction", "drain_rate", "ack_timeout", "sync",
            "level", "stats_interval"]
    for k in keys:
        assert k in text, k
    # Uncommenting every option gives a valid file too.
    lines = []
    for line in text.splitlines():
        if line.startswith("#") and not line.startswith("# ") and line != "#":
            line = line[1:]
        lines.append(line)
    full = tmp_path / "full.toml"
    (tmp_path / "d1.secret").write_text("s3cret\n")
    (tmp_path / "d1-up.secret").write_text("s3cret\n")
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "headend-ca.crt").write_text("x")
    full.write_text("\n".join(lines))
    cfg = Config.load(full)
    assert cfg.headend_broker is not None and cfg.headend_broker.port == 8883
    assert cfg.meters_broker.password == "s3cret"


def test_min_gap_is_at_most_the_window(tmp_path):
    """A bundle is never held past its window, whatever min_gap says."""
    path = tmp_path / "dap.toml"
    for window, gap, want in ((0.2, None, 0.2), (0.5, 2, 0.5), (10, None, 0.25), (10, 3, 3.0)):
        extra = "" if gap is None else f"min_gap = {gap}\n"
        path.write_text(f"dap = 1\nstate_dir = 's'\n[meters_broker]\n[aggregate]\n"
                        f"window = {window}\n{extra}")
        assert Config.load(path).aggregate.min_gap == want


@pytest.mark.parametrize("text, words", [
    ("", ["dap is missing"]),
    ("dap = 1\nstate_dir = 's'\n", ["meters_broker is missing"]),
    ("dap = -1\nstate_dir = 's'\n[meters_broker]\n", ["dap = -1", "whole number"]),
    ("dap = 1\nmode = 'bus'\nstate_dir = 's'\n[meters_broker]\n", ["mode", '"router"']),
    ("dap = 1\nstate_dir = 's'\n[meters_broker]\nport = 70000\n", ["[meters_broker]", "port"]),
    ("dap = 1\nstate_dir = 's'\n[meters_broker]\nprot = 1\n", ["unknown broker setting", "prot"]),
    ("dap = 1\nstate_dir = 's'\n[meters_broker]\n[aggregate]\nwindw = 3\n", ["did you mean",
                                                                            "window"]),
    ("dap = 1\nstate_dir = 's'\n[meters_broker]\n[aggregate]\nwindow = 0\n", ["window = 0"]),
    ("dap = 1\nstate_dir = 's'\n[meters_broker]\n[aggregate]\nmin_gap = -0.5\n",
     ["min_gap = -0.5", "at least 0"]),
    ("dap = 1\nstate_dir = 's'\n[meters_broker]\n[aggregate]\nmax_items = 30000\n",
     ["max_items", "20000"]),
    ("dap = 1\nstate_dir = 's'\n[meters_broker]\n[queue]\nwarn_fraction = 1.5\n",
     ["warn_fraction"]),
    ("dap = 1\nstate_dir = 's'\n[meters_broker]\n[queue]\ndisk_budget_bytes = 70000\n"
     "[aggregate]\nmax_bytes = 100000\n", ["disk_budget_bytes", "max_bytes"]),
    ("dap = 1\nstate_dir = 's'\n[meters_broker]\npassword_file = 'nope'\n", ["password_file"]),
    ("dap = 1\nstate_dir = 's'\n[meters_broker]\n[log]\nlevel = 'loud'\n", ["level"]),
    ("dap = 1\nstate_dir = 's\n", ["not valid TOML"]),
])
def test_config_errors_name_the_key(tmp_path, text, words):
    path = tmp_path / "dap.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        Config.load(path)
    msg = str(e.value)
    assert str(path) in msg
    for w in words:
        assert w in msg, msg


def test_config_defaults_and_relative_paths(tmp_path):
    (tmp_path / "dap.toml").write_text("dap = 7\nmode = 'Router'\nstate_dir = 'st'\n"
                                       "[meters_broker]\nusername = 'd8'\n")
    cfg = Config.load(tmp_path / "dap.toml")
    assert cfg.mode == "router" and cfg.state_dir == tmp_path / "st"
    assert cfg.aggregate.window == 10.0 and cfg.queue.ack_timeout == 30.0
    assert cfg.warnings() and "d7" in cfg.warnings()[0]
    with pytest.raises(ConfigError, match="no such file"):
        Config.load(tmp_path / "missing.toml")


def test_inbound_checks():
    keys = Keys()
    wire = keys.meter_channel(5).seal(T_READ_CURRENT, [1, 2, 3], os.urandom(24))[1]
    assert inbound.classify(1, "d1/m5/up") == (inbound.UPLINK, 5)
    assert inbound.classify(1, "d1/req") == (inbound.REQUEST, None)
    assert inbound.classify(1, "d1/ack") == (inbound.ACK, None)
    for bad in ("d2/m5/up", "d1/x/up", "d1/m5/down", "d1/state", "m5/up", "d1/m05/up"):
        with pytest.raises(BadTopic):
            inbound.classify(1, bad)
    assert inbound.check_uplink(5, wire) == wire
    with pytest.raises(MismatchError):
        inbound.check_uplink(6, wire)
    with pytest.raises(WrongKind):
        inbound.check_uplink(5, bytes([ENV_GROUP_ITEM]) + wire[1:])
    with pytest.raises(TooLarge):
        inbound.check_uplink(5, wire + bytes(2000))
    v2 = bytes([0x21]) + wire[1:]
    item = bytes([ENV_GROUP_ITEM]) + wire[1:]
    req = inbound.request(inbound.CBOR, 1, gateway.forward(DEFAULT, 30, [v2, wire, item]))
    assert req.kind == K_FORWARD and req.tolerance == 30
    assert [(d.meter, d.topic, d.payload) for d in req.deliveries] == [(5, "d1/m5/down", wire)]
    assert req.rejected == {"version": 1, "kind": 1}
    with pytest.raises(ProtocolError):  # a wrong-size envelope fails the whole message
        inbound.request(inbound.CBOR, 1, gateway.forward(DEFAULT, 30, [wire, b"\x11short"]))
    with pytest.raises(WrongKind):
        inbound.request(inbound.CBOR, 1, gateway.ack(DEFAULT, 1, [(1, 2)]))
    with pytest.raises(MismatchError):
        inbound.ack(inbound.CBOR, 1, gateway.ack(DEFAULT, 2, [(1, 2)]))
    assert inbound.ack(inbound.CBOR, 1, gateway.ack(DEFAULT, 1, [(1, 2)])) == [[1, 2]]
    with pytest.raises(ProtocolError):
        inbound.ack(inbound.CBOR, 1, b"\xff")


# -- against real brokers -----------------------------------------------------------


def test_aggregate_mode_bundles(world):
    w = world
    w.dap(aggregate={"window": 1.0, "max_items": 10})
    sent = [w.meters.send(5 + i % 4) for i in range(25)]
    wait_until(lambda: len(w.head.envelopes()) >= 25, 30, "25 envelopes in bundles")
    assert not w.head.errors
    assert sorted(w.head.envelopes()) == sorted(sent)  # each exactly once, authentic
    sizes = [len(envs) for _, envs in w.head.bundles]
    assert max(sizes) <= 10 and len(sizes) < 25  # bundled, never over max_items
    seqs = w.head.seqs()
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # The head-end acked each bundle: the DAP deletes them.
    wait_until(lambda: w.head.counter("bundles_acked") == len(seqs)
               and w.head.counter("queue_depth") == 0, 30, "acks applied")
    st = w.head.state()["counters"]
    assert st["received"] == 25 and st["forwarded"] == 25 and st["bundles_sent"] == len(seqs)


def test_router_mode_one_bundle_per_message(world):
    w = world
    w.dap(mode="router", aggregate={"window": 60.0})
    sent = [w.meters.send(5 + i % 2) for i in range(8)]
    wait_until(lambda: len(w.head.bundles) >= 8, 30, "8 bundles")
    assert all(len(envs) == 1 for _, envs in w.head.bundles)
    assert sorted(w.head.envelopes()) == sorted(sent)
    wait_until(lambda: w.head.counter("queue_depth") == 0, 30, "acks applied")


def test_forward_delivery(world):
    w = world
    w.dap()
    r5, r6, r5b = w.head.request(5), w.head.request(6), w.head.request(5, reqid=8)
    w.head.forward([r5, r6, r5b], tolerance=60)
    wait_until(lambda: len(w.meters.downlinks()) >= 3, 30, "3 downlinks")
    assert w.meters.downlinks(5) == [r5, r5b]
    assert w.meters.downlinks(6) == [r6]
    # The meters open them with their own keys.
    ch = w.keys.meter_channel(5)
    assert ch.open(w.meters.downlinks(5)[0])[0] == T_READ_CURRENT
    wait_until(lambda: w.head.counter("requests_delivered") == 3, 30, "counter")


def test_group_fanout_to_every_member(world):
    w = world
    w.dap()
    members = [5, 6, 7, 11, 12]
    nonce, body, entries = w.head.group(42, members, tolerance=30)
    wait_until(lambda: len(w.meters.downlinks()) >= len(members), 30, "group items")
    for meter, box in entries:
        got = w.meters.downlinks(meter)
        assert got == [group.item(meter, nonce, box, body)]
        _, _, _, gid = w.keys.meter_channel(meter).open_group_item(got[0])
        assert gid == 42
    wait_until(lambda: w.head.counter("group_fanouts") == 1
               and w.head.counter("group_items") == len(members), 30, "counters")


def test_tolerance_hint_flushes_early(world):
    """With a 120 s window, a response to a request with a 1 s tolerance
    leaves long before the window ends, taking the buffer with it."""
    w = world
    w.dap(aggregate={"window": 120.0})
    early = w.meters.send(6)  # no hint: would wait for the window
    wait_until(lambda: w.head.counter("queue_depth") == 1, 30, "queued")
    time.sleep(0.5)
    assert w.head.bundles == []  # still buffered (the window is 120 s)
    w.head.forward([w.head.request(5)], tolerance=1)
    wait_until(lambda: w.meters.downlinks(5), 30, "request delivered")
    answer = w.meters.send(5)
    wait_until(lambda: w.head.bundles, 60, "a bundle before the 120 s window")
    assert sorted(w.head.envelopes()) == sorted([early, answer])


def test_late_answers_leave_together_not_one_bundle_each(world):
    """Answers to a request with tolerance 0 are due as they come. Arriving
    one by one, they leave one bundle per min_gap (2 s here), not one each:
    the DAP stays an aggregator when the meters or the broker fall behind."""
    w = world
    w.dap(aggregate={"window": 120.0, "min_gap": 2.0})
    w.head.forward([w.head.request(5), w.head.request(6)], tolerance=0)
    wait_until(lambda: w.meters.downlinks(5) and w.meters.downlinks(6), 30, "delivered")
    t0 = time.monotonic()
    sent = []
    for i in range(12):  # over ~2.4 s, each already past its flush-by time
        sent.append(w.meters.send(5 + i % 2, reqid=7))
        time.sleep(0.2)
    wait_until(lambda: len(w.head.envelopes()) == 12, 30, "every answer upstream")
    assert sorted(w.head.envelopes()) == sorted(sent)
    # one at once, then at most one per 2 s (one bundle each would be 12)
    assert 2 <= len(w.head.bundles) <= 2 + (time.monotonic() - t0) // 2.0


def test_resend_without_ack_then_delete_on_ack(world):
    w = world
    w.head.auto_ack = False
    # the bundle closes when both are in, however long the second takes
    w.dap(aggregate={"window": 60.0, "max_items": 2},
          queue={"ack_timeout": 1.0, "drain_rate": 5.0})
    sent = [w.meters.send(5), w.meters.send(6)]
    wait_until(lambda: len(w.head.bundles) >= 3, 60, "the bundle sent again")
    seqs = w.head.seqs()
    assert len(set(seqs)) == 1  # the same bundle, same number, again
    assert all(sorted(envs) == sorted(sent) for _, envs in w.head.bundles)
    wait_until(lambda: w.head.counter("resent") >= 2, 30, "resent counted")
    w.head.ack([seqs[0]])
    wait_until(lambda: w.head.counter("queue_depth") == 0
               and w.head.counter("unacked_bundles") == 0, 30, "deleted on ack")
    n = len(w.head.bundles)
    time.sleep(2.5)  # longer than ack_timeout: no further re-send
    assert len(w.head.bundles) == n


def test_kill9_recovery(world):
    """kill -9 with one bundle sent but unacknowledged and a half-full
    buffer; meters keep sending while the DAP is down. After the restart:
    every envelope arrives, and the only repeats are the re-sent bundle."""
    w = world
    w.head.auto_ack = False
    d = w.dap(aggregate={"window": 120.0, "max_items": 5})
    first = [w.meters.send(5 + i % 3) for i in range(5)]  # a full bundle: sent at once
    wait_until(lambda: len(w.head.bundles) == 1, 30, "the first bundle")
    buffered = [w.meters.send(8 + i) for i in range(3)]
    wait_until(lambda: w.head.counter("queue_depth") == 8, 30, "8 envelopes queued")
    d.kill()
    while_down = [w.meters.send(20 + i) for i in range(2)]
    w.head.auto_ack = True
    w.dap(aggregate={"window": 1.0, "max_items": 5})
    everything = first + buffered + while_down
    wait_until(lambda: set(everything) <= set(w.head.envelopes()), 60, "every envelope")
    seq0, envs0 = w.head.bundles[0]
    assert sorted(envs0) == sorted(first)
    repeats = [(s, e) for s, e in w.head.bundles[1:] if s == seq0]
    assert repeats and all(sorted(e) == sorted(first) for _, e in repeats)
    others = [(s, e) for s, e in w.head.bundles[1:] if s != seq0]
    assert all(s > seq0 for s, _ in others)
    other_envs = [x for _, e in others for x in e]
    assert sorted(other_envs) == sorted(buffered + while_down)  # nothing new duplicated
    assert not w.head.errors
    wait_until(lambda: w.head.counter("queue_depth") == 0, 30, "all acked")


def test_broker_restart(world):
    """The broker goes away and comes back: the DAP reconnects by itself
    and carries on; what it had queued is delivered."""
    w = world
    w.head.auto_ack = False
    w.dap(aggregate={"window": 0.5}, queue={"ack_timeout": 2.0})
    before = [w.meters.send(5), w.meters.send(6)]
    wait_until(lambda: set(before) <= set(w.head.envelopes()), 30, "first bundle")
    w.broker.restart()  # the bundle was never acked
    w.head.auto_ack = True
    restarted = time.time()
    wait_until(lambda: w.head.fresh_state(restarted).get("state") == "online", 60,
               "the DAP back online")
    after = [w.meters.send(7)]
    wait_until(lambda: set(before + after) <= set(w.head.envelopes()), 60, "all envelopes")
    wait_until(lambda: w.head.counter("queue_depth") == 0, 60, "all acked")
    assert w.daps[-1].running()


def test_sigterm_flushes_buffer_and_goes_offline(world):
    w = world
    d = w.dap(aggregate={"window": 120.0})
    sent = [w.meters.send(5), w.meters.send(6), w.meters.send(7)]
    wait_until(lambda: w.head.counter("queue_depth") == 3, 30, "queued")
    assert d.stop() == 0, d.log()
    # flushed on the way out (the bundle may still be with the broker if the
    # DAP's grace for the ack ran out on a slow machine)
    wait_until(lambda: sorted(w.head.envelopes()) == sorted(sent), 30, "the flushed bundle",
               diagnose=lambda: f"{len(w.head.envelopes())} of {len(sent)} envelopes")
    wait_until(lambda: w.head.state().get("state") == "offline", 30, "offline status")
    assert "stats at shutdown" in d.log()


def test_will_says_offline_after_kill(world):
    d = world.dap()
    d.kill()
    wait_until(lambda: world.head.state() == {"state": "offline"}, 60, "the last will")


def test_bad_input_on_every_topic(world):
    w = world
    w.dap()
    good = w.meters.envelope(5)
    m = w.meters
    m.publish("d1/m5/up", b"\x11\x00")  # malformed: too short
    m.publish("d1/m5/up", bytes([ENV_GROUP_ITEM]) + good[1:])  # kind
    m.publish("d1/m6/up", good)  # mismatch: m5's envelope on m6's topic
    m.publish("d1/m5/up", good + bytes(1200))  # oversized
    m.publish("d1/m5/up", bytes([0x21]) + good[1:])  # version
    m.publish("d1/x/up", good)  # topic
    m.publish("d1/m05/up", good)  # topic
    m.publish(topics.dap_req(1), b"\xff\x00")  # malformed CBOR
    m.publish(topics.dap_req(1), gateway.bundle(DEFAULT, 1, 5, [good]))  # kind
    m.publish(topics.dap_req(1), gateway.forward(DEFAULT, 5, [b"\x31" * 50]))  # version
    m.publish(topics.dap_req(1), b"")  # empty
    m.publish(topics.dap_ack(1), b"junk")  # malformed
    m.publish(topics.dap_ack(1), gateway.ack(DEFAULT, 2, [(1, 1)]))  # mismatch
    m.publish(topics.dap_ack(1), gateway.ack(DEFAULT, 1, [(1, 3)]))  # unknown seqs: ignored
    expect = {"rejected:malformed": 4, "rejected:kind": 2, "rejected:mismatch": 2,
              "rejected:oversized": 1, "rejected:version": 2, "rejected:topic": 2}

    def counted():
        c = w.head.state().get("counters", {})
        return all(c.get(k, 0) == v for k, v in expect.items())

    wait_until(counted, 30, f"rejections counted as {expect}")
    # Still running and still serving.
    m.publish("d1/m5/up", good)
    wait_until(lambda: good in w.head.envelopes(), 30, "a good envelope after the bad ones")
    assert w.daps[-1].running()
    assert w.head.counter("rejected:internal") == 0


def test_budget_full_drops_and_counts(world):
    w = world
    w.head.auto_ack = False
    w.dap(aggregate={"window": 0.2, "max_bytes": 16384},
          queue={"disk_budget_bytes": 65536, "warn_fraction": 0.5})
    n = 0
    while w.head.counter("dropped:budget") == 0 and n < 2000:
        for _ in range(50):
            w.meters.send(5 + n % 7)
            n += 1
        time.sleep(0.3)
    wait_until(lambda: w.head.counter("dropped:budget") > 0, 30, "dropped:budget")
    st = w.head.state()["counters"]
    assert st["budget_warning"] is True and st["queue_bytes"] <= 65536
    log = w.daps[-1].log(500)
    assert "disk budget full" in log and "of its budget" in log
    # Acks free the queue; envelopes are accepted again.
    w.head.ack(sorted(set(w.head.seqs())))
    wait_until(lambda: w.head.counter("queue_bytes") < 65536 // 2, 30, "queue drained")
    dropped = w.head.counter("dropped:budget")
    w.head.auto_ack = True
    late = w.meters.send(5)
    wait_until(lambda: late in w.head.envelopes(), 30, "accepted again")
    assert w.head.counter("dropped:budget") == dropped


def test_separate_headend_broker(world, broker_kind, tmp_path):
    """With [headend_broker], a second connection (d1-up) carries bundles,
    requests, acks and the status; meters stay on their own broker."""
    from tests.brokers import start_broker

    w = world
    up = start_broker(broker_kind, tmp_path / "upstream", anonymous=True)
    head = None
    try:
        head = HeadEnd(up.host, up.port, w.keys)
        path = write_config(tmp_path / "two.toml", w.broker.port, tmp_path / "st2",
                            headend_port=up.port, aggregate={"window": 0.5},
                            queue={"ack_timeout": 2.0})
        d = DapProcess(path, tmp_path / "two.log")
        w.daps.append(d)
        d.start(head)
        sent = [w.meters.send(5), w.meters.send(6)]
        wait_until(lambda: sorted(head.envelopes()) == sorted(sent), 30, "bundle upstream")
        assert w.head.bundles == []  # nothing on the meters' broker
        r = head.request(5)
        head.forward([r], tolerance=5)
        wait_until(lambda: w.meters.downlinks(5) == [r], 30, "request via the other broker")
        wait_until(lambda: head.counter("bundles_acked") == 1, 30, "ack over the upstream")
        # The head-end's broker goes away: the DAP keeps taking readings and
        # sends them once it is back.
        up.stop()
        offline = [w.meters.send(7), w.meters.send(8)]
        wait_until(lambda: d.check_alive() and "queue=2 envelopes" in d.log(20), 30,
                   "readings queued while the head-end is away")
        up.restart()
        wait_until(lambda: set(offline) <= set(head.envelopes()), 60, "the backlog delivered")
        assert d.stop() == 0
        wait_until(lambda: head.state().get("state") == "offline", 30, "offline upstream")
    finally:
        if head is not None:
            head.close()
        for d in w.daps:
            d.kill()
        up.stop()


def test_with_broker_accounts_and_acls(secured_broker, tmp_path):
    """On a broker with accounts and the product's ACLs, the DAP (account
    d1) can subscribe, publish bundles, downlinks and its retained status
    with its will, and --check passes with its credentials."""
    from headend.brokerconf import Layout

    broker = secured_broker(Layout(meters=((5, 1), (6, 1)), daps=(1,)))
    acc = broker.accounts
    keys = Keys()
    head = HeadEnd(broker.host, broker.port, keys, account=acc["headend"])
    meters = Meters(broker.host, broker.port, keys, accounts=acc)
    d = None
    try:
        cfg = write_config(tmp_path / "acl.toml", broker.port, tmp_path / "st",
                           account=acc["d1"], aggregate={"window": 0.5})
        r = run_cli("--config", str(cfg), "--check")
        assert r.returncode == 0, r.stderr
        assert "as d1" in r.stdout
        d = DapProcess(cfg, tmp_path / "acl.log").start(head)
        sent = [meters.send(5), meters.send(6)]
        wait_until(lambda: sorted(head.envelopes()) == sorted(sent), 30, "bundle via ACLs")
        req = head.request(6)
        head.forward([req], tolerance=3)
        wait_until(lambda: meters.downlinks(6) == [req], 30, "downlink via ACLs")
        wait_until(lambda: head.counter("bundles_acked") >= 1, 30, "ack via ACLs")
        assert "refused" not in d.log(200)
        d.kill()
        wait_until(lambda: head.state() == {"state": "offline"}, 60, "the will, allowed")
    finally:
        if d is not None:
            d.kill()
        meters.close()
        head.close()


# --check tries the broker and exits; the DAP itself stops at start the
# same way, on its own network loop, instead of retrying silently.
STARTS = [("--check", "--timeout", "5"), ()]


@pytest.mark.parametrize("args", STARTS, ids=["check", "service"])
def test_wrong_password(secured_broker, tmp_path, args):
    from headend.brokerconf import Account, Layout

    broker = secured_broker(Layout(daps=(1,)))
    cfg = write_config(tmp_path / "bad.toml", broker.port, tmp_path / "st",
                       account=Account("d1", "not-the-password"))
    r = run_cli("--config", str(cfg), *args)
    assert r.returncode == 1
    assert f"the broker at 127.0.0.1:{broker.port} refused the connection" in r.stderr
    assert "check the username and password" in r.stderr


def test_check_success(world, tmp_path):
    cfg = write_config(tmp_path / "check.toml", world.broker.port, tmp_path / "st")
    r = run_cli("--config", str(cfg), "--check")
    assert r.returncode == 0, r.stderr
    assert f"connected to 127.0.0.1:{world.broker.port}" in r.stdout
    assert r.stdout.strip().endswith("ok")


@pytest.mark.parametrize("args", STARTS, ids=["check", "service"])
def test_wrong_port(tmp_path, args):
    port = free_port()
    cfg = write_config(tmp_path / "check.toml", port, tmp_path / "st")
    r = run_cli("--config", str(cfg), *args)
    assert r.returncode == 1
    assert f"cannot reach the MQTT broker at 127.0.0.1:{port}" in r.stderr


def test_bad_config_exits_1_and_help(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("dap = 1\nstate_dir = 's'\n[meters_broker]\n[queue]\nack_timout = 3\n")
    r = run_cli("--config", str(cfg))
    assert r.returncode == 1 and "ack_timeout" in r.stderr
    r = run_cli("--help")
    assert r.returncode == 0 and "--check" in r.stdout and "--config" in r.stdout


def test_main_in_process_check(world, tmp_path, capsys):
    from dap.__main__ import main

    cfg = write_config(tmp_path / "c.toml", world.broker.port, tmp_path / "st")
    assert main(["--config", str(cfg), "--check"]) == 0
    assert "meters_broker: connected" in capsys.readouterr().out


def test_dap_process_never_loads_nacl():
    """Importing every DAP module, and parsing gateway traffic the way the
    DAP does, leaves PyNaCl unloaded: the DAP has no crypto in memory."""
    code = (
        "import sys, importlib, pkgutil, dap\n"
        "for m in pkgutil.iter_modules(dap.__path__):\n"
        "    importlib.import_module('dap.' + m.name)\n"
        "from dap import inbound\n"
        "from shared import gateway\n"
        "msg = gateway.forward(inbound.CBOR, 5, [bytes([0x11]) + bytes(60)])\n"
        "assert gateway.decode(inbound.CBOR, msg)[0] == 1\n"
        "assert 'nacl' not in sys.modules, sorted(m for m in sys.modules if 'nacl' in m)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
