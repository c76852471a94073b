"""MQTT connection settings, a configured paho-mqtt 2.x client, and a
driver that runs paho from the caller's own loop, for the roles that run on
CPython (DAP, head-end, host simulation). Not part of the meter firmware:
MicroPython never imports this module."""

from __future__ import annotations

import logging
import os
import random
import selectors
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


log = logging.getLogger("mqtt")


class MqttSetupError(Exception):
    """The broker could not be reached, or refused the connection."""


@dataclass(frozen=True)
class BrokerSettings:
    """Where and how to connect. `tls_ca` turns TLS on (server verified
    against that CA file)."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    keepalive: int = 30

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("broker host is empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"broker port {self.port} is not 1 to 65535")
        if not 5 <= self.keepalive <= 3600:
            raise ValueError("keepalive is 5 to 3600 seconds")
        if self.tls_ca is not None and not Path(self.tls_ca).is_file():
            raise ValueError(f"TLS CA file {self.tls_ca} does not exist: see docs/brokers.md")

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: Path | None = None) -> BrokerSettings:
        """From a TOML/JSON table: host, port, username, password,
        password_file (read and stripped), tls_ca, keepalive."""
        known = {"host", "port", "username", "password", "password_file", "tls_ca", "keepalive"}
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown broker setting(s): {', '.join(sorted(extra))}")
        password = d.get("password")
        if d.get("password_file"):
            p = Path(d["password_file"])
            if base is not None and not p.is_absolute():
                p = base / p
            password = p.read_text().strip()
        ca = d.get("tls_ca")
        if ca and base is not None and not Path(ca).is_absolute():
            ca = base / ca
        return cls(host=d.get("host", "127.0.0.1"), port=int(d.get("port", 1883)),
                   username=d.get("username"), password=password,
                   tls_ca=Path(ca) if ca else None, keepalive=int(d.get("keepalive", 30)))


# One recv() at a packet boundary takes up to RECV_BYTES (about 180
# readings) off the socket, and one loop_read() makes one such recv(): a
# read stays a bounded amount of work. A DAP that took a whole backlog in
# one read would commit and acknowledge it in one lump while the broker's
# stream waited (dap_aggregate_vs_raw_subscribe_mosquitto fell from 1.7 to
# 1.3 with eight reads of 64 KiB per loop_read).
RECV_BYTES = 16384
SEND_BYTES = 65536  # what one send() of queued packets carries at most


class BufferedClient(mqtt.Client):
    """paho's Client, reading its socket a buffer at a time and writing
    queued packets together.

    Stock paho reads every packet with at least three recv() calls (its
    type byte, its length, its body) and a select() before each, and
    sends every packet with a send() of its own: on the router path
    (make bench, router_vs_raw_relay_mosquitto) those system calls were
    about a quarter of the head-end's time and a sixth of the DAP's. Here
    a recv() at a packet boundary takes up to RECV_BYTES, paho's small
    reads are served from that buffer, and loop_read() goes on while whole
    packets sit in it (select() cannot see them there); the rest of a
    packet the buffer ends in is read as paho reads it, exactly what it
    asks for. Writes: see _packet_queue and _packet_write.

    It replaces paho internals (`_sock_recv`, `_packet_queue`,
    `_packet_write`, and reads `_in_packet`, `_out_packet`), as they are in
    the paho release line pyproject.toml allows (2.2);
    tests/test_hostmqtt.py runs the protocol through it against real
    brokers, and every role's client is one (TLS: tests/test_tls.py)."""

    _rbuf = b""
    _rpos = 0
    _rsock: Any = None
    _may_recv = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._queue_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def _sock_recv(self, bufsize: int) -> bytes:
        buf, pos = self._rbuf, self._rpos
        if pos < len(buf) and self._rsock is self._sock:
            end = pos + bufsize
            self._rpos = end
            return buf[pos:end] if pos or end < len(buf) else buf
        self._rbuf = b""
        if self._in_packet["command"]:
            # the rest of a packet begun: what paho asks for, as paho does
            return self._fill(bufsize)
        if not self._may_recv:
            # this loop_read has had its recv(): the rest waits for the next
            # one (the socket stays readable, so select() says so)
            raise BlockingIOError
        self._may_recv = False
        self._rsock = self._sock
        buf = self._fill(RECV_BYTES)
        self._rbuf, self._rpos = buf, bufsize
        return buf[:bufsize]

    def _fill(self, n: int) -> bytes:
        """One recv() from the socket (paho's, with its error mapping)."""
        return super()._sock_recv(n)

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        self._may_recv = True
        rc = super().loop_read(max_packets)
        while (rc == mqtt.MQTT_ERR_SUCCESS and self._rpos < len(self._rbuf)
               and self._sock is not None and self._rsock is self._sock):
            rc = super().loop_read(max_packets)
        return rc

    def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                      info: mqtt.MQTTMessageInfo | None = None) -> mqtt.MQTTErrorCode:
        """paho's, except that the network thread is woken (a byte on its
        socket pair: a system call) only when the queue was empty: once
        woken it writes until the queue is empty, so the packets queued
        behind the first go with it. Appending and looking are one step
        under a lock, so that of two threads queueing at once one always
        sees the queue it made non-empty."""
        with self._queue_lock:
            self._out_packet.append({"command": command, "mid": mid, "qos": qos, "pos": 0,
                                     "to_process": len(packet), "packet": packet,
                                     "info": info})
            first = len(self._out_packet) == 1
        if first and self._sockpairW is not None:
            try:
                self._sockpairW.send(b"0")
            except BlockingIOError:
                pass
        if (self._thread is None and self._on_socket_register_write is None
                and self._in_callback_mutex.acquire(False)):
            self._in_callback_mutex.release()
            return self.loop_write()
        self._call_socket_register_write()
        return mqtt.MQTT_ERR_SUCCESS

    def _packet_write(self) -> mqtt.MQTTErrorCode:
        """paho's, except that queued QoS 1 publishes and acknowledgements
        go out together, up to SEND_BYTES per send(): one system call where
        paho makes one per packet. Anything else (QoS 0 publishes, which
        call on_publish, DISCONNECT) goes through paho's own."""
        out = self._out_packet
        while len(out) > 1:
            run: list[Any] = []
            size = 0
            while out and size < SEND_BYTES:
                p = out.popleft()  # taken, then looked at: never half of two writers' runs
                kind = p["command"] & 0xF0
                if kind == mqtt.DISCONNECT or (kind == mqtt.PUBLISH and p["qos"] == 0):
                    out.appendleft(p)
                    break
                run.append(p)
                size += p["to_process"]
            if len(run) < 2:
                out.extendleft(reversed(run))
                break
            data = b"".join([p["packet"][p["pos"]:] if p["pos"] else p["packet"] for p in run])
            try:
                sent = self._sock_send(data)
            except BlockingIOError:
                out.extendleft(reversed(run))
                return mqtt.MQTT_ERR_AGAIN
            except (AttributeError, ValueError):
                out.extendleft(reversed(run))
                return mqtt.MQTT_ERR_SUCCESS
            except OSError as err:
                out.extendleft(reversed(run))
                self._easy_log(mqtt.MQTT_LOG_ERR, "failed to send on socket: %s", err)
                return mqtt.MQTT_ERR_CONN_LOST
            i = 0
            while i < len(run) and sent >= run[i]["to_process"]:
                sent -= run[i]["to_process"]
                i += 1
            if i < len(run):  # a partial send: the rest waits for the next write
                run[i]["pos"] += sent
                run[i]["to_process"] -= sent
                out.extendleft(reversed(run[i:]))
                break
        return super()._packet_write()


