# The protocol's exception family. Every decoder and checker in shared/
# raises one of these and nothing else, so a caller can count rejections by
# `reason` and keep running. Plain classes: this module runs on MicroPython.


class ProtocolError(Exception):
    """Base of every error the protocol raises for bad input."""

    reason = "protocol"


class DecodeError(ProtocolError):
    """Bytes that are not a well-formed message: truncated, wrong type, bad CBOR."""

    reason = "malformed"


class TooLarge(DecodeError):
    """Input over the size limit for its kind; rejected before any parsing."""

    reason = "oversized"


class VersionError(ProtocolError):
    """A protocol version this code does not speak."""

    reason = "version"


class AuthError(ProtocolError):
    """The box did not open: tampered, truncated ciphertext, or wrong key."""

    reason = "auth"


class BadKeyError(AuthError):
    """A public key of small order, or all zero: refused as libsodium does."""

    reason = "bad-key"


class DirectionError(ProtocolError):
    """An authentic message going the wrong way: a reflection."""

    reason = "direction"


class UnknownPeerError(ProtocolError):
    """No key is registered for this meter (or the hint names nobody)."""

    reason = "unknown-meter"


class MismatchError(ProtocolError):
    """An authentic message whose inner fields contradict its context
    (other meter id, message type not allowed here, group body mismatch)."""

    reason = "mismatch"


class ReplayError(ProtocolError):
    """A counter already seen, or older than the replay window."""

    reason = "replay"


class DuplicateError(ReplayError):
    """Exactly this counter was accepted before (a redelivery or a replay)."""

    reason = "duplicate"


class StaleError(ReplayError):
    """A counter older than the replay window: can no longer be checked."""

    reason = "stale"
