"""The DAP's MQTT connections (paho-mqtt 2.x through shared/hostmqtt.py):
MQTT 3.1.1, persistent sessions, QoS 1, manual acknowledgement.

One connection, client id "d<id>", serves the meters and the head-end; or,
with [headend_broker], a second one, "d<id>-up", serves the head-end side
(d<id>/req, d<id>/ack, d<id>/up and d<id>/state, with the retained last
will).

No network threads: the service's loop drives paho through a
shared.hostmqtt.Driver, which also reconnects with backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import paho.mqtt.client as mqtt

from dap.config import Config
from dap.errors import BrokerError
from dap.stats import OFFLINE
from shared import topics
from shared.hostmqtt import Driver, Link, MqttSetupError, client

log = logging.getLogger("dap")

# What arrives: (client, mid, qos, topic, payload).
Item = tuple[mqtt.Client, int, int, str, bytes]

CONNECT_WAIT = 15.0  # seconds to wait for a CONNACK at start
SUBSCRIBE_WAIT = 10.0  # ...and for the SUBACKs
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
    def __init__(self, cfg: Config, on_up: Callable[[], None]) -> None:
        """`on_up`: called whenever the head-end side (re)connects, so the
        loop can publish the status."""
        self.cfg = cfg
        self.on_up = on_up
        self.state_topic = topics.dap_state(cfg.dap)
        self.received: list[Item] = []
        self.driver = Driver()
        will = (self.state_topic, OFFLINE, True)
        name = cfg.name
        if cfg.headend_broker is None:
            self.meters = client(cfg.meters_broker, name, clean_session=False,
                                 manual_ack=True, will=will, inflight=METERS_INFLIGHT)
            self.up = self.meters
            self._add(self.meters, cfg.meters_broker, "broker", name)
        else:
            self.meters = client(cfg.meters_broker, name, clean_session=False,
                                 manual_ack=True, inflight=METERS_INFLIGHT)
            self.up = client(cfg.headend_broker, name + "-up", clean_session=False,
                             manual_ack=True, will=will)
            self._add(self.up, cfg.headend_broker, "head-end's broker", name + "-up")
            self._add(self.meters, cfg.meters_broker, "meters' broker", name)

    def _add(self, c: mqtt.Client, settings, role: str, name: str) -> None:
        self.driver.add(c, settings, role, name, on_message=self._on_message,
                        on_connect=self._on_connect)

    # -- lifecycle -------------------------------------------------------------

    def connect(self) -> None:
        """Connect everything and wait for the subscriptions (BrokerError if a
        broker cannot be reached or refuses). Lost connections come back by
        themselves afterwards, in poll()."""
        try:
            self.driver.connect(CONNECT_WAIT)
        except MqttSetupError as e:
            raise BrokerError(str(e)) from None
        for link in self.driver.links:
            if not self.driver.pump_until(lambda link=link: link.subscribed, SUBSCRIBE_WAIT):
                log.warning("no answer to subscribing at %s:%d yet", link.settings.host,
                            link.settings.port)

    def close(self) -> None:
        self.driver.close()

    def head_end_online(self) -> bool:
        return bool(self.up.is_connected())

    def wake(self) -> None:
        """Make a waiting poll() return: safe from a signal handler."""
        self.driver.wake()

    # -- the loop's side ------------------------------------------------------

    def poll(self, timeout: float) -> list[Item]:
        """Wait up to `timeout` for network events, handle them, and return
        what arrived (with anything that arrived in pump_until)."""
        self.driver.events(timeout)
        out, self.received = self.received, []
        return out

    def flush(self) -> None:
        """Send what the loop published and acknowledged, now."""
        self.driver.flush()

    def pump_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Run the network until done() or timeout; what arrives meanwhile
        waits for the next poll()."""
        return self.driver.pump_until(done, timeout)

    # -- paho callbacks (in the loop) -----------------------------------------

    def _subscriptions(self, c: mqtt.Client) -> list[tuple[str, int]]:
        d = self.cfg.dap
        subs = []
        if c is self.meters:
            subs.append((topics.dap_meters_up(d), 1))
        if c is self.up:
            subs += [(topics.dap_req(d), 1), (topics.dap_ack(d), 1)]
        return subs

    def _on_connect(self, c: mqtt.Client, link: Link) -> None:
        c.subscribe(self._subscriptions(c))
        if c is self.up:
            self.on_up()

    def _on_message(self, c: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        self.received.append((c, msg.mid, msg.qos, msg.topic, bytes(msg.payload)))