def client(settings: BrokerSettings, client_id: str, *, clean_session: bool = True,
           manual_ack: bool = False, will: tuple[str, bytes, bool] | None = None,
           inflight: int = 0, buffered: bool = True) -> mqtt.Client:
    """A paho client set up for MQTT 3.1.1 with our settings; not yet
    connected. `will`: (topic, payload, retain), published with QoS 1.
    `inflight`: outgoing QoS 1 messages awaiting PUBACK, 0 for no limit
    (paho rescans its whole outgoing table on every PUBACK when there is a
    limit, which costs more than the limit saves here). `buffered`: a
    BufferedClient; False for stock paho (the benchmarks' baselines)."""
    if "+" in client_id or "#" in client_id or not client_id:
        raise ValueError(f"client id {client_id!r} is empty or has + or #")
    c = (BufferedClient if buffered else mqtt.Client)(
        CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
        protocol=mqtt.MQTTv311, manual_ack=manual_ack)
    if settings.username is not None:
        c.username_pw_set(settings.username, settings.password)
    if settings.tls_ca is not None:
        c.tls_set(ca_certs=str(settings.tls_ca), cert_reqs=ssl.CERT_REQUIRED,
                  tls_version=ssl.PROTOCOL_TLS_CLIENT)
    if will is not None:
        c.will_set(will[0], will[1], qos=1, retain=will[2])
    c.reconnect_delay_set(min_delay=1, max_delay=30)
    c.max_inflight_messages_set(inflight)
    c.max_queued_messages_set(0)
    return c


