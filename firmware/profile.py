# The load profile: one row per interval (15 minutes by default), holding the
# import and export registers at the interval's end and its quality flags.
#
# In RAM: a ring of preallocated 9-byte rows. One extra row is kept beyond
# the retention so the oldest served row still has a row before it to take
# its delta from.
# On flash: append-only segment files of 96 rows ("p<n>.bin", n = k // 96),
# one 14-byte record appended as each interval closes, so a reading costs a
# small append and never a rewrite; whole segments are deleted once they
# fall out of retention. A record torn by a power cut is detected (length
# and CRC) and dropped at boot: the profile is never corrupted, at most short
# by the interval that was being written.
#   record: k u32 | import Wh u32 | export Wh u32 | flags u8 | crc8 u8
import binascii
import struct

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from shared.const import MAX_ROWS, Q_OVERFLOW

_REC = const(14)
_RAM_ROW = const(9)
_SEG = const(96)
_MAX_DELTA = const(0xFFFF)
DAYS_KEPT = const(8)


def _check(rec13):
    return binascii.crc32(rec13) & 0xFF


def _record(k, imp, exp, flags):
    body = struct.pack(">IIIB", k, imp, exp, flags)
    return body + bytes((_check(body),))


class Profile:
    def __init__(self, flash, period, capacity=None):
        self.flash = flash
        self.period = period
        per_day = 86400 // period
        self.capacity = capacity or DAYS_KEPT * per_day  # rows served
        self._slots = self.capacity + 1
        self._ram = bytearray(self._slots * _RAM_ROW)
        self.first = -1  # k of the oldest row held (used only as a base)
        self.last = -1   # k of the newest row
        self.dropped = 0  # torn or corrupt records dropped at load

    # -- rows in RAM --------------------------------------------------------

    def _put(self, k, imp, exp, flags):
        struct.pack_into(">IIB", self._ram, (k % self._slots) * _RAM_ROW, imp, exp, flags)

    def row(self, k):
        """(import, export, flags) of interval k, which must be held."""
        return struct.unpack_from(">IIB", self._ram, (k % self._slots) * _RAM_ROW)

    def empty(self):
        return self.last < 0

    def registers(self):
        """(import, export) at the end of the newest row."""
        imp, exp, _ = self.row(self.last)
        return imp, exp

    def oldest_start(self):
        """Start (epoch s) of the oldest interval that can be served, or 0."""
        if self.last <= self.first:
            return 0
        return (self.first + 1) * self.period

    def _take(self, k, imp, exp, flags):
        if self.last >= 0 and k != self.last + 1:
            raise ValueError("profile rows must be appended in order")
        self._put(k, imp, exp, flags)
        if self.first < 0:
            self.first = k
        self.last = k
        if self.last - self.first > self.capacity:
            self.first = self.last - self.capacity

    # -- persistence --------------------------------------------------------

    def append(self, k, imp, exp, flags):
        """Add the row for interval k (the one after the newest) and append
        it to flash. A new segment file drops the one now out of retention."""
        rec = _record(k, imp, exp, flags)
        seg = k // _SEG
        if k % _SEG == 0 or self.last < 0:
            self.flash.remove("p%d.bin" % (seg - self.capacity // _SEG - 1))
        self.flash.append("p%d.bin" % seg, rec)
        self._take(k, imp, exp, flags)

    def load(self):
        """Rebuild the ring from flash. Keeps the newest contiguous run of
        valid records; a torn tail is cut off the file it is in."""
        segs = []
        for name in self.flash.names():
            if name.startswith("p") and name.endswith(".bin") and name[1:-4].isdigit():
                segs.append(int(name[1:-4]))
        segs.sort()
        run = []  # (k, imp, exp, flags) of the current contiguous run
        for seg in segs:
            name = "p%d.bin" % seg
            data = self.flash.read(name) or b""
            good = 0
            for at in range(0, len(data) - _REC + 1, _REC):
                rec = data[at:at + _REC]
                if _check(rec[:13]) != rec[13]:
                    break
                k, imp, exp, flags = struct.unpack_from(">IIIB", rec)  # rec ends in its CRC
                if k // _SEG != seg:
                    break
                if run and k != run[-1][0] + 1:
                    self.dropped += len(run)
                    run = []
                run.append((k, imp, exp, flags))
                if len(run) > self._slots:
                    run.pop(0)
                good = at + _REC
            if good != len(data):
                self.dropped += 1
                self.flash.write(name, data[:good])
        self.first = self.last = -1
        for k, imp, exp, flags in run:
            self._take(k, imp, exp, flags)

    # -- serving reads ------------------------------------------------------

    def span(self, start, end):
        """The held interval indices [k0, k1) whose start lies in
        [start, end)."""
        p = self.period
        k0 = max((start + p - 1) // p, self.first + 1)
        k1 = min((end + p - 1) // p, self.last + 1)
        return k0, max(k0, k1)

    def part(self, k0, k1):
        """One response part for rows k0..k1-1 (at most MAX_ROWS):
        [start, period, import base, export base, import deltas, export
        deltas, flags]. Deltas over 65535 Wh are clamped and flagged."""
        if k1 - k0 > MAX_ROWS:
            raise ValueError("a part holds at most %d rows" % MAX_ROWS)
        base_imp, base_exp, _ = self.row(k0 - 1)
        imps = []
        exps = []
        flags = []
        prev_imp, prev_exp = base_imp, base_exp
        for k in range(k0, k1):
            imp, exp, f = self.row(k)
            di = (imp - prev_imp) & 0xFFFFFFFF
            de = (exp - prev_exp) & 0xFFFFFFFF
            if di > _MAX_DELTA or de > _MAX_DELTA:
                di = min(di, _MAX_DELTA)
                de = min(de, _MAX_DELTA)
                f |= Q_OVERFLOW
            imps.append(di)
            exps.append(de)
            if f:
                flags.append(k - k0)
                flags.append(f)
            prev_imp, prev_exp = imp, exp
        return [k0 * self.period, self.period, base_imp, base_exp, imps, exps, flags]
