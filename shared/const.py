# Every wire constant of the protocol, defined once. docs/protocol.md is the
# prose for these numbers; the two must agree.
try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


VERSION = const(1)

# First byte of a binary envelope: protocol version in the high nibble,
# envelope kind in the low nibble.
ENV_SEALED = const(0x11)      # a crypto_box between one meter and the head-end
ENV_GROUP_ITEM = const(0x12)  # one member's share of a group request

# Direction, inside the sealed plaintext: a request can never be reflected
# back as a response.
DOWN = const(0)  # head-end -> meter
UP = const(1)    # meter -> head-end

# Inner message types. Uplink types are below 16, downlink types 16 and up.
T_BIRTH = const(1)
T_DEATH = const(2)
T_CURRENT = const(3)
T_INTERVAL = const(4)
T_STATUS = const(5)
T_READ_CURRENT = const(16)
T_READ_INTERVAL = const(17)

# Status codes carried by T_STATUS.
S_NO_DATA = const(1)      # nothing held for that range; detail: oldest interval held
S_EXPIRED = const(2)      # the request arrived after its deadline
S_MALFORMED = const(3)    # authentic, but its fields make no sense
S_UNSUPPORTED = const(4)  # a request type this meter does not serve

# Why a meter went offline (T_DEATH).
DEATH_WILL = const(0)     # the broker published the last will: connection lost
DEATH_ORDERLY = const(1)  # the meter said goodbye

# Messages between the head-end and a DAP (CBOR arrays, see shared/gateway.py).
K_FORWARD = const(1)  # head-end -> DAP: deliver these sealed envelopes
K_GROUP = const(2)    # head-end -> DAP: fan this group request out
K_BUNDLE = const(3)   # DAP -> head-end: sealed responses, batched
K_ACK = const(4)      # head-end -> DAP: these bundles are committed

# Row quality flags of the load profile (a bit set; 0 means a good reading).
Q_OUTAGE = const(1)     # power failed during the interval
Q_PARTIAL = const(2)    # the meter was not measuring for the whole interval
Q_CLOCK = const(4)      # the clock was set during the interval
Q_OVERFLOW = const(8)   # a value did not fit and was clamped

# Sizes and limits. A decoder refuses input over its limit before parsing.
NONCE_BYTES = const(24)
MAC_BYTES = const(16)
ENV_HEADER = const(29)       # kind(1) + meter id(4) + nonce(24)
MAX_ENVELOPE = const(1024)   # one sealed message, header included
MAX_INNER = const(960)       # its plaintext
MAX_GATEWAY_MSG = const(4 * 1024 * 1024)  # a bundle or group request
MAX_BUNDLE_ITEMS = const(20000)
MAX_GROUP_MEMBERS = const(20000)
MAX_ROWS = const(96)         # interval rows in one response part (one day at 15 min)
MAX_PARTS = const(32)
MAX_U32 = const(0xFFFFFFFF)
GROUP_TAG_BYTES = const(16)  # SHA-256 prefix of a group body, boxed per member

REPLAY_WINDOW = const(64)
DEFAULT_PERIOD = const(900)  # seconds per load-profile interval
