# The outbox: sealed responses waiting for their PUBACK. It is kept on flash
# so that a reboot loses none of them; a response leaves it only when the
# broker acknowledged it (ack), or when the queue is full and it is the
# oldest (dropped, and counted: the head-end re-reads what it misses).
#
# On flash it is a log, appended to as responses come and go, and rewritten
# (compacted) only once it holds `slack` bytes of records that are no longer
# needed, which at a few responses a day is every few days. Two files,
# "ob0.log" and "ob1.log", take turns on compaction: the new one is written
# whole before the old one is removed, so a power cut at any byte leaves one
# complete log.
#
#   header  b"H" | generation u32 | next seq u32 | entries u16 | crc32 u32
#   add     b"A" | seq u32 | length u16 | payload | crc32 u32
#   forget  b"F" | seq u32 | crc32 u32      every entry up to seq is gone
#
# A compacted file is its header followed by exactly `entries` add records;
# a file cut short before that is not used. Records appended later are read
# up to the first one that is torn or fails its CRC; what follows it is
# discarded by compacting at boot.
import binascii
import struct

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_HEAD = const(15)
_ADD = const(11)  # add record overhead
_FORGET = const(9)
_NAMES = ("ob0.log", "ob1.log")


def _crc(data):
    return struct.pack(">I", binascii.crc32(data) & 0xFFFFFFFF)


def _header(gen, nxt, count):
    body = b"H" + struct.pack(">IIH", gen, nxt, count)
    return body + _crc(body)


def _add(seq, payload):
    body = b"A" + struct.pack(">IH", seq, len(payload)) + payload
    return body + _crc(body)


def _forget(seq):
    body = b"F" + struct.pack(">I", seq)
    return body + _crc(body)


def _parse(data):
    """(generation, next seq, [(seq, payload), ...], bytes used) of one log
    file, or None if it has no complete header and snapshot."""
    n = len(data)
    if n < _HEAD or data[0] != 0x48:
        return None
    if _crc(data[:_HEAD - 4]) != data[_HEAD - 4:_HEAD]:
        return None
    gen, nxt, count = struct.unpack_from(">IIH", data, 1)
    items = []
    at = _HEAD
    seen = 0
    while at < n:
        kind = data[at]
        if kind == 0x41 and at + _ADD <= n:
            seq, size = struct.unpack_from(">IH", data, at + 1)
            end = at + _ADD + size
            if end > n or _crc(data[at:end - 4]) != data[end - 4:end]:
                break
            items.append((seq, data[at + 7:end - 4]))
            if seq >= nxt:
                nxt = seq + 1
        elif kind == 0x46 and seen >= count and at + _FORGET <= n:
            end = at + _FORGET
            if _crc(data[at:end - 4]) != data[end - 4:end]:
                break
            seq = struct.unpack_from(">I", data, at + 1)[0]
            while items and items[0][0] <= seq:
                items.pop(0)
        else:
            break
        seen += 1
        at = end
    if seen < count:
        return None  # the compacted snapshot was cut short
    return gen, nxt, items, at


class Outbox:
    def __init__(self, flash, max_items=32, max_bytes=12288, slack=8192):
        self.flash = flash
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.slack = slack
        self.items = []  # (seq, payload), oldest first
        self.bytes = 0   # payload bytes held
        self.dropped = 0  # entries pushed out by newer ones since boot
        self.gen = 0
        self.next = 0
        self.name = None
        self.size = 0    # bytes in the current log file
        best = None
        for name in _NAMES:
            data = flash.read(name)
            got = _parse(data) if data else None
            if got is not None and (best is None or got[0] > best[0][0]):
                best = (got, name, len(data))
        for name in _NAMES:
            if best is None or name != best[1]:
                if flash.read(name) is not None:
                    flash.remove(name)
        if best is None:
            self._compact()
            return
        (self.gen, self.next, self.items, used), self.name, self.size = best
        for _, payload in self.items:
            self.bytes += len(payload)
        if used != self.size or len(self.items) > max_items or self.bytes > max_bytes:
            self._trim()
            self._compact()  # drops a torn tail so appends start clean

    def __len__(self):
        return len(self.items)

    def peek(self):
        """(seq, payload) of the oldest entry, or None."""
        return self.items[0] if self.items else None

    def push(self, payload):
        """Keep a new response (on flash before this returns). The oldest
        entries make room if the queue is over its bounds."""
        payload = bytes(payload)
        seq = self.next
        self.next = seq + 1
        self.items.append((seq, payload))
        self.bytes += len(payload)
        self._append(_add(seq, payload))
        gone = self._trim()
        if gone is not None:
            self._append(_forget(gone))
        self._maybe_compact()
        return seq

    def ack(self, seq):
        """The entry `seq` was acknowledged: forget it (and anything older)."""
        if not self.items or self.items[0][0] > seq:
            return
        while self.items and self.items[0][0] <= seq:
            self.bytes -= len(self.items.pop(0)[1])
        self._append(_forget(seq))
        self._maybe_compact()

    def _trim(self):
        """Drop the oldest entries while over the bounds (never the newest).
        Returns the highest seq dropped, or None."""
        gone = None
        while len(self.items) > 1 and (len(self.items) > self.max_items
                                       or self.bytes > self.max_bytes):
            seq, payload = self.items.pop(0)
            self.bytes -= len(payload)
            self.dropped += 1
            gone = seq
        return gone

    def _append(self, rec):
        self.flash.append(self.name, rec)
        self.size += len(rec)

    def _live(self):
        return _HEAD + _ADD * len(self.items) + self.bytes

    def _maybe_compact(self):
        if self.size > self._live() + self.slack:
            self._compact()

    def _compact(self):
        """Write the live entries to the other file, then remove this one."""
        gen = self.gen + 1
        name = _NAMES[gen & 1]
        parts = [_header(gen, self.next, len(self.items))]
        for seq, payload in self.items:
            parts.append(_add(seq, payload))
        data = b"".join(parts)
        self.flash.write(name, data)
        old = self.name
        self.gen = gen
        self.name = name
        self.size = len(data)
        if old is not None and old != name:
            self.flash.remove(old)
