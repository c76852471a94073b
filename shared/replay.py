# Sliding-window replay protection (the IPsec/DTLS anti-replay window).
# `top` is the highest counter accepted; bit i of `bits` says top - i was
# accepted. Reordering inside the window is fine; a duplicate, or anything
# older than the window, is refused. Callers accept a counter only after the
# message carrying it has authenticated, so forgeries never move the window.
from shared.const import REPLAY_WINDOW
from shared.errors import DuplicateError, StaleError


class ReplayWindow:
    def __init__(self, size=REPLAY_WINDOW, top=-1, bits=0):
        self.size = size
        self.top = top
        self.bits = bits
        # Counters that left the window without ever being seen: messages
        # lost on the way (or later than a whole window). Only counted.
        self.missed = 0

    def check(self, ctr):
        """Raise if `ctr` must be refused; change nothing."""
        if ctr > self.top:
            return
        age = self.top - ctr
        if age >= self.size:
            raise StaleError("counter %d is older than the window (top %d)" % (ctr, self.top))
        if (self.bits >> age) & 1:
            raise DuplicateError("counter %d was already accepted" % ctr)

    def accept(self, ctr):
        """Check `ctr`, then record it."""
        self.check(ctr)
        if ctr > self.top:
            shift = ctr - self.top
            if self.top >= 0:
                # counters (>= 0) that fall out of the window unseen, and
                # skipped ones that never even enter the new window
                out = min(shift, self.size)
                real = min(self.size - 1, self.top) - (self.size - out) + 1
                if real > 0:
                    self.missed += real - bin(self.bits >> (self.size - out)).count("1")
                if shift > self.size:
                    self.missed += shift - self.size
            if shift >= self.size:
                self.bits = 1
            else:
                self.bits = ((self.bits << shift) | 1) & ((1 << self.size) - 1)
            self.top = ctr
        else:
            self.bits |= 1 << (self.top - ctr)

    def state(self):
        return self.top, self.bits
