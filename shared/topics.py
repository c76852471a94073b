# The MQTT topic layout, defined once. Meters are named "m<id>" and DAPs
# "d<id>" (decimal ids). A name is also the client's MQTT username and client
# id, and every client's topics start with its own name (or, for a meter
# behind a DAP, with the DAP's name and then its own), which is what lets the
# broker ACLs use %u patterns.
#
#   m<id>/up             meter (flow A) -> head-end      sealed envelopes
#   m<id>/down           head-end -> meter (flow A)      sealed envelopes
#   d<id>/m<id>/up       meter (flow B) -> its DAP       sealed envelopes
#   d<id>/m<id>/down     DAP -> meter (flow B)           envelopes, group items
#   d<id>/req            head-end -> DAP                 forward, group
#   d<id>/up             DAP -> head-end                 bundles
#   d<id>/ack            head-end -> DAP                 acks
#   d<id>/state          DAP, retained; its last will says "offline"
#
# Everything is published with QoS 1. Topics are routing hints: the sealed
# contents say who a message is from and for.
from shared.errors import DecodeError

HEADEND = "headend"
HEADEND_SUBSCRIPTIONS = ("+/up",)  # m<id>/up and d<id>/up


def meter_name(meter):
    return "m%d" % meter


def dap_name(dap):
    return "d%d" % dap


def _digits(s):
    """ASCII digits only (str.isdigit also takes other scripts' digits)."""
    if not s:
        return False
    for c in s:
        if c < "0" or c > "9":
            return False
    return True


def _id(name, prefix):
    digits = name[1:]
    if (
        not name.startswith(prefix)
        or not _digits(digits)
        or len(digits) > 10
        or (digits[0] == "0" and len(digits) > 1)
        or int(digits) > 0xFFFFFFFF
    ):
        raise DecodeError("%r is not a %s name" % (name, "meter" if prefix == "m" else "DAP"))
    return int(digits)


def parse_meter(name):
    return _id(name, "m")


def parse_dap(name):
    return _id(name, "d")


def meter_up(meter, dap=None):
    if dap is None:
        return "m%d/up" % meter
    return "d%d/m%d/up" % (dap, meter)


def meter_down(meter, dap=None):
    if dap is None:
        return "m%d/down" % meter
    return "d%d/m%d/down" % (dap, meter)


def dap_req(dap):
    return "d%d/req" % dap


def dap_up(dap):
    return "d%d/up" % dap


def dap_ack(dap):
    return "d%d/ack" % dap


def dap_state(dap):
    return "d%d/state" % dap


def dap_meters_up(dap):
    """The DAP's one subscription for all its meters' uplinks."""
    return "d%d/+/up" % dap


def parse(topic):
    """Split a topic into (leaf, meter id or None, dap id or None).
    Raises DecodeError for a topic outside the layout."""
    p = topic.split("/")
    if len(p) == 2 and p[1] in ("up", "down") and p[0][:1] == "m":
        return p[1], parse_meter(p[0]), None
    if len(p) == 2 and p[1] in ("req", "up", "ack", "state") and p[0][:1] == "d":
        return p[1], None, parse_dap(p[0])
    if len(p) == 3 and p[2] in ("up", "down"):
        return p[2], parse_meter(p[1]), parse_dap(p[0])
    raise DecodeError("topic %r is not part of the layout" % topic)
