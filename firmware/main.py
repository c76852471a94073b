# The meter's entry point, copied to the board's root as main.py (it stays
# source; what it imports is compiled .mpy under /firmware and /shared, and
# umqtt.simple is in /lib).
#
# Boot:
#   1. LED steady on. Read and check meter.json and the head-end key.
#   2. If that fails: SAFE MODE. The problem and its fix are printed on the
#      serial console, the LED flickers fast (5 Hz), nothing touches the
#      network, and meter.json is read again every 30 s, so copying a good
#      one onto the board (make flash) is enough. The watchdog is NOT armed
#      in safe mode: nothing in it can hang, a reset cannot fix a config,
#      and an armed watchdog (it cannot be stopped) would reset the board
#      under someone working at the REPL. It never reboots by itself.
#   3. A short grace period (LED still steady on, watchdog not armed yet):
#      Ctrl-C here, as mpremote sends when it connects, leaves the board at
#      the REPL with no watchdog running. `make flash` relies on this.
#   4. Arm the watchdog (30 s) and run the main loop (firmware/app.py).
#      Ctrl-C while running sends an orderly goodbye and stops; the
#      watchdog then resets the board within 30 s.
import sys

CONFIG = "meter.json"
DATA = "data"              # the meter's state, profile and outbox (keep it!)
CONFIG_RETRY_MS = 30000
BOOT_GRACE_MS = 3000
WDT_MS = 30000


def _say(*args):
    print("meter:", *args)


def _load(path):
    """(settings, pairwise key) or a ConfigError naming the problem."""
    from firmware.config import ConfigError, load
    from shared.backend import PURE
    from shared.errors import BadKeyError

    cfg = load(path)
    try:
        key = PURE.beforenm(cfg["headend_public_key"], cfg["secret_key"])
    except BadKeyError:
        raise ConfigError("meter.json: 'headend_public_key' is not a usable X25519 public "
                          "key; re-provision this meter (python -m headend provision)")
    try:
        import umqtt.simple  # noqa: F401
    except ImportError:
        raise ConfigError("umqtt.simple is not installed on the board; run `make flash` "
                          "(it runs: mpremote mip install umqtt.simple)")
    return cfg, key


def _led_pin(path, default):
    """led.pin from meter.json if it can be read at all, else the default."""
    try:
        import json

        with open(path) as f:
            pin = json.load(f)["led"]["pin"]
        return pin if type(pin) is int else default
    except Exception:
        return default


def _safe_mode(problem, led, retry_ms):
    """Blink the config-error code for retry_ms. False on Ctrl-C."""
    from firmware import board

    _say("CONFIG ERROR:", problem)
    _say("safe mode: no network, no MQTT, watchdog not armed; LED flickers fast. "
         "Fix meter.json (make flash METER=<id> PORT=<port>); retrying in %d s. "
         "Ctrl-C for the REPL." % (retry_ms // 1000))
    up = board.Uptime()
    end = up.ms() + retry_ms
    try:
        while True:
            ms = up.ms()
            if ms >= end:
                return True
            led.show(board.CONFIG_ERROR, ms)
            led.update(ms)
            board.sleep_ms(50)
    except KeyboardInterrupt:
        _say("stopped in safe mode (at the REPL)")
        return False


def run(config=CONFIG, data=DATA, retry_ms=CONFIG_RETRY_MS, grace_ms=BOOT_GRACE_MS,
        wdt_ms=WDT_MS):
    from firmware import board
    from firmware.config import ConfigError

    led = board.Led(_led_pin(config, board.DEFAULT_LED_PIN))
    led.show(board.BOOT, 0)
    _say("booting (%s)" % sys.implementation._machine if hasattr(sys.implementation, "_machine")
         else "booting")
    try:
        while True:
            try:
                cfg, key = _load(config)
                break
            except ConfigError as e:
                problem = str(e)
            except MemoryError:
                raise
            except Exception as e:  # e.g. a read error on the file system
                problem = "%s could not be read (%r)" % (config, e)
            if not _safe_mode(problem, led, retry_ms):
                return
        _say("meter %d, %s" % (cfg["meter"], "behind DAP %d" % cfg["dap"]
                               if cfg["dap"] is not None else "direct to the head-end"))
        b = board.Board(cfg)
        led = b.led
        led.show(board.BOOT, b.uptime.ms())
        _say("reset cause:", b.reset_cause())
        for note in b.source.notes:
            _say(note)
        if grace_ms > 0:
            _say("starting in %d s (Ctrl-C now for the REPL without the watchdog)"
                 % (grace_ms // 1000))
            board.sleep_ms(grace_ms)
    except KeyboardInterrupt:
        _say("stopped before start (at the REPL, watchdog not armed)")
        return
    b.wdt.arm(wdt_ms)

    from firmware.app import App
    from firmware.flash import Flash
    from firmware.mqtt import Link
    from shared.backend import PURE

    app = App(cfg, key, b, Flash(data), lambda: Link(cfg), PURE)
    try:
        app.run()
    except KeyboardInterrupt:
        _say("stopped (the watchdog resets the board within %d s)" % (wdt_ms // 1000))


if __name__ == "__main__":
    run()
