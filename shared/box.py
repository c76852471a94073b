"""NaCl crypto_box (Curve25519, XSalsa20, Poly1305) in plain Python for the meter.

MicroPython on the ESP32 has neither PyNaCl nor libsodium, so the meter seals
with this module; CPython code uses PyNaCl, and the tests hold the two to the
same bytes. The format is NaCl's: seal() returns the 16-byte Poly1305 tag
followed by the ciphertext, exactly what PyNaCl's Box.encrypt(...).ciphertext
and nacl.bindings.crypto_box_easy_afternm return.

How it is built:
  beforenm(pk, sk)  X25519(sk, pk), then HSalsa20 of that with a zero input.
  seal/open         XSalsa20: HSalsa20(key, nonce[0:16]) gives a subkey, and
                    Salsa20 under it with nonce[16:24] and a block counter from
                    zero gives the keystream. Its first 32 bytes are the
                    one-time Poly1305 key; the message is XORed with the rest.
                    The tag covers the ciphertext only.

MicroPython keeps integers below 2**30 unboxed; anything larger is a heap
bigint. The Salsa20 core therefore holds every 32-bit word as two 16-bit
halves (l = low, h = high) in local variables, so a block allocates nothing.
The rounds are written out in full (see _core): the same rounds as a loop
calling a helper per step measured about three times slower under
MicroPython. Poly1305 uses bigints: it runs once per 16 bytes, not per
operation.

Working state lives in module-level buffers: the functions here are not
reentrant (one thread on the meter; the CPython side uses PyNaCl).
"""

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from shared import x25519
from shared.errors import AuthError, BadKeyError, DecodeError

KEY_BYTES = const(32)
NONCE_BYTES = const(24)
MAC_BYTES = const(16)

# "expand 32-byte k" as little-endian words, split into 16-bit halves.
_C0L = const(0x7865)
_C0H = const(0x6170)
_C1L = const(0x646E)
_C1H = const(0x3320)
_C2L = const(0x2D32)
_C2H = const(0x7962)
_C3L = const(0x6574)
_C3H = const(0x6B20)

# Poly1305: p = 2**130 - 5; r is clamped with _RMASK.
_P1305 = const(0x3FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFB)
_M128 = const(0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF)
_BIT128 = const(0x100000000000000000000000000000000)
_RMASK = const(0x0FFFFFFC0FFFFFFC0FFFFFFC0FFFFFFF)

# Salsa20 state: word i is _ST[2*i] (low 16 bits) and _ST[2*i + 1] (high).
_ST = [0] * 32
# One keystream block.
_KS = bytearray(64)
_ZERO16 = bytes(16)
_ZERO64 = bytes(64)
_ZERO_ST = (0,) * 32


