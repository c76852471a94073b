# The board: everything that touches ESP32 hardware, in small classes that
# the main loop (firmware/app.py) drives and none of which blocks for long.
#
#   Uptime    milliseconds since boot as a plain growing number
#   Clock     Unix time from the uptime, set by NTP (or a valid RTC) without
#             ever making an interval boundary jump or repeat
#   Ntp       when to ask ntptime, and the 2000/1970 epoch conversion
#   WiFi      network.WLAN station: connect, reconnect with backoff
#   Watchdog  machine.WDT, fed by the main loop
#   Led       non-blocking blink codes (see the table below)
#   S0        the metrology interface (firmware/metrology.py) over S0 pulse
#             inputs: the ESP32 pulse counter (machine.Counter) where the
#             port has one, else a pin interrupt with debounce
#   Board     all of the above, built from the checked meter.json settings
#
# On the host and under tests `machine`, `network` and `ntptime` are the
# stand-ins in tests/mpy/boardstub/, which record what they are asked to do.
import time

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


try:
    import machine
except ImportError:  # the host
    machine = None
try:
    import network
except ImportError:
    network = None
try:
    import ntptime
except ImportError:
    ntptime = None

from shared.const import Q_OUTAGE, Q_PARTIAL

try:
    ticks_ms = time.ticks_ms
    ticks_diff = time.ticks_diff
    ticks_add = time.ticks_add
    sleep_ms = time.sleep_ms
except AttributeError:  # CPython

    def ticks_ms():
        return int(time.monotonic() * 1000)

    def ticks_diff(a, b):
        return a - b

    def ticks_add(a, b):
        return a + b

    def sleep_ms(ms):
        time.sleep(ms / 1000)


# LED blink codes (Led.show). Count the blinks between the pauses.
BOOT = const(0)          # steady on: starting, watchdog not armed yet
RUNNING = const(1)       # one short flash every 3 s: connected, metering
NO_WIFI = const(2)       # 2 blinks: no Wi-Fi
NO_BROKER = const(3)     # 3 blinks: Wi-Fi up, no MQTT broker
NO_TIME = const(4)       # 4 blinks: Wi-Fi up, waiting for the first NTP answer
CONFIG_ERROR = const(5)  # fast flicker (5 Hz), never stops: safe mode, see console

# on, off, on, off, ... in ms, repeating
_PATTERNS = (
    (1, 0),
    (60, 2940),
    (200, 250, 200, 1850),
    (200, 250, 200, 250, 200, 1850),
    (200, 250, 200, 250, 200, 250, 200, 1850),
    (100, 100),
)
CODE_NAMES = ("booting", "running", "no Wi-Fi", "no broker", "no time", "config error")

DEFAULT_LED_PIN = const(2)  # the on-board LED of most ESP32 DevKit boards
DEFAULT_S0_PIN = const(4)
_DEBOUNCE_MS = const(20)    # S0 pulses and pauses last >= 30 ms (IEC 62053-31)
_FILTER_NS = const(12000)   # pulse counter glitch filter (its maximum is ~12.7 us)
_EPOCH_2000 = const(946684800)  # 2000-01-01 in Unix seconds
VALID_AFTER = 1704067200    # 2024-01-01: an RTC before this was never set


def embedded_to_unix(t, epoch_year=None):
    """Seconds since MicroPython's epoch (2000 on some ports) to Unix."""
    if epoch_year is None:
        epoch_year = time.gmtime(0)[0]
    return t + _EPOCH_2000 if epoch_year == 2000 else t


def unix_to_embedded(t, epoch_year=None):
    if epoch_year is None:
        epoch_year = time.gmtime(0)[0]
    return t - _EPOCH_2000 if epoch_year == 2000 else t


class Uptime:
    """ms since boot. ticks_ms() wraps (every 12.4 days on the ESP32); this
    does not, as long as ms() is called more often than every few days."""

    def __init__(self):
        self._last = ticks_ms()
        self._ms = 0

    def ms(self):
        t = ticks_ms()
        self._ms += ticks_diff(t, self._last)
        self._last = t
        return self._ms


class Clock:
    """Unix time = uptime + an offset. The offset is set by the first sync
    and then corrected so that an interval boundary never jumps or repeats:
    a correction smaller than one period waits for a moment when applying
    it keeps the time inside the current interval; a larger one (the RTC or
    NTP was far off) is stepped at once and counted in `steps`, so the app
    can flag the interval (Q_CLOCK)."""

    def __init__(self, period, uptime):
        self.period = period
        self.uptime = uptime
        self.offset = None  # ms
        self.pending = 0    # s, waiting to be applied
        self.steps = 0
        self.syncs = 0

    def valid(self):
        return self.offset is not None

    def now(self):
        """Unix seconds, or None before the first sync."""
        if self.offset is None:
            return None
        t = (self.offset + self.uptime.ms()) // 1000
        d = self.pending
        if d:
            p = self.period
            if (t + d) // p == t // p:
                self.offset += d * 1000
                self.pending = 0
                t += d
        return t

    def sync(self, unix):
        """A fresh reading of the true time (NTP, or a valid RTC at boot)."""
        self.syncs += 1
        up = self.uptime.ms()
        if self.offset is None:
            self.offset = unix * 1000 - up
            return
        d = unix - (self.offset + up) // 1000
        if d >= self.period or -d >= self.period:
            self.offset += d * 1000
            self.pending = 0
            self.steps += 1
        else:
            self.pending = d


