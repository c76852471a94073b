"""The meter firmware as it goes onto a board: the built .mpy bundle, booted
by its main.py under the real MicroPython WebAssembly port, with the
hardware-only modules (machine, network, ntptime, umqtt.simple) replaced by
the recording stand-ins in tests/mpy/boardstub/ (mounted at /lib, where mip
installs umqtt on a board).

What this proves: the bundle's .mpy files are of the port's .mpy version
and load; main.py reads a meter.json made now with fresh keys, starts the
meter core, arms the watchdog after its grace period, sets the sealed last
will, publishes a sealed birth that the head-end's Channel (PyNaCl) opens,
answers a sealed request once (and refuses its replay), and says an orderly
goodbye on Ctrl-C. A broken meter.json gives the documented safe mode. What
it cannot prove: anything about the radio, sockets, TLS, the real pulse
counter, flash timing or the watchdog firing: those are stand-ins here.

The CPython tests at the end check the board and transport logic that the
stand-ins cannot exercise (clock slewing, blink codes, S0 arithmetic,
backoff, the bounded PUBACK wait).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from firmware import board as fb
from firmware import mqtt as fm
from firmware.outbox import Outbox
from headend import flashing
from shared.backend import NATIVE
from shared.channel import Channel
from shared.const import (
    DEATH_ORDERLY,
    DEATH_WILL,
    DOWN,
    Q_CLOCK,
    Q_OUTAGE,
    Q_PARTIAL,
    T_BIRTH,
    T_CURRENT,
    T_DEATH,
    T_READ_CURRENT,
)
from shared.obis import ENERGY_EXPORT, ENERGY_IMPORT, POWER, VOLTAGE
from tests.mpy_harness import ROOT, run_script

BOARDSTUB = ROOT / "tests" / "mpy" / "boardstub"
METER = 1001

SCRIPT = r"""
import binascii, json, os, sys, time
os.chdir('/proj')
import boardlog
run = json.load(open('/proj/run.json'))
boardlog.limits.update(run['limits'])
for h in run['downlinks']:
    boardlog.downlinks.append(binascii.unhexlify(h))
if run.get('fix_at'):
    def fix():
        with open('/proj/meter.json', 'w') as f:
            f.write(run['fix'])
    boardlog.hooks[(run['fix_at'][0], run['fix_at'][1])] = fix
t0 = time.ticks_ms()
err = None
try:
    if run['mode'] == 'exec':
        exec(open('main.py').read(), {'__name__': '__main__'})
    else:
        import main
        main.run(**run['kwargs'])
except BaseException as e:
    err = repr(e)
elapsed = time.ticks_diff(time.ticks_ms(), t0)
files = {}
for name in run['modules']:
    m = sys.modules.get(name)
    files[name] = getattr(m, '__file__', None) if m is not None else None

def plain(x):
    if isinstance(x, (bytes, bytearray)):
        return {'hex': binascii.hexlify(x).decode()}
    if isinstance(x, (list, tuple)):
        return [plain(i) for i in x]
    return x

out = {'error': err, 'elapsed': elapsed, 'files': files, 't0': t0,
       'events': plain(boardlog.events), 'counts': boardlog.counts}
with open('/proj/out.json', 'w') as f:
    json.dump(out, f)
