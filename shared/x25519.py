"""X25519 (RFC 7748) in plain Python, for the meter's NaCl box.

Runs unchanged on MicroPython and CPython. The field arithmetic uses Python
integers (heap bigints on MicroPython): the meter does one X25519 per peer per
boot, so a Montgomery ladder over bigints is fast enough, and it keeps the
code short enough to check by eye against RFC 7748 section 5.

Refusals match libsodium's crypto_scalarmult, which PyNaCl calls:
  - a point in libsodium's small-order list (compared with bit 255 ignored),
  - an all-zero result,
  - a scalar or point that is not 32 bytes,
all raise BadKeyError.

Python integer arithmetic is not constant-time. The ladder does the same
sequence of operations for every scalar and swaps with masks instead of
branches, which is as far as plain Python can go; it is not a defence against
an attacker who can time the meter's CPU closely.
"""

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from shared.errors import BadKeyError

_P = const(0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFED)
_M255 = const(0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF)
_BIT254 = const(0x4000000000000000000000000000000000000000000000000000000000000000)
# (486662 - 2) / 4, the ladder constant of Curve25519.
_A24 = const(121665)

# The u-coordinates libsodium refuses (after masking bit 255): 0, 1, the two
# points of order 8, p - 1, and the unreduced p and p + 1 (that is, 0 and 1).
_SMALL_ORDER = (
    0,
    1,
    0x00B8495F16056286FDB1329CEB8D09DA6AC49FF1FAE35616AEB8413B7C7AEBE0,
    0x57119FD0DD4E22D8868E1C58C45C44045BEF839C55B1D0B1248C50A3BC959C5F,
    _P - 1,
    _P,
    _P + 1,
)

_BASE = b"\x09" + bytes(31)


def _ladder(k, u):
    # k: clamped scalar, u: u-coordinate below p. Returns u(k * P) mod p.
    # Projective (x:z) Montgomery ladder from bit 254 down (RFC 7748
    # section 5). Every value is kept reduced below p, so the differences
    # below stay positive once p is added. (Reducing with % measured faster
    # on MicroPython than folding 2**255 = 19 by shifts and masks, and it
    # allocates half as much.)
    p = _P
    x1 = u
    x2 = 1
    z2 = 0
    x3 = u
    z3 = 1
    swap = 0
    t = 254
    while t >= 0:
        bit = (k >> t) & 1
        swap ^= bit
        # Exchange (x2, z2) and (x3, z3) when swap is 1, without branching.
        mask = -swap
        d = mask & (x2 ^ x3)
        x2 ^= d
        x3 ^= d
        d = mask & (z2 ^ z3)
        z2 ^= d
        z3 ^= d
        swap = bit

        a = x2 + z2
        b = x2 - z2 + p
        c = x3 + z3
        e = x3 - z3 + p
        aa = a * a % p
        bb = b * b % p
        da = e * a % p
        cb = c * b % p
        x3 = da + cb
        x3 = x3 * x3 % p
        z3 = da - cb + p
        z3 = z3 * z3 % p * x1 % p
        x2 = aa * bb % p
        e = aa - bb + p
        z2 = (e * _A24 + aa) * e % p
        t -= 1
    mask = -swap
    x2 ^= mask & (x2 ^ x3)
    z2 ^= mask & (z2 ^ z3)
    # x2 / z2; z2 = 0 (a point of small order) gives 0, as in the RFC.
    return x2 * pow(z2, p - 2, p) % p


def scalarmult(scalar, point):
    """X25519(scalar, point): the shared u-coordinate, 32 bytes little-endian.

    The scalar is clamped (RFC 7748 section 5) and bit 255 of the point is
    ignored. BadKeyError for a wrong length, a small-order point or an
    all-zero result.
    """
    if len(scalar) != 32:
        raise BadKeyError("X25519 scalar must be 32 bytes")
    if len(point) != 32:
        raise BadKeyError("X25519 point must be 32 bytes")
    u = int.from_bytes(point, "little") & _M255
    if u in _SMALL_ORDER:
        raise BadKeyError("public key of small order")
    k = int.from_bytes(scalar, "little")
    k &= _M255 - 7  # clear the three low bits and bit 255
    k |= _BIT254
    r = _ladder(k, u % _P)
    if r == 0:
        raise BadKeyError("all-zero shared secret")
    return r.to_bytes(32, "little")


def scalarmult_base(scalar):
    """The public key of a 32-byte secret key: X25519(scalar, 9)."""
    return scalarmult(scalar, _BASE)