class Ntp:
    """When to ask ntptime for the time: every `every_ms` once it answers,
    after 30 s, 60 s, ... (up to 30 min) while it does not."""

    def __init__(self, host=None, every_ms=3 * 3600 * 1000):
        self.every = every_ms
        self.due_ms = 0
        self.wait = 30000
        self.ok = 0
        self.failed = 0
        if ntptime is not None:
            if host:
                ntptime.host = host
            ntptime.timeout = 2

    def due(self, ms):
        return ntptime is not None and ms >= self.due_ms

    def query(self, ms):
        """Unix seconds from NTP, or None (and a later retry)."""
        try:
            t = ntptime.time()
        except Exception as e:  # OSError, a DNS failure (IndexError), ...
            self.failed += 1
            self.due_ms = ms + self.wait
            self.wait = min(self.wait * 2, 1800000)
            print("meter: NTP failed (%r); retrying in %d s" % (e, (self.due_ms - ms) // 1000))
            return None
        self.ok += 1
        self.due_ms = ms + self.every
        self.wait = 30000
        set_rtc(t)
        return embedded_to_unix(t)


def rtc_unix():
    """The RTC's time if it was ever set (it survives a watchdog or soft
    reset, not a power cut), else None."""
    if machine is None:
        return None
    try:
        t = embedded_to_unix(int(time.time()))
    except Exception:
        return None
    return t if t >= VALID_AFTER else None


def set_rtc(embedded):
    """Set the RTC from seconds since the port's epoch (as ntptime returns)."""
    if machine is None or not hasattr(machine, "RTC"):
        return
    tm = time.gmtime(embedded)
    try:
        machine.RTC().datetime((tm[0], tm[1], tm[2], tm[6], tm[3], tm[4], tm[5], 0))
    except Exception as e:
        print("meter: could not set the RTC (%r)" % (e,))


class WiFi:
    """The Wi-Fi station. poll() never blocks: it starts a connection and
    looks again later; while down it retries after 2 s, 4 s, ... 2 min.
    Without an SSID in meter.json it only uses a connection made elsewhere
    (boot.py)."""

    def __init__(self, ssid, password):
        self.ssid = ssid
        self.password = password
        self.wlan = None
        self.retry_ms = 0
        self.backoff = 2000
        self.was_up = False
        self.attempts = 0
        if network is not None:
            self.wlan = network.WLAN(network.STA_IF)
            self.wlan.active(True)

    def poll(self, ms):
        w = self.wlan
        if w is None:
            return True  # the host: its network is always there
        if w.isconnected():
            if not self.was_up:
                self.was_up = True
                self.backoff = 2000
                print("meter: Wi-Fi up", w.ifconfig()[0] if hasattr(w, "ifconfig") else "")
            return True
        if self.was_up:
            self.was_up = False
            print("meter: Wi-Fi lost")
        if self.ssid and ms >= self.retry_ms:
            self.attempts += 1
            try:
                w.disconnect()
            except Exception:
                pass
            try:
                w.connect(self.ssid, self.password or "")
            except Exception as e:
                print("meter: Wi-Fi connect failed (%r)" % (e,))
            self.retry_ms = ms + self.backoff
            self.backoff = min(self.backoff * 2, 120000)
        return False


class Watchdog:
    """machine.WDT: once armed it cannot be stopped; the main loop feeds it."""

    def __init__(self):
        self.wdt = None

    def arm(self, timeout_ms):
        if machine is not None and hasattr(machine, "WDT"):
            self.wdt = machine.WDT(timeout=timeout_ms)

    def feed(self):
        if self.wdt is not None:
            self.wdt.feed()


class Led:
    def __init__(self, pin=None, active_low=False):
        self.pin = None
        if machine is not None and pin is not None:
            self.pin = machine.Pin(pin, machine.Pin.OUT)
        self.low = active_low
        self.code = -1
        self.since = 0
        self.lit = None

    def show(self, code, ms):
        if code != self.code:
            self.code = code
            self.since = ms
            self.update(ms)

    def update(self, ms):
        if self.code < 0:
            return
        pat = _PATTERNS[self.code]
        t = (ms - self.since) % sum(pat)
        on = False
        for i in range(len(pat)):
            if t < pat[i]:
                on = not i & 1
                break
            t -= pat[i]
        if on != self.lit:
            self.lit = on
            if self.pin is not None:
                self.pin.value(1 if on != self.low else 0)


class _Pulses:
    """Falling edges on one S0 input, counted since boot."""

    def __init__(self, pin_no, unit):
        Pin = machine.Pin
        self.pin = Pin(pin_no, Pin.IN, Pin.PULL_UP)
        self.n = 0
        Counter = getattr(machine, "Counter", None)
        if Counter is not None:
            self.hw = Counter(unit, self.pin, edge=Counter.FALLING, filter_ns=_FILTER_NS)
            self.how = "pulse counter unit %d" % unit
        else:
            self.hw = None
            self.last = ticks_add(ticks_ms(), -_DEBOUNCE_MS)
            self.pin.irq(trigger=Pin.IRQ_FALLING, handler=self._edge)
            self.how = "pin interrupt, %d ms debounce" % _DEBOUNCE_MS

    def _edge(self, pin):
        t = ticks_ms()
        if ticks_diff(t, self.last) >= _DEBOUNCE_MS:
            self.n += 1
            self.last = t

    def count(self):
        return self.hw.value() if self.hw is not None else self.n


class S0:
    """The metrology interface over S0 pulse inputs. Energy is whole Wh:
    pulses * 1000 // pulses_per_kwh, with the remainder carried over, so no
    pulse is ever lost between intervals. Export is 0 unless a second S0
    input is configured. Voltage is the configured nominal value, or 0 when
    there is no sensor (listed in `notes`).

    Quality flags: an interval before the meter was measuring (the board
    was off, or its clock not yet set) is Q_OUTAGE with 0 Wh; the first one
    it measures is Q_PARTIAL and holds everything counted since power-on;
    note(flag) adds a flag (Q_CLOCK) to the next interval closed."""

    def __init__(self, pin, pulses_per_kwh, export_pin=None, nominal_dv=0):
        self.ppk = pulses_per_kwh
        self.imp = _Pulses(pin, 0)
        self.exp = _Pulses(export_pin, 1) if export_pin is not None else None
        self.nominal = nominal_dv
        self.start_k = None
        self.flags = 0
        self.done_imp = 0  # Wh given to closed intervals
        self.done_exp = 0
        self.watts = 0
        self.t0 = None
        self.c0 = 0
        self.notes = ["import: GPIO %d, %d pulses/kWh, %s" % (pin, pulses_per_kwh, self.imp.how)]
        if self.exp is None:
            self.notes.append("export: no second S0 input (s0.export_pin); reported as 0")
        else:
            self.notes.append("export: GPIO %d, %s" % (export_pin, self.exp.how))
        if not nominal_dv:
            self.notes.append("voltage: no sensor; reported as 0 (voltage.nominal sets a value)")

    def _wh(self):
        imp = self.imp.count() * 1000 // self.ppk
        exp = self.exp.count() * 1000 // self.ppk if self.exp is not None else 0
        return imp, exp

    def start(self, k):
        """The clock is valid and interval k is open: measuring starts."""
        if self.start_k is None:
            self.start_k = k

    def note(self, flag):
        self.flags |= flag

    def initial(self):
        return 0, 0

    def take(self, k):
        if self.start_k is None or k < self.start_k:
            return 0, 0, Q_OUTAGE
        imp, exp = self._wh()
        di = imp - self.done_imp
        de = exp - self.done_exp
        self.done_imp = imp
        self.done_exp = exp
        flags = self.flags
        self.flags = 0
        if k == self.start_k:
            flags |= Q_PARTIAL
        return di, de, flags

    def peek(self, k, elapsed):
        imp, exp = self._wh()
        return imp - self.done_imp, exp - self.done_exp

    def tick(self, ms):
        """Called by the main loop: power is the average over the last
        minute (its resolution is one pulse per minute)."""
        c = self.imp.count()
        if self.t0 is None:
            self.t0 = ms
            self.c0 = c
        elif ms - self.t0 >= 60000:
            self.watts = (c - self.c0) * 3600000000 // (self.ppk * (ms - self.t0))
            self.t0 = ms
            self.c0 = c

    def power(self, now):
        return self.watts

    def voltage(self, now):
        return self.nominal


class Board:
    def __init__(self, cfg):
        self.uptime = Uptime()
        pin = cfg.get("led_pin")
        self.led = Led(DEFAULT_LED_PIN if pin is None else pin, cfg.get("led_active_low", False))
        self.wifi = WiFi(cfg.get("ssid"), cfg.get("wifi_password"))
        self.wdt = Watchdog()
        self.ntp = Ntp(cfg.get("ntp_host"))
        self.clock = Clock(cfg["period"], self.uptime)
        s0 = cfg.get("s0_pin")
        self.source = S0(DEFAULT_S0_PIN if s0 is None else s0, cfg["pulses_per_kwh"],
                         cfg.get("s0_export_pin"), cfg.get("nominal_dv") or 0)
        if s0 is None:
            self.source.notes.append("s0.pin not set: using GPIO %d" % DEFAULT_S0_PIN)
        rtc = rtc_unix()
        if rtc is not None:
            self.clock.sync(rtc)  # kept across a watchdog reset; NTP corrects it

    def reset_cause(self):
        if machine is None or not hasattr(machine, "reset_cause"):
            return "unknown"
        c = machine.reset_cause()
        for name in ("PWRON_RESET", "HARD_RESET", "WDT_RESET", "DEEPSLEEP_RESET", "SOFT_RESET"):
            if getattr(machine, name, None) == c:
                return name
        return str(c)