def _core(st, out):
    """The 20 Salsa20 rounds over the state st.

    out is a 64-byte bytearray: the Salsa20 block (rounds plus the input
    words) is written to it. out is None: HSalsa20; its eight output words go
    back into st as the key words (1-4, 11-14) of the Salsa20 state that uses
    the derived subkey.

    A quarter-round on words (a b c d) is four steps w ^= (u + v) <<< r:
    b ^= (a + d) <<< 7, c ^= (b + a) <<< 9, d ^= (c + b) <<< 13,
    a ^= (d + c) <<< 18. Each step is four lines on the halves. s is the sum
    of the low halves with its carry left in bit 16; t is the sum of the high
    halves without that carry. For r < 16 the new high bits are
    ((t << r) + (s >> (16 - r))) & 0xFFFF: the carry in bit 16 of s lands on
    bit r, where it belongs in t << r, so it is added in on the way. The low
    bits need the high sum with the carry, masked:
    ((s << r) | (((t + (s >> 16)) & 0xFFFF) >> (16 - r))) & 0xFFFF.
    A rotation by 18 is a swap of the halves and a rotation by 2.

    Largest intermediate: (2**17 - 2) << 13 plus 2**14 - 1 = 2**30 - 1, the
    largest MicroPython small int; so the core never allocates.
    """
    # fmt: off
    (
        l0, h0, l1, h1, l2, h2, l3, h3,
        l4, h4, l5, h5, l6, h6, l7, h7,
        l8, h8, l9, h9, l10, h10, l11, h11,
        l12, h12, l13, h13, l14, h14, l15, h15,
    ) = st
    # fmt: on
    n = 10
    while n:
        # Column round.
        # (0 4 8 12)
        s = l0 + l12
        t = h0 + h12
        h4 ^= ((t << 7) + (s >> 9)) & 0xFFFF
        l4 ^= ((s << 7) | (((t + (s >> 16)) & 0xFFFF) >> 9)) & 0xFFFF
        s = l4 + l0
        t = h4 + h0
        h8 ^= ((t << 9) + (s >> 7)) & 0xFFFF
        l8 ^= ((s << 9) | (((t + (s >> 16)) & 0xFFFF) >> 7)) & 0xFFFF
        s = l8 + l4
        t = h8 + h4
        h12 ^= ((t << 13) + (s >> 3)) & 0xFFFF
        l12 ^= ((s << 13) | (((t + (s >> 16)) & 0xFFFF) >> 3)) & 0xFFFF
        s = l12 + l8
        t = h12 + h8
        l0 ^= ((t << 2) + (s >> 14)) & 0xFFFF
        h0 ^= ((s << 2) | (((t + (s >> 16)) & 0xFFFF) >> 14)) & 0xFFFF
        # (5 9 13 1)
        s = l5 + l1
        t = h5 + h1
        h9 ^= ((t << 7) + (s >> 9)) & 0xFFFF
        l9 ^= ((s << 7) | (((t + (s >> 16)) & 0xFFFF) >> 9)) & 0xFFFF
        s = l9 + l5
        t = h9 + h5
        h13 ^= ((t << 9) + (s >> 7)) & 0xFFFF
        l13 ^= ((s << 9) | (((t + (s >> 16)) & 0xFFFF) >> 7)) & 0xFFFF
        s = l13 + l9
        t = h13 + h9
        h1 ^= ((t << 13) + (s >> 3)) & 0xFFFF
        l1 ^= ((s << 13) | (((t + (s >> 16)) & 0xFFFF) >> 3)) & 0xFFFF
        s = l1 + l13
        t = h1 + h13
        l5 ^= ((t << 2) + (s >> 14)) & 0xFFFF
        h5 ^= ((s << 2) | (((t + (s >> 16)) & 0xFFFF) >> 14)) & 0xFFFF
        # (10 14 2 6)
        s = l10 + l6
        t = h10 + h6
        h14 ^= ((t << 7) + (s >> 9)) & 0xFFFF
        l14 ^= ((s << 7) | (((t + (s >> 16)) & 0xFFFF) >> 9)) & 0xFFFF
        s = l14 + l10
        t = h14 + h10
        h2 ^= ((t << 9) + (s >> 7)) & 0xFFFF
        l2 ^= ((s << 9) | (((t + (s >> 16)) & 0xFFFF) >> 7)) & 0xFFFF
        s = l2 + l14
        t = h2 + h14
        h6 ^= ((t << 13) + (s >> 3)) & 0xFFFF
        l6 ^= ((s << 13) | (((t + (s >> 16)) & 0xFFFF) >> 3)) & 0xFFFF
        s = l6 + l2
        t = h6 + h2
        l10 ^= ((t << 2) + (s >> 14)) & 0xFFFF
        h10 ^= ((s << 2) | (((t + (s >> 16)) & 0xFFFF) >> 14)) & 0xFFFF
        # (15 3 7 11)
        s = l15 + l11
        t = h15 + h11
        h3 ^= ((t << 7) + (s >> 9)) & 0xFFFF
        l3 ^= ((s << 7) | (((t + (s >> 16)) & 0xFFFF) >> 9)) & 0xFFFF
        s = l3 + l15
        t = h3 + h15
        h7 ^= ((t << 9) + (s >> 7)) & 0xFFFF
        l7 ^= ((s << 9) | (((t + (s >> 16)) & 0xFFFF) >> 7)) & 0xFFFF
        s = l7 + l3
        t = h7 + h3
        h11 ^= ((t << 13) + (s >> 3)) & 0xFFFF
        l11 ^= ((s << 13) | (((t + (s >> 16)) & 0xFFFF) >> 3)) & 0xFFFF
        s = l11 + l7
        t = h11 + h7
        l15 ^= ((t << 2) + (s >> 14)) & 0xFFFF
        h15 ^= ((s << 2) | (((t + (s >> 16)) & 0xFFFF) >> 14)) & 0xFFFF
        # Row round.
        # (0 1 2 3)
        s = l0 + l3
        t = h0 + h3
        h1 ^= ((t << 7) + (s >> 9)) & 0xFFFF
        l1 ^= ((s << 7) | (((t + (s >> 16)) & 0xFFFF) >> 9)) & 0xFFFF
        s = l1 + l0
        t = h1 + h0
        h2 ^= ((t << 9) + (s >> 7)) & 0xFFFF
        l2 ^= ((s << 9) | (((t + (s >> 16)) & 0xFFFF) >> 7)) & 0xFFFF
        s = l2 + l1
        t = h2 + h1
        h3 ^= ((t << 13) + (s >> 3)) & 0xFFFF
        l3 ^= ((s << 13) | (((t + (s >> 16)) & 0xFFFF) >> 3)) & 0xFFFF
        s = l3 + l2
        t = h3 + h2
        l0 ^= ((t << 2) + (s >> 14)) & 0xFFFF
        h0 ^= ((s << 2) | (((t + (s >> 16)) & 0xFFFF) >> 14)) & 0xFFFF
        # (5 6 7 4)
        s = l5 + l4
        t = h5 + h4
        h6 ^= ((t << 7) + (s >> 9)) & 0xFFFF
        l6 ^= ((s << 7) | (((t + (s >> 16)) & 0xFFFF) >> 9)) & 0xFFFF
        s = l6 + l5
        t = h6 + h5
        h7 ^= ((t << 9) + (s >> 7)) & 0xFFFF
        l7 ^= ((s << 9) | (((t + (s >> 16)) & 0xFFFF) >> 7)) & 0xFFFF
        s = l7 + l6
        t = h7 + h6
        h4 ^= ((t << 13) + (s >> 3)) & 0xFFFF
        l4 ^= ((s << 13) | (((t + (s >> 16)) & 0xFFFF) >> 3)) & 0xFFFF
        s = l4 + l7
        t = h4 + h7
        l5 ^= ((t << 2) + (s >> 14)) & 0xFFFF
        h5 ^= ((s << 2) | (((t + (s >> 16)) & 0xFFFF) >> 14)) & 0xFFFF
        # (10 11 8 9)
        s = l10 + l9
        t = h10 + h9
        h11 ^= ((t << 7) + (s >> 9)) & 0xFFFF
        l11 ^= ((s << 7) | (((t + (s >> 16)) & 0xFFFF) >> 9)) & 0xFFFF
        s = l11 + l10
        t = h11 + h10
        h8 ^= ((t << 9) + (s >> 7)) & 0xFFFF
        l8 ^= ((s << 9) | (((t + (s >> 16)) & 0xFFFF) >> 7)) & 0xFFFF
        s = l8 + l11
        t = h8 + h11
        h9 ^= ((t << 13) + (s >> 3)) & 0xFFFF
        l9 ^= ((s << 13) | (((t + (s >> 16)) & 0xFFFF) >> 3)) & 0xFFFF
        s = l9 + l8
        t = h9 + h8
        l10 ^= ((t << 2) + (s >> 14)) & 0xFFFF
        h10 ^= ((s << 2) | (((t + (s >> 16)) & 0xFFFF) >> 14)) & 0xFFFF
        # (15 12 13 14)
        s = l15 + l14
        t = h15 + h14
        h12 ^= ((t << 7) + (s >> 9)) & 0xFFFF
        l12 ^= ((s << 7) | (((t + (s >> 16)) & 0xFFFF) >> 9)) & 0xFFFF
        s = l12 + l15
        t = h12 + h15
        h13 ^= ((t << 9) + (s >> 7)) & 0xFFFF
        l13 ^= ((s << 9) | (((t + (s >> 16)) & 0xFFFF) >> 7)) & 0xFFFF
        s = l13 + l12
        t = h13 + h12
        h14 ^= ((t << 13) + (s >> 3)) & 0xFFFF
        l14 ^= ((s << 13) | (((t + (s >> 16)) & 0xFFFF) >> 3)) & 0xFFFF
        s = l14 + l13
        t = h14 + h13
        l15 ^= ((t << 2) + (s >> 14)) & 0xFFFF
        h15 ^= ((s << 2) | (((t + (s >> 16)) & 0xFFFF) >> 14)) & 0xFFFF
        n -= 1
    if out is None:
        # HSalsa20: words 0 5 10 15 and 6 7 8 9 become the key words 1-4 and
        # 11-14 of the state, ready for the Salsa20 stream that follows.
        st[2] = l0
        st[3] = h0
        st[4] = l5
        st[5] = h5
        st[6] = l10
        st[7] = h10
        st[8] = l15
        st[9] = h15
        st[22] = l6
        st[23] = h6
        st[24] = l7
        st[25] = h7
        st[26] = l8
        st[27] = h8
        st[28] = l9
        st[29] = h9
        return
    # Salsa20: add the input words back in and write the block little-endian.
    s = l0 + st[0]
    t = h0 + st[1] + (s >> 16)
    out[0] = s & 0xFF
    out[1] = (s >> 8) & 0xFF
    out[2] = t & 0xFF
    out[3] = (t >> 8) & 0xFF
    s = l1 + st[2]
    t = h1 + st[3] + (s >> 16)
    out[4] = s & 0xFF
    out[5] = (s >> 8) & 0xFF
    out[6] = t & 0xFF
    out[7] = (t >> 8) & 0xFF
    s = l2 + st[4]
    t = h2 + st[5] + (s >> 16)
    out[8] = s & 0xFF
    out[9] = (s >> 8) & 0xFF
    out[10] = t & 0xFF
    out[11] = (t >> 8) & 0xFF
    s = l3 + st[6]
    t = h3 + st[7] + (s >> 16)
    out[12] = s & 0xFF
    out[13] = (s >> 8) & 0xFF
    out[14] = t & 0xFF
    out[15] = (t >> 8) & 0xFF
    s = l4 + st[8]
    t = h4 + st[9] + (s >> 16)
    out[16] = s & 0xFF
    out[17] = (s >> 8) & 0xFF
    out[18] = t & 0xFF
    out[19] = (t >> 8) & 0xFF
    s = l5 + st[10]
    t = h5 + st[11] + (s >> 16)
    out[20] = s & 0xFF
    out[21] = (s >> 8) & 0xFF
    out[22] = t & 0xFF
    out[23] = (t >> 8) & 0xFF
    s = l6 + st[12]
    t = h6 + st[13] + (s >> 16)
    out[24] = s & 0xFF
    out[25] = (s >> 8) & 0xFF
    out[26] = t & 0xFF
    out[27] = (t >> 8) & 0xFF
    s = l7 + st[14]
    t = h7 + st[15] + (s >> 16)
    out[28] = s & 0xFF
    out[29] = (s >> 8) & 0xFF
    out[30] = t & 0xFF
    out[31] = (t >> 8) & 0xFF
    s = l8 + st[16]
    t = h8 + st[17] + (s >> 16)
    out[32] = s & 0xFF
    out[33] = (s >> 8) & 0xFF
    out[34] = t & 0xFF
    out[35] = (t >> 8) & 0xFF
    s = l9 + st[18]
    t = h9 + st[19] + (s >> 16)
    out[36] = s & 0xFF
    out[37] = (s >> 8) & 0xFF
    out[38] = t & 0xFF
    out[39] = (t >> 8) & 0xFF
    s = l10 + st[20]
    t = h10 + st[21] + (s >> 16)
    out[40] = s & 0xFF
    out[41] = (s >> 8) & 0xFF
    out[42] = t & 0xFF
    out[43] = (t >> 8) & 0xFF
    s = l11 + st[22]
    t = h11 + st[23] + (s >> 16)
    out[44] = s & 0xFF
    out[45] = (s >> 8) & 0xFF
    out[46] = t & 0xFF
    out[47] = (t >> 8) & 0xFF
    s = l12 + st[24]
    t = h12 + st[25] + (s >> 16)
    out[48] = s & 0xFF
    out[49] = (s >> 8) & 0xFF
    out[50] = t & 0xFF
    out[51] = (t >> 8) & 0xFF
    s = l13 + st[26]
    t = h13 + st[27] + (s >> 16)
    out[52] = s & 0xFF
    out[53] = (s >> 8) & 0xFF
    out[54] = t & 0xFF
    out[55] = (t >> 8) & 0xFF
    s = l14 + st[28]
    t = h14 + st[29] + (s >> 16)
    out[56] = s & 0xFF
    out[57] = (s >> 8) & 0xFF
    out[58] = t & 0xFF
    out[59] = (t >> 8) & 0xFF
    s = l15 + st[30]
    t = h15 + st[31] + (s >> 16)
    out[60] = s & 0xFF
    out[61] = (s >> 8) & 0xFF
    out[62] = t & 0xFF
    out[63] = (t >> 8) & 0xFF


