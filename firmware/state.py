# The meter's small persistent state, in two slots written alternately so a
# power cut during a write leaves the other slot intact:
#   up_saved   last value the uplink counter persisted (skip-ahead, see
#              shared/counter.py), or None before the first message
#   down_top   highest downlink counter accepted: requests at or below it
#              are refused after a reboot
#   session    incremented on every connection to the broker
# Record: b"MS" | seq u32 | up_saved u32 | down_top u32 | session u32 | crc32
import binascii
import struct

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_FMT = ">2sIIIII"
_SIZE = const(22)  # struct.calcsize(_FMT)
_NONE = const(0xFFFFFFFF)
_SLOTS = ("state.a", "state.b")


def _pack(seq, up, down, session):
    body = struct.pack(">2sIIII", b"MS", seq, _NONE if up is None else up,
                       _NONE if down is None else down, session)
    return body + struct.pack(">I", binascii.crc32(body) & 0xFFFFFFFF)


def _unpack(data):
    if data is None or len(data) != _SIZE:
        return None
    magic, seq, up, down, session, crc = struct.unpack(_FMT, data)
    if magic != b"MS" or binascii.crc32(data[:-4]) & 0xFFFFFFFF != crc:
        return None
    return seq, (None if up == _NONE else up), (None if down == _NONE else down), session


class State:
    def __init__(self, flash):
        self.flash = flash
        self.seq = 0
        self.up_saved = None
        self.down_top = None
        self.session = 0
        best = None
        for name in _SLOTS:
            rec = _unpack(flash.read(name))
            if rec is not None and (best is None or rec[0] > best[0]):
                best = rec
        if best is not None:
            self.seq, self.up_saved, self.down_top, self.session = best

    def save(self):
        """Write the state to the slot not holding the newest copy."""
        seq = self.seq + 1
        self.flash.write(_SLOTS[seq & 1], _pack(seq, self.up_saved, self.down_top, self.session))
        self.seq = seq

    def persist_counter(self, value):
        """The uplink counter's persist callback (SkipAheadCounter)."""
        self.up_saved = value
        self.save()
