"""Helpers for the DAP's broker tests: the DAP as a subprocess, fake meters
that seal with real crypto (keys generated at run time), and a fake
head-end that opens bundles, acknowledges them and sends requests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import paho.mqtt.client as mqtt
from nacl.public import PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from shared import envelope, gateway, group, topics
from shared.backend import DEFAULT
from shared.channel import Channel
from shared.const import DOWN, K_BUNDLE, S_NO_DATA, T_READ_CURRENT, T_STATUS, UP
from tests.waits import wait_until

REPO = Path(__file__).resolve().parent.parent
B = DEFAULT


class Counter:
    def __init__(self, start: int = 0) -> None:
        self.value = start

    def next(self) -> int:
        v = self.value
        self.value += 1
        return v


class Keys:
    """The head-end's key pair and each meter's pairwise key, made now."""

    def __init__(self) -> None:
        self.headend = PrivateKey.generate()
        self.meter_secret: dict[int, PrivateKey] = {}

    def pairwise(self, meter: int) -> bytes:
        sk = self.meter_secret.setdefault(meter, PrivateKey.generate())
        return B.beforenm(bytes(self.headend.public_key), bytes(sk))

    def meter_channel(self, meter: int) -> Channel:
        return Channel(B, self.pairwise(meter), meter, UP, Counter())

    def headend_channel(self, meter: int, counter: Counter) -> Channel:
        return Channel(B, self.pairwise(meter), meter, DOWN, counter)


def connect(host: str, port: int, client_id: str, on_message=None,
            subs: tuple[str, ...] = (), account=None) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                    protocol=mqtt.MQTTv311)
    if account is not None:
        c.username_pw_set(account.username, account.password)
    c.max_inflight_messages_set(1000)
    if on_message is not None:
        c.on_message = on_message
    c.reconnect_delay_set(0.2, 2)
    return connect_wait(c, host, port, subs)


def connect_wait(c: mqtt.Client, host: str, port: int, subs: Iterable[str] = (), *,
                 keepalive: int = 30, timeout: float = 15.0) -> mqtt.Client:
    """Connect a plain paho client, start its network thread and wait for
    the CONNACK (accepted) and, with `subs`, the SUBACK (QoS 1; subscribed
    again after every reconnect: a clean session forgets them)."""
    subs = list(subs)
    done = threading.Event()
    refused: list[object] = []

    def on_connect(client, userdata, flags, reason, properties):
        if reason.is_failure:
            refused.append(reason)
            done.set()
        elif subs:
            client.subscribe([(s, 1) for s in subs])
        else:
            done.set()

    c.on_connect = on_connect
    c.on_subscribe = lambda *a: done.set()
    c.connect(host, port, keepalive)
    c.loop_start()
    assert done.wait(timeout), f"no CONNACK or SUBACK from {host}:{port}"
    assert not refused, f"{host}:{port} refused the connection: {refused[0]}"
    return c


def close(c: mqtt.Client) -> None:
    try:
        c.disconnect()
    finally:
        c.loop_stop()


class Meters:
    """Fake flow-B meters behind DAP `dap`: one MQTT client publishes for
    all of them and receives their downlinks."""

    def __init__(self, host: str, port: int, keys: Keys, dap: int = 1,
                 accounts: dict | None = None) -> None:
        """`accounts` (username -> Account): each meter connects as itself
        (a broker with ACLs); else one anonymous client serves them all."""
        self.keys, self.dap = keys, dap
        self.host, self.port, self.accounts = host, port, accounts
        self.channels: dict[int, Channel] = {}
        self.sent: list[bytes] = []
        self.down: list[tuple[int, bytes]] = []
        self._lock = threading.Lock()
        self.clients: dict[int, mqtt.Client] = {}
        self.client = None
        if accounts is None:
            self.client = connect(host, port, f"meters-sim-{os.getpid()}", self._on_message,
                                  (f"d{dap}/+/down",))

    def client_for(self, meter: int) -> mqtt.Client:
        if self.client is not None:
            return self.client
        if meter not in self.clients:
            assert self.accounts is not None
            name = topics.meter_name(meter)
            self.clients[meter] = connect(self.host, self.port, name, self._on_message,
                                          (topics.meter_down(meter, self.dap),),
                                          self.accounts[name])
        return self.clients[meter]

    def _on_message(self, c, userdata, msg) -> None:
        _, meter, _ = topics.parse(msg.topic)
        with self._lock:
            self.down.append((meter, msg.payload))

    def downlinks(self, meter: int | None = None) -> list[bytes]:
        with self._lock:
            return [p for m, p in self.down if meter is None or m == meter]

    def envelope(self, meter: int, reqid: int = 1) -> bytes:
        ch = self.channels.setdefault(meter, self.keys.meter_channel(meter))
        _, wire = ch.seal(T_STATUS, [reqid, S_NO_DATA, 0], os.urandom(24))
        return wire

    def send(self, meter: int, reqid: int = 1, topic_meter: int | None = None) -> bytes:
        wire = self.envelope(meter, reqid)
        self.publish(topics.meter_up(meter if topic_meter is None else topic_meter, self.dap),
                     wire, self.client_for(meter))
        self.sent.append(wire)
        return wire

    def publish(self, topic: str, payload: bytes, client: mqtt.Client | None = None) -> None:
        c = client or self.client
        assert c is not None
        c.publish(topic, payload, qos=1).wait_for_publish(15)

    def close(self) -> None:
        for c in [self.client, *self.clients.values()]:
            if c is not None:
                close(c)


class HeadEnd:
    """Subscribes d<dap>/up and d<dap>/state; opens every envelope of every
    bundle with the meter's key; acknowledges bundles when auto_ack."""

    def __init__(self, host: str, port: int, keys: Keys, dap: int = 1,
                 auto_ack: bool = True, account=None) -> None:
        self.keys, self.dap, self.auto_ack = keys, dap, auto_ack
        self.bundles: list[tuple[int, list[bytes]]] = []
        self.states: list[dict] = []
        self.opened: list[tuple[int, int, int]] = []  # meter, type, counter
        self.errors: list[str] = []
        self.downlink = Counter(1000)
        self._lock = threading.Lock()
        self.client = connect(host, port, "headend" if account else f"headend-sim-{os.getpid()}",
                              self._on_message, (topics.dap_up(dap), topics.dap_state(dap)),
                              account)

    def _on_message(self, c, userdata, msg) -> None:
        try:
            if msg.topic.endswith("/state"):
                with self._lock:
                    self.states.append(json.loads(msg.payload))
                return
            kind, dap, seq, envs = gateway.decode(B, msg.payload)
            assert kind == K_BUNDLE and dap == self.dap
            for env in envs:
                _, hint = envelope.peek(env)
                mtype, ctr, body = Channel(B, self.keys.pairwise(hint), hint, DOWN,
                                           Counter()).unseal(env)
                with self._lock:
                    self.opened.append((hint, mtype, ctr))
            with self._lock:
                self.bundles.append((seq, list(envs)))
            if self.auto_ack:
                self.ack([seq])
        except Exception as e:  # recorded; the test checks errors is empty
            self.errors.append(repr(e))

    # -- what arrived ----------------------------------------------------------

    def envelopes(self) -> list[bytes]:
        with self._lock:
            return [e for _, envs in self.bundles for e in envs]

    def seqs(self) -> list[int]:
        with self._lock:
            return [s for s, _ in self.bundles]

    def state(self) -> dict:
        with self._lock:
            return self.states[-1] if self.states else {}

    def counter(self, key: str) -> int:
        return int(self.state().get("counters", {}).get(key, 0))

    def fresh_state(self, since: float) -> dict:
        """The latest status published after `since` (epoch s), or {}."""
        s = self.state()
        return s if s.get("time", 0) > since else {}

    # -- what it sends ---------------------------------------------------------

    def ack(self, seqs: list[int]) -> None:
        ranges = [(s, s) for s in sorted(seqs)]
        self.client.publish(topics.dap_ack(self.dap), gateway.ack(B, self.dap, ranges), qos=1)

    def request(self, meter: int, reqid: int = 7, tolerance: int = 0) -> bytes:
        """A sealed read request for `meter`, as forward() would carry it."""
        ch = self.keys.headend_channel(meter, self.downlink)
        _, wire = ch.seal(T_READ_CURRENT, [reqid, int(time.time()) + 300, tolerance],
                          os.urandom(24))
        return wire

    def forward(self, envs: list[bytes], tolerance: int = 0) -> None:
        self.publish_req(gateway.forward(B, tolerance, envs))

    def group(self, gid: int, members: list[int], tolerance: int = 0,
              reqid: int = 9) -> tuple[bytes, bytes, list[list]]:
        nonce = os.urandom(24)
        keyed = [(m, self.keys.pairwise(m)) for m in members]
        body, entries = group.build(B, gid, T_READ_CURRENT, self.downlink.next(),
                                    [reqid, int(time.time()) + 300, tolerance], keyed, nonce)
        self.publish_req(gateway.group(B, tolerance, gid, nonce, body, entries))
        return nonce, body, entries

    def publish_req(self, payload: bytes) -> None:
        self.client.publish(topics.dap_req(self.dap), payload, qos=1).wait_for_publish(15)

    def close(self) -> None:
        close(self.client)