def _words(st, i, src, o, n):
    # n little-endian words of src from byte o into st from half i.
    while n:
        st[i] = src[o] | (src[o + 1] << 8)
        st[i + 1] = src[o + 2] | (src[o + 3] << 8)
        i += 2
        o += 4
        n -= 1


def _hsalsa(st, key, inp):
    # The HSalsa20 state from a 32-byte key and a 16-byte input; after it,
    # st holds the subkey in the key positions.
    st[0] = _C0L
    st[1] = _C0H
    _words(st, 2, key, 0, 4)
    st[10] = _C1L
    st[11] = _C1H
    _words(st, 12, inp, 0, 4)
    st[20] = _C2L
    st[21] = _C2H
    _words(st, 22, key, 16, 4)
    st[30] = _C3L
    st[31] = _C3H
    _core(st, None)


def _start(st, key, nonce):
    # XSalsa20: subkey from the first 16 nonce bytes, Salsa20 state with the
    # last 8 and block counter zero.
    _hsalsa(st, key, nonce)
    _words(st, 12, nonce, 16, 2)
    st[16] = 0
    st[17] = 0
    st[18] = 0
    st[19] = 0


def _next_block(st, ks):
    # Advance the 64-bit block counter (words 8, 9) and fill ks.
    i = 16
    while i < 20:
        v = st[i] + 1
        if v < 0x10000:
            st[i] = v
            break
        st[i] = 0
        i += 1
    _core(st, ks)


