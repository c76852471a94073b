# A message counter that never goes backwards, even across power loss,
# while writing to flash only once every `block` messages (the skip-ahead
# scheme of OSCORE, RFC 8613 Appendix B.1.1).
#
# Before a value divisible by `block` is used, it is persisted. After a
# reboot the counter resumes at saved + block. Every value used since the
# last save lies in [saved, saved + block), so none can repeat.
try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


DEFAULT_BLOCK = const(32)


class SkipAheadCounter:
    def __init__(self, saved, persist, block=DEFAULT_BLOCK):
        """`saved`: the value last persisted, or None on first boot.
        `persist(value)`: durably stores value; it must have completed when
        it returns, and raise if it could not."""
        self.block = block
        self._persist = persist
        self._next = 0 if saved is None else saved + block

    def peek(self):
        return self._next

    def next(self):
        value = self._next
        if value % self.block == 0:
            self._persist(value)  # raises: the value is not used
        self._next = value + 1
        return value
