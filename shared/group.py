# Group requests: one message the head-end sends to a DAP, which fans it out
# to every member meter. The DAP can split it, drop parts of it, or delay
# it; it cannot forge, alter or replay it (docs/protocol.md, "Group requests").
#
# The body is a request in clear, with the group id where a meter id would
# be and a counter from the head-end's downlink counter. Each member gets a
# crypto_box, under its own pairwise key, of digest(body): a 16-byte prefix
# of SHA-256(body). All boxes share one fresh nonce; that is safe because
# every member's key is different.
from shared import envelope, messages
from shared.channel import digest
from shared.const import DOWN, ENV_GROUP_ITEM, ENV_HEADER, MAX_ENVELOPE, NONCE_BYTES, VERSION
from shared.errors import DecodeError

ITEM_HEADER = ENV_HEADER + 32  # header and the member's box, before the body


def build(backend, group, mtype, ctr, req_body, members, nonce):
    """Head-end side. `members`: list of (meter id, pairwise key).
    Returns (body bytes, [[meter id, box], ...])."""
    body = messages.encode(backend, group, DOWN, mtype, ctr, req_body)
    if len(body) > MAX_ENVELOPE - ITEM_HEADER:
        raise ValueError("group body of %d bytes: a member's item would exceed %d"
                         % (len(body), MAX_ENVELOPE))
    tag = digest(body)
    return body, [[meter, backend.seal(key, nonce, tag)] for meter, key in members]


def item(meter, nonce, box, body):
    """DAP side: the bytes delivered to one member meter."""
    if len(nonce) != NONCE_BYTES or len(box) != 32:
        raise DecodeError("group entry has the wrong size")
    return envelope.header(ENV_GROUP_ITEM, meter, nonce) + box + body


def body_header(backend, body):
    """(group id, type, counter) of a group body, for logs and routing; the
    meter checks the body for itself."""
    obj = backend.loads(body, len(body))
    if type(obj) is not list or len(obj) < 5 or obj[0] != VERSION:
        raise DecodeError("group body is not a request")
    return obj[1], obj[3], obj[4]