def _stream(st, ks, k, src, so, dst, do, n):
    # dst[do:do+n] = src[so:so+n] XOR keystream, starting at byte k of the
    # block already in ks; later blocks are made as needed.
    while n:
        if k == 64:
            _next_block(st, ks)
            k = 0
        m = min(64 - k, n)
        n -= m
        while m:
            dst[do] = src[so] ^ ks[k]
            do += 1
            so += 1
            k += 1
            m -= 1


def _wipe(st, ks):
    st[:] = _ZERO_ST
    ks[:] = _ZERO64


def _poly(r, s, buf, i, end):
    # Poly1305 of buf[i:end] under (r, s) as integers; returns the 16-byte tag.
    # Bigints: four or five allocations per 16-byte block. (% measured both
    # faster and leaner on MicroPython than folding 2**130 = 5 by hand.)
    mv = memoryview(buf)
    h = 0
    while i < end:
        j = i + 16
        if j > end:
            # A short last block gets its 1 bit just past its end.
            h += int.from_bytes(mv[i:end], "little") + (1 << (8 * (end - i)))
            h = h * r % _P1305
            break
        h = (h + int.from_bytes(mv[i:j], "little") + _BIT128) * r % _P1305
        i = j
    return ((h + s) & _M128).to_bytes(16, "little")


