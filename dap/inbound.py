"""What arrives at the DAP, checked and turned into what to do; sans-IO.

The DAP sees only framing and clear gateway fields: it never opens an
envelope (it has no keys). Each function raises a ProtocolError (with a
`reason` to count by) for input it refuses.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import cast

from dap.errors import BadTopic, WrongKind
from shared import envelope, gateway, group, topics
from shared.backend import DEFAULT, Backend
from shared.const import ENV_HEADER, ENV_SEALED, K_ACK, K_FORWARD, K_GROUP, MAX_ENVELOPE
from shared.errors import DecodeError, MismatchError, ProtocolError, TooLarge

UPLINK = "uplink"
REQUEST = "req"
ACK = "ack"

GROUP_BOX = 32  # bytes of each member's box in a group item


def _no_keys(*args: object) -> bytes:
    raise RuntimeError("the DAP holds no keys: it never seals, opens or derives a box")


# The DAP's backend: the protocol's CBOR, with every crypto entry point
# disabled. Nothing in dap/ imports nacl or handles a key.
CBOR = Backend("dap-cbor-only", DEFAULT.dumps, DEFAULT.loads, _no_keys, _no_keys, _no_keys,
               _no_keys)


def classify(dap: int, topic: str) -> tuple[str, int | None]:
    """(UPLINK, meter) for d<dap>/m<meter>/up, (REQUEST, None) for
    d<dap>/req, (ACK, None) for d<dap>/ack; BadTopic for anything else."""
    try:
        leaf, meter, d = topics.parse(topic)
    except DecodeError as e:
        raise BadTopic(str(e)) from None
    if d != dap:
        raise BadTopic(f"topic {topic!r} is not for DAP {dap}")
    if meter is not None and leaf == "up":
        return UPLINK, meter
    if meter is None and leaf == "req":
        return REQUEST, None
    if meter is None and leaf == "ack":
        return ACK, None
    raise BadTopic(f"the DAP does not take messages on {topic!r}")


def check_uplink(meter: int, payload: bytes) -> bytes:
    """A meter's envelope, checked: framing, size, sealed kind, and the hint
    equal to the meter named by the topic. Returns the envelope."""
    kind, hint = envelope.peek(payload)
    if kind != ENV_SEALED:
        raise WrongKind(f"meters send only sealed envelopes, not kind 0x{kind:02x}")
    if hint != meter:
        raise MismatchError(f"envelope for meter {hint} on meter {meter}'s topic")
    return payload


@dataclass(frozen=True)
class Delivery:
    """One message to publish to one meter."""

    meter: int
    topic: str
    payload: bytes


@dataclass
class Request:
    """A head-end request, unpacked into deliveries. `rejected` counts the
    parts refused (the rest is still delivered)."""

    kind: int  # K_FORWARD or K_GROUP
    tolerance: int
    deliveries: list[Delivery] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    group: int | None = None


def request(backend: Backend, dap: int, payload: bytes) -> Request:
    """Unpack a forward or group message from d<dap>/req."""
    msg = gateway.decode(backend, payload)
    if msg[0] == K_FORWARD:
        _, tolerance, envs = msg
        out = Request(K_FORWARD, tolerance)
        for env in envs:
            try:
                kind, hint = envelope.peek(env)
                if kind != ENV_SEALED:
                    raise WrongKind(f"a forwarded request must be sealed, not kind 0x{kind:02x}")
            except ProtocolError as e:
                out.rejected[e.reason] += 1
                continue
            out.deliveries.append(Delivery(hint, topics.meter_down(hint, dap), env))
        return out
    if msg[0] == K_GROUP:
        _, tolerance, gid, nonce, body, entries = msg
        if ENV_HEADER + GROUP_BOX + len(body) > MAX_ENVELOPE:
            raise TooLarge(f"group body of {len(body)} bytes makes items over "
                           f"{MAX_ENVELOPE} bytes")
        out = Request(K_GROUP, tolerance, group=gid)
        for meter, box in entries:
            out.deliveries.append(Delivery(meter, topics.meter_down(meter, dap),
                                           group.item(meter, nonce, box, body)))
        return out
    raise WrongKind(f"gateway message kind {msg[0]} does not belong on d{dap}/req")


def ack(backend: Backend, dap: int, payload: bytes) -> list[list[int]]:
    """The bundle ranges [first, last] of an ack from d<dap>/ack."""
    msg = gateway.decode(backend, payload)
    if msg[0] != K_ACK:
        raise WrongKind(f"gateway message kind {msg[0]} does not belong on d{dap}/ack")
    _, who, ranges = msg
    if who != dap:
        raise MismatchError(f"ack for DAP {who} on DAP {dap}'s topic")
    return cast(list[list[int]], ranges)
