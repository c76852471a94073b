"""shared.hostmqtt.BufferedClient: paho's Client reading its socket a
buffer at a time and sending queued packets together, against real brokers
(amqtt and Mosquitto).

What must hold: every message arrives whole, once and in order, whatever
its size (the remaining-length encoding's 1- to 3-byte boundaries, bodies
around and far past the buffer's size); a backlog that ends with packets
sitting in the buffer is still handled, though select() no longer sees
them; bytes left from a dropped connection are never parsed as the new
connection's; it makes far fewer recv() and send() calls than paho's one or
three per packet; and a send() that takes only part of a run of packets is
resumed from exactly where it stopped. TLS through it is covered by
tests/test_tls.py (every role's client is a BufferedClient).
"""

from __future__ import annotations

import fcntl
import random
import select
import socket
import struct
import termios
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from shared import hostmqtt
from shared.hostmqtt import RECV_BYTES, BrokerSettings, BufferedClient, client
from tests.brokers import Broker
from tests.dap_helpers import close, connect_wait
from tests.waits import wait_until

# around every boundary of MQTT's remaining length (1, 2, 3 bytes) and of
# the buffer, and far past it
SIZES = [0, 1, 77, 110, 111, 112, 16_370, 16_371, 16_372, 16_384, RECV_BYTES - 1,
         RECV_BYTES, RECV_BYTES + 1, 4 * RECV_BYTES + 5, 2_000_000]


class Counting(BufferedClient):
    """Counts the real recv() calls."""

    fills = 0

    def _fill(self, n: int) -> bytes:
        self.fills += 1
        return super()._fill(n)