def open_socket(c: mqtt.Client, settings: BrokerSettings) -> None:
    """Open the connection and send CONNECT (the CONNACK comes later, to
    whichever loop drives the client). Raises MqttSetupError with what to
    check."""
    try:
        c.connect(settings.host, settings.port, settings.keepalive)
    except ssl.SSLError as e:
        raise MqttSetupError(
            f"the TLS handshake with the MQTT broker at {settings.host}:{settings.port} "
            f"failed ({e}); check that tls_ca is the CA that signed the broker's certificate "
            "and that the host name matches it (docs/brokers.md, TLS)") from e
    except OSError as e:
        raise MqttSetupError(
            f"cannot reach the MQTT broker at {settings.host}:{settings.port} ({e}); "
            "is it running, and are host and port right?") from e


def no_answer(settings: BrokerSettings, timeout: float) -> MqttSetupError:
    return MqttSetupError(
        f"no answer from the MQTT broker at {settings.host}:{settings.port} in {timeout:.0f} s")


def refused(settings: BrokerSettings, reason: Any) -> MqttSetupError:
    return MqttSetupError(
        f"the broker at {settings.host}:{settings.port} refused the connection: {reason}; "
        "check the username and password (provisioning wrote them) and the broker's ACLs")


def connect(c: mqtt.Client, settings: BrokerSettings, timeout: float = 15.0) -> None:
    """Connect, start paho's network thread and wait for the broker's
    CONNACK. Raises MqttSetupError with what to check."""
    done = threading.Event()
    result: dict[str, Any] = {}
    previous = c.on_connect

    def on_connect(client, userdata, flags, reason, properties):
        result["reason"] = reason
        done.set()
        if previous is not None:
            previous(client, userdata, flags, reason, properties)

    c.on_connect = on_connect
    open_socket(c, settings)
    c.loop_start()
    if not done.wait(timeout):
        c.loop_stop()
        raise no_answer(settings, timeout)
    reason = result["reason"]
    if reason.is_failure:
        c.loop_stop()
        c.disconnect()
        raise refused(settings, reason)
    c.on_connect = previous


# -- driving paho from our own loop --------------------------------------------

MISC_EVERY = 1.0  # seconds between keepalive checks
READS_PER_EVENT = 256  # packets read from a readable socket before the next select
BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0  # seconds between reconnection attempts


def _tls_pending(sock: Any) -> bool:
    """Decrypted bytes an SSL socket holds, which select() cannot see."""
    return sock is not None and hasattr(sock, "pending") and sock.pending() > 0


class Link:
    """One paho client on a Driver, and what is known of its connection."""

    def __init__(self, c: mqtt.Client, settings: BrokerSettings, role: str, name: str,
                 on_connect: Callable[[mqtt.Client, Link], None] | None,
                 on_message: Callable[[mqtt.Client, mqtt.MQTTMessage], None]) -> None:
        self.c = c
        self.settings = settings
        self.role = role  # for messages: "the head-end's broker"
        self.name = name  # its client id and account
        self.on_connect = on_connect
        self.on_message = on_message
        self.connack: Any = None  # the last CONNACK's reason code
        self.subscribed = False  # a SUBACK came since the last CONNACK
        self.down = False  # lost: reconnect at retry_at
        self.retry_at = 0.0
        self.backoff = BACKOFF_MIN
        self.progress = 0  # packets handled: tells a read that did something


class Driver:
    """Runs paho clients from one loop of the caller's, with paho's external
    loop API (loop_read, loop_write, loop_misc) on one selector, instead of
    a network thread per client. With paho's thread, every publish and
    acknowledgement made by another thread also wakes that thread through a
    socket pair, and the threads take turns on the GIL for each message
    (make bench: a sixth of the DAP's CPU per routed message).

    One thread uses the clients: the one that calls events(). Only wake()
    may be called from elsewhere (another thread, a signal handler). Lost
    connections are re-made in events(), with backoff."""

    def __init__(self) -> None:
        self.links: list[Link] = []
        self.closing = False
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._misc_at = 0.0

    def add(self, c: mqtt.Client, settings: BrokerSettings, role: str, name: str, *,
            on_message: Callable[[mqtt.Client, mqtt.MQTTMessage], None],
            on_connect: Callable[[mqtt.Client, Link], None] | None = None) -> Link:
        """Take over a client (before it connects). `role` names the broker
        in messages, `name` is the client's id. `on_connect(client, link)`
        runs after every accepted CONNACK (subscribe there)."""
        link = Link(c, settings, role, name, on_connect, on_message)
        c.user_data_set(link)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_want_write
        c.on_socket_unregister_write = self._on_no_write
        self.links.append(link)
        return link

    # -- connecting and closing ----------------------------------------------

    def connect(self, timeout: float = 15.0) -> None:
        """Connect every client and wait for the CONNACKs. Raises
        MqttSetupError with what to check."""
        for link in self.links:
            link.connack = None
            open_socket(link.c, link.settings)
        for link in self.links:
            if not self.pump_until(lambda link=link: link.connack is not None, timeout):
                raise no_answer(link.settings, timeout)
            if link.connack.is_failure:
                raise refused(link.settings, link.connack)

    def close(self) -> None:
        """Disconnect cleanly (no last will) and release the sockets."""
        self.closing = True
        for link in self.links:
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
            self._forget(fd)
            os.close(fd)
        self._sel.close()

    def wake(self) -> None:
        """Make a waiting events() return at once: safe from any thread and
        from a signal handler."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # full: a wake-up is pending anyway
            pass

    # -- the loop ------------------------------------------------------------

    def events(self, timeout: float) -> None:
        """Wait up to `timeout` for network events and handle them: read
        (paho calls on_message), write, keepalive, reconnect, and send what
        was queued."""
        now = time.monotonic()
        for link in self.links:
            if link.down and not self.closing:
                timeout = min(timeout, max(0.0, link.retry_at - now))
        timeout = min(timeout, max(0.0, self._misc_at - now))
        # decrypted TLS bytes a read left behind (at READS_PER_EVENT) are
        # invisible to select(): don't wait while there are any
        if any(_tls_pending(link.c.socket()) for link in self.links):
            timeout = 0.0
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
        for link in self.links:  # ...and read them, whatever select() said
            if _tls_pending(link.c.socket()):
                self._read(link)
        now = time.monotonic()
        if now >= self._misc_at:
            self._misc_at = now + MISC_EVERY
            for link in self.links:
                if link.c.socket() is not None:
                    link.c.loop_misc()
        if not self.closing:
            for link in self.links:
                if link.down and now >= link.retry_at:
                    self._reconnect(link, now)
        self.flush()

    def flush(self) -> None:
        """Send what is queued, now."""
        for link in self.links:
            if link.c.want_write() and link.c.socket() is not None:
                link.c.loop_write()

    def pump_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Run events() until done() or timeout."""
        end = time.monotonic() + timeout
        while not done():
            left = end - time.monotonic()
            if left <= 0:
                return False
            self.events(min(left, 0.05))
        return True

    def _read(self, link: Link) -> None:
        """Read what the socket holds, up to READS_PER_EVENT packets:
        paho's loop_read takes one packet when nothing of ours is in flight,
        so read until a pass does nothing (a TLS socket may hold decrypted
        bytes select cannot see)."""
        c = link.c
        start = link.progress
        while link.progress - start < READS_PER_EVENT:
            before = link.progress
            if c.loop_read() != mqtt.MQTT_ERR_SUCCESS or c.socket() is None:
                return
            if link.progress == before and not _tls_pending(c.socket()):
                return

    def _reconnect(self, link: Link, now: float) -> None:
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

    def _forget(self, sock: Any) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    # -- paho's callbacks (in the loop) --------------------------------------

    def _on_connect(self, c: mqtt.Client, link: Link, flags: Any, reason: Any,
                    properties: Any) -> None:
        link.connack = reason
        link.subscribed = False
        link.progress += 1
        if reason.is_failure:
            log.warning("the %s refused the connection: %s", link.role, reason)
            return
        link.backoff = BACKOFF_MIN
        log.info("connected to the %s", link.role)
        if link.on_connect is not None:
            link.on_connect(c, link)

    def _on_subscribe(self, c: mqtt.Client, link: Link, mid: int, reasons: Any,
                      properties: Any) -> None:
        link.progress += 1
        if any(r.is_failure for r in reasons):
            log.error("the %s refused a subscription (%s): check its ACLs for %s", link.role,
                      ", ".join(str(r) for r in reasons), link.name)
        link.subscribed = True

    def _on_disconnect(self, c: mqtt.Client, link: Link, flags: Any, reason: Any,
                       properties: Any) -> None:
        link.progress += 1
        if self.closing or link.down:
            return
        link.down = True
        link.retry_at = time.monotonic() + link.backoff * (0.5 + random.random())
        link.backoff = min(link.backoff * 2, BACKOFF_MAX)  # back to the minimum on a CONNACK
        log.warning("lost the %s (%s); reconnecting", link.role, reason)

    def _on_publish(self, c: mqtt.Client, link: Link, mid: int, reason: Any,
                    properties: Any) -> None:
        link.progress += 1

    def _on_message(self, c: mqtt.Client, link: Link, msg: mqtt.MQTTMessage) -> None:
        link.progress += 1
        link.on_message(c, msg)

    def _on_socket_open(self, c: mqtt.Client, link: Link, sock: Any) -> None:
        self._sel.register(sock, selectors.EVENT_READ, link)

    def _on_socket_close(self, c: mqtt.Client, link: Link, sock: Any) -> None:
        self._forget(sock)

    def _on_want_write(self, c: mqtt.Client, link: Link, sock: Any) -> None:
        try:
            self._sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, link)
        except (KeyError, ValueError):
            pass

    def _on_no_write(self, c: mqtt.Client, link: Link, sock: Any) -> None:
        try:
            self._sel.modify(sock, selectors.EVENT_READ, link)
        except (KeyError, ValueError):
            pass
