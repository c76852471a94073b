"""What every benchmark needs: the machine's description, open brokers,
a provisioned site (head-end key, store, DAP configs, meter configs held in
memory), child processes and small MQTT helpers.

Brokers here are anonymous (`anonymous=True` of headend.brokerconf, the
setting docs/brokers.md reserves for tests and benchmarks): the benchmarks
measure the pipeline, not the password and ACL checks, which Mosquitto does
once per CONNECT and once per message in C.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import queue
import resource
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from nacl.public import PrivateKey

from headend.store import Store
from shared import topics
from shared.hostmqtt import BrokerSettings, client
from sim.procs import Proc
from tests import brokers, dap_helpers
from tests.brokers import Broker, mosquitto_binary, start_amqtt
from tests.dap_helpers import close
from tests.waits import wait_until

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
HOST = "127.0.0.1"


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the machine ---------------------------------------------------------------

def raise_nofile(want: int = 65536) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE for this process and its children (brokers,
    fleets): to `want` if allowed (root may raise the hard limit), else to
    the hard limit. Returns the limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for s, h in ((want, max(want, hard)), (min(want, hard), hard), (hard, hard)):
        if s <= soft and h <= hard:
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (s, h))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return (p.stdout + p.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({e})"


def machine() -> dict[str, Any]:
    """Cores, memory, OS, Python, library and broker versions."""
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mosq = _run([mosquitto_binary(), "-h"]).splitlines()[0]
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        mosq = f"unavailable ({e})"
    mpy_pkg = REPO / "node_modules" / "@micropython" / "micropython-webassembly-pyscript"
    try:
        mpy = json.loads((mpy_pkg / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        mpy = None
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "hostname": platform.node(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cpu_model": cpu_model,
        "memory_bytes": psutil.virtual_memory().total,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "os": platform.platform(),
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "sqlite": sqlite3.sqlite_version,
        "libraries": {d: _version(d) for d in ("paho-mqtt", "PyNaCl", "cbor2", "amqtt",
                                                 "psutil")},
        "brokers": {"mosquitto": mosq, "amqtt": _version("amqtt")},
        "node": _run(["node", "--version"]),
        "micropython_webassembly": mpy,
        "rlimit_nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    }


def wanted(names: tuple[str, ...], only: list[str] | None) -> bool:
    """Whether any of these metric names is asked for (`--only` names or
    prefixes; nothing asked: all)."""
    return not only or any(n.startswith(o) or o.startswith(n) for n in names for o in only)


# -- brokers -------------------------------------------------------------------

def start_mosquitto(workdir: Path) -> Broker:
    """An open Mosquitto on a free loopback port, with the project's queue
    settings (headend.brokerconf) and no persistence file (queues are held
    in memory either way; the autosave would only add noise). Its
    max_connections is unlimited (the default); the real bound is the
    process's RLIMIT_NOFILE, inherited from this process (raise_nofile)."""
    return brokers.start_mosquitto(workdir, persistence=False)


def start_broker(kind: str, workdir: Path) -> Broker:
    if kind == "mosquitto":
        return start_mosquitto(workdir)
    d = Path(workdir) / "amqtt"
    shutil.rmtree(d, ignore_errors=True)
    return start_amqtt(Path(workdir), anonymous=True)


# -- a site --------------------------------------------------------------------

