# Messages on the hop between the head-end and a DAP. They are CBOR arrays
# in clear: what they carry is sealed already (envelopes), or authenticated
# per member (group requests). The DAP reads only these outer fields.
#
#   forward  [1, 1, tolerance, [envelope, ...]]            head-end -> DAP
#   group    [1, 2, tolerance, group, nonce, body, [[meter, box], ...]]
#   bundle   [1, 3, dap, seq, [envelope, ...]]             DAP -> head-end
#   ack      [1, 4, dap, [[first seq, last seq], ...]]     head-end -> DAP
#
# `tolerance` is the request's delay tolerance in seconds, given to the DAP
# in clear so it can schedule aggregation. It is only a hint: the meter acts
# on the copy inside the sealed request.
from shared.const import (
    ENV_HEADER,
    K_ACK,
    K_BUNDLE,
    K_FORWARD,
    K_GROUP,
    MAC_BYTES,
    MAX_BUNDLE_ITEMS,
    MAX_ENVELOPE,
    MAX_GATEWAY_MSG,
    MAX_GROUP_MEMBERS,
    NONCE_BYTES,
    VERSION,
)
from shared.errors import DecodeError, VersionError
from shared.messages import uint

_MAX_U64 = (1 << 64) - 1


def forward(backend, tolerance, envelopes):
    return backend.dumps([VERSION, K_FORWARD, tolerance, list(envelopes)])


def group(backend, tolerance, group_id, nonce, body, entries):
    return backend.dumps([VERSION, K_GROUP, tolerance, group_id, nonce, body, entries])


def bundle(backend, dap, seq, envelopes):
    return backend.dumps([VERSION, K_BUNDLE, dap, seq, list(envelopes)])


def ack(backend, dap, ranges):
    return backend.dumps([VERSION, K_ACK, dap, [list(r) for r in ranges]])


def _seq(x):
    if type(x) is not int or x < 0 or x > _MAX_U64:
        raise DecodeError("sequence numbers are unsigned 64-bit integers")
    return x


def _envelopes(items, limit):
    if type(items) is not list or not items or len(items) > limit:
        raise DecodeError("expected a list of 1 to %d envelopes" % limit)
    for env in items:
        if type(env) is not bytes or not ENV_HEADER + MAC_BYTES <= len(env) <= MAX_ENVELOPE:
            raise DecodeError("an envelope must be a byte string of %d to %d bytes"
                              % (ENV_HEADER + MAC_BYTES, MAX_ENVELOPE))
    return items


def decode(backend, data):
    """Parse one gateway message. Returns a tuple whose first item is its
    kind (K_FORWARD, K_GROUP, K_BUNDLE or K_ACK), then its fields in the
    order shown above."""
    obj = backend.loads(data, MAX_GATEWAY_MSG)
    if type(obj) is not list or len(obj) < 2:
        raise DecodeError("gateway message must be an array")
    if obj[0] != VERSION or type(obj[0]) is not int:
        raise VersionError("gateway message version %r; this code speaks %d" % (obj[0], VERSION))
    kind = obj[1]
    if type(kind) is not int:
        raise DecodeError("gateway message kind must be an integer")
    if kind == K_FORWARD and len(obj) == 4:
        return kind, uint(obj[2], "tolerance"), _envelopes(obj[3], MAX_BUNDLE_ITEMS)
    if kind == K_BUNDLE and len(obj) == 5:
        return kind, uint(obj[2], "dap id"), _seq(obj[3]), _envelopes(obj[4], MAX_BUNDLE_ITEMS)
    if kind == K_GROUP and len(obj) == 7:
        tol, gid, nonce, body, entries = obj[2:]
        uint(tol, "tolerance")
        uint(gid, "group id")
        if type(nonce) is not bytes or len(nonce) != NONCE_BYTES:
            raise DecodeError("group nonce must be 24 bytes")
        if type(body) is not bytes or not 0 < len(body) <= MAX_ENVELOPE:
            raise DecodeError("group body must be a byte string")
        if type(entries) is not list or not entries or len(entries) > MAX_GROUP_MEMBERS:
            raise DecodeError("group needs 1 to %d members" % MAX_GROUP_MEMBERS)
        for e in entries:
            if type(e) is not list or len(e) != 2 or type(e[1]) is not bytes or len(e[1]) != 32:
                raise DecodeError("group member entry must be [meter id, 32-byte box]")
            uint(e[0], "meter id")
        return kind, tol, gid, nonce, body, entries
    if kind == K_ACK and len(obj) == 4:
        ranges = obj[3]
        if type(ranges) is not list or len(ranges) > MAX_BUNDLE_ITEMS:
            raise DecodeError("ack ranges must be a list")
        for r in ranges:
            if type(r) is not list or len(r) != 2 or _seq(r[0]) > _seq(r[1]):
                raise DecodeError("an ack range is [first, last] with first <= last")
        return kind, uint(obj[2], "dap id"), ranges
    raise DecodeError("unknown gateway message kind %r with %d fields" % (kind, len(obj)))