def write_config(path: Path, port: int, state_dir: Path, dap: int = 1, mode: str = "aggregate",
                 aggregate: dict | None = None, queue: dict | None = None,
                 host: str = "127.0.0.1", stats_interval: float = 0.2,
                 headend_port: int | None = None, sync: str = "full",
                 account=None) -> Path:
    agg = {"window": 1.0, "max_items": 1000, "max_bytes": 262144} | (aggregate or {})
    q = {"ack_timeout": 30.0, "drain_rate": 50.0, "sync": sync} | (queue or {})
    up = ""
    if headend_port is not None:
        up = f'[headend_broker]\nhost = "{host}"\nport = {headend_port}\n'

    login = ""
    if account is not None:  # the password in a file of its own, as deployed
        secret = path.with_name(path.stem + ".secret")
        secret.write_text(account.password + "\n")
        login = f'username = "{account.username}"\npassword_file = "{secret.name}"\n'

    def table(d: dict) -> str:
        return "\n".join(f"{k} = {json.dumps(v)}" for k, v in d.items())

    path.write_text(f"""dap = {dap}
mode = "{mode}"
state_dir = "{state_dir}"

[meters_broker]
host = "{host}"
port = {port}
{login}
{up}
[aggregate]
{table(agg)}

[queue]
{table(q)}

[log]
level = "DEBUG"
stats_interval = {stats_interval}
""")
    return path


