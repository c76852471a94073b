# What the hardware stand-ins in this folder were asked to do, for the test
# that boots main.py under MicroPython (tests/test_firmware_boot.py). The
# test script reads `events` at the end; `limits` stop the main loop: when a
# counter in `counts` reaches its limit, the stand-in raises
# KeyboardInterrupt once (as Ctrl-C on the serial console would); `hooks`
# run a function when a counter reaches a value (e.g. to fix meter.json).
import time

events = []
counts = {}
limits = {}
hooks = {}         # (counter name, value) -> function
downlinks = []     # payloads the fake broker delivers on the downlink, in order
pulses_per_read = 3  # the fake pulse counter advances this much per read
broker_down = False


def record(*ev):
    events.append([time.ticks_ms()] + list(ev))


def bump(name):
    n = counts.get(name, 0) + 1
    counts[name] = n
    fn = hooks.get((name, n))
    if fn is not None:
        record("hook", name, n)
        fn()
    if limits.get(name) == n:
        record("stop", name, n)
        raise KeyboardInterrupt
