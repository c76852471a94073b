# The binary envelope: what travels on MQTT between a meter and the head-end.
#
#   offset  size  field
#   0       1     kind: 0x11 sealed message, 0x12 group-request item
#   1       4     meter id, big-endian: a routing hint, never trusted
#   5       24    nonce: fresh from os.urandom for every message
#   29      16    Poly1305 tag   } crypto_box (XSalsa20-Poly1305) of the
#   45      n     ciphertext     } CBOR inner message, under the pairwise key
#
# A group-request item carries, after the same 29-byte header, a 32-byte box
# of the group body's digest and then the group body itself (shared/group.py).
import struct

from shared.const import (
    ENV_GROUP_ITEM,
    ENV_HEADER,
    ENV_SEALED,
    MAC_BYTES,
    MAX_ENVELOPE,
    NONCE_BYTES,
    VERSION,
)
from shared.errors import DecodeError, TooLarge, VersionError


def header(kind, meter, nonce):
    if len(nonce) != NONCE_BYTES:
        raise DecodeError("nonce must be 24 bytes")
    return struct.pack(">BI", kind, meter) + nonce


def peek(wire, max_size=MAX_ENVELOPE):
    """(kind, meter id) of an envelope, checking only its framing. The meter
    id is a hint for choosing a key: the sealed contents decide."""
    n = len(wire)
    if n > max_size:
        raise TooLarge("envelope of %d bytes; the limit is %d" % (n, max_size))
    if n < ENV_HEADER + MAC_BYTES:
        raise DecodeError("envelope of %d bytes is shorter than its header" % n)
    kind = wire[0]
    if kind >> 4 != VERSION:
        raise VersionError("envelope version %d; this code speaks %d" % (kind >> 4, VERSION))
    if kind != ENV_SEALED and kind != ENV_GROUP_ITEM:
        raise DecodeError("unknown envelope kind 0x%02x" % kind)
    return kind, struct.unpack_from(">I", wire, 1)[0]


def seal(backend, key, meter, nonce, plaintext):
    return header(ENV_SEALED, meter, nonce) + backend.seal(key, nonce, plaintext)


def open(backend, key, wire):
    """Plaintext of a sealed envelope (kind 0x11); AuthError if it was
    altered or sealed under another key."""
    kind, _ = peek(wire)
    if kind != ENV_SEALED:
        raise DecodeError("expected a sealed envelope, got kind 0x%02x" % kind)
    mv = memoryview(wire)
    return backend.open(key, mv[5:ENV_HEADER], mv[ENV_HEADER:])
