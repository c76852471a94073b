"""The broker access rules, on real brokers: amqtt (headend.broker) and
Mosquitto, both configured by headend.brokerconf.

Accounts are generated at run time. A refused subscription is one whose
SUBACK says 0x80 or, where the broker grants the SUBACK (Mosquitto checks
read access on every delivery instead), one that never delivers anything. A
refused publish is one that never reaches a subscriber who may read that
topic. Every absence is checked after a canary: an allowed message to the
same watcher, sent later, has arrived, so the broker has already routed the
forbidden one.
"""

from __future__ import annotations

import os
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from headend.amqtt_plugins import filter_matches, session_refusal
from headend.brokerconf import (
    Account,
    Layout,
    TlsFiles,
    generate_accounts,
    mosquitto_hash,
    permissions,
    write_amqtt,
    write_mosquitto,
)
from tests.brokers import KINDS, Broker, free_port, raw_connect, start_broker

LAYOUT = Layout(
    meters=((1, None), (2, None), (5, 1), (6, 1), (7, 2)),
    daps=(1, 2),
)
PERMS = permissions(LAYOUT)
TIMEOUT = 30.0  # for what must happen; absences are shown by canaries, not by waiting

# watcher -> (publisher, topic): an allowed route to each watcher, for canaries.
CANARY = {
    "headend": ("m1", "m1/up"),
    "m1": ("headend", "m1/down"),
    "m2": ("headend", "m2/down"),
    "m5": ("d1", "d1/m5/down"),
    "m6": ("d1", "d1/m6/down"),
    "m7": ("d2", "d2/m7/down"),
    "d1": ("headend", "d1/req"),
    "d2": ("headend", "d2/req"),
}


def may_publish(user: str, topic: str) -> bool:
    return any(filter_matches(topic, f) for f in PERMS[user][0])


def may_read(user: str, topic: str) -> bool:
    return any(filter_matches(topic, f) for f in PERMS[user][1] if not f.startswith("$share/"))


def payload() -> bytes:
    return uuid.uuid4().hex.encode()


_V311_CONNACK = {132: 1, 133: 2, 136: 3, 134: 4, 135: 5}


class Mq:
    """A paho-mqtt 2.x client (MQTT 3.1.1) with blocking helpers."""

    def __init__(self, broker: Broker, user: str | None, *, client_id: str | None = None,
                 password: str | None = None, clean: bool = True) -> None:
        self.user = user
        cid = client_id if client_id is not None else (user or "")
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid,
                             protocol=mqtt.MQTTv311, clean_session=clean)
        if user is not None:
            pw = password if password is not None else broker.accounts[user].password
            self.c.username_pw_set(user, pw)
        self.cond = threading.Condition()
        self.messages: list[tuple[str, bytes, bool]] = []
        self.subacks: dict[int, int] = {}
        self.connack: int | None = None
        self.disconnected = False
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.c.on_disconnect = self._on_disconnect
        self.broker = broker

    def _on_connect(self, client, userdata, flags, rc, props) -> None:  # noqa: ANN001
        with self.cond:
            # paho 2 reports MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes.
            self.connack = _V311_CONNACK.get(int(rc.value), int(rc.value))
            self.cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, rcs, props) -> None:  # noqa: ANN001
        with self.cond:
            self.subacks[mid] = int(rcs[0].value)
            self.cond.notify_all()

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        with self.cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self.cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, rc, props) -> None:  # noqa: ANN001
        with self.cond:
            self.disconnected = True
            self.cond.notify_all()

    def _wait(self, pred, timeout: float = TIMEOUT) -> bool:  # noqa: ANN001
        with self.cond:
            return self.cond.wait_for(pred, timeout)

    def open(self) -> int:
        """Connect; the CONNACK code (0: accepted), or -1 if the broker hung up."""
        self.c.connect(self.broker.host, self.broker.port, keepalive=30)
        self.c.loop_start()
        self._wait(lambda: self.connack is not None or self.disconnected)
        if self.connack is None:
            return -1
        return self.connack

    def subscribe(self, topic_filter: str) -> int:
        """The SUBACK code for `topic_filter` (QoS granted, or 0x80), -1 if disconnected."""
        _rc, mid = self.c.subscribe(topic_filter, qos=1)
        self._wait(lambda: mid in self.subacks or self.disconnected)
        return self.subacks.get(mid, -1)

    def publish(self, topic: str, data: bytes, retain: bool = False) -> None:
        info = self.c.publish(topic, data, qos=1, retain=retain)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published(), f"{self.user}: no PUBACK for {topic}"

    def got(self, data: bytes) -> list[tuple[str, bytes, bool]]:
        with self.cond:
            return [m for m in self.messages if m[1] == data]

    def wait_for(self, data: bytes, timeout: float = TIMEOUT) -> bool:
        return self._wait(lambda: any(m[1] == data for m in self.messages), timeout)

    def close(self) -> None:
        try:
            if self.connack == 0 and not self.disconnected:
                self.c.disconnect()
        finally:
            self.c.loop_stop()


