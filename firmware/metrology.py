# Where energy comes from, behind one small interface:
#
#   take(k)            -> (import Wh, export Wh, flags) of interval k, which
#                         has just closed; called once per k, in order
#   peek(k, elapsed)   -> (import Wh, export Wh) so far in open interval k
#   power(now)         -> instantaneous import power, W
#   voltage(now)       -> voltage, dV (0.1 V)
#
# SimulatedLoad is a household load curve that is a pure function of the
# meter's seed and the interval index, so any run (and any test) can say what
# a meter measured. The S0 pulse input of a real board is in board.py.
try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


# Typical household demand by hour of day, in W: low at night, a morning
# bump, an evening peak.
_SHAPE = (180, 160, 150, 150, 150, 170, 260, 420, 380, 300, 260, 250,
          270, 250, 240, 260, 330, 480, 620, 640, 560, 430, 320, 230)
_SOLAR = (0, 0, 0, 0, 0, 0, 40, 180, 420, 700, 900, 1000,
          1000, 920, 760, 520, 260, 80, 0, 0, 0, 0, 0, 0)


def _mix(x):
    # A small integer hash (xorshift-multiply), kept under 2**30 between
    # steps so it stays in MicroPython small ints.
    x &= 0x3FFFFFFF
    x ^= x >> 15
    x = (x * 0x2C1B) & 0x3FFFFFFF
    x ^= x >> 13
    x = (x * 0x3A8F) & 0x3FFFFFFF
    x ^= x >> 16
    return x


class SimulatedLoad:
    def __init__(self, seed, period=900):
        self.seed = seed
        self.period = period
        self.scale = 60 + _mix(seed) % 90        # percent of the typical curve
        self.solar = seed % 3 == 0               # a third of homes export

    def _watts(self, k):
        t = k * self.period
        hour = (t // 3600) % 24
        noise = _mix(self.seed * 7919 + k) % 200  # up to +200 W of appliances
        imp = _SHAPE[hour] * self.scale // 100 + noise
        exp = 0
        if self.solar:
            sun = _SOLAR[hour] * (70 + _mix(k // 96 + self.seed) % 60) // 100
            if sun > imp:
                exp = sun - imp
                imp = 0
            else:
                imp -= sun
        return imp, exp

    def interval(self, k):
        """Energy in interval k, Wh: what take(k) reports."""
        imp, exp = self._watts(k)
        return imp * self.period // 3600, exp * self.period // 3600

    def take(self, k):
        imp, exp = self.interval(k)
        return imp, exp, 0

    def peek(self, k, elapsed):
        imp, exp = self.interval(k)
        return imp * elapsed // self.period, exp * elapsed // self.period

    def power(self, now):
        imp, _ = self._watts(now // self.period)
        return imp

    def voltage(self, now):
        return 2250 + _mix(self.seed + now // 60) % 100

    def initial(self):
        """Register values (import, export) at installation, Wh."""
        return (_mix(self.seed * 31) % 5000) * 1000, 0
