# A small CBOR codec (RFC 8949) for the meter: MicroPython has no cbor2.
# Runs unchanged on MicroPython 1.27 and CPython 3.11.
#
# dumps(obj) encodes None, bool, int (-2**64 .. 2**64-1), str, bytes,
# bytearray, memoryview (as a byte string), list/tuple (definite array),
# dict (definite map, in the dict's iteration order), float, Tag, Simple and
# `undefined`.
# For every type cbor2 also encodes the same way, the output is byte for byte
# that of cbor2.dumps with default options (floats: NaN and infinities as
# half precision, every other float as double precision, as cbor2 does).
# cbor2 itself encodes a memoryview as an array of its items; this module
# encodes it as a byte string, like bytes(view). Anything else, an int
# outside 64 bits, or nesting deeper than max_depth (a cycle, say) raises
# TypeError: the encoder is only called with the protocol's own values.
#
# loads(data) decodes one complete data item from bytes, bytearray or
# memoryview, definite or indefinite length. Results: unsigned and negative
# ints -> int, byte strings -> bytes, text -> str, arrays -> list, maps ->
# dict (OrderedDict on MicroPython, see below), false/true/null ->
# False/True/None, undefined -> `undefined`,
# other simple values -> Simple(n), half/single/double floats -> float,
# tags 2 and 3 (bignums, content must be a byte string) -> int, every other
# tag -> Tag(number, content) with no further meaning given to it.
# Map keys that are arrays become tuples (as cbor2 does); a map used as a map
# key is rejected, and so is a key that occurs twice in one map (cbor2 keeps
# the last one unless allow_duplicate_keys=False).
# Every array, map and tag is one level of nesting; more than max_depth
# levels is a DecodeError (dumps refuses them with TypeError likewise).
# Everything malformed raises DecodeError, and input longer than max_size
# raises TooLarge before any parsing; nothing else escapes for bytes input.
# Text must be strict UTF-8 (no surrogates, overlong forms or code points
# past U+10FFFF), checked here because MicroPython's own check is looser.
# Unlike cbor2.loads, bytes after the top-level item are an error.
#
# Map order on MicroPython: its plain dict iterates in hash order, not
# insertion order, so a dict literal there encodes its entries in another
# order than cbor2 would (still valid CBOR, decodes to an equal map). Build
# messages as collections.OrderedDict on the meter when the bytes must match
# cbor2's. loads() returns OrderedDict maps on MicroPython (plain dict on
# CPython) so decoding then re-encoding gives back the same bytes.

import struct
import sys

from shared.errors import DecodeError, TooLarge

try:
    from micropython import const
except ImportError:

    def const(x):
        return x


_MAX_SIZE = const(4096)
_MAX_DEPTH = const(16)

# Major types, already shifted into the top three bits of the initial byte.
_UINT = const(0x00)
_NINT = const(0x20)
_BYTES = const(0x40)
_TEXT = const(0x60)
_ARRAY = const(0x80)
_MAP = const(0xA0)
_TAG = const(0xC0)
_SIMPLE = const(0xE0)
_BREAK = const(0xFF)
_INDEF = const(31)


class Tag:
    """A tagged data item: tag number `tag` over the decoded `value`."""

    def __init__(self, tag, value):
        self.tag = tag
        self.value = value

    def __eq__(self, other):
        return isinstance(other, Tag) and self.tag == other.tag and self.value == other.value

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash((self.tag, self.value))

    def __repr__(self):
        return "Tag(%d, %r)" % (self.tag, self.value)