class Env:
    """One secured broker with every account of LAYOUT connected and
    subscribed to everything it may read."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.kind = broker.kind
        self.clients: dict[str, Mq] = {}
        for name in PERMS:
            c = Mq(broker, name)
            assert c.open() == 0, f"{name} refused\n{broker.log_tail()}"
            for f in PERMS[name][1]:
                if f.startswith("$share/"):
                    continue  # would duplicate '+/up'; tested on its own
                assert c.subscribe(f) == 1, f"{name} could not subscribe {f}"
            self.clients[name] = c

    def __getitem__(self, name: str) -> Mq:
        return self.clients[name]

    def canary(self, watcher: str) -> None:
        """Send an allowed message to `watcher` and wait until it arrives."""
        publisher, topic = CANARY[watcher]
        data = b"canary-" + payload()
        self[publisher].publish(topic, data)
        assert self[watcher].wait_for(data), f"canary {topic} never reached {watcher}"

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        self.broker.stop()


@pytest.fixture(scope="module", params=KINDS)
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    broker = start_broker(request.param, tmp_path_factory.mktemp(f"acl-{request.param}"),
                          layout=LAYOUT)
    e = Env(broker)
    try:
        yield e
    finally:
        e.close()


# -- the rules themselves ---------------------------------------------------

ALLOWED = [
    ("m1", "m1/up", "headend"),
    ("headend", "m1/down", "m1"),
    ("m5", "d1/m5/up", "d1"),
    ("d1", "d1/m5/down", "m5"),
    ("m7", "d2/m7/up", "d2"),
    ("d2", "d2/m7/down", "m7"),
    ("d1", "d1/up", "headend"),
    ("d2", "d2/state", "headend"),
    ("headend", "d1/req", "d1"),
    ("headend", "d2/ack", "d2"),
]

FORBIDDEN_PUBLISH = [
    ("m1", "m2/up", "headend"),
    ("m1", "m1/down", "m1"),
    ("m1", "d1/m1/up", "d1"),
    ("m1", "d1/m5/down", "m5"),
    ("m1", "d1/state", "headend"),
    ("m1", "d1/up", "headend"),
    ("m1", "d1/req", "d1"),
    ("m5", "m5/up", "headend"),
    ("m5", "d1/m6/up", "d1"),
    ("m5", "d2/m5/up", "d2"),
    ("m5", "d1/m5/down", "m5"),
    ("m5", "d1/up", "headend"),
    ("m5", "d1/ack", "d1"),
    ("d1", "d2/m7/down", "m7"),
    ("d1", "d2/up", "headend"),
    ("d1", "d2/state", "headend"),
    ("d1", "m1/down", "m1"),
    ("d1", "d1/req", "d1"),
    ("d1", "d1/m5/up", "d1"),
    ("d1", "d2/req", "d2"),
    ("headend", "d1/m5/down", "m5"),
    ("headend", "m1/up", "headend"),
    ("headend", "d1/up", "headend"),
    ("headend", "d1/state", "headend"),
    ("headend", "d1/m5/up", "d1"),
]

# (subscriber, forbidden filter, bait publisher, bait topic)
FORBIDDEN_SUBSCRIBE = [
    ("m1", "m2/down", "headend", "m2/down"),
    ("m1", "+/down", "headend", "m2/down"),
    ("m1", "#", "m2", "m2/up"),
    ("m1", "m1/up", "m1", "m1/up"),
    ("m1", "+/up", "m2", "m2/up"),
    ("m1", "d1/m5/down", "d1", "d1/m5/down"),
    ("m1", "+/state", "d1", "d1/state"),
    ("m5", "d1/m6/down", "d1", "d1/m6/down"),
    ("m5", "d1/+/down", "d1", "d1/m6/down"),
    ("m5", "d1/m5/up", "m5", "d1/m5/up"),
    ("m5", "m5/down", "headend", "m5/down"),
    ("m5", "d1/#", "headend", "d1/ack"),
    ("d1", "d2/+/up", "m7", "d2/m7/up"),
    ("d1", "d2/req", "headend", "d2/req"),
    ("d1", "+/up", "m1", "m1/up"),
    ("d1", "m1/down", "headend", "m1/down"),
    ("d1", "#", "d2", "d2/up"),
    ("d1", "d1/m5/down", "d1", "d1/m5/down"),
    ("d1", "+/state", "d2", "d2/state"),
    ("headend", "d1/+/up", "m5", "d1/m5/up"),
    ("headend", "+/+/up", "m7", "d2/m7/up"),
    ("headend", "#", "d1", "d1/m5/down"),
    ("headend", "m1/down", "headend", "m1/down"),
    ("headend", "+/req", "headend", "d1/req"),
    ("headend", "+/ack", "headend", "d2/ack"),
]


def test_permissions_match_the_access_model() -> None:
    assert PERMS["m1"] == (("m1/up",), ("m1/down",))
    assert PERMS["m5"] == (("d1/m5/up",), ("d1/m5/down",))
    assert PERMS["d1"] == (("d1/+/down", "d1/up", "d1/state"), ("d1/+/up", "d1/req", "d1/ack"))
    assert PERMS["headend"] == (("+/down", "+/req", "+/ack"), ("+/up", "+/state", "$share/+/+/up"))
    assert set(PERMS) == set(LAYOUT.names())
    for user, (pub, sub) in PERMS.items():
        assert pub and sub, f"{user} has an empty list (amqtt would allow every publish)"


def test_the_cases_are_what_they_claim() -> None:
    for pub, topic, watcher in ALLOWED:
        assert may_publish(pub, topic) and may_read(watcher, topic), (pub, topic, watcher)
    for pub, topic, watcher in FORBIDDEN_PUBLISH:
        assert not may_publish(pub, topic) and may_read(watcher, topic), (pub, topic, watcher)
    for sub, flt, bait_pub, bait in FORBIDDEN_SUBSCRIBE:
        assert filter_matches(bait, flt) and may_publish(bait_pub, bait), (sub, flt)
        assert not may_read(sub, bait), (sub, flt, bait)
    # Every allowed filter of every account is exercised end to end somewhere.
    routes = {(w, f) for _, t, w in ALLOWED for f in PERMS[w][1] if filter_matches(t, f)}
    assert {w for w, _ in routes} >= {"headend", "m1", "m5", "m7", "d1", "d2"}


@pytest.mark.parametrize(("publisher", "topic", "watcher"), ALLOWED,
                         ids=[f"{p}->{t}" for p, t, _ in ALLOWED])
def test_allowed_path_delivers(env: Env, publisher: str, topic: str, watcher: str) -> None:
    data = payload()
    env[publisher].publish(topic, data)
    assert env[watcher].wait_for(data), f"{publisher} -> {topic} never reached {watcher}"


@pytest.mark.parametrize(("publisher", "topic", "watcher"), FORBIDDEN_PUBLISH,
                         ids=[f"{p}->{t}" for p, t, _ in FORBIDDEN_PUBLISH])
def test_forbidden_publish_is_dropped(env: Env, publisher: str, topic: str, watcher: str) -> None:
    data = payload()
    env[publisher].publish(topic, data)  # both brokers PUBACK it, then drop it
    env.canary(watcher)
    assert not env[watcher].got(data), f"{publisher} published on {topic}: {env.kind} let it through"
    assert not env[publisher].disconnected


@pytest.mark.parametrize(("subscriber", "topic_filter", "bait_publisher", "bait"),
                         FORBIDDEN_SUBSCRIBE,
                         ids=[f"{s}<-{f}" for s, f, _, _ in FORBIDDEN_SUBSCRIBE])
def test_forbidden_subscription_gets_nothing(env: Env, subscriber: str, topic_filter: str,
                                             bait_publisher: str, bait: str) -> None:
    code = env[subscriber].subscribe(topic_filter)
    if env.kind == "amqtt":
        assert code == 0x80, f"amqtt granted {subscriber} {topic_filter!r}: {code}"
    else:
        # Mosquitto 2.0.11's acl_file grants every SUBSCRIBE and checks read
        # access on each delivery instead.
        assert code in (0x80, 1)
    data = payload()
    env[bait_publisher].publish(bait, data)
    env.canary(subscriber)
    assert not env[subscriber].got(data), f"{subscriber} read {bait} through {topic_filter!r}"


def test_retained_messages_respect_read_access(env: Env) -> None:
    data = payload()
    env["d2"].publish("d2/state", data, retain=True)
    assert env["headend"].wait_for(data)
    # A forbidden retained publish is not stored either.
    forged = payload()
    env["m1"].publish("d1/state", forged, retain=True)
    env.canary("headend")
    late = Mq(env.broker, "headend", client_id="headend-late")
    meter = Mq(env.broker, "m2", client_id="m2-late")
    try:
        assert late.open() == 0 and meter.open() == 0
        assert late.subscribe("+/state") == 1
        assert late.wait_for(data), "the head-end never got the retained DAP state"
        assert meter.subscribe("m2/down") == 1
        meter.subscribe("d2/state")  # forbidden
        env.canary("m2")
        late.publish("m2/down", b"late-canary")
        assert meter.wait_for(b"late-canary")
        # amqtt 0.12 on its own sends a connecting client the retained
        # messages of everyone's subscriptions; headend.broker does not.
        assert not meter.got(data), f"{env.kind} leaked a retained message to m2"
        assert not late.got(forged), "a forbidden retained publish was stored"
    finally:
        late.close()
        meter.close()


def test_dap_will_is_published(env: Env) -> None:
    data = b"offline-" + payload()
    sock, rc = raw_connect(env.broker.host, env.broker.port, "d1-will", username="d1",
                           password=env.broker.accounts["d1"].password,
                           will=("d1/state", data, 1, True))
    assert rc == 0
    sock.close()  # no DISCONNECT: the broker must publish the Will
    assert env["headend"].wait_for(data), "the DAP's last will never reached the head-end"


@pytest.mark.parametrize(("user", "will_topic", "watcher"), [
    ("m1", "m2/up", "headend"),
    ("m1", "d1/state", "headend"),
    ("m5", "d1/m6/up", "d1"),
    ("d1", "d2/state", "headend"),
])
def test_will_on_a_forbidden_topic_is_never_published(env: Env, user: str, will_topic: str,
                                                      watcher: str) -> None:
    data = payload()
    sock, rc = raw_connect(env.broker.host, env.broker.port, f"{user}-badwill", username=user,
                           password=env.broker.accounts[user].password,
                           will=(will_topic, data, 1, True))
    try:
        if env.kind == "amqtt":
            # amqtt publishes Wills without a topic check: our plugin refuses
            # the CONNECT instead.
            assert rc == 5
        else:
            assert rc == 0  # Mosquitto checks write access when it sends the Will
    finally:
        sock.close()
    time.sleep(0.3)
    env.canary(watcher)
    assert not env[watcher].got(data), f"{env.kind} published a forbidden Will on {will_topic}"


def test_strangers_are_refused(env: Env) -> None:
    b = env.broker
    cases = {
        "unknown user": ("x1", "zz", "whatever"),
        "wrong password": ("m1", "m1", "not-the-password"),
        "another user's password": ("m1", "m1", b.accounts["m2"].password),
        "anonymous": ("anon", None, None),
        "'+' in username": ("m+1", "m+1", "x"),
        "'#' in username": ("m#1", "m#1", "x"),
    }
    for what, (cid, user, pw) in cases.items():
        sock, rc = raw_connect(b.host, b.port, cid, username=user, password=pw)
        sock.close()
        assert rc in (4, 5), f"{what}: {env.kind} accepted the CONNECT (code {rc})"
    c = Mq(b, None, client_id="anon-paho")
    try:
        assert c.open() != 0
    finally:
        c.close()


@pytest.mark.parametrize("client_id", ["m1+x", "m1#", "+", "#"])
def test_wildcards_in_client_ids_are_refused(env: Env, client_id: str) -> None:
    c = Mq(env.broker, "m1", client_id=client_id)
    try:
        rc = c.open()
        if env.kind == "amqtt":
            assert rc == 5, f"amqtt answered client id {client_id!r} with {rc}"
            return
        # Mosquitto 2.0.11 accepts the CONNECT but denies every ACL pattern
        # check for such a client, and flow-A meters have nothing else.
        assert rc == 0
        c.subscribe("m1/down")
        sent = payload()
        c.publish("m1/up", sent)
        down = payload()
        env["headend"].publish("m1/down", down)
        assert env["m1"].wait_for(down)
        env.canary("headend")
        assert not env["headend"].got(sent), f"client id {client_id!r} could publish"
        assert not c.got(down), f"client id {client_id!r} could read"
    finally:
        c.close()


@pytest.mark.parametrize("env", ["amqtt"], indirect=True)
def test_amqtt_binds_client_ids_to_usernames(env: Env) -> None:
    b = env.broker
    for user, cid in (("m1", "headend"), ("m1", "m2"), ("m1", "m10"), ("d1", "d10-x")):
        sock, rc = raw_connect(b.host, b.port, cid, username=user,
                               password=b.accounts[user].password, clean=False)
        sock.close()
        assert rc == 5, f"{user} could take client id {cid!r}"
    sock, rc = raw_connect(b.host, b.port, "m1-spare", username="m1",
                           password=b.accounts["m1"].password)
    sock.close()
    assert rc == 0


def test_unauthenticated_connect_cannot_touch_sessions(env: Env) -> None:
    """amqtt 0.12 handles a CONNECT's session before it checks the password;
    headend.broker checks first. Mosquitto always did."""
    b = env.broker
    hq = Mq(b, "headend", client_id="headend-q", clean=False)
    assert hq.open() == 0 and hq.subscribe("+/up") == 1
    hq.close()
    queued = payload()
    env["m1"].publish("m1/up", queued)
    # 1. A clean-session CONNECT with a wrong password must not wipe the queue.
    sock, rc = raw_connect(b.host, b.port, "headend-q", username="headend", password="wrong")
    sock.close()
    assert rc == 5
    # 2. ... nor plant a Will in a connected client's session, nor kick it off.
    evil = payload()
    sock, rc = raw_connect(b.host, b.port, "d1", username="d1", password="wrong", clean=False,
                           will=("m1/down", evil, 1, False))
    sock.close()
    assert rc == 5
    hq2 = Mq(b, "headend", client_id="headend-q", clean=False)
    try:
        assert hq2.open() == 0
        assert hq2.wait_for(queued), f"{b.kind}: the persistent session lost its queue"
        assert hq2.got(queued)[0][2] is False, "a queued message came with RETAIN set"
    finally:
        hq2.c.unsubscribe("+/up")
        hq2.close()
    env.canary("m1")
    env.canary("d1")
    assert not env["d1"].disconnected, f"{b.kind}: a refused CONNECT threw the DAP off"
    assert not env["m1"].got(evil), f"{b.kind}: a refused CONNECT published its Will"


@pytest.mark.parametrize("env", ["mosquitto"], indirect=True)
def test_mosquitto_shared_subscription_for_the_headend(env: Env) -> None:
    he = Mq(env.broker, "headend", client_id="headend-s1")
    m = Mq(env.broker, "m2", client_id="m2-share")
    try:
        assert he.open() == 0 and m.open() == 0
        assert he.subscribe("$share/g/+/up") == 1
        m.subscribe("$share/g/+/up")  # granted by Mosquitto, but reads are checked
        assert m.subscribe("m2/down") == 1
        data = payload()
        env["m1"].publish("m1/up", data)
        assert he.wait_for(data)
        env["headend"].publish("m2/down", b"share-canary")
        assert m.wait_for(b"share-canary")
        assert not m.got(data)
    finally:
        he.close()
        m.close()


# -- the files ---------------------------------------------------------------

def test_written_files_are_private_and_hold_no_secret(tmp_path: Path) -> None:
    accounts = generate_accounts(LAYOUT)
    tls = TlsFiles(tmp_path / "c.pem", tmp_path / "k.pem", port=8883, cafile=tmp_path / "ca.pem")
    write_mosquitto(tmp_path / "m", layout=LAYOUT, accounts=accounts, port=1883,
                    persistence=tmp_path / "m" / "db", tls=tls)
    write_amqtt(tmp_path / "a", layout=LAYOUT, accounts=accounts, port=1883)
    for f in (tmp_path / "m" / "passwd", tmp_path / "a" / "amqtt.passwd"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 5
    for p in files:
        text = p.read_bytes()
        for a in accounts:
            assert a.password.encode() not in text, f"{a.username}'s password is in {p}"
    assert accounts[0].password not in repr(accounts[0])
    # amqtt allows every publish when publish-acl is missing or empty.
    import json

    conf = json.loads((tmp_path / "a" / "amqtt.json").read_text())
    acl = conf["plugins"]["amqtt.plugins.topic_checking.TopicAccessControlListPlugin"]
    assert acl["publish_acl"] and all(acl["publish_acl"].values())
    assert set(acl["publish_acl"]) == set(acl["acl"]) == set(LAYOUT.names())


def test_mosquitto_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    import shutil

    tool = shutil.which("mosquitto_passwd")
    assert tool, "mosquitto_passwd is missing: apt-get install mosquitto"
    f = tmp_path / "pw"
    f.write_text("")
    subprocess.run([tool, "-b", str(f), "alice", "s3cret-Pass"], check=True)
    line = f.read_text().strip()
    _, _, iterations, salt, _ = line.split(":", 1)[1].split("$")
    import base64

    ours = mosquitto_hash("s3cret-Pass", salt=base64.b64decode(salt), iterations=int(iterations))
    assert line == f"alice:{ours}"


@pytest.mark.parametrize("bad", ["", "m+1", "m#", "d1/m2", "a:b", "a b", "m-1", "mé", "$SYS"])
def test_account_refuses_dangerous_names(bad: str) -> None:
    with pytest.raises(ValueError):
        Account(bad, "x" * 43)


def test_layout_validates_itself() -> None:
    with pytest.raises(ValueError):
        Layout(meters=((1, 9),), daps=(1,))
    with pytest.raises(ValueError):
        Layout(meters=((1, None), (1, None)))
    with pytest.raises(ValueError):
        Layout(meters=((-1, None),))
    with pytest.raises(ValueError):
        Layout(daps=(True,))


def test_session_refusal_rules() -> None:
    acl = {"d1": ["d1/state"]}
    assert session_refusal("d1", "d1", "d1/state", bind_client_id=True, publish_acl=acl) is None
    assert session_refusal("d1-2", "d1", None, bind_client_id=True, publish_acl=acl) is None
    assert session_refusal("d1", "d1", "d2/state", bind_client_id=True, publish_acl=acl)
    assert session_refusal("d1", "d1", "d1/#", bind_client_id=True, publish_acl={"d1": ["#"]})
    assert session_refusal("d10", "d1", None, bind_client_id=True, publish_acl=acl)
    assert session_refusal("x", None, None, bind_client_id=True, publish_acl=acl) is None
    assert session_refusal("a+b", None, None, bind_client_id=False, publish_acl=None)


def test_provisioning_1000_accounts_is_quick(tmp_path: Path) -> None:
    layout = Layout(meters=tuple((i, None if i % 2 else 1 + i % 10) for i in range(1, 1001)),
                    daps=tuple(range(1, 11)))
    accounts = generate_accounts(layout)
    t0 = time.perf_counter()
    write_mosquitto(tmp_path / "m", layout=layout, accounts=accounts, port=1883)
    t1 = time.perf_counter()
    write_amqtt(tmp_path / "a", layout=layout, accounts=accounts, port=1883)
    t2 = time.perf_counter()
    print(f"1,011 accounts: mosquitto {t1 - t0:.2f} s, amqtt {t2 - t1:.2f} s")
    assert t1 - t0 < 10 and t2 - t1 < 10


# -- the helpers (tests/brokers.py) ------------------------------------------

def test_open_broker_is_anonymous_and_queues_for_persistent_sessions(open_broker: Broker) -> None:
    c = Mq(open_broker, None, client_id="anyone", clean=False)
    p = Mq(open_broker, None, client_id="someone")
    try:
        assert c.open() == 0 and p.open() == 0
        assert c.subscribe("any/where") == 1
        p.publish("any/where", b"hello")
        assert c.wait_for(b"hello")
        c.close()
        p.publish("any/where", b"while-offline")
        c = Mq(open_broker, None, client_id="anyone", clean=False)
        assert c.open() == 0
        assert c.wait_for(b"while-offline"), f"{open_broker.kind} dropped an offline QoS 1 message"
        assert c.subscribe("a/+/b") == 1
    finally:
        c.close()
        p.close()


def test_restart_keeps_port_and_sessions(secured_broker) -> None:  # noqa: ANN001
    layout = Layout(meters=((1, None),))
    b = secured_broker(layout)
    port = b.port
    he = Mq(b, "headend", clean=False)
    assert he.open() == 0 and he.subscribe("+/up") == 1
    he.close()
    m = Mq(b, "m1")
    assert m.open() == 0
    m.publish("m1/up", b"while-away")
    m.close()
    b.restart()
    assert b.port == port and b.running()
    he = Mq(b, "headend", clean=False)
    try:
        assert he.open() == 0
        if b.kind == "mosquitto":  # amqtt keeps nothing across a restart
            assert he.wait_for(b"while-away"), "Mosquitto lost a queued message on restart"
    finally:
        he.close()
    b.kill()
    assert not b.running()


def _tls_connect(port: int, ca: Path, password: str, cert: Path | None = None) -> int:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="m1", protocol=mqtt.MQTTv311)
    c.tls_set(ca_certs=str(ca), certfile=str(cert) if cert else None,
              keyfile=str(cert.with_suffix(".key")) if cert else None)
    c.username_pw_set("m1", password)
    done = threading.Event()
    result: list[int] = []
    c.on_connect = lambda cl, u, f, rc, p: (result.append(int(rc.value)), done.set())
    c.on_disconnect = lambda cl, u, f, rc, p: done.set()
    try:
        c.connect("localhost", port, keepalive=30)
    except OSError:
        return -1
    c.loop_start()
    try:
        done.wait(TIMEOUT)
        return result[0] if result else -1
    finally:
        c.disconnect()
        c.loop_stop()


def test_tls_listener(broker_kind: str, tmp_path: Path) -> None:
    script = Path(__file__).resolve().parent.parent / "tools" / "make-ca.sh"
    ca_dir = tmp_path / "ca"
    subprocess.run(["bash", str(script), str(ca_dir), "localhost"], check=True,
                   capture_output=True, timeout=60, env={**os.environ, "CLIENTS": "m1"})
    for key in ca_dir.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    layout = Layout(meters=((1, None),))
    accounts = generate_accounts(layout)
    pw = next(a.password for a in accounts if a.username == "m1")
    tls = TlsFiles(ca_dir / "broker.crt", ca_dir / "broker.key", port=free_port())
    b = start_broker(broker_kind, tmp_path / "b", layout=layout, accounts=accounts, tls=tls)
    try:
        assert _tls_connect(tls.port, ca_dir / "ca.crt", pw) == 0, f"TLS failed\n{b.log_tail()}"
        assert _tls_connect(tls.port, ca_dir / "ca.crt", "wrong") not in (0, -1)
    finally:
        b.stop()
    if broker_kind != "mosquitto":
        return  # amqtt cannot require a client certificate (write_amqtt refuses)
    tls = TlsFiles(ca_dir / "broker.crt", ca_dir / "broker.key", port=free_port(),
                   cafile=ca_dir / "ca.crt", require_certificate=True)
    b = start_broker(broker_kind, tmp_path / "b2", layout=layout, accounts=accounts, tls=tls)
    try:
        assert _tls_connect(tls.port, ca_dir / "ca.crt", pw, ca_dir / "client-m1.crt") == 0
        assert _tls_connect(tls.port, ca_dir / "ca.crt", pw) != 0
    finally:
        b.stop()


def test_offline_queue_holds_more_than_mosquittos_default(open_broker: Broker) -> None:
    """Mosquitto's default max_queued_messages (1,000) silently drops the
    rest of a backlog for an offline persistent session; ours does not."""
    n = 2500
    sub = Mq(open_broker, None, client_id="slow-headend", clean=False)
    assert sub.open() == 0 and sub.subscribe("q/+/up") == 1
    sub.close()
    pub = Mq(open_broker, None, client_id="busy-meter")
    pub.c.max_inflight_messages_set(100)
    try:
        assert pub.open() == 0
        infos = [pub.c.publish(f"q/{i % 7}/up", b"%d" % i, qos=1) for i in range(n)]
        for info in infos:
            info.wait_for_publish(30)
            assert info.is_published()
    finally:
        pub.close()
    sub = Mq(open_broker, None, client_id="slow-headend", clean=False)
    try:
        assert sub.open() == 0
        assert sub._wait(lambda: len(sub.messages) >= n, 30), (
            f"{open_broker.kind} delivered {len(sub.messages)} of {n} queued messages")
        assert {m[1] for m in sub.messages} == {b"%d" % i for i in range(n)}
    finally:
        sub.close()
