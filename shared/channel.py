# One meter's sealed channel to the head-end, seen from either end. It owns
# the pairwise key (computed once: crypto_box_beforenm), the outgoing
# counter and the replay window for incoming messages, and checks every
# inner field before anything is accepted.
import hashlib

from shared import envelope, messages
from shared.const import (
    DOWN,
    ENV_GROUP_ITEM,
    ENV_HEADER,
    GROUP_TAG_BYTES,
    MAX_INNER,
    T_BIRTH,
    T_DEATH,
    UP,
)
from shared.errors import DecodeError, MismatchError, ReplayError, StaleError
from shared.replay import ReplayWindow


def digest(body):
    """What each member's box in a group request seals: a prefix of SHA-256
    of the group body. Binds the member's authentication to that body."""
    return hashlib.sha256(body).digest()[:GROUP_TAG_BYTES]


def same(a, b):
    """Compare without stopping at the first difference."""
    if len(a) != len(b):
        return False
    acc = 0
    for i in range(len(a)):
        acc |= a[i] ^ b[i]
    return acc == 0


class Channel:
    def __init__(self, backend, key, meter, sends, counter, window=None):
        """`key`: the 32-byte pairwise key. `sends`: UP at the meter, DOWN at
        the head-end. `counter`: anything with next(); the head-end passes
        one downlink counter shared by all its channels."""
        self.backend = backend
        self.key = key
        self.meter = meter
        self.sends = sends
        self.receives = DOWN if sends == UP else UP
        self.counter = counter
        self.window = window if window is not None else ReplayWindow()
        # The counter of the last will announced by the current session's
        # birth (head-end side). The broker publishes that will late, after
        # newer messages, so it is accepted by this match, once.
        self.pending_will = None
        # The meter's current session, from its last birth (None: unknown).
        # A death must name it: an earlier session's will is refused.
        self.session = None

    def seal(self, mtype, body, nonce):
        """(counter, envelope) for a new message. `nonce`: 24 fresh random
        bytes from the caller (os.urandom)."""
        ctr = self.counter.next()
        pt = messages.encode(self.backend, self.meter, self.sends, mtype, ctr, body)
        return ctr, envelope.seal(self.backend, self.key, self.meter, nonce, pt)

    def unseal(self, wire):
        """Open one sealed envelope and check its header fields.
        Returns (type, counter, body) with the body not yet checked; changes
        nothing. Raises a ProtocolError for anything not authentic or not
        meant for this end."""
        kind, hint = envelope.peek(wire)
        if hint != self.meter:
            raise MismatchError("envelope addressed to meter %d, not %d" % (hint, self.meter))
        pt = envelope.open(self.backend, self.key, wire)
        return messages.decode(self.backend, pt, self.meter, self.receives)

    def unseal_group_item(self, wire):
        """Open one member's item of a group request (meter side) and check
        the group body against the member's box. Returns (type, counter,
        body, group id) with the body not yet checked; changes nothing."""
        kind, hint = envelope.peek(wire)
        if kind != ENV_GROUP_ITEM:
            raise DecodeError("expected a group-request item")
        if hint != self.meter:
            raise MismatchError("group item addressed to meter %d" % hint)
        body_at = ENV_HEADER + 16 + GROUP_TAG_BYTES
        if len(wire) <= body_at:
            raise DecodeError("group item has no body")
        mv = memoryview(wire)
        tag = self.backend.open(self.key, mv[5:ENV_HEADER], mv[ENV_HEADER:body_at])
        body = bytes(mv[body_at:])
        if not same(tag, digest(body)):
            raise MismatchError("group body does not match what the head-end authorised")
        obj = self.backend.loads(body, MAX_INNER)
        if type(obj) is not list or len(obj) < 5:
            raise DecodeError("group body must be an array of at least 5 items")
        group = messages.uint(obj[1], "group id")
        obj[1] = self.meter  # the body names the group; the box named the meter
        mtype, ctr = messages.check_header(obj, self.meter, self.receives)
        return mtype, ctr, obj[5:], group

    def accept(self, mtype, ctr, body):
        """Record an authentic, checked message in the replay state.
        Raises ReplayError (and records nothing) for a replay, or for the
        death of a session that is no longer current."""
        if mtype == T_DEATH:
            if self.session is not None and body[0] != self.session:
                # typically the will of a session the meter has since replaced
                raise StaleError("death of session %d; the current session is %d"
                                 % (body[0], self.session))
            if ctr == self.pending_will:
                try:
                    self.window.accept(ctr)  # so a second copy is a duplicate
                except ReplayError:
                    pass  # older than the window: the match below is what counts
                self.pending_will = None
                return
        self.window.accept(ctr)
        if mtype == T_BIRTH:
            self.pending_will = body[1]
            self.session = body[0]

    def open(self, wire):
        """Open, check and accept one sealed envelope. Returns (type,
        counter, body); on any ProtocolError nothing has changed."""
        mtype, ctr, body = self.unseal(wire)
        messages.check_body(mtype, body)
        self.accept(mtype, ctr, body)
        return mtype, ctr, body

    def open_group_item(self, wire):
        """As open(), for a group-request item. Returns (type, counter,
        body, group id)."""
        mtype, ctr, body, group = self.unseal_group_item(wire)
        messages.check_body(mtype, body)
        self.accept(mtype, ctr, body)
        return mtype, ctr, body, group