def _polykey(ks):
    # The one-time Poly1305 key from the first 32 bytes of keystream block 0.
    mv = memoryview(ks)
    return (
        int.from_bytes(mv[0:16], "little") & _RMASK,
        int.from_bytes(mv[16:32], "little"),
    )


def _check(key, nonce):
    if len(key) != 32:
        raise BadKeyError("box key must be 32 bytes")
    if len(nonce) != 24:
        raise DecodeError("nonce must be 24 bytes")


def _stwords(st, i, dst, o, n):
    # n words from st half i, little-endian into dst at byte o.
    while n:
        v = st[i]
        dst[o] = v & 0xFF
        dst[o + 1] = v >> 8
        v = st[i + 1]
        dst[o + 2] = v & 0xFF
        dst[o + 3] = v >> 8
        i += 2
        o += 4
        n -= 1


def hsalsa20(key, inp):
    """HSalsa20 (crypto_core_hsalsa20): 32-byte key, 16-byte input -> 32 bytes."""
    if len(key) != 32:
        raise BadKeyError("key must be 32 bytes")
    if len(inp) != 16:
        raise DecodeError("HSalsa20 input must be 16 bytes")
    st = _ST
    _hsalsa(st, key, inp)
    out = bytearray(32)
    _stwords(st, 2, out, 0, 4)
    _stwords(st, 22, out, 16, 4)
    st[:] = _ZERO_ST
    return bytes(out)