def _payload(i: int, size: int) -> bytes:
    head = i.to_bytes(4, "big")
    return (head * (size // 4 + 1))[:size] if size >= 4 else bytes([i & 0xFF]) * size


def _buffered(cls: type[BufferedClient] = Counting,
              client_id: str = "buffered-rx") -> BufferedClient:
    c = cls(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(0)
    return c


def _stock(client_id: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(0)
    return c


def _exchange(broker: Broker, tx: mqtt.Client, rx: mqtt.Client, payloads: list[bytes],
              qos: Callable[[int], int] = lambda i: 1, timeout: float = 60.0
              ) -> tuple[list[bytes], list[mqtt.MQTTMessageInfo]]:
    """rx subscribes, tx publishes every payload (the i-th at QoS qos(i);
    each client with a network thread of its own) and waits until each is
    published: what rx received, in order, and tx's publish handles."""
    topic = "t/exchange"
    got: list[bytes] = []
    done = threading.Event()

    def on_message(c, userdata, msg):
        got.append(msg.payload)
        if len(got) == len(payloads):
            done.set()

    rx.on_message = on_message
    connect_wait(rx, broker.host, broker.port, [topic])
    connect_wait(tx, broker.host, broker.port)
    try:
        infos = [tx.publish(topic, p, qos=qos(i)) for i, p in enumerate(payloads)]
        for info in infos:
            info.wait_for_publish(timeout)
        assert done.wait(timeout), f"{len(got)} of {len(payloads)} messages arrived"
    finally:
        close(tx)
        close(rx)
    return got, infos


def _receive(broker: Broker, rx: BufferedClient, payloads: list[bytes]) -> list[bytes]:
    """Stock paho sends, rx receives."""
    return _exchange(broker, _stock("stock-tx"), rx, payloads)[0]


def _send_through(broker: Broker, tx: BufferedClient, payloads: list[bytes]) -> list[bytes]:
    """tx sends, a stock paho subscriber receives."""
    return _exchange(broker, tx, _stock("stock-rx"), payloads)[0]


def test_every_size_arrives_whole_and_in_order(open_broker: Broker) -> None:
    payloads = [_payload(i, size) for i, size in enumerate(SIZES)]
    got = _receive(open_broker, _buffered(), payloads)
    assert [len(p) for p in got] == SIZES
    assert got == payloads


def _pending_bytes(c: mqtt.Client) -> int:
    return struct.unpack("i", fcntl.ioctl(c.socket(), termios.FIONREAD, b"\0" * 4))[0]


def test_a_backlog_is_read_in_buffers_and_its_tail_is_not_left_behind(
        open_broker: Broker) -> None:
    """600 small messages (54 KB: what a loopback socket's default receive
    buffer holds) wait in the receiver's socket (QoS 0, its loop paused)
    before it reads: it takes them in a handful of recv()s where paho alone
    makes three per message (1,800), and the last ones, which sit in the
    buffer after the socket has gone quiet, are delivered too."""
    topic = "t/backlog"
    n, size = 600, 77
    packet = 2 + 2 + len(topic) + size  # fixed header, topic, payload (QoS 0)
    payloads = [_payload(i, size) for i in range(n)]
    rx = _buffered()
    got: list[bytes] = []
    done, subscribed = threading.Event(), threading.Event()

    def on_message(c, userdata, msg):
        got.append(msg.payload)
        if len(got) == n:
            done.set()

    rx.on_message = on_message
    connect_wait(rx, open_broker.host, open_broker.port)
    rx.on_subscribe = lambda *a: subscribed.set()
    rx.subscribe(topic, 0)
    assert subscribed.wait(20)
    rx.loop_stop()  # the connection stays; nothing reads it for now
    tx = connect_wait(_stock("stock-tx"), open_broker.host, open_broker.port)
    try:
        for info in [tx.publish(topic, p, qos=1) for p in payloads]:
            info.wait_for_publish(60)
        wait_until(lambda: _pending_bytes(rx) >= n * packet, 30, "the backlog in the socket",
                   diagnose=lambda: f"{_pending_bytes(rx)} bytes of {n * packet}")
        before = rx.fills
        rx.loop_start()
        # well within the 30 s keepalive, whose PINGRESP would wake a reader
        # that left packets in its buffer
        assert done.wait(15), f"{len(got)} of {n} messages arrived"
    finally:
        close(tx)
        close(rx)
    assert got == payloads
    # a buffer's worth at a time, plus the rest of each packet a buffer
    # ends in
    assert rx.fills - before <= 2 * (n * packet // RECV_BYTES + 1), rx.fills - before


def test_bytes_of_an_old_connection_are_dropped(open_broker: Broker) -> None:
    """Leftovers from a socket that is gone (here: planted garbage that
    would parse as a PUBLISH) are never read as the new connection's."""
    rx = _buffered(BufferedClient)
    # a complete PUBLISH on topic t/fresh with payload "stale"
    rx._rbuf, rx._rpos, rx._rsock = b"\x30\x0e\x00\x07t/freshstale", 0, object()
    assert _receive(open_broker, rx, [b"fresh"]) == [b"fresh"]


def test_the_factory_makes_buffered_clients_unless_told_not_to() -> None:
    s = BrokerSettings()
    assert type(client(s, "a")) is BufferedClient
    assert type(client(s, "b", buffered=False)) is mqtt.Client
    # the paho internals it builds on are there in the paho installed
    for name in ("_sock_recv", "_sock_send", "_packet_queue", "_packet_write"):
        assert callable(getattr(mqtt.Client, name, None)), name
    c = client(s, "c")
    assert c._in_packet["command"] == 0 and len(c._out_packet) == 0
    assert hostmqtt.RECV_BYTES >= 4096


def test_a_body_far_larger_than_the_buffer_between_small_ones(open_broker: Broker) -> None:
    """The rest of a packet the buffer ends in is read as paho reads it; the
    small packets on either side are intact."""
    payloads = [b"before", _payload(7, 40 * RECV_BYTES + 3), b"after"]
    got = _receive(open_broker, _buffered(), payloads)
    assert got == payloads


class Sends(BufferedClient):
    """Counts send() calls; with `cap`, sends at most that many bytes per
    call, as a socket with a full send buffer does."""

    sends = 0
    cap: int | None = None

    def _sock_send(self, buf: bytes | bytearray) -> int:
        self.sends += 1
        return super()._sock_send(buf if self.cap is None else buf[:self.cap])


class Held(Sends):
    """Its network thread, given a publish to write, first waits (up to 60 s)
    until `held` packets are queued: so they are all queued when it writes,
    however the publishing thread and it are scheduled. (Unheld, on a busy
    machine the network thread can keep pace with the publisher and find one
    packet at a time, which is right but tests nothing.)"""

    held = 0

    def _packet_write(self) -> mqtt.MQTTErrorCode:
        out = self._out_packet
        if self.held and out and out[0]["command"] & 0xF0 == mqtt.PUBLISH:
            wait_until(lambda: len(out) >= self.held, timeout=60.0,
                       what=f"{self.held} publishes queued")
            self.held = 0
        return super()._packet_write()


def test_queued_publishes_go_out_together(open_broker: Broker) -> None:
    """2,000 QoS 1 publishes queued at once leave in far fewer send()s than
    paho's one per packet, and arrive whole and in order."""
    tx = _buffered(Held, "coalescing-tx")
    payloads = [_payload(i, 77) for i in range(2000)]
    tx.held = len(payloads)
    assert _send_through(open_broker, tx, payloads) == payloads
    assert tx.sends < len(payloads) // 4, tx.sends


def test_partial_sends_resume_where_they_stopped(open_broker: Broker) -> None:
    """Every send() taking at most 1,000 bytes: runs of packets are cut
    anywhere, inside a packet's header or body, and what follows is sent
    from exactly there (a byte lost or repeated would break the stream)."""
    tx = _buffered(Sends, "partial-tx")
    tx.cap = 1000
    payloads = [_payload(i, size) for i, size in
                enumerate([77, 3, 999, 1000, 1001, 0, 20_000, 77, 5, 70_000] * 20)]
    assert _send_through(open_broker, tx, payloads) == payloads


def _publish_packet(topic: str, payload: bytes) -> bytes:
    """A QoS 0 PUBLISH as a broker sends it (MQTT 3.1.1 §3.3)."""
    body = len(topic).to_bytes(2, "big") + topic.encode() + payload
    n, length = len(body), bytearray()
    while True:
        n, digit = divmod(n, 128)
        length.append(digit | (0x80 if n else 0))
        if not n:
            return b"\x30" + bytes(length) + body


def _read_in_chunks(chunks: list[bytes]) -> list[bytes]:
    """Feed a BufferedClient the chunks through a socket pair, one send()
    each, calling loop_read only when select() says the socket is readable,
    as a loop does. What it delivered."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    c = BufferedClient(CallbackAPIVersion.VERSION2, client_id="split", protocol=mqtt.MQTTv311)
    c._sock = ours  # as paho's connect leaves it, without the CONNECT exchange
    got: list[bytes] = []
    c.on_message = lambda cl, u, msg: got.append(msg.payload)
    try:
        for chunk in chunks:
            theirs.sendall(chunk)
            while select.select([ours], [], [], 0)[0]:
                assert c.loop_read() == mqtt.MQTT_ERR_SUCCESS
    finally:
        ours.close()
        theirs.close()
    return got


def test_every_split_of_the_stream_is_read_the_same(monkeypatch) -> None:
    """With a 64-byte buffer, the stream is cut at every byte (inside fixed
    headers, remaining lengths of 1 to 3 bytes, topics, bodies) and in 200
    random ways: the same messages come out each time, and nothing is left
    in the buffer where select() cannot see it."""
    monkeypatch.setattr(hostmqtt, "RECV_BYTES", 64)
    # ending in small packets, several of which fit one buffer: they are
    # handled though select() has nothing more to say
    payloads = [bytes([i]) * n for i, n in enumerate([0, 1, 5, 57, 58, 59, 60, 64, 120, 121,
                                                      200, 300, 63, 2, 0, 1, 2, 3, 4])]
    stream = b"".join(_publish_packet("t/s", p) for p in payloads)
    for cut in range(1, len(stream)):
        assert _read_in_chunks([stream[:cut], stream[cut:]]) == payloads, cut
    rng = random.Random(7)
    big = payloads + [b"\x07" * 20_000] + payloads
    stream = b"".join(_publish_packet("t/s", p) for p in big)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 40)))
        chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
        assert _read_in_chunks(chunks) == big, cuts


def test_qos0_publishes_between_runs_complete(open_broker: Broker) -> None:
    """QoS 0 publishes, which paho completes itself on writing (on_publish,
    wait_for_publish), stay paho's between the runs sent together."""
    tx = _buffered(Sends, "mixed-tx")
    published: list[int] = []
    tx.on_publish = lambda c, u, mid, rc, props: published.append(mid)
    payloads = [_payload(i, 77) for i in range(600)]
    got, infos = _exchange(open_broker, tx, _stock("stock-rx"), payloads,
                           qos=lambda i: 0 if i % 3 == 0 else 1, timeout=30)
    assert all(info.is_published() for info in infos)
    assert sorted(got) == sorted(payloads)  # QoS 0 and 1 may pass each other at the broker
    assert sorted(published) == sorted(info.mid for info in infos)


class HeldBytes:
    """A socket like an SSLSocket that holds decrypted bytes: recv() serves
    them and pending() counts them, while select() on its file descriptor
    (one end of a quiet socket pair) sees nothing."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.quiet, self.peer = socket.socketpair()

    def recv(self, n: int) -> bytes:
        if not self.data:
            raise BlockingIOError
        out = bytes(self.data[:n])
        del self.data[:n]
        return out

    def pending(self) -> int:
        return len(self.data)

    def fileno(self) -> int:
        return self.quiet.fileno()

    def close(self) -> None:
        self.quiet.close()
        self.peer.close()


def test_the_driver_reads_tls_bytes_a_capped_read_left_behind(monkeypatch) -> None:
    """A read stops after READS_PER_EVENT packets; what the TLS layer still
    holds is read by the next events() though select() stays quiet (the
    peer sends nothing more). Stock paho, which reads a byte at a time,
    leaves the most behind."""
    monkeypatch.setattr(hostmqtt, "READS_PER_EVENT", 1)
    payloads = [bytes([i]) * 10 for i in range(5)]
    held = HeldBytes(b"".join(_publish_packet("t/h", p) for p in payloads))
    got: list[bytes] = []
    driver = hostmqtt.Driver()
    c = _stock("held")
    link = driver.add(c, BrokerSettings(), "test broker", "held",
                      on_message=lambda cl, msg: got.append(msg.payload))
    c._sock = held  # as paho's connect leaves it, without the CONNECT exchange
    driver._on_socket_open(c, link, held)
    try:
        for _ in range(len(payloads)):
            driver.events(0.01)
        assert got == payloads
        assert held.pending() == 0
    finally:
        driver.close()  # closes the held socket too