class Simple:
    """A simple value other than false, true, null and undefined."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, Simple) and self.value == other.value

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash(self.value) ^ 0x5A5A

    def __repr__(self):
        return "Simple(%d)" % self.value


class _Undefined:
    def __repr__(self):
        return "undefined"

    def __hash__(self):
        return 0x0F7


undefined = _Undefined()

_INF = float("inf")
_NINF = float("-inf")
_U64 = 0xFFFFFFFFFFFFFFFF
_Z4 = b"\0\0\0\0"
_Z8 = b"\0\0\0\0\0\0\0\0"
# Built once: a tuple written inside a function is rebuilt on every call.
_BYTES_LIKE = (bytes, bytearray, memoryview)
_SEQUENCE = (list, tuple)

# MicroPython's str hands out its UTF-8 bytes directly (bytearray.extend
# takes it), which saves an encode() copy per string; CPython's does not.
try:
    bytearray().extend("a")
    _STR_IS_UTF8 = True
except TypeError:
    _STR_IS_UTF8 = False

# MicroPython's dict does not keep insertion order; its OrderedDict does.
# Decoded maps use it there so that decode -> encode reproduces the bytes.
# (On MicroPython an OrderedDict never compares equal to a plain dict.)
_Map = dict
if sys.implementation.name == "micropython":
    try:
        from collections import OrderedDict as _Map
    except ImportError:
        pass


# ---------------------------------------------------------------- encoding


def dumps(obj, max_depth=_MAX_DEPTH):
    out = bytearray()
    _enc(out, obj, max_depth)
    return bytes(out)


def head_size(n):
    """The bytes _head writes for the argument n (an unsigned integer's
    value, an array's item count): what padding counts (shared/messages.py)."""
    return 1 if n < 24 else 2 if n < 0x100 else 3 if n < 0x10000 else 5 if n < 0x100000000 else 9


def _head(out, major, n):
    # Initial byte plus the shortest argument; wide arguments are packed in
    # place (struct.pack_into) so that no temporary bytes are allocated.
    if n < 24:
        out.append(major | n)
    elif n < 0x100:
        out.append(major | 24)
        out.append(n)
    elif n < 0x10000:
        out.append(major | 25)
        out.append(n >> 8)
        out.append(n & 0xFF)
    elif n < 0x100000000:
        out.append(major | 26)
        out.extend(_Z4)
        struct.pack_into(">I", out, len(out) - 4, n)
    else:
        out.append(major | 27)
        out.extend(_Z8)
        struct.pack_into(">Q", out, len(out) - 8, n)


def _enc(out, obj, depth):
    if obj is None:
        out.append(0xF6)
    elif obj is False:
        out.append(0xF4)
    elif obj is True:
        out.append(0xF5)
    elif isinstance(obj, int):
        if obj < 0:
            major = _NINT
            obj = -1 - obj
        else:
            major = _UINT
        if obj > _U64:
            raise TypeError("cbor: int outside 64 bits")
        _head(out, major, obj)
    elif isinstance(obj, str):
        if _STR_IS_UTF8:
            # Copy the text first, then fill in its head: one byte when short,
            # else spliced in (which allocates, only for text of 24+ bytes).
            pos = len(out)
            out.append(_TEXT)
            out.extend(obj)
            n = len(out) - pos - 1
            if n < 24:
                out[pos] = _TEXT | n
            else:
                h = bytearray()
                _head(h, _TEXT, n)
                out[pos : pos + 1] = h
        else:
            try:
                b = obj.encode()
            except UnicodeError:  # CPython: lone surrogates
                raise TypeError("cbor: text is not valid Unicode")
            _head(out, _TEXT, len(b))
            out.extend(b)
    elif isinstance(obj, _BYTES_LIKE):
        if isinstance(obj, memoryview):
            obj = bytes(obj)
        _head(out, _BYTES, len(obj))
        out.extend(obj)
    elif isinstance(obj, _SEQUENCE):
        if depth < 1:
            raise TypeError("cbor: nesting too deep")
        _head(out, _ARRAY, len(obj))
        for x in obj:
            _enc(out, x, depth - 1)
    elif isinstance(obj, dict):
        if depth < 1:
            raise TypeError("cbor: nesting too deep")
        _head(out, _MAP, len(obj))
        for k in obj:
            _enc(out, k, depth - 1)
            _enc(out, obj[k], depth - 1)
    elif isinstance(obj, float):
        if obj != obj:
            out.extend(b"\xf9\x7e\x00")
        elif obj == _INF:
            out.extend(b"\xf9\x7c\x00")
        elif obj == _NINF:
            out.extend(b"\xf9\xfc\x00")
        else:
            out.append(0xFB)
            out.extend(struct.pack(">d", obj))
    elif isinstance(obj, Tag):
        if depth < 1:
            raise TypeError("cbor: nesting too deep")
        t = obj.tag
        if not isinstance(t, int) or t is True or t is False or t < 0 or t > _U64:
            raise TypeError("cbor: bad tag number")
        _head(out, _TAG, t)
        _enc(out, obj.value, depth - 1)
    elif obj is undefined:
        out.append(0xF7)
    elif isinstance(obj, Simple):
        v = obj.value
        if not isinstance(v, int) or v < 0 or v > 255 or 20 <= v < 32:
            raise TypeError("cbor: bad simple value")
        _head(out, _SIMPLE, v)
    else:
        raise TypeError("cbor: cannot encode %s" % type(obj).__name__)


# ---------------------------------------------------------------- decoding


def loads(data, max_size=_MAX_SIZE, max_depth=_MAX_DEPTH, pad=False):
    """The one item `data` holds. With pad, zero bytes may follow it (the
    padding of a sealed message, shared/messages.py); anything else after
    the item is an error."""
    if not isinstance(data, _BYTES_LIKE):
        raise TypeError("cbor: loads needs bytes, bytearray or memoryview")
    mv = memoryview(data)
    if getattr(mv, "format", "B") != "B":  # CPython: a typed view, read its raw bytes
        mv = mv.cast("B")
    if len(mv) > max_size:
        raise TooLarge("cbor: %d bytes, limit %d" % (len(mv), max_size))
    d = _Decoder(mv, max_depth)
    try:
        obj = d.item(0)
    except RuntimeError:  # the platform's own recursion limit, below max_depth
        raise DecodeError("cbor: nesting too deep")
    if d.i != d.end and not (pad and not any(mv[d.i:d.end])):
        raise DecodeError("cbor: %d trailing bytes" % (d.end - d.i))
    return obj


def _utf8_ok(mv, i, end):
    # Strict UTF-8 (RFC 3629): shortest forms only, no surrogates, <= U+10FFFF.
    while i < end:
        c = mv[i]
        i += 1
        if c < 0x80:
            continue
        if c < 0xC2 or c > 0xF4:
            return False
        lo = 0x80
        hi = 0xBF
        if c < 0xE0:
            n = 1
        elif c < 0xF0:
            n = 2
            if c == 0xE0:
                lo = 0xA0
            elif c == 0xED:
                hi = 0x9F
        else:
            n = 3
            if c == 0xF0:
                lo = 0x90
            elif c == 0xF4:
                hi = 0x8F
        if end - i < n:
            return False
        c = mv[i]
        if c < lo or c > hi:
            return False
        for k in range(i + 1, i + n):
            if mv[k] & 0xC0 != 0x80:
                return False
        i += n
    return True


def _half(h):
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = m * 2.0**-24
    elif e == 31:
        v = float("nan") if m else _INF
    else:
        v = (m | 0x400) * 2.0 ** (e - 25)
    return -v if h & 0x8000 else v


def _freeze(v):
    # A map key must be hashable: arrays become tuples, maps are refused.
    if isinstance(v, list):
        return tuple([_freeze(x) for x in v])
    if isinstance(v, dict):
        raise DecodeError("cbor: map as map key")
    if isinstance(v, Tag):
        return Tag(v.tag, _freeze(v.value))
    return v


class _Decoder:
    def __init__(self, mv, max_depth):
        self.mv = mv
        self.i = 0
        self.end = len(mv)
        self.max_depth = max_depth

    def _byte(self):
        i = self.i
        if i >= self.end:
            raise DecodeError("cbor: truncated")
        self.i = i + 1
        return self.mv[i]

    def _take(self, n):
        # Claim n bytes; the claim is checked against what is left before use.
        i = self.i
        if n > self.end - i:
            raise DecodeError("cbor: length %d past end of input" % n)
        self.i = i + n
        return i

    def _arg(self, ai):
        if ai < 24:
            return ai
        if ai > 27:
            raise DecodeError("cbor: reserved additional info %d" % ai)
        mv = self.mv
        if ai == 24:
            return mv[self._take(1)]
        if ai == 25:
            i = self._take(2)
            return (mv[i] << 8) | mv[i + 1]
        if ai == 26:
            return struct.unpack_from(">I", mv, self._take(4))[0]
        return struct.unpack_from(">Q", mv, self._take(8))[0]

    def _at_break(self):
        if self.i >= self.end:
            raise DecodeError("cbor: truncated, no break")
        if self.mv[self.i] == _BREAK:
            self.i += 1
            return True
        return False

    def _text(self, n):
        i = self._take(n)
        try:
            s = str(self.mv[i : i + n], "utf-8")
        except UnicodeError:
            raise DecodeError("cbor: invalid UTF-8")
        if len(s) != n and not _utf8_ok(self.mv, i, i + n):
            raise DecodeError("cbor: invalid UTF-8")
        return s

    def _chunks(self, major):
        # Indefinite-length string: definite chunks of the same major type.
        parts = []
        while not self._at_break():
            ib = self._byte()
            if ib & 0xE0 != major or ib & 0x1F == _INDEF:
                raise DecodeError("cbor: bad chunk in indefinite string")
            n = self._arg(ib & 0x1F)
            if major == _TEXT:
                parts.append(self._text(n))
            else:
                i = self._take(n)
                parts.append(bytes(self.mv[i : i + n]))
        return ("" if major == _TEXT else b"").join(parts)

    def _simple(self, ai):
        if ai < 20:
            return Simple(ai)
        if ai == 20:
            return False
        if ai == 21:
            return True
        if ai == 22:
            return None
        if ai == 23:
            return undefined
        if ai == 24:
            v = self._byte()
            if v < 32:
                raise DecodeError("cbor: simple value %d in two bytes" % v)
            return Simple(v)
        if ai == 25:
            i = self._take(2)
            return _half((self.mv[i] << 8) | self.mv[i + 1])
        if ai == 26:
            return struct.unpack_from(">f", self.mv, self._take(4))[0]
        if ai == 27:
            return struct.unpack_from(">d", self.mv, self._take(8))[0]
        raise DecodeError("cbor: reserved simple/float info %d" % ai)

    def _put(self, d, k, v):
        try:
            dup = k in d
        except TypeError:
            raise DecodeError("cbor: unhashable map key")
        if dup:
            raise DecodeError("cbor: duplicate map key")
        d[k] = v

    def item(self, depth):
        ib = self._byte()
        major = ib & 0xE0
        ai = ib & 0x1F
        if major == _SIMPLE:
            if ai == _INDEF:
                raise DecodeError("cbor: unexpected break")
            return self._simple(ai)
        if ai == _INDEF:
            if major == _BYTES or major == _TEXT:
                return self._chunks(major)
            if major != _ARRAY and major != _MAP:
                raise DecodeError("cbor: indefinite length on major type %d" % (major >> 5))
            n = -1
        else:
            n = self._arg(ai)
        if major == _UINT:
            return n
        if major == _NINT:
            return -1 - n
        if major == _BYTES:
            i = self._take(n)
            return bytes(self.mv[i : i + n])
        if major == _TEXT:
            return self._text(n)
        if depth >= self.max_depth:
            raise DecodeError("cbor: nesting deeper than %d" % self.max_depth)
        depth += 1
        if major == _ARRAY:
            out = []
            if n < 0:
                while not self._at_break():
                    out.append(self.item(depth))
            else:
                if n > self.end - self.i:  # every item takes at least one byte
                    raise DecodeError("cbor: array length %d past end of input" % n)
                for _ in range(n):
                    out.append(self.item(depth))
            return out
        if major == _MAP:
            out = _Map()
            if n < 0:
                while not self._at_break():
                    k = _freeze(self.item(depth))
                    self._put(out, k, self.item(depth))
            else:
                if n > (self.end - self.i) >> 1:
                    raise DecodeError("cbor: map length %d past end of input" % n)
                for _ in range(n):
                    k = _freeze(self.item(depth))
                    self._put(out, k, self.item(depth))
            return out
        # major == _TAG
        v = self.item(depth)
        if n == 2 or n == 3:
            if not isinstance(v, bytes):
                raise DecodeError("cbor: bignum content is not a byte string")
            v = int.from_bytes(v, "big")
            return -1 - v if n == 3 else v
        return Tag(n, v)
