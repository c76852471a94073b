# The board's MQTT transport, on micropython-lib's umqtt.simple (installed
# on the board by `make flash`: mpremote mip install umqtt.simple), in two
# layers, the way mqtt_as keeps protocol and retries apart:
#
#   Link       one MQTT session. Connects with the sealed last will (QoS 1),
#              subscribes to the downlink, sends what the outbox still
#              holds from before, then publishes the birth; QoS 1
#              publishes whose wait for the PUBACK is bounded; check_msg
#              polling; pings. Any failure raises, and the Link is dropped.
#   Transport  the retry layer. Opens a Link while the network is up, with
#              exponential backoff and jitter between attempts; holds the
#              downlink messages for the app in a small inbox; sends the
#              outbox (firmware/outbox.py) oldest first, an entry leaving it
#              only once its PUBACK came back.
#
# umqtt.simple blocks on its socket with no timeout: its connect makes a
# blocking socket, and wait_msg() (inside publish and subscribe too) sets it
# back to blocking after every poll. Here every socket it makes has a
# timeout (_Sockets), and once connected its socket is wrapped (_Guard) so
# that "blocking" means "blocking for at most TIMEOUT_S", and a whole
# publish or subscribe gives up at a deadline however much else arrives.
import errno

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


try:
    from umqtt import simple as _simple
except ImportError:  # not installed (yet): Link says so when it is used
    _simple = None

from firmware.board import ticks_add, ticks_diff, ticks_ms
from shared import topics

KEEPALIVE_S = const(60)
TIMEOUT_S = const(5)        # any one socket operation
WAIT_MS = const(8000)       # a publish or subscribe, PUBACK/SUBACK included
PING_MS = const(30000)
DEAD_MS = const(90000)      # nothing heard for this long: the session is dead
MIN_BACKOFF_MS = const(1000)
MAX_BACKOFF_MS = const(120000)
INBOX_MAX = const(8)


class _Sockets:
    """Stands in for the socket module inside umqtt.simple: every socket it
    makes has a timeout, so neither the TCP/TLS connect nor the wait for
    CONNACK can hang. Remembers the last socket made (the TCP one, under
    TLS)."""

    def __init__(self, mod):
        self.mod = mod
        self.last = None

    def getaddrinfo(self, *args):
        return self.mod.getaddrinfo(*args)

    def socket(self, *args):
        s = self.mod.socket(*args)
        s.settimeout(TIMEOUT_S)
        self.last = s
        return s


_sockets = None
if _simple is not None and hasattr(_simple, "socket"):
    _sockets = _Sockets(_simple.socket)
    _simple.socket = _sockets


class _Guard:
    """The connected socket as umqtt.simple sees it."""

    def __init__(self, sock, raw):
        self.sock = sock  # what umqtt connected (TLS-wrapped or not)
        self.raw = raw    # the TCP socket under it
        self.deadline = None
        self.heard = ticks_ms()

    def read(self, n):
        if self.deadline is not None and ticks_diff(ticks_ms(), self.deadline) >= 0:
            raise OSError(errno.ETIMEDOUT)
        data = self.sock.read(n)
        if data:
            self.heard = ticks_ms()
        return data

    def write(self, *args):
        return self.sock.write(*args)

    def setblocking(self, flag):
        if self.sock is not self.raw:
            self.sock.setblocking(flag)
        if self.raw is not None:
            self.raw.settimeout(TIMEOUT_S if flag else 0)

    def settimeout(self, t):
        if self.raw is not None:
            self.raw.settimeout(t)

    def close(self):
        self.sock.close()


def _ssl_context(cfg):
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cfg.get("ca"):
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=cfg["ca"])
    return ctx


class Link:
    def __init__(self, cfg, client_class=None):
        if client_class is None:
            if _simple is None:
                raise OSError(errno.ENOENT)  # main.py checks this first, with a message
            client_class = _simple.MQTTClient
        meter = cfg["meter"]
        self.up = topics.meter_up(meter, cfg.get("dap"))
        self.down = topics.meter_down(meter, cfg.get("dap"))
        self.client = client_class(
            topics.meter_name(meter), cfg["host"], cfg.get("port") or 1883,
            cfg.get("username"), cfg.get("password"), KEEPALIVE_S,
            _ssl_context(cfg) if cfg.get("tls") else None,
        )
        self.guard = None
        self.birth_tried = False

    def open(self, will, birth, on_message, backlog=None):
        """`backlog()` publishes what the outbox holds, before the birth:
        those responses carry older counters than the new will and birth,
        and the head-end's replay window must see them first."""
        c = self.client
        c.set_callback(on_message)
        c.set_last_will(self.up, will, False, 1)
        if _sockets is not None:
            _sockets.last = None
        c.connect(True)
        self.guard = _Guard(c.sock, _sockets.last if _sockets is not None else None)
        c.sock = self.guard
        self._bounded(c.subscribe, self.down, 1)
        self.birth_tried = True
        if backlog is not None:
            backlog(self)
        self.publish(birth)

    def _bounded(self, fn, *args):
        g = self.guard
        g.deadline = ticks_add(ticks_ms(), WAIT_MS)
        try:
            return fn(*args)
        finally:
            g.deadline = None

    def publish(self, payload):
        """QoS 1: returns once the PUBACK came, raises if it did not."""
        self._bounded(self.client.publish, self.up, payload, False, 1)

    def poll(self, limit=8):
        """Take in what the broker sent (PUBLISHes go to on_message)."""
        for _ in range(limit):
            op = self.client.check_msg()
            if op is None:
                return
            if op & 0xF0 != 0x30:
                raise OSError(errno.EIO)  # a packet umqtt left unread: resync by reconnecting

    def ping(self):
        self.client.ping()

    def silent_ms(self):
        return ticks_diff(ticks_ms(), self.guard.heard) if self.guard is not None else 0

    def close(self, clean=False):
        try:
            if clean:
                self.client.disconnect()
            elif self.client.sock is not None:
                self.client.sock.close()
        except Exception:
            pass


