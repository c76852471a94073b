"""The DAP's MQTT connections (paho-mqtt 2.x through shared/hostmqtt.py):
MQTT 3.1.1, persistent sessions, QoS 1, manual acknowledgement.

One connection, client id "d<id>", serves the meters and the head-end; or,
with [headend_broker], a second one, "d<id>-up", serves the head-end side
(d<id>/req, d<id>/ack, d<id>/up and d<id>/state, with the retained last
will).

No network threads: the service's loop drives paho itself (paho's external
loop API: loop_read, loop_write, loop_misc) through one selector, and
reconnects with backoff. With paho's own thread, every publish and every
acknowledgement the loop made also woke that thread through a socket pair,
and the two threads took turns on the GIL for each message: a third of the
DAP's CPU in router mode (make bench, router_vs_raw_relay_mosquitto).
"""

from __future__ import annotations

import logging
import os
import random
import selectors
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from dap.config import Config
from dap.errors import BrokerError
from dap.stats import OFFLINE
from shared import topics
from shared.hostmqtt import (
    BrokerSettings,
    MqttSetupError,
    client,
    no_answer,
    open_socket,
    refused,
)

log = logging.getLogger("dap")

# What arrives: (client, mid, qos, topic, payload).
Item = tuple[mqtt.Client, int, int, str, bytes]

CONNECT_WAIT = 15.0  # seconds to wait for a CONNACK at start
SUBSCRIBE_WAIT = 10.0  # ...and for the SUBACKs
MISC_EVERY = 1.0  # seconds between keepalive checks
READS_PER_EVENT = 256  # packets read from a readable socket before the next select
BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0  # seconds between reconnection attempts
# QoS 1 messages the meters' connection may have unacknowledged at once:
# 0 = no limit. With a limit, paho walks its whole table of outgoing
# messages from the start on every PUBACK to find the next one to send, so
# a fan-out of N items costs O(N x window): a 10,000-member group read with
# a window of 1,000 spent a third of the DAP's CPU there (make bench,
# group_read_10k). With no limit every publish goes straight to the socket
# and a PUBACK only removes its message. Delivery is unchanged: QoS 1, and
# what is unacknowledged at a disconnect is sent again on reconnect.
METERS_INFLIGHT = 0


class _Link:
    """One paho client and what the loop knows of its connection."""

    def __init__(self, c: mqtt.Client, settings: BrokerSettings, role: str) -> None:
        self.c = c
        self.settings = settings
        self.role = role
        self.connack: Any = None  # the last CONNACK's reason code
        self.subscribed = False
        self.down = False  # lost: reconnect at retry_at
        self.retry_at = 0.0
        self.backoff = BACKOFF_MIN
        self.progress = 0  # packets handled, to tell a read that did something


class Links:
    def __init__(self, cfg: Config, on_up: Callable[[], None]) -> None:
        """`on_up`: called whenever the head-end side (re)connects, so the
        loop can publish the status."""
        self.cfg = cfg
        self.on_up = on_up
        self.closing = False
        self.state_topic = topics.dap_state(cfg.dap)
        self.received: list[Item] = []
        will = (self.state_topic, OFFLINE, True)
        name = cfg.name
        if cfg.headend_broker is None:
            self.meters = client(cfg.meters_broker, name, clean_session=False,
                                 manual_ack=True, will=will, inflight=METERS_INFLIGHT)
            self.up = self.meters
            self._links = [_Link(self.meters, cfg.meters_broker, "broker")]
        else:
            self.meters = client(cfg.meters_broker, name, clean_session=False,
                                 manual_ack=True, inflight=METERS_INFLIGHT)
            self.up = client(cfg.headend_broker, name + "-up", clean_session=False,
                             manual_ack=True, will=will)
            self._links = [_Link(self.up, cfg.headend_broker, "head-end's broker"),
                           _Link(self.meters, cfg.meters_broker, "meters' broker")]
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._misc_at = 0.0
        for link in self._links:
            c = link.c
            c.user_data_set(link)
            c.on_message = self._on_message
            c.on_connect = self._on_connect
            c.on_disconnect = self._on_disconnect
            c.on_subscribe = self._on_subscribe
            c.on_publish = self._on_publish
            c.on_socket_open = self._on_socket_open
            c.on_socket_close = self._on_socket_close
            c.on_socket_register_write = self._on_want_write
            c.on_socket_unregister_write = self._on_no_write

    def connections(self) -> list[tuple[mqtt.Client, BrokerSettings]]:
        """(client, settings), head-end side first."""
        return [(link.c, link.settings) for link in self._links]

    # -- lifecycle -------------------------------------------------------------

    def connect(self) -> None:
        """Connect everything and wait for the subscriptions (BrokerError if a
        broker cannot be reached or refuses). Lost connections come back by
        themselves afterwards, in poll()."""
        for link in self._links:
            try:
                open_socket(link.c, link.settings)
            except MqttSetupError as e:
                raise BrokerError(str(e)) from None
        for link in self._links:
            if not self.pump_until(lambda link=link: link.connack is not None, CONNECT_WAIT):
                raise BrokerError(str(no_answer(link.settings, CONNECT_WAIT)))
            if link.connack.is_failure:
                raise BrokerError(str(refused(link.settings, link.connack)))
        for link in self._links:
            if not self.pump_until(lambda link=link: link.subscribed, SUBSCRIBE_WAIT):
                log.warning("no answer to subscribing at %s:%d yet", link.settings.host,
                            link.settings.port)

    def close(self) -> None:
        """Disconnect cleanly (no last will) and release the sockets."""
        self.closing = True
        for link in self._links:
            c = link.c
            if c.is_connected():
                c.disconnect()
                c.loop_write()
            sock = c.socket()
            if sock is not None:
                self._forget(sock)
                try:
                    sock.close()
                except OSError:
                    pass
        for fd in (self._wake_r, self._wake_w):
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError):
                pass
            os.close(fd)
        self._sel.close()

    def head_end_online(self) -> bool:
        return bool(self.up.is_connected())

    def wake(self) -> None:
        """Make a waiting poll() return: safe from a signal handler."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # full: a wake-up is pending anyway
            pass

    # -- the loop's side ------------------------------------------------------

    def poll(self, timeout: float) -> list[Item]:
        """Wait up to `timeout` for network events, handle them (reading,
        writing, keepalive, reconnecting) and return what arrived (with
        anything that arrived in pump_until)."""
        self._events(timeout)
        out, self.received = self.received, []
        return out

    def _events(self, timeout: float) -> None:
        now = time.monotonic()
        for link in self._links:
            if link.down and not self.closing:
                timeout = min(timeout, max(0.0, link.retry_at - now))
        timeout = min(timeout, max(0.0, self._misc_at - now))
        for key, mask in self._sel.select(timeout):
            link = key.data
            if link is None:
                try:
                    os.read(self._wake_r, 4096)
                except OSError:
                    pass
                continue
            if mask & selectors.EVENT_READ:
                self._read(link)
            if mask & selectors.EVENT_WRITE and link.c.socket() is not None:
                link.c.loop_write()
        now = time.monotonic()
        if now >= self._misc_at:
            self._misc_at = now + MISC_EVERY
            for link in self._links:
                if link.c.socket() is not None:
                    link.c.loop_misc()
        if not self.closing:
            for link in self._links:
                if link.down and now >= link.retry_at:
                    self._reconnect(link, now)

    def flush(self) -> None:
        """Send what the loop published and acknowledged, now."""
        for link in self._links:
            if link.c.want_write() and link.c.socket() is not None:
                link.c.loop_write()

    def pump_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Run the network until done() or timeout; what arrives meanwhile
        waits for the next poll()."""
        end = time.monotonic() + timeout
        while not done():
            left = end - time.monotonic()
            if left <= 0:
                return False
            self.flush()
            self._events(min(left, 0.05))
        return True

    def _read(self, link: _Link) -> None:
        """Read what the socket holds: paho's loop_read takes one packet
        when nothing of ours is in flight, so read until a pass does
        nothing (a TLS socket may hold decrypted bytes select cannot see)."""
        c = link.c
        for _ in range(READS_PER_EVENT):
            before = link.progress
            if c.loop_read() != mqtt.MQTT_ERR_SUCCESS or c.socket() is None:
                return
            if link.progress == before:
                sock = c.socket()
                if not (hasattr(sock, "pending") and sock.pending()):
                    return

    def _reconnect(self, link: _Link, now: float) -> None:
        link.down = False
        link.connack = None
        try:
            link.c.reconnect()
        except OSError as e:  # ssl.SSLError included
            link.down = True
            link.retry_at = now + link.backoff * (0.5 + random.random())
            log.warning("cannot reach the %s at %s:%d (%s); trying again in %.0f s",
                        link.role, link.settings.host, link.settings.port, e,
                        link.retry_at - now)
            link.backoff = min(link.backoff * 2, BACKOFF_MAX)

    # -- paho callbacks (in the loop's own thread) ----------------------------

    def _subscriptions(self, c: mqtt.Client) -> list[tuple[str, int]]:
        d = self.cfg.dap
        subs = []
        if c is self.meters:
            subs.append((topics.dap_meters_up(d), 1))
        if c is self.up:
            subs += [(topics.dap_req(d), 1), (topics.dap_ack(d), 1)]
        return subs

    def _on_connect(self, c: mqtt.Client, link: _Link, flags: Any, reason: Any,
                    properties: Any) -> None:
        link.connack = reason
        link.progress += 1
        if reason.is_failure:
            log.warning("the %s refused the connection: %s", link.role, reason)
            return
        link.backoff = BACKOFF_MIN
        c.subscribe(self._subscriptions(c))
        log.info("connected to the %s", link.role)
        if c is self.up:
            self.on_up()

    def _on_subscribe(self, c: mqtt.Client, link: _Link, mid: int, reasons: Any,
                      properties: Any) -> None:
        link.progress += 1
        if any(r.is_failure for r in reasons):
            log.error("the %s refused a subscription (%s): check its ACLs for %s",
                      link.role, ", ".join(str(r) for r in reasons), self.cfg.name)
        link.subscribed = True

    def _on_disconnect(self, c: mqtt.Client, link: _Link, flags: Any, reason: Any,
                       properties: Any) -> None:
        link.progress += 1
        if self.closing or link.down:
            return
        link.down = True
        link.retry_at = time.monotonic() + link.backoff * (0.5 + random.random())
        link.backoff = min(link.backoff * 2, BACKOFF_MAX)  # back to the minimum on a CONNACK
        log.warning("lost the %s (%s); reconnecting", link.role, reason)

    def _on_publish(self, c: mqtt.Client, link: _Link, mid: int, reason: Any,
                    properties: Any) -> None:
        link.progress += 1

    def _on_message(self, c: mqtt.Client, link: _Link, msg: mqtt.MQTTMessage) -> None:
        link.progress += 1
        self.received.append((c, msg.mid, msg.qos, msg.topic, bytes(msg.payload)))

    def _on_socket_open(self, c: mqtt.Client, link: _Link, sock: Any) -> None:
        self._sel.register(sock, selectors.EVENT_READ, link)

    def _on_socket_close(self, c: mqtt.Client, link: _Link, sock: Any) -> None:
        self._forget(sock)

    def _on_want_write(self, c: mqtt.Client, link: _Link, sock: Any) -> None:
        try:
            self._sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, link)
        except (KeyError, ValueError):
            pass

    def _on_no_write(self, c: mqtt.Client, link: _Link, sock: Any) -> None:
        try:
            self._sel.modify(sock, selectors.EVENT_READ, link)
        except (KeyError, ValueError):
            pass

    def _forget(self, sock: Any) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass
