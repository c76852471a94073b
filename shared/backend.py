# The two implementations of CBOR and the NaCl box behind one interface:
# PyNaCl + cbor2 on CPython ("native"), our pure-Python modules on MicroPython
# ("pure"). Both produce identical bytes; tests run everything against both.
from shared.errors import AuthError, BadKeyError, DecodeError, TooLarge


class Backend:
    """A named set of: dumps, loads, beforenm, seal, open, public_key."""

    def __init__(self, name, dumps, loads, beforenm, seal, open_, public_key):
        self.name = name
        self.dumps = dumps
        # loads(data, max_size, pad=False) -> object: strict, but with pad
        # zero bytes may follow the item (shared/messages.py: padding)
        self.loads = loads
        self.beforenm = beforenm  # beforenm(peer_public, my_secret) -> 32-byte key
        self.seal = seal  # seal(key, nonce, plaintext) -> MAC || ciphertext
        self.open = open_  # open(key, nonce, box) -> plaintext, or AuthError
        self.public_key = public_key  # public_key(secret) -> public


def _pure():
    from shared import box, cbor, x25519

    def loads(data, max_size, pad=False):
        return cbor.loads(data, max_size, pad=pad)

    def public_key(secret):
        return x25519.scalarmult_base(secret)

    return Backend("pure", cbor.dumps, loads, box.beforenm, box.seal, box.open, public_key)


def _native():
    import io
    import threading

    import cbor2

    # PyNaCl is imported on first use, so a role that never seals or opens
    # (the DAP) never loads it.
    nacl = []

    def lib():
        if not nacl:
            from nacl import bindings
            from nacl.exceptions import CryptoError

            nacl.extend((bindings, CryptoError))
        return nacl

    bytes_io = io.BytesIO
    # One decoder per thread, given each item in turn: making a decoder per
    # call cost more than decoding a reading (the head-end's ingest makes
    # tens of thousands of calls a second). cbor2 forgets shared and string
    # references at the start of every decode(), so nothing carries over.
    kept = threading.local()

    def loads(data, max_size, pad=False):
        if len(data) > max_size:
            raise TooLarge("CBOR item of %d bytes; the limit is %d" % (len(data), max_size))
        fp = bytes_io(data)
        decoder = getattr(kept, "decoder", None)
        if decoder is None:
            decoder = kept.decoder = cbor2.CBORDecoder(fp, max_depth=16,
                                                       allow_duplicate_keys=False)
        else:
            decoder.fp = fp
        try:
            obj = decoder.decode()
        except Exception as e:  # cbor2 raises several types; all mean malformed
            raise DecodeError("not valid CBOR: %s" % e) from None
        end = fp.tell()
        if end != len(data) and not (pad and not bytes(data[end:]).strip(b"\0")):
            raise DecodeError("%d trailing bytes after the CBOR item" % (len(data) - end))
        return obj

    def beforenm(public, secret):
        if len(public) != 32 or len(secret) != 32:
            raise BadKeyError("keys are 32 bytes")
        nb, crypto_error = lib()
        try:
            return nb.crypto_box_beforenm(bytes(public), bytes(secret))
        except crypto_error:
            raise BadKeyError("public key of small order refused") from None

    def seal(key, nonce, plaintext):
        if len(nonce) != 24:
            raise DecodeError("nonce must be 24 bytes")
        return lib()[0].crypto_box_easy_afternm(bytes(plaintext), nonce, key)

    def open_(key, nonce, box):
        if len(box) < 16:
            raise DecodeError("box shorter than its 16-byte tag")
        if len(nonce) != 24:
            raise DecodeError("nonce must be 24 bytes")
        nb, crypto_error = nacl or lib()
        try:
            return nb.crypto_box_open_easy_afternm(bytes(box), bytes(nonce), key)
        except crypto_error:
            raise AuthError("box did not authenticate") from None

    def public_key(secret):
        return lib()[0].crypto_scalarmult_base(bytes(secret))

    return Backend("native", cbor2.dumps, loads, beforenm, seal, open_, public_key)


PURE = _pure()
try:
    NATIVE = _native()
except ImportError:  # MicroPython, or a host without PyNaCl/cbor2
    NATIVE = None
DEFAULT = NATIVE or PURE