class Transport:
    def __init__(self, make_link, outbox, rand, log=print):
        """`make_link()` -> a new Link; `outbox`: firmware.outbox.Outbox;
        `rand(n)` -> an int in [0, n) for the backoff jitter."""
        self.make_link = make_link
        self.outbox = outbox
        self.rand = rand
        self.log = log
        self.link = None
        self.hello = None  # (will, birth) not yet shown to any broker
        self.backoff = MIN_BACKOFF_MS
        self.retry_ms = 0
        self.ping_ms = 0
        self.inbox = []
        self.stats = {"connects": 0, "failures": 0, "published": 0, "inbox_dropped": 0}

    def connected(self):
        return self.link is not None

    def _on_message(self, topic, msg):
        if len(self.inbox) >= INBOX_MAX:
            self.stats["inbox_dropped"] += 1  # the head-end asks again
            return
        self.inbox.append(bytes(msg))

    def poll(self, ms, net_up, hello):
        """Keep the session going. `hello()` -> (will, birth) of a new
        session (Meter.connect); it is called only when one is needed, and
        a pair no broker has seen is kept for the next attempt."""
        if not net_up:
            if self.link is not None:
                self._fail(ms, "network down")
            return
        if self.link is None:
            if ms >= self.retry_ms:
                self._open(ms, hello)
            return
        try:
            self.link.poll()
            if ms >= self.ping_ms:
                self.link.ping()
                self.ping_ms = ms + PING_MS
            if self.link.silent_ms() > DEAD_MS:
                raise OSError(errno.ETIMEDOUT)
        except Exception as e:
            self._fail(ms, e)

    def _open(self, ms, hello):
        if self.hello is None:
            self.hello = hello()
        will, birth = self.hello
        link = None
        try:
            link = self.make_link()
            link.open(will, birth, self._on_message, self._backlog)
        except Exception as e:
            if link is not None:
                if link.birth_tried:
                    self.hello = None  # the broker may hold that will: use a new session
                link.close()
            self.stats["failures"] += 1
            self._backoff(ms)
            self.log("meter: MQTT connect failed (%r); retrying in %d s"
                     % (e, (self.retry_ms - ms) // 1000))
            return
        self.hello = None
        self.link = link
        self.backoff = MIN_BACKOFF_MS
        self.ping_ms = ms + PING_MS
        self.stats["connects"] += 1
        self.log("meter: MQTT connected, birth published on", link.up)

    def _backlog(self, link):
        """Publish every outbox entry on a link being opened (raises on
        failure, which fails the open)."""
        while True:
            head = self.outbox.peek()
            if head is None:
                return
            link.publish(head[1])
            self.outbox.ack(head[0])
            self.stats["published"] += 1

    def flush(self, ms, limit=4):
        """Publish up to `limit` outbox entries, oldest first."""
        while self.link is not None and limit > 0:
            head = self.outbox.peek()
            if head is None:
                return
            try:
                self.link.publish(head[1])
            except Exception as e:
                self._fail(ms, e)
                return
            self.outbox.ack(head[0])
            self.stats["published"] += 1
            limit -= 1

    def goodbye(self, payload):
        """Publish an orderly death and disconnect. True if it was acked."""
        link = self.link
        if link is None:
            return False
        self.link = None
        ok = True
        try:
            link.publish(payload)
        except Exception:
            ok = False
        link.close(clean=ok)
        return ok

    def _fail(self, ms, why):
        link = self.link
        self.link = None
        if link is not None:
            link.close()
        self.stats["failures"] += 1
        self._backoff(ms)
        self.log("meter: MQTT connection lost (%r); retrying in %d s"
                 % (why, (self.retry_ms - ms) // 1000))

    def _backoff(self, ms):
        b = self.backoff
        self.retry_ms = ms + b // 2 + self.rand(b)
        self.backoff = min(b * 2, MAX_BACKOFF_MS)
