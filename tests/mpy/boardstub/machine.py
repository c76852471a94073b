# Stand-in for MicroPython's `machine` on the ESP32: records pins, LED
# writes, watchdog arming and feeds, RTC sets, pulse counters and resets.
import boardlog

PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5


class Pin:
    IN = 1
    OUT = 3
    PULL_UP = 2
    PULL_DOWN = 1
    IRQ_RISING = 1
    IRQ_FALLING = 2

    def __init__(self, id, mode=-1, pull=-1, value=None):
        self.id = id
        self.mode = mode
        self._v = 0
        boardlog.record("pin", id, mode, pull)

    def value(self, v=None):
        if v is None:
            return self._v
        self._v = v
        boardlog.record("pin.value", self.id, v)
        boardlog.bump("pin_writes")

    def irq(self, trigger=None, handler=None):
        boardlog.record("pin.irq", self.id, trigger)


class WDT:
    def __init__(self, id=0, timeout=5000):
        boardlog.record("wdt", timeout)

    def feed(self):
        boardlog.bump("wdt_feeds")


class RTC:
    def datetime(self, t=None):
        if t is None:
            return (2000, 1, 1, 5, 0, 0, 0, 0)
        boardlog.record("rtc.set", list(t))


class Counter:
    RISING = 1
    FALLING = 2

    def __init__(self, id, src=None, edge=RISING, direction=None, filter_ns=0):
        self._n = 0
        boardlog.record("counter", id, src.id if src is not None else None, edge, filter_ns)

    def value(self, v=None):
        self._n += boardlog.pulses_per_read
        return self._n


def reset():
    boardlog.record("reset")
    raise SystemExit("machine.reset")


def reset_cause():
    return PWRON_RESET


def unique_id():
    return b"\x24\x0a\xc4\x00\x00\x01"
