# The inner messages: CBOR arrays, sealed inside an envelope. Every message
# starts with the same five fields, so a receiver checks all of them before
# it looks at the body:
#
#   [version, meter id, direction, type, counter, body...]
#
# The body's fields, per type, are listed once in BODY below and in
# docs/protocol.md (CDDL). Everything is an unsigned integer or a list of
# them. There are no CBOR maps: MicroPython's dict keeps no order, and the
# meter must produce the same bytes as cbor2, so keyed values travel as flat
# [key, value, key, value, ...] lists with strictly increasing keys.
try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from shared import cbor, obis
from shared.const import (
    DEATH_ORDERLY,
    DOWN,
    MAX_INNER,
    MAX_PARTS,
    MAX_ROWS,
    MAX_U32,
    S_UNSUPPORTED,
    T_BIRTH,
    T_CURRENT,
    T_DEATH,
    T_INTERVAL,
    T_READ_CURRENT,
    T_READ_INTERVAL,
    T_STATUS,
    UP,
    VERSION,
)
from shared.errors import DecodeError, DirectionError, MismatchError, VersionError

# Field kinds.
U = const(0)       # unsigned integer < 2**32
PAIRS = const(1)   # [key, value, ...]: registers (quantity tag, value) or
                   # quality flags (row index, flags), keys increasing
DELTAS = const(2)  # list of unsigned integers, one per interval row

# type -> field kinds of its body, in order.
BODY = {
    # request id, deadline (epoch s), delay tolerance (s)
    T_READ_CURRENT: (U, U, U),
    # ... and the range [from, to) in epoch seconds
    T_READ_INTERVAL: (U, U, U, U, U),
    # request id, time of reading (epoch s), registers
    T_CURRENT: (U, U, PAIRS),
    # request id, part, parts, start of first row, period (s),
    # import and export registers at start, per-row import and export Wh,
    # quality flags of rows that have any
    T_INTERVAL: (U, U, U, U, U, U, U, DELTAS, DELTAS, PAIRS),
    # request id, status code, detail (0 when there is none)
    T_STATUS: (U, U, U),
    # session, counter of the sealed last will, time (epoch s), profile
    # period (s), start of the oldest interval held
    T_BIRTH: (U, U, U, U, U),
    # session, reason
    T_DEATH: (U, U),
}

UPLINK = (T_BIRTH, T_DEATH, T_CURRENT, T_INTERVAL, T_STATUS)
DOWNLINK = (T_READ_CURRENT, T_READ_INTERVAL)

# Padding. CBOR writes an unsigned integer in 1, 2, 3 or 5 bytes depending
# on its value, so without padding the length of a sealed response would
# tell whoever relays it (a third-party DAP) roughly how much power a home
# draws: a power register under 24 W, under 256 W or above, whether it
# exports, how many intervals of a profile used more than 24 Wh. A response
# that carries readings is therefore followed, inside the box, by zero
# bytes: as many as it takes for every register value to count as
# REGISTER_WIDTH bytes (the most a 32-bit value takes), every interval
# value as INTERVAL_WIDTH (any value up to 65,535 Wh, where the meter
# clamps a row and flags it), and the quality flags as if every row had
# one (an outage, or a clamped row, would show otherwise). What a length
# still tells: the message type, the number of registers and rows, and the
# size of ids, counters and times. docs/protocol.md, "Padding".
REGISTER_WIDTH = const(5)
INTERVAL_WIDTH = const(3)


def _size(x):
    """The bytes CBOR takes for the unsigned integer x, or None for anything
    else."""
    if type(x) is not int or x < 0:
        return None
    return cbor.head_size(x)


def _short(x, width):
    """How many bytes less than `width` CBOR takes for x, if an unsigned
    integer (anything else: 0)."""
    n = _size(x)
    return width - n if n is not None and n < width else 0


def _lists(*xs):
    for x in xs:
        if not isinstance(x, (list, tuple)):
            return False
    return True


def _flags_short(flags, rows):
    """How many bytes less the quality flags take than a flag (of one byte:
    the Q_ bits) on every one of `rows` rows would."""
    full = cbor.head_size(2 * rows)
    for row in range(rows):
        full += cbor.head_size(row) + 1
    n = cbor.head_size(len(flags))
    for x in flags:
        k = _size(x)
        if k is None:
            return 0
        n += k
    return full - n if n < full else 0


def padding(mtype, body):
    """The zero bytes that follow the inner message of this type and body
    (none for a body not of its type's shape: tests seal those on purpose)."""
    n = 0
    if mtype == T_CURRENT and len(body) == 3 and _lists(body[2]):
        regs = body[2]
        for j in range(1, len(regs), 2):
            n += _short(regs[j], REGISTER_WIDTH)
    elif mtype == T_INTERVAL and len(body) == 10 and _lists(body[7], body[8], body[9]):
        n = _short(body[5], REGISTER_WIDTH) + _short(body[6], REGISTER_WIDTH)
        for x in body[7]:
            n += _short(x, INTERVAL_WIDTH)
        for x in body[8]:
            n += _short(x, INTERVAL_WIDTH)
        n += _flags_short(body[9], len(body[7]))
    return n