class Site:
    """A head-end site laid out as `provision` would (headend.toml,
    headend.key, headend.db, daps/d<k>/dap.toml), for an open broker, with
    scheduled collection off so that only the benchmark's reads run. Meter
    configs are kept in memory (`meter_json`): thousands of meters need no
    thousands of files."""

    def __init__(self, root: Path, port: int, host: str = HOST) -> None:
        self.root = Path(root)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.host, self.port = host, port
        sk = PrivateKey.generate()
        self.secret_key = bytes(sk)
        self.public_key = bytes(sk.public_key)
        key = self.root / "headend.key"
        key.write_bytes(self.secret_key)
        key.chmod(0o600)
        (self.root / "headend.toml").write_text(
            'db = "headend.db"\nsecret_key_file = "headend.key"\n\n'
            f'[broker]\nhost = "{host}"\nport = {port}\nkeepalive = 120\n\n'
            "[requests]\nretries = 2\n\n[collect]\nenabled = false\n")
        self.db = self.root / "headend.db"
        self.store = Store(self.db)
        self.meter_json: dict[int, str] = {}
        self.meter_secret: dict[int, bytes] = {}

    @property
    def broker(self) -> BrokerSettings:
        return BrokerSettings(host=self.host, port=self.port, keepalive=120)

    def dap_home(self, dap: int) -> Path:
        return self.root / "daps" / topics.dap_name(dap)

    def add_dap(self, dap: int, mode: str, **kw: Any) -> Path:
        self.store.add_dap(dap, mode)
        return self.write_dap_config(dap, mode, **kw)

    def write_dap_config(self, dap: int, mode: str, *, window: float = 10.0,
                         max_items: int = 500, max_bytes: int = 262144, sync: str = "full",
                         stats_interval: float = 60.0, level: str = "INFO") -> Path:
        home = self.dap_home(dap)
        home.mkdir(parents=True, exist_ok=True)
        path = home / "dap.toml"
        path.write_text(
            f'dap = {dap}\nmode = "{mode}"\nstate_dir = "state"\n\n'
            f'[meters_broker]\nhost = "{self.host}"\nport = {self.port}\nkeepalive = 120\n\n'
            f"[aggregate]\nwindow = {window}\nmax_items = {max_items}\nmax_bytes = {max_bytes}\n\n"
            f'[queue]\nsync = "{sync}"\n\n[log]\nlevel = "{level}"\n'
            f"stats_interval = {stats_interval}\n")
        return path

    def add_meters(self, ids: Iterable[int], dap: int | None, group: int | None) -> list[str]:
        rows, texts = [], []
        hpk = self.public_key.hex()
        for m in ids:
            sk = PrivateKey.generate()
            self.meter_secret[m] = bytes(sk)
            rows.append((m, bytes(sk.public_key), dap, group, 900))
            text = json.dumps({
                "meter": m, "secret_key": bytes(sk).hex(), "headend_public_key": hpk,
                "dap": dap, "group": group, "period": 900,
                "broker": {"host": self.host, "port": self.port, "username": None,
                           "password": None, "tls": False, "ca": None}})
            self.meter_json[m] = text
            texts.append(text)
        self.store.add_meters(rows)
        return texts

    def stored(self) -> int:
        return int(self.store.counts().get("stored", 0))

    def accepted(self) -> int:
        return int(self.store.counts().get("accepted", 0))

    def close(self) -> None:
        self.store.close()


# -- child processes -----------------------------------------------------------

def python_proc(name: str, args: list[str], logdir: Path, *, ready: str | None = None,
                cwd: Path = REPO, timeout: float = 60.0) -> Proc:
    return Proc(name, [PY, *args], cwd=cwd, log=logdir / f"{name}.log", ready=ready,
                timeout=timeout, env={"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})


def headend_serve(site: Site, logdir: Path) -> Proc:
    """`python -m headend serve --site ...`: the head-end in its own process."""
    return python_proc("headend", ["-m", "headend", "serve", "--site", str(site.root),
                                   "--stats-interval", "3600"], logdir, ready="serving")


def start_dap(site: Site, dap: int, logdir: Path, timeout: float = 60.0) -> Proc:
    """`python -m dap --config ...`; returns once the DAP announced itself
    online on its retained state topic (so it is subscribed)."""
    since = time.time()
    p = python_proc(f"dap{dap}", ["-m", "dap", "--config", str(site.dap_home(dap) / "dap.toml")],
                    logdir, cwd=site.dap_home(dap))
    try:
        wait_state(site.host, site.port, dap, since, timeout)
    except Exception:
        p.stop()
        raise
    return p


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


# -- MQTT helpers --------------------------------------------------------------

def mqtt_client(client_id: str, clean: bool = True, inflight: int = 0) -> mqtt.Client:
    """A stock paho client (shared.hostmqtt's settings, not its
    BufferedClient) for the open broker: the baselines and the load."""
    return client(BrokerSettings(), client_id, clean_session=clean, inflight=inflight,
                  buffered=False)


def connect_wait(c: mqtt.Client, host: str, port: int, subs: Iterable[str] = (),
                 timeout: float = 20.0) -> mqtt.Client:
    """tests.dap_helpers.connect_wait, with a keepalive long enough for a
    busy benchmark."""
    return dap_helpers.connect_wait(c, host, port, subs, keepalive=120, timeout=timeout)


def create_session(host: str, port: int, client_id: str, subs: list[str]) -> None:
    """Make a persistent session with these subscriptions and leave it: QoS 1
    messages published from now on queue for it at the broker."""
    c = connect_wait(mqtt_client(client_id, clean=False), host, port, subs)
    close(c)


def wait_state(host: str, port: int, dap: int, since: float, timeout: float) -> dict:
    """Wait for DAP `dap` to publish an 'online' status newer than `since`."""
    got: dict = {}
    ev = threading.Event()

    def on_message(c, u, msg):
        try:
            s = json.loads(msg.payload)
        except ValueError:
            return
        if s.get("state") == "online" and s.get("time", 0) >= since - 1:
            got.update(s)
            ev.set()

    c = mqtt_client(f"bench-state-{os.getpid()}-{dap}")
    c.on_message = on_message
    connect_wait(c, host, port, [topics.dap_state(dap)])
    try:
        if not ev.wait(timeout):
            raise RuntimeError(f"DAP {dap} did not come online within {timeout:.0f} s")
    finally:
        close(c)
    return got


def publish_all(host: str, port: int, messages: list[tuple[str, bytes]], clients: int = 4,
                timeout: float = 300.0) -> float:
    """Publish (topic, payload) at QoS 1 from `clients` connections in
    parallel; return once every PUBACK is in. Returns the seconds taken."""
    t0 = time.perf_counter()
    parts = [messages[i::clients] for i in range(clients)]
    errors: list[BaseException] = []

    def run(i: int, part: list[tuple[str, bytes]]) -> None:
        try:
            done = threading.Event()
            left = [len(part)]
            lock = threading.Lock()

            def on_publish(c, u, mid, reason, props):
                with lock:
                    left[0] -= 1
                    if left[0] <= 0:
                        done.set()

            c = mqtt_client(f"bench-pub-{os.getpid()}-{i}")
            c.on_publish = on_publish
            connect_wait(c, host, port)
            if not part:
                done.set()
            for topic, payload in part:
                c.publish(topic, payload, qos=1)
            if not done.wait(timeout):
                raise RuntimeError(f"publisher {i}: {left[0]} PUBACKs missing")
            close(c)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(parts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05,
             procs: Iterable[Proc] = ()) -> Any:
    """tests.waits.wait_until (AssertionError on timeout) that also stops
    at once, with its log, if one of `procs` has exited."""
    procs = list(procs)

    def exited() -> None:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited while waiting for {what}:\n{p.tail()}")

    return wait_until(pred, timeout, what, interval, fail=exited)


def _span(db: Path, table: str, column: str, since: float) -> tuple[int, float, float, int]:
    """(rows, first, last time, rows at the last time) of `table` since
    `since`, by `column`: the time each batch of the writer began, so
    (rows - last batch) / (last - first) is the rate, with no polling.
    All zeros while the table does not exist yet."""
    con = sqlite3.connect(db, timeout=30)
    try:
        n, lo, hi = con.execute(f"SELECT count(*), min({column}), max({column}) FROM {table} "
                                f"WHERE {column} >= ?", (since,)).fetchone()
        last = con.execute(f"SELECT count(*) FROM {table} WHERE {column} = ?",
                           (hi,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0, 0.0, 0.0, 0
    finally:
        con.close()
    return int(n), float(lo or 0.0), float(hi or 0.0), int(last)


def stored_span(db: Path, since: float = 0.0) -> tuple[int, float, float, int]:
    """(rows, first, last received_at, rows of the last batch) of a
    head-end store."""
    return _span(db, "readings", "received_at", since)


class ChildLines:
    """A `python -m bench.<module>` child speaking JSON lines: commands on
    its stdin, events on its stdout, its stderr in a log file."""

    def __init__(self, name: str, module: str, args: list[str], logdir: Path) -> None:
        self.name = name
        logdir.mkdir(parents=True, exist_ok=True)
        self._log = open(logdir / f"{name}.log", "ab")
        self.p = subprocess.Popen([PY, "-m", module, *args], cwd=REPO, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self._log, text=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO)},
                                  start_new_session=True)
        # One reader for the child's whole life: events wait here in order,
        # and an expect() that timed out leaves nothing reading behind it.
        self._events: queue.SimpleQueue[dict | None] = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            try:
                self._events.put(json.loads(line))
            except ValueError:
                continue
        self._events.put(None)  # the child closed its stdout

    @property
    def pid(self) -> int:
        return self.p.pid

    def send(self, cmd: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()

    def expect(self, key: str, timeout: float = 120.0) -> dict:
        """The next event that has `key` (others are skipped)."""
        end = time.monotonic() + timeout
        while True:
            try:
                ev = self._events.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                ev = None
            else:
                if ev is None:
                    self._events.put(None)  # closed: the next expect() fails at once too
            if ev is None:
                raise TimeoutError(f"{self.name}: no {key!r} event within {timeout:.0f} s "
                                   f"(exit status {self.p.poll()})")
            if key in ev:
                return ev

    def stop(self, timeout: float = 20.0) -> None:
        if self.p.poll() is None:
            try:
                self.send("stop")
                self.p.wait(timeout)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.p.kill()
                self.p.wait(5)
        self._log.close()


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p * (len(v) - 1))))]


def clear_session(host: str, port: int, client_id: str) -> None:
    """Delete a persistent session (a clean-session CONNECT with its id), so
    that later phases do not also queue copies for it."""
    c = connect_wait(mqtt_client(client_id, clean=True), host, port)
    close(c)


def dap_queue_span(site: Site, dap: int, since: float) -> tuple[int, float, float, int]:
    """(envelopes, first, last received, envelopes of the last batch) in a
    DAP's disk queue since `since`."""
    return _span(site.dap_home(dap) / "state" / "queue.sqlite3", "envelopes", "received", since)