"""

MODULES = ["firmware.meter", "firmware.app", "firmware.board", "firmware.mqtt",
           "firmware.outbox", "firmware.config", "shared.box", "shared.channel", "main"]


def _unplain(x):
    if isinstance(x, dict) and set(x) == {"hex"}:
        return bytes.fromhex(x["hex"])
    if isinstance(x, list):
        return [_unplain(i) for i in x]
    return x


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rep = flashing.build(tmp_path_factory.mktemp("fw") / "out")
    return Path(rep["out"])


@pytest.fixture
def keys():
    """Fresh key pairs, made at test time (none is ever committed)."""
    meter, headend = PrivateKey.generate(), PrivateKey.generate()
    key = NATIVE.beforenm(bytes(meter.public_key), bytes(headend))
    return meter, headend, key


def meter_doc(meter: PrivateKey, headend: PrivateKey, **extra) -> dict:
    doc = {
        "meter": METER, "secret_key": bytes(meter).hex(),
        "headend_public_key": bytes(headend.public_key).hex(),
        "dap": None, "group": None, "period": 900,
        "broker": {"host": "broker.invalid", "port": 1883, "username": f"m{METER}",
                   "password": "pw-for-test", "tls": False, "ca": None},
        "wifi": {"ssid": "meters", "password": "wifi-pw"},
        "s0": {"pin": 4, "pulses_per_kwh": 1000},
        "led": {"pin": 2},
        "voltage": {"nominal": 230},
    }
    doc.update(extra)
    return doc


def boot(bundle: Path, config: str | None, *, limits: dict, downlinks=(), mode="exec",
         kwargs=None, fix_at=None, fix=None):
    run = {"limits": limits, "downlinks": [d.hex() for d in downlinks], "mode": mode,
           "kwargs": kwargs or {}, "modules": MODULES, "fix_at": fix_at, "fix": fix}
    files = {"/proj/run.json": json.dumps(run)}
    if config is not None:
        files["/proj/meter.json"] = config
    res = run_script(SCRIPT, files=files, outputs=["/proj/out.json"],
                     trees=[(bundle, "/proj"), (BOARDSTUB, "/lib")], timeout=300)
    res.check()
    out = json.loads(res.outputs["/proj/out.json"])
    out["events"] = [_unplain(e) for e in out["events"]]
    out["stdout"] = res.stdout
    return out


def events(out: dict, kind: str) -> list[list]:
    return [e[2:] for e in out["events"] if e[1] == kind]


class _Ctr:
    def __init__(self) -> None:
        self.n = 0

    def next(self) -> int:
        self.n += 1
        return self.n


# -- the bundle and the port ---------------------------------------------------------


def test_boot_bundle_headers_match_the_port(bundle: Path) -> None:
    res = run_script("import sys\nprint('MPY', sys.implementation._mpy)\n",
                     trees=[(bundle, "/proj")]).check()
    sys_mpy = int(res.stdout.split("MPY")[1].split()[0])
    version, sub, arch = sys_mpy & 0xFF, (sys_mpy >> 8) & 3, sys_mpy >> 10
    assert version == flashing.MPY_VERSION
    mpys = sorted(bundle.rglob("*.mpy"))
    assert len(mpys) >= 20
    for p in mpys:
        head = p.read_bytes()[:4]
        assert head[0:1] == b"M", p
        assert head[1] == version, f"{p}: .mpy v{head[1]}, the port loads v{version}"
        # Bytecode only: no native code, so neither arch nor sub-version is
        # set (the sub-version is checked only for native code, arch must
        # then match the port's, which is {arch}).
        assert head[2] == 0, f"{p}: feature byte {head[2]:#x} (native code?)"
        assert head[3] == 31, f"{p}: built for {head[3]}-bit small ints"
    assert sub == 3 and arch == 0  # the WebAssembly port: .mpy 6.3, no native arch
    # And the port does import them: every module comes from its .mpy.
    names = sorted({"firmware." + p.stem for p in (bundle / "firmware").glob("*.mpy")}
                   | {"shared." + p.stem for p in (bundle / "shared").glob("*.mpy")})
    names = [n.replace(".__init__", "") for n in names]
    src = "import sys\n" + "".join(f"import {n}\n" for n in names) + (
        "for n in %r:\n    print('FILE', n, sys.modules[n].__file__)\n" % (names,))
    res = run_script(src, trees=[(bundle, "/proj")]).check()
    got = dict(line.split()[1:3] for line in res.stdout.splitlines() if line.startswith("FILE"))
    assert set(got) == set(names)
    assert all(f.endswith(".mpy") for f in got.values()), got


# -- a good boot ---------------------------------------------------------------------


def test_boot_from_mpy_bundle_publishes_sealed_will_and_birth(bundle: Path, keys) -> None:
    meter_sk, headend_sk, key = keys
    he = Channel(NATIVE, key, METER, DOWN, _Ctr())
    now = int(time.time())
    _, request = he.seal(T_READ_CURRENT, [7, now + 600, 60], os.urandom(24))
    out = boot(bundle, json.dumps(meter_doc(meter_sk, headend_sk)),
               limits={"wdt_feeds": 40}, downlinks=[request, request])
    assert out["error"] is None, out["stdout"]
    # Every firmware and shared module ran from the .mpy bundle.
    for name in MODULES[:-1]:
        assert out["files"][name].endswith(".mpy"), out["files"]
    assert out["files"]["main"] is None or out["files"]["main"].endswith("main.py")

    # Hardware: S0 on GPIO 4 through the pulse counter, LED on GPIO 2, the
    # watchdog armed only after the 3 s grace period, Wi-Fi, NTP, RTC.
    assert [4, 1, 2] in events(out, "pin")  # IN, PULL_UP
    assert events(out, "counter")[0] == [0, 4, 2, 12000]  # unit 0, FALLING, filter
    assert any(e[0] == 2 for e in events(out, "pin.value"))
    wdt = [e for e in out["events"] if e[1] == "wdt"]
    assert [e[2] for e in wdt] == [30000]
    assert wdt[0][0] - out["t0"] >= 2900
    assert out["counts"]["wdt_feeds"] == 40
    assert events(out, "wlan.connect")[0] == ["meters", len("wifi-pw")]
    assert events(out, "ntp") and events(out, "rtc.set")

    # MQTT: client id, credentials, keepalive, will, clean session, downlink.
    client = events(out, "mqtt.client")
    assert client == [[f"m{METER}", "broker.invalid", 1883, f"m{METER}", "pw-for-test", 60,
                       False]]
    (will_topic, will, will_retain, will_qos), = events(out, "mqtt.will")
    assert (will_topic, will_retain, will_qos) == (f"m{METER}/up", False, 1)
    assert events(out, "mqtt.connect") == [[True, True]]
    assert events(out, "mqtt.subscribe") == [[f"m{METER}/down", 1]]
    assert len(events(out, "mqtt.deliver")) == 2
    pubs = events(out, "mqtt.publish")
    assert all(p[0] == f"m{METER}/up" and p[2:] == [False, 1] for p in pubs)
    assert len(pubs) == 3, "birth, one answer (the replay is refused), goodbye"
    birth, answer, bye = (p[1] for p in pubs)

    # The head-end opens all of it with PyNaCl.
    b_type, b_ctr, b_body = he.open(birth)
    assert b_type == T_BIRTH
    session, will_ctr, t, period, oldest = b_body
    assert session == 1  # a fresh meter's first session
    assert abs(t - now) < 120 and period == 900
    w_type, w_ctr, w_body = he.open(will)  # accepted as the will the birth named
    assert (w_type, w_ctr, w_body) == (T_DEATH, will_ctr, [session, DEATH_WILL])
    assert w_ctr < b_ctr
    a_type, a_ctr, a_body = he.open(answer)
    assert a_type == T_CURRENT and a_body[0] == 7 and a_ctr > b_ctr
    regs = dict(zip(a_body[2][0::2], a_body[2][1::2]))
    assert set(regs) == {ENERGY_IMPORT, ENERGY_EXPORT, POWER, VOLTAGE}
    assert regs[ENERGY_EXPORT] == 0 and regs[VOLTAGE] == 2300  # no export input; nominal
    assert regs[ENERGY_IMPORT] > 0  # the stand-in counter saw pulses
    d_type, d_ctr, d_body = he.open(bye)
    assert (d_type, d_body) == (T_DEATH, [session, DEATH_ORDERLY]) and d_ctr > a_ctr
    assert events(out, "mqtt.disconnect") == [[]]
    assert "goodbye sent" in out["stdout"]
    assert not events(out, "reset")


# -- safe boot -----------------------------------------------------------------------


def _short_key(meter_sk, headend_sk) -> str:
    doc = meter_doc(meter_sk, headend_sk)
    doc["secret_key"] = doc["secret_key"][:62]
    return json.dumps(doc)


BROKEN = {
    "missing": (lambda m, h: None, "meter.json not found"),
    "bad_json": (lambda m, h: '{"meter": 1001, "secret_key": ', "not valid JSON"),
    "short_key": (_short_key, "'secret_key' must be 64 lowercase hex digits"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_boot_with_broken_config_enters_safe_mode(bundle: Path, keys, case: str) -> None:
    meter_sk, headend_sk, _ = keys
    make, problem = BROKEN[case]
    out = boot(bundle, make(meter_sk, headend_sk), limits={"pin_writes": 24})
    assert out["error"] is None, out["stdout"]  # it returned to the REPL on Ctrl-C
    text = out["stdout"]
    assert text.count("CONFIG ERROR") == 1, text  # one attempt in ~2.4 s: no tight loop
    assert problem in text
    assert "make flash" in text or "provision" in text  # says how to fix it
    assert "safe mode" in text and "stopped in safe mode" in text
    # The LED flickers the config-error code: on/off every 100 ms on GPIO 2.
    led = [e for e in out["events"] if e[1] == "pin.value" and e[2] == 2]
    assert len(led) == 24
    assert [e[3] for e in led] == [1, 0] * 12
    gaps = [b[0] - a[0] for a, b in zip(led[1:], led[2:])]
    assert 80 <= statistics.median(gaps) <= 160, gaps
    assert out["elapsed"] >= 2000  # it slept between blinks rather than spun
    # Nothing else happened: no watchdog, no network, no MQTT, no reboot.
    kinds = {e[1] for e in out["events"]}
    assert kinds <= {"pin", "pin.value", "stop"}, kinds


def test_boot_safe_mode_retries_slowly_and_recovers(bundle: Path, keys) -> None:
    meter_sk, headend_sk, _ = keys
    good = json.dumps(meter_doc(meter_sk, headend_sk))
    out = boot(bundle, None, mode="call", kwargs={"retry_ms": 500, "grace_ms": 0},
               limits={"wdt_feeds": 20}, fix_at=["pin_writes", 16], fix=good)
    assert out["error"] is None, out["stdout"]
    tries = out["stdout"].count("CONFIG ERROR")
    assert 2 <= tries <= 5, out["stdout"]  # every 500 ms, not in a tight loop
    fixed = next(e[0] for e in out["events"] if e[1] == "hook")
    connect = next(e[0] for e in out["events"] if e[1] == "mqtt.connect")
    assert connect > fixed
    assert events(out, "wdt") == [[30000]]
    assert len(events(out, "mqtt.publish")) == 2  # birth and goodbye


# -- board logic on CPython ------------------------------------------------------------


class _Up:
    def __init__(self) -> None:
        self.t = 0

    def ms(self) -> int:
        return self.t


def test_boot_clock_never_moves_an_interval_boundary() -> None:
    up = _Up()
    c = fb.Clock(900, up)
    assert c.now() is None
    base = 1_750_000_000 - 1_750_000_000 % 900
    c.sync(base + 100)
    assert c.now() == base + 100
    # 30 s behind: applied at once, it stays inside the interval.
    up.t = 10_000
    c.sync(base + 110 + 30)
    assert c.now() == base + 140 and c.pending == 0
    # From here local time is base + 130 + uptime.
    # 20 s ahead, just past a boundary: held until it can be applied
    # without going back over the boundary.
    up.t = 780_000  # local base + 910
    c.sync(base + 890)
    assert c.now() == base + 910 and c.pending == -20
    up.t = 800_000  # local base + 930: now 20 s back stays in the interval
    assert c.now() == base + 910 and c.pending == 0
    # From here local time is base + 110 + uptime.
    # 40 s behind, 30 s before the end of an interval: held until the next.
    up.t = 1_660_000  # local base + 1770
    c.sync(base + 1810)
    assert c.now() == base + 1770 and c.pending == 40
    up.t = 1_689_000
    assert c.now() == base + 1799  # the boundary comes on time
    up.t = 1_690_000
    assert c.now() == base + 1840 and c.pending == 0  # applied inside the new interval
    # Every boundary crossed exactly once, in order, over the whole run.
    seen = []
    c2 = fb.Clock(900, _Up())
    up2 = c2.uptime
    c2.sync(base)
    last_k = base // 900
    for s in range(0, 4 * 900, 7):
        up2.t = s * 1000
        if s % 301 == 0:
            c2.sync(base + s + (s % 5) * 60 - 120)
        k = c2.now() // 900
        assert k >= last_k
        if k > last_k:
            seen.append(k)
            assert k == last_k + 1
        last_k = k
    # A step of a period or more is applied at once and counted (Q_CLOCK).
    steps = c2.steps
    c2.sync(c2.now() + 5000)
    assert c2.steps == steps + 1


def test_boot_epoch_conversion() -> None:
    assert fb.embedded_to_unix(0, 2000) == 946684800
    assert fb.embedded_to_unix(123, 1970) == 123
    assert fb.unix_to_embedded(fb.embedded_to_unix(777, 2000), 2000) == 777


def test_boot_led_blink_codes() -> None:
    class Pin:
        OUT = 3

        def __init__(self, n, mode):
            self.writes = []

        def value(self, v):
            self.writes.append(v)

    class M:
        pass

    m = M()
    m.Pin = Pin
    old = fb.machine
    fb.machine = m
    try:
        led = fb.Led(2)
        lit = []
        led.show(fb.NO_BROKER, 0)
        for t in range(0, 2950, 10):  # one cycle of the pattern
            led.update(t)
            lit.append(led.lit)
        # three blinks, then the pause
        rises = sum(1 for a, b in zip(lit, lit[1:]) if b and not a) + (1 if lit[0] else 0)
        assert rises == 3
        led.show(fb.CONFIG_ERROR, 0)
        led.update(50)
        assert led.lit
        led.update(150)
        assert not led.lit
        led.show(fb.BOOT, 0)
        assert all((led.update(t), led.lit)[1] for t in range(0, 5000, 333))
        low = fb.Led(3, active_low=True)
        low.show(fb.BOOT, 0)
        assert low.pin.writes == [0]
    finally:
        fb.machine = old


def test_boot_s0_energy_and_flags() -> None:
    counts = {4: 0, 5: 0}

    class Pin:
        IN, PULL_UP, IRQ_FALLING = 1, 2, 2

        def __init__(self, n, mode=None, pull=None):
            self.n = n

    class Counter:
        FALLING = 2

        def __init__(self, unit, pin, edge=None, filter_ns=0):
            self.pin = pin.n

        def value(self):
            return counts[self.pin]

    class M:
        pass

    m = M()
    m.Pin, m.Counter = Pin, Counter
    old = fb.machine
    fb.machine = m
    try:
        s0 = fb.S0(4, 800, export_pin=5, nominal_dv=2300)
        assert s0.take(10) == (0, 0, Q_OUTAGE)  # before the clock was set
        counts[4] = 7  # counted since power-on
        s0.start(11)
        assert s0.take(11) == (8, 0, Q_PARTIAL)  # 7 * 1000 // 800, the rest carried
        counts[4] = 15
        counts[5] = 4
        assert s0.peek(12, 100) == (18 - 8, 5)
        s0.note(Q_CLOCK)
        assert s0.take(12) == (10, 5, Q_CLOCK)  # 15 pulses = 18 Wh in all: none lost
        assert s0.take(13) == (0, 0, 0)
        s0.tick(0)
        counts[4] = 15 + 80  # 100 Wh in 60 s = 6 kW
        s0.tick(60_000)
        assert s0.power(0) == 6000
        assert s0.voltage(0) == 2300
        bare = fb.S0(4, 1000)
        assert bare.voltage(0) == 0 and any("no sensor" in n for n in bare.notes)
        assert any("export" in n for n in bare.notes)
    finally:
        fb.machine = old


# -- transport logic on CPython ----------------------------------------------------------


class FakeFlash:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.writes = 0

    def read(self, name):
        return self.files.get(name)

    def write(self, name, data):
        self.writes += 1
        self.files[name] = bytes(data)

    def append(self, name, data):
        self.writes += 1
        self.files[name] = self.files.get(name, b"") + bytes(data)

    def remove(self, name):
        self.files.pop(name, None)

    def names(self):
        return list(self.files)


class FakeLink:
    def __init__(self, script: list) -> None:
        self.script = script  # what each call does: "ok" or an exception
        self.up = "m1/up"
        self.birth_tried = False
        self.published: list[bytes] = []
        self.closed = False

    def _do(self) -> None:
        r = self.script.pop(0) if self.script else "ok"
        if r != "ok":
            raise r

    def open(self, will, birth, on_message, backlog=None):
        self._do()
        self.birth_tried = True
        if backlog is not None:
            backlog(self)
        self.publish(birth)
        self.on_message = on_message

    def publish(self, payload):
        self._do()
        self.published.append(payload)

    def poll(self):
        pass

    def ping(self):
        pass

    def silent_ms(self):
        return 0

    def close(self, clean=False):
        self.closed = True


def test_boot_transport_backoff_and_outbox() -> None:
    ob = Outbox(FakeFlash())
    for i in range(3):
        ob.push(b"resp%d" % i)
    links: list[FakeLink] = []
    scripts = [[OSError(113)], [OSError(113)], ["ok", "ok", OSError(110)], []]
    hellos = []

    def make():
        links.append(FakeLink(scripts.pop(0)))
        return links[-1]

    def hello():
        hellos.append((b"will%d" % len(hellos), b"birth%d" % len(hellos)))
        return hellos[-1]

    tr = fm.Transport(make, ob, lambda n: 0, log=lambda *a: None)
    tr.poll(0, True, hello)  # connect refused
    assert not tr.connected() and tr.retry_ms == 500
    tr.poll(100, True, hello)  # too early: no attempt
    assert len(links) == 1
    tr.poll(500, True, hello)  # refused again, backoff doubles
    assert tr.retry_ms == 500 + 1000 and len(hellos) == 1  # the unseen will is reused
    # Connects; the backlog goes out before the birth (its counters are older
    # than the new will's), and a publish fails part-way.
    tr.poll(1500, True, hello)
    assert not tr.connected() and links[-1].published == [b"resp0"] and len(ob) == 2
    tr.poll(1500 + 2000, True, hello)
    assert tr.connected() and len(hellos) == 2  # a broker saw session 0's will: a new one
    assert links[-1].published == [b"resp1", b"resp2", b"birth1"] and len(ob) == 0
    tr._on_message("m1/down", b"x" * 10)
    assert tr.inbox == [b"x" * 10]
    for _ in range(20):
        tr._on_message("m1/down", b"y")
    assert len(tr.inbox) == fm.INBOX_MAX and tr.stats["inbox_dropped"] == 20 - fm.INBOX_MAX + 1
    tr.poll(4000, False, hello)  # Wi-Fi lost: the link is dropped
    assert not tr.connected() and links[-1].closed
    assert tr.goodbye(b"bye") is False


def test_boot_outbox_bounded_and_persistent() -> None:
    flash = FakeFlash()
    ob = Outbox(flash, max_items=4)
    for i in range(10):
        ob.push(b"r%d" % i)
    assert [p for _, p in ob.items] == [b"r6", b"r7", b"r8", b"r9"] and ob.dropped == 6
    ob.ack(ob.peek()[0])
    again = Outbox(flash, max_items=4)  # a reboot
    assert [p for _, p in again.items] == [b"r7", b"r8", b"r9"]
    again.push(b"r10")
    assert again.peek() == (7, b"r7")


def test_boot_guard_bounds_the_puback_wait(monkeypatch) -> None:
    class Sock:
        def __init__(self):
            self.timeouts = []

        def read(self, n):
            return None

        def settimeout(self, t):
            self.timeouts.append(t)

        def close(self):
            pass

    raw = Sock()
    g = fm._Guard(raw, raw)
    g.setblocking(True)
    g.setblocking(False)
    assert raw.timeouts == [fm.TIMEOUT_S, 0]  # "blocking" is never "forever"
    clock = [1000]
    monkeypatch.setattr(fm, "ticks_ms", lambda: clock[0])
    g.deadline = 5000
    assert g.read(1) is None
    clock[0] = 5000
    with pytest.raises(OSError):
        g.read(1)  # a publish still waiting for its PUBACK at the deadline gives up


def test_boot_app_catches_up_a_long_outage_feeding_the_watchdog() -> None:
    from firmware.app import App
    from firmware.metrology import SimulatedLoad

    class Wdt:
        feeds = 0

        def feed(self):
            Wdt.feeds += 1

    class Board:
        pass

    b = Board()
    b.uptime, b.wdt = _Up(), Wdt()
    b.clock = fb.Clock(900, b.uptime)
    b.source = SimulatedLoad(5, 900)
    flash = FakeFlash()
    cfg = {"meter": 5, "period": 900}
    app = App(cfg, bytes(32), b, flash, lambda: None, NATIVE, log=lambda *a: None)
    t0 = 1_750_000_000 - 1_750_000_000 % 900
    app.catch_up(t0)
    before = Wdt.feeds
    app.catch_up(t0 + 5 * 86400)  # five days off
    assert app.meter.profile.last == (t0 + 5 * 86400) // 900 - 1
    assert Wdt.feeds - before >= 5 * 96 // 96 - 1  # fed between chunks of 96
    want = SimulatedLoad(5, 900)
    imp = want.initial()[0] + sum(want.interval(k)[0] for k in range(t0 // 900, t0 // 900 + 480))
    assert app.meter.profile.registers()[0] == imp & 0xFFFFFFFF