def xsalsa20_xor(key, nonce, data):
    """data XOR the XSalsa20 keystream from its start (crypto_stream_xsalsa20_xor)."""
    _check(key, nonce)
    n = len(data)
    out = bytearray(n)
    st = _ST
    ks = _KS
    _start(st, key, nonce)
    _core(st, ks)
    _stream(st, ks, 0, data, 0, out, 0, n)
    _wipe(st, ks)
    return bytes(out)


def poly1305(key, msg):
    """Poly1305 one-time authenticator: 32-byte key (r || s), message -> 16-byte tag."""
    if len(key) != 32:
        raise BadKeyError("Poly1305 key must be 32 bytes")
    return _poly(
        int.from_bytes(key[0:16], "little") & _RMASK,
        int.from_bytes(key[16:32], "little"),
        msg,
        0,
        len(msg),
    )


def beforenm(public_key, secret_key):
    """The 32-byte box key for a peer (crypto_box_beforenm).

    BadKeyError for keys of the wrong length, a public key of small order,
    or an all-zero shared secret, as libsodium refuses them.
    """
    return hsalsa20(x25519.scalarmult(secret_key, public_key), _ZERO16)


def seal(key, nonce, plaintext):
    """Box plaintext under the 32-byte box key and 24-byte nonce.

    Returns MAC (16 bytes) || ciphertext. The nonce must never repeat for a key.
    """
    _check(key, nonce)
    n = len(plaintext)
    out = bytearray(16 + n)
    st = _ST
    ks = _KS
    _start(st, key, nonce)
    _core(st, ks)
    r, s = _polykey(ks)
    _stream(st, ks, 32, plaintext, 0, out, 16, n)
    _wipe(st, ks)
    out[0:16] = _poly(r, s, out, 16, 16 + n)
    return bytes(out)


def open(key, nonce, box):
    """Check and decrypt a box made by seal (or PyNaCl); returns the plaintext.

    DecodeError if box is shorter than the 16-byte tag; AuthError if the tag
    does not match (wrong key or nonce, or altered bytes).
    """
    _check(key, nonce)
    n = len(box)
    if n < 16:
        raise DecodeError("box shorter than its 16-byte tag")
    st = _ST
    ks = _KS
    _start(st, key, nonce)
    _core(st, ks)
    r, s = _polykey(ks)
    tag = _poly(r, s, box, 16, n)
    # Compare every byte; no early exit on the first difference.
    d = 0
    i = 0
    while i < 16:
        d |= tag[i] ^ box[i]
        i += 1
    if d:
        _wipe(st, ks)
        raise AuthError("box did not open")
    out = bytearray(n - 16)
    _stream(st, ks, 32, box, 16, out, 0, n - 16)
    _wipe(st, ks)
    return bytes(out)