class DapProcess:
    """`python -m dap --config ...` as a subprocess, its log in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log_path = config, log
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def start(self, headend: HeadEnd | None = None, timeout: float = 30.0) -> DapProcess:
        """Start; with `headend`, wait until the DAP announces itself online."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.started = time.time()
        with open(self.log_path, "ab") as log:
            log.write(b"\n--- start ---\n")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dap", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO, env=env,
                start_new_session=True)
        if headend is not None:
            wait_until(lambda: self.check_alive() and
                       headend.fresh_state(self.started).get("state") == "online",
                       timeout, "the DAP to announce itself online")
        return self

    def check_alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the DAP exited with {self.proc.returncode}\n{self.log()}")
        return True

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"the DAP did not stop on SIGTERM\n{self.log()}") from None
        return self.proc.returncode

    def kill(self) -> None:
        """kill -9."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self, tail: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-tail:])


def _run_module(module: str, args: tuple[str, ...], timeout: float
                ) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """`python -m dap ARGS`."""
    return _run_module("dap", args, timeout)


def headend_cli(*args: str, check: bool = True, timeout: float = 120
                ) -> subprocess.CompletedProcess:
    """`python -m headend ARGS`; with `check`, a non-zero exit fails the test."""
    proc = _run_module("headend", args, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"headend {' '.join(args)} exited {proc.returncode}\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc
