"""The DAP's MQTT connections (paho-mqtt 2.x through shared/hostmqtt.py):
MQTT 3.1.1, persistent sessions, QoS 1, manual acknowledgement.

One connection, client id "d<id>", serves the meters and the head-end; or,
with [headend_broker], a second one, "d<id>-up", serves the head-end side
(d<id>/req, d<id>/ack, d<id>/up and d<id>/state, with the retained last
will). paho's network threads only put what arrives into the inbox.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

import paho.mqtt.client as mqtt

from dap.config import Config
from dap.errors import BrokerError
from dap.stats import OFFLINE
from shared import topics
from shared.hostmqtt import BrokerSettings, MqttSetupError, client, connect

log = logging.getLogger("dap")

# What the inbox holds: (client, mid, qos, topic, payload); None wakes the loop.
Item = tuple[mqtt.Client, int, int, str, bytes]
Inbox = SimpleQueue[Item | None]

SUBSCRIBE_WAIT = 10.0  # seconds to wait for SUBACKs at start
# QoS 1 messages the meters' connection may have unacknowledged at once:
# 0 = no limit. With a limit, paho walks its whole table of outgoing
# messages from the start on every PUBACK to find the next one to send, so
# a fan-out of N items costs O(N x window): a 10,000-member group read with
# a window of 1,000 spent a third of the DAP's CPU there (make bench,
# group_read_10k). With no limit every publish goes straight to the socket
# and a PUBACK only removes its message. Delivery is unchanged: QoS 1, and
# what is unacknowledged at a disconnect is sent again on reconnect.
METERS_INFLIGHT = 0


class Links:
    def __init__(self, cfg: Config, inbox: Inbox, on_up: Callable[[], None]) -> None:
        """`on_up`: called (from a network thread) whenever the head-end
        side (re)connects, so the loop can publish the status."""
        self.cfg = cfg
        self.inbox = inbox
        self.on_up = on_up
        self.closing = False
        self.state_topic = topics.dap_state(cfg.dap)
        will = (self.state_topic, OFFLINE, True)
        name = cfg.name
        if cfg.headend_broker is None:
            self.meters = client(cfg.meters_broker, name, clean_session=False,
                                 manual_ack=True, will=will, inflight=METERS_INFLIGHT)
            self.up = self.meters
        else:
            self.meters = client(cfg.meters_broker, name, clean_session=False,
                                 manual_ack=True, inflight=METERS_INFLIGHT)
            self.up = client(cfg.headend_broker, name + "-up", clean_session=False,
                             manual_ack=True, will=will)
        self._subscribed: dict[int, threading.Event] = {}
        for c, _ in self.connections():
            c.on_message = self._on_message
            c.on_connect = self._on_connect
            c.on_disconnect = self._on_disconnect
            c.on_subscribe = self._on_subscribe
            self._subscribed[id(c)] = threading.Event()

    def connections(self) -> list[tuple[mqtt.Client, BrokerSettings]]:
        """(client, settings), head-end side first."""
        out = []
        if self.up is not self.meters:
            assert self.cfg.headend_broker is not None
            out.append((self.up, self.cfg.headend_broker))
        out.append((self.meters, self.cfg.meters_broker))
        return out

    def connect(self) -> None:
        """Connect everything and wait for the subscriptions (BrokerError if a
        broker cannot be reached). paho reconnects by itself afterwards."""
        for c, settings in self.connections():
            try:
                connect(c, settings)
            except MqttSetupError as e:
                raise BrokerError(str(e)) from None
        for c, settings in self.connections():
            if not self._subscribed[id(c)].wait(SUBSCRIBE_WAIT):
                log.warning("no answer to subscribing at %s:%d yet", settings.host, settings.port)

    def close(self) -> None:
        self.closing = True
        for c, _ in self.connections():
            c.disconnect()
            c.loop_stop()

    def head_end_online(self) -> bool:
        return bool(self.up.is_connected())

    def _role(self, c: mqtt.Client) -> str:
        if self.up is self.meters:
            return "broker"
        return "meters' broker" if c is self.meters else "head-end's broker"

    # -- paho callbacks (network threads) ------------------------------------

    def _subscriptions(self, c: mqtt.Client) -> list[tuple[str, int]]:
        d = self.cfg.dap
        subs = []
        if c is self.meters:
            subs.append((topics.dap_meters_up(d), 1))
        if c is self.up:
            subs += [(topics.dap_req(d), 1), (topics.dap_ack(d), 1)]
        return subs

    def _on_connect(self, c: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            log.warning("the %s refused the connection: %s", self._role(c), reason)
            return
        c.subscribe(self._subscriptions(c))
        log.info("connected to the %s", self._role(c))
        if c is self.up:
            self.on_up()

    def _on_subscribe(self, c: mqtt.Client, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        if any(r.is_failure for r in reasons):
            log.error("the %s refused a subscription (%s): check its ACLs for %s",
                      self._role(c), ", ".join(str(r) for r in reasons), self.cfg.name)
        self._subscribed[id(c)].set()

    def _on_disconnect(self, c: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        if not self.closing:
            log.warning("lost the %s (%s); reconnecting", self._role(c), reason)

    def _on_message(self, c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.inbox.put((c, msg.mid, msg.qos, msg.topic, bytes(msg.payload)))
