"""A malicious DAP for the security tests (docs/security.md).

`MaliciousDap` connects to a real broker with DAP k's own account (username
and client id "d<k>"), so it has exactly the rights the broker ACLs give a
DAP: it reads d<k>/+/up, d<k>/req and d<k>/ack, and publishes d<k>/+/down,
d<k>/up and d<k>/state. By default it does what the real DAP does in router
mode: every meter uplink goes to the head-end at once as a bundle of one,
every forward/group request is unpacked (with the real DAP's own sans-IO
code, dap.inbound) and delivered to the meters. Tests install hooks to
attack: tamper, drop, hold back, reorder, replay, reflect, inject.

It holds no key of any meter or of the head-end. Where an attack needs a
box, the box is sealed under a key the adversary made up itself.

Everything it sees is recorded (`seen`): topic, size, time. That is the
metadata a DAP learns, and what tests/test_adversarial_dap.py reports.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
from nacl.public import PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from dap import inbound
from shared import envelope, gateway, topics
from shared import group as group_mod
from shared.backend import DEFAULT
from shared.channel import Channel
from shared.const import DOWN, K_FORWARD, K_GROUP, NONCE_BYTES, T_READ_CURRENT
from shared.group import item as group_item

B = DEFAULT

# What a hook returns. Uplink hook: the bundles to send (each a list of
# envelopes); [] drops; None means "behave honestly". Request hook: the
# (topic, payload) messages to publish downstream; None means honest.
UplinkHook = Callable[[int, bytes], "list[list[bytes]] | None"]
RequestHook = Callable[[bytes], "list[tuple[str, bytes]] | None"]


@dataclass(frozen=True)
class Seen:
    """One message the DAP handled: when, on which topic, how big."""

    at: float
    topic: str
    size: int


# -- byte-level tampering (pure functions) -------------------------------------


def flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    """`data` with the bits of `mask` flipped at `offset`."""
    b = bytearray(data)
    b[offset] ^= mask
    return bytes(b)


def with_hint(env: bytes, meter: int) -> bytes:
    """The envelope with another meter id in its clear header."""
    return env[:1] + meter.to_bytes(4, "big") + env[5:]


def hint_of(env: bytes) -> int:
    """The meter-id hint of an envelope (its framing already known good)."""
    return envelope.peek(env)[1]


def random_box(meter: int, size: int = 62) -> bytes:
    """Well-framed envelope for `meter` whose nonce, tag and ciphertext are
    random bytes: the cheapest forgery."""
    return bytes([0x11]) + meter.to_bytes(4, "big") + os.urandom(size - 5)


class Forger:
    """Seals requests under a key the adversary made up: it generates its
    own X25519 key pair and pretends to be the head-end, with the meter's
    public key (not a secret). Its counters are fresh (far above the real
    ones), so only the box itself can stop what it sends."""

    def __init__(self) -> None:
        self.secret = PrivateKey.generate()
        self._ctr = 10**9  # far above anything the real head-end has used

    def next(self) -> int:
        """A fresh counter (also Channel's counter interface)."""
        self._ctr += 1
        return self._ctr

    def key_for(self, meter_public: bytes) -> bytes:
        return B.beforenm(meter_public, bytes(self.secret))

    def request(self, meter: int, meter_public: bytes, reqid: int = 4242) -> bytes:
        """A well-formed current-read request for `meter`, sealed under the
        adversary's own pairwise key (not the head-end's)."""
        ch = Channel(B, self.key_for(meter_public), meter, DOWN, self)
        _, wire = ch.seal(T_READ_CURRENT, [reqid, int(time.time()) + 600, 0],
                          os.urandom(NONCE_BYTES))
        return wire

    def group(self, group_id: int, nonce: bytes, members: list[tuple[int, bytes]],
              reqid: int = 4343) -> tuple[bytes, list[list[Any]]]:
        """A group request for a group id it chose, built as the head-end
        builds one (shared.group.build) but with a box under the
        adversary's own key for each (meter, public key) member:
        (body, [[meter, box], ...])."""
        return group_mod.build(B, group_id, T_READ_CURRENT, self.next(),
                               [reqid, int(time.time()) + 600, 0],
                               [(m, self.key_for(pk)) for m, pk in members], nonce)


def decode_group(payload: bytes) -> tuple[int, int, bytes, bytes, list[list[Any]]]:
    """(tolerance, group, nonce, body, entries) of a group message."""
    kind, tol, gid, nonce, body, entries = gateway.decode(inbound.CBOR, payload)
    assert kind == K_GROUP
    return tol, gid, nonce, body, entries


# -- the DAP -------------------------------------------------------------------


class MaliciousDap:
    def __init__(self, host: str, port: int, dap: int, password: str | None,
                 username: str | None = None, client_id: str | None = None) -> None:
        self.dap = dap
        self.name = topics.dap_name(dap)
        self.host, self.port = host, port
        self._seq = 0
        self._lock = threading.Lock()
        self.uplink_hook: UplinkHook | None = None
        self.request_hook: RequestHook | None = None
        # what it saw and did
        self.seen: list[Seen] = []
        self.uplinks: list[tuple[float, int, bytes]] = []   # (time, meter, envelope)
        self.requests: list[tuple[float, bytes]] = []       # d<k>/req payloads
        self.bundles: list[tuple[float, int, list[bytes]]] = []  # what it sent upstream
        self.deliveries: list[tuple[float, str, bytes]] = []     # what it sent downstream
        self.errors: list[str] = []
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or self.name,
                        clean_session=True, protocol=mqtt.MQTTv311)
        if password is not None:
            c.username_pw_set(username or self.name, password)
        c.max_inflight_messages_set(1000)
        c.reconnect_delay_set(0.2, 2)
        self._subscribed = threading.Event()
        c.on_connect = self._on_connect
        c.on_subscribe = lambda *a: self._subscribed.set()
        c.on_message = self._on_message
        self.client = c

    # -- lifecycle -------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> MaliciousDap:
        self.client.connect(self.host, self.port, 30)
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            raise AssertionError(f"the malicious DAP got no SUBACK from {self.host}:{self.port}")
        return self

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def honest(self) -> None:
        """Remove every hook: relay like the real DAP in router mode."""
        self.uplink_hook = None
        self.request_hook = None

    def _on_connect(self, c, userdata, flags, reason, properties) -> None:
        if reason.is_failure:
            self.errors.append(f"CONNACK refused: {reason}")
            return
        c.subscribe([(topics.dap_meters_up(self.dap), 1), (topics.dap_req(self.dap), 1),
                     (topics.dap_ack(self.dap), 1)])

    # -- the message path ----------------------------------------------------------

    def _on_message(self, c, userdata, msg) -> None:
        now = time.time()
        payload = bytes(msg.payload)
        with self._lock:
            self.seen.append(Seen(now, msg.topic, len(payload)))
        try:
            leaf, meter, _ = topics.parse(msg.topic)
            if meter is not None and leaf == "up":
                with self._lock:
                    self.uplinks.append((now, meter, payload))
                hook = self.uplink_hook
                out = hook(meter, payload) if hook is not None else None
                for envs in ([[payload]] if out is None else out):
                    self.send_bundle(envs, wait=False)
            elif leaf == "req":
                with self._lock:
                    self.requests.append((now, payload))
                hook = self.request_hook
                out = hook(payload) if hook is not None else None
                for topic, p in (self.fan_out(payload) if out is None else out):
                    self.publish(topic, p, wait=False)
        except Exception as e:  # a broken hook must show up in the test, not hang it
            self.errors.append(f"{msg.topic}: {e!r}")

    def fan_out(self, payload: bytes) -> list[tuple[str, bytes]]:
        """What the real DAP delivers for a d<k>/req message (its own code)."""
        req = inbound.request(inbound.CBOR, self.dap, payload)
        return [(d.topic, d.payload) for d in req.deliveries]

    # -- sending -----------------------------------------------------------------

    def relay_request(self, payload: bytes) -> None:
        """Deliver a d<k>/req message as the real DAP does, now."""
        for topic, p in self.fan_out(payload):
            self.publish(topic, p)

    def next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def send_bundle(self, envs: list[bytes], *, dap: int | None = None, seq: int | None = None,
                    topic: str | None = None, wait: bool = True) -> int:
        """Publish a bundle of these envelopes on d<k>/up (or `topic`)."""
        seq = self.next_seq() if seq is None else seq
        payload = gateway.bundle(B, self.dap if dap is None else dap, seq, envs)
        with self._lock:
            self.bundles.append((time.time(), seq, list(envs)))
        self.publish(topic or topics.dap_up(self.dap), payload, wait=wait)
        return seq

    def send_raw_up(self, payload: bytes, wait: bool = True) -> None:
        self.publish(topics.dap_up(self.dap), payload, wait=wait)

    def deliver(self, meter: int, payload: bytes, wait: bool = True) -> None:
        """Publish `payload` on meter's downlink topic d<k>/m<id>/down."""
        self.publish(topics.meter_down(meter, self.dap), payload, wait=wait)

    def publish(self, topic: str, payload: bytes, wait: bool = True) -> None:
        if topic.endswith("/down"):
            with self._lock:
                self.deliveries.append((time.time(), topic, payload))
        info = self.client.publish(topic, payload, qos=1)
        if wait:
            info.wait_for_publish(15)

    # -- what it holds -------------------------------------------------------------

    def uplinks_of(self, meter: int, since: float = 0.0) -> list[bytes]:
        with self._lock:
            return [e for t, m, e in self.uplinks if m == meter and t >= since]

    def requests_since(self, since: float = 0.0) -> list[bytes]:
        with self._lock:
            return [p for t, p in self.requests if t >= since]

    def group_requests(self, since: float = 0.0) -> list[bytes]:
        out = []
        for p in self.requests_since(since):
            try:
                if cbor2.loads(p)[1] == K_GROUP:
                    out.append(p)
            except Exception:
                pass
        return out

    def forwarded_to(self, meter: int, since: float = 0.0) -> list[bytes]:
        """Sealed requests for `meter` the head-end sent through this DAP."""
        out = []
        for p in self.requests_since(since):
            try:
                msg = gateway.decode(inbound.CBOR, p)
            except Exception:
                continue
            if msg[0] == K_FORWARD:
                out += [e for e in msg[2] if hint_of(e) == meter]
        return out

    def seen_snapshot(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)


# -- hook factories ------------------------------------------------------------------


class Holder:
    """An uplink or request hook that holds back the first `n` messages it
    matches and passes everything else; `release()` hands them out."""

    def __init__(self, match: Callable[[int | None, bytes], bool], n: int = 1) -> None:
        self.match, self.n = match, n
        self.held: list[tuple[int | None, bytes]] = []
        self._lock = threading.Lock()
        self.full = threading.Event()

    def take(self, meter: int | None, data: bytes) -> bool:
        with self._lock:
            if len(self.held) < self.n and self.match(meter, data):
                self.held.append((meter, data))
                if len(self.held) == self.n:
                    self.full.set()
                return True
            return False

    def uplink(self, meter: int, env: bytes) -> list[list[bytes]] | None:
        return [] if self.take(meter, env) else None

    def request(self, payload: bytes) -> list[tuple[str, bytes]] | None:
        return [] if self.take(None, payload) else None


__all__ = [
    "Forger", "Holder", "MaliciousDap", "Seen", "decode_group", "flip", "group_item",
    "hint_of", "random_box", "with_hint",
]
