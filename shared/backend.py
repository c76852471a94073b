# The two implementations of CBOR and the NaCl box behind one interface:
# PyNaCl + cbor2 on CPython ("native"), our pure-Python modules on MicroPython
# ("pure"). Both produce identical bytes; tests run everything against both.
from shared.errors import AuthError, BadKeyError, DecodeError, TooLarge


class Backend:
    """A named set of: dumps, loads, beforenm, seal, open, public_key."""

    def __init__(self, name, dumps, loads, beforenm, seal, open_, public_key):
        self.name = name
        self.dumps = dumps
        self.loads = loads  # loads(data, max_size) -> object, strict
        self.beforenm = beforenm  # beforenm(peer_public, my_secret) -> 32-byte key
        self.seal = seal  # seal(key, nonce, plaintext) -> MAC || ciphertext
        self.open = open_  # open(key, nonce, box) -> plaintext, or AuthError
        self.public_key = public_key  # public_key(secret) -> public


def _pure():
    from shared import box, cbor, x25519

    def loads(data, max_size):
        return cbor.loads(data, max_size)

    def public_key(secret):
        return x25519.scalarmult_base(secret)

    return Backend("pure", cbor.dumps, loads, box.beforenm, box.seal, box.open, public_key)


def _native():
    import io

    import cbor2
    from nacl import bindings as nb
    from nacl.exceptions import CryptoError

    decoder = cbor2.CBORDecoder
    bytes_io = io.BytesIO

    def loads(data, max_size):
        if len(data) > max_size:
            raise TooLarge("CBOR item of %d bytes; the limit is %d" % (len(data), max_size))
        fp = bytes_io(data)
        try:
            obj = decoder(fp, max_depth=16, allow_duplicate_keys=False).decode()
        except Exception as e:  # cbor2 raises several types; all mean malformed
            raise DecodeError("not valid CBOR: %s" % e) from None
        if fp.tell() != len(data):
            raise DecodeError("%d trailing bytes after the CBOR item" % (len(data) - fp.tell()))
        return obj

    def beforenm(public, secret):
        if len(public) != 32 or len(secret) != 32:
            raise BadKeyError("keys are 32 bytes")
        try:
            return nb.crypto_box_beforenm(bytes(public), bytes(secret))
        except CryptoError:
            raise BadKeyError("public key of small order refused") from None

    def seal(key, nonce, plaintext):
        return nb.crypto_box_easy_afternm(bytes(plaintext), nonce, key)

    open_easy = nb.crypto_box_open_easy_afternm

    def open_(key, nonce, box):
        if len(box) < 16:
            raise DecodeError("box shorter than its 16-byte tag")
        try:
            return open_easy(bytes(box), bytes(nonce), key)
        except CryptoError:
            raise AuthError("box did not authenticate") from None

    def public_key(secret):
        return nb.crypto_scalarmult_base(bytes(secret))

    return Backend("native", cbor2.dumps, loads, beforenm, seal, open_, public_key)


PURE = _pure()
try:
    NATIVE = _native()
except ImportError:  # MicroPython, or a host without PyNaCl/cbor2
    NATIVE = None
DEFAULT = NATIVE or PURE
