# The main loop: config, board, meter core and transport glued together.
# One step (about every LOOP_MS) feeds the watchdog, keeps Wi-Fi and the
# clock going, closes the intervals that ended into the load profile, takes
# in downlink requests and answers them through the persistent outbox, and
# shows the state on the LED. Nothing in a step blocks for longer than a
# bounded socket wait, well inside the watchdog timeout.
#
# Everything the loop touches comes in through the constructor (board,
# flash, link factory, urandom), so the host and the tests can stand in for
# any of it.
import gc
import os
import sys

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from firmware import board as _b
from firmware.meter import Meter
from firmware.mqtt import Transport
from firmware.outbox import Outbox
from shared.const import Q_CLOCK

LOOP_MS = const(100)
CHUNK = const(96)           # intervals closed between two watchdog feeds
STATUS_MS = const(300000)   # a status line on the console every 5 minutes
MAX_PAUSE_MS = const(60000)  # after repeated errors, wait at most this long


def _rand(n):
    return int.from_bytes(os.urandom(4), "big") % n if n > 0 else 0


class App:
    def __init__(self, cfg, key, board, flash, make_link, backend, urandom=os.urandom,
                 log=print):
        """`key`: the pairwise key (box.beforenm of the head-end's public key
        and the meter's secret key), computed once by the caller."""
        self.cfg = cfg
        self.board = board
        self.flash = flash
        self.urandom = urandom
        self.log = log
        self.period = cfg["period"]
        self.meter = Meter(cfg["meter"], key, backend, flash, board.source, self.period)
        self.outbox = Outbox(flash)
        self.transport = Transport(make_link, self.outbox, _rand, log)
        self.started = False
        self.steps_seen = board.clock.steps
        self.errors = 0
        self.steps = 0
        self.status_ms = 0
        self.stopped = False

    # -- one step -------------------------------------------------------------

    def step(self):
        b = self.board
        ms = b.uptime.ms()
        b.wdt.feed()
        net = b.wifi.poll(ms)
        if net and b.ntp.due(ms):
            t = b.ntp.query(ms)
            if t is not None:
                b.clock.sync(t)
        now = b.clock.now()
        if now is None:
            b.led.show(_b.NO_TIME if net else _b.NO_WIFI, ms)
            b.led.update(ms)
            return
        src = b.source
        if b.clock.steps != self.steps_seen:
            self.steps_seen = b.clock.steps
            if hasattr(src, "note"):
                src.note(Q_CLOCK)
            self.log("meter: clock stepped (it was off by a period or more)")
        if not self.started:
            self.started = True
            if hasattr(src, "start"):
                src.start(now // self.period)
            self.log("meter: clock set, metering from", now)
        self.catch_up(now)
        if hasattr(src, "tick"):
            src.tick(ms)
        tr = self.transport
        tr.poll(ms, net, self._hello)
        self.serve(now)
        tr.flush(ms)
        if tr.connected():
            b.led.show(_b.RUNNING, ms)
        else:
            b.led.show(_b.NO_BROKER if net else _b.NO_WIFI, ms)
        b.led.update(ms)
        if ms >= self.status_ms:
            self.status_ms = ms + STATUS_MS
            self.status(ms)

    def _hello(self):
        return self.meter.connect(self.board.clock.now(), self.urandom)

    def catch_up(self, now):
        """Close every interval that ended, feeding the watchdog every CHUNK
        of them (after a long power cut there can be thousands)."""
        m = self.meter
        prof = m.profile
        p = self.period
        while not prof.empty() and now // p - prof.last > CHUNK + 1:
            m.catch_up((prof.last + 1 + CHUNK) * p)
            self.board.wdt.feed()
        m.catch_up(now)

    def serve(self, now):
        """Answer the downlink requests that came in (each answer is on
        flash in the outbox before the next request is looked at)."""
        inbox = self.transport.inbox
        while inbox:
            wire = inbox.pop(0)
            for resp in self.meter.handle(wire, now, self.urandom):
                self.outbox.push(resp)

    def status(self, ms):
        m = self.meter
        tr = self.transport
        self.log("meter: up %d s, %s, profile to interval %d, outbox %d (dropped %d), "
                 "requests %d, rejected %d, flash writes %d, free %d"
                 % (ms // 1000, "connected" if tr.connected() else "offline", m.profile.last,
                    len(self.outbox), self.outbox.dropped, m.stats["requests"],
                    m.stats["rejected"], getattr(self.flash, "writes", 0), gc.mem_free()
                    if hasattr(gc, "mem_free") else 0))

    # -- the loop -------------------------------------------------------------

    def run(self, max_steps=None):
        """Step until stopped: Ctrl-C (KeyboardInterrupt) is a clean stop
        with an orderly goodbye. An unexpected error is printed and the step
        retried after a pause that grows with repeated errors; the watchdog
        stays fed meanwhile, and fires only if the loop itself hangs."""
        b = self.board
        try:
            while max_steps is None or self.steps < max_steps:
                self.steps += 1
                try:
                    self.step()
                    self.errors = 0
                    pause = LOOP_MS
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as e:
                    self.errors += 1
                    self.log("meter: error in the main loop (%d in a row):" % self.errors)
                    if hasattr(sys, "print_exception"):
                        sys.print_exception(e)
                    else:
                        self.log(repr(e))
                    pause = min(LOOP_MS << min(self.errors, 10), MAX_PAUSE_MS)
                if self.steps % 50 == 0:
                    gc.collect()
                self._sleep(pause)
        except KeyboardInterrupt:
            self.log("meter: stopping (Ctrl-C)")
            self.stop()
            raise
        finally:
            b.led.update(b.uptime.ms())

    def _sleep(self, ms):
        b = self.board
        while ms > 0:
            n = min(ms, 1000)
            _b.sleep_ms(n)
            ms -= n
            b.wdt.feed()
            b.led.update(b.uptime.ms())

    def stop(self):
        """Orderly goodbye (if connected) and disconnect."""
        if self.stopped:
            return
        self.stopped = True
        if self.transport.connected():
            ok = self.transport.goodbye(self.meter.goodbye(self.urandom))
            self.log("meter: goodbye %s" % ("sent" if ok else "not acknowledged"))