def encode(backend, meter, direction, mtype, ctr, body):
    """The plaintext of a message: its inner CBOR array, then its padding."""
    pt = backend.dumps([VERSION, meter, direction, mtype, ctr] + list(body))
    # Never past MAX_INNER. What the firmware sends, padded, is never longer
    # than the same message with every value at its widest and every row
    # flagged, which fits (96 rows: 887 bytes); a body only check_body
    # would pass (flags near 2**32 on every row) may get less padding.
    n = min(padding(mtype, body), MAX_INNER - len(pt))
    return pt + bytes(n) if n > 0 else pt


def uint(x, what):
    if type(x) is not int or x < 0 or x > MAX_U32:
        raise DecodeError("%s must be an unsigned 32-bit integer" % what)
    return x


def check_header(obj, meter, direction):
    """Validate the five common fields against what this receiver expects.
    Returns (type, counter)."""
    if type(obj) is not list or len(obj) < 5:
        raise DecodeError("inner message must be an array of at least 5 items")
    if obj[0] != VERSION or type(obj[0]) is not int:
        raise VersionError("message version %r; this code speaks %d" % (obj[0], VERSION))
    if obj[1] != meter or type(obj[1]) is not int:
        raise MismatchError("message names meter %r, expected %d" % (obj[1], meter))
    if obj[2] != direction or type(obj[2]) is not int:
        raise DirectionError("message direction %r where %d was expected" % (obj[2], direction))
    mtype = obj[3]
    if mtype not in (UPLINK if direction == UP else DOWNLINK) or type(mtype) is not int:
        raise MismatchError("message type %r is not allowed in this direction" % (mtype,))
    return mtype, uint(obj[4], "counter")


def check_body(mtype, body):
    """Validate a body's fields by the BODY table, then the rules that tie
    fields together. Returns the body unchanged."""
    kinds = BODY[mtype]
    if len(body) != len(kinds):
        raise DecodeError("type %d has %d body fields, got %d" % (mtype, len(kinds), len(body)))
    for i in range(len(kinds)):
        k = kinds[i]
        x = body[i]
        if k == U:
            uint(x, "field %d" % i)
        elif k == DELTAS:
            if type(x) is not list or len(x) > MAX_ROWS:
                raise DecodeError("interval values must be a list of at most %d" % MAX_ROWS)
            for v in x:
                uint(v, "interval value")
        else:
            if type(x) is not list or len(x) & 1 or len(x) > 2 * MAX_ROWS:
                raise DecodeError("field %d must be a [key, value, ...] list" % i)
            prev = -1
            for j in range(0, len(x), 2):
                if uint(x[j], "key") <= prev:
                    raise DecodeError("keys in field %d must increase" % i)
                prev = x[j]
                uint(x[j + 1], "value")
    if mtype == T_CURRENT:
        regs = body[2]
        for j in range(0, len(regs), 2):
            if regs[j] not in obis.CODES:
                raise DecodeError("unknown quantity tag %d" % regs[j])
        for tag in obis.CURRENT_REGISTERS:
            if tag not in regs[0::2]:
                raise DecodeError("current reading lacks register %s" % obis.CODES[tag][0])
    elif mtype == T_INTERVAL:
        part, parts, period = body[1], body[2], body[4]
        rows = len(body[7])
        if not 0 <= part < parts <= MAX_PARTS:
            raise DecodeError("part %d of %d is out of range" % (part, parts))
        if period == 0 or body[3] % period:
            raise DecodeError("interval rows must start on a period boundary")
        if len(body[8]) != rows:
            raise DecodeError("import and export rows differ in number")
        flags = body[9]
        for j in range(0, len(flags), 2):
            if flags[j] >= rows or flags[j + 1] == 0:
                raise DecodeError("quality flags for a row that does not exist")
    elif mtype == T_READ_INTERVAL:
        if body[3] >= body[4]:
            raise DecodeError("interval range is empty: from must be before to")
    elif mtype == T_STATUS:
        if not 1 <= body[1] <= S_UNSUPPORTED:
            raise DecodeError("unknown status code %d" % body[1])
    elif mtype == T_DEATH:
        if body[1] > DEATH_ORDERLY:
            raise DecodeError("unknown death reason %d" % body[1])
    return body


def decode(backend, plaintext, meter, direction):
    """Parse an opened plaintext and check its header. Returns (type,
    counter, body); the body still needs check_body(). Zero bytes after the
    inner message are padding; how many is the sender's concern."""
    obj = backend.loads(plaintext, MAX_INNER, True)
    mtype, ctr = check_header(obj, meter, direction)
    return mtype, ctr, obj[5:]


def request_id(mtype, body):
    """The request id a response answers, or None for birth and death."""
    if mtype == T_BIRTH or mtype == T_DEATH:
        return None
    return body[0]


def is_request(mtype):
    return mtype in DOWNLINK


def direction_of(mtype):
    return DOWN if mtype in DOWNLINK else UP
