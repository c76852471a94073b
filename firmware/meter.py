# The meter core, sans-IO: sealed request bytes in, sealed response bytes
# out. No sockets, no clock, no `machine`: the shell passes the time and
# os.urandom in. The same class runs on the ESP32, in the host simulation
# and under pytest.
try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from firmware.profile import Profile
from firmware.state import State
from shared import envelope, messages
from shared.channel import Channel
from shared.const import (
    DEATH_ORDERLY,
    DEATH_WILL,
    ENV_SEALED,
    MAX_ROWS,
    NONCE_BYTES,
    REPLAY_WINDOW,
    S_EXPIRED,
    S_MALFORMED,
    S_NO_DATA,
    S_UNSUPPORTED,
    T_BIRTH,
    T_CURRENT,
    T_DEATH,
    T_INTERVAL,
    T_READ_CURRENT,
    T_READ_INTERVAL,
    T_STATUS,
    UP,
)
from shared.counter import SkipAheadCounter
from shared.errors import DecodeError, ProtocolError
from shared.obis import ENERGY_EXPORT, ENERGY_IMPORT, POWER, VOLTAGE
from shared.replay import ReplayWindow

_WRAP = const(0xFFFFFFFF)


class Meter:
    def __init__(self, meter_id, key, backend, flash, source, period=900):
        """`key`: the pairwise key with the head-end (box.beforenm, computed
        once per boot). `flash`: firmware.flash.Flash or a stand-in.
        `source`: the metrology (firmware/metrology.py)."""
        self.id = meter_id
        self.period = period
        self.source = source
        self.state = State(flash)
        top = self.state.down_top
        # After a reboot every counter at or below the saved top is refused:
        # which of the ones below it were seen is not kept on flash.
        window = ReplayWindow(top=-1 if top is None else top,
                              bits=0 if top is None else (1 << REPLAY_WINDOW) - 1)
        counter = SkipAheadCounter(self.state.up_saved, self.state.persist_counter)
        self.channel = Channel(backend, key, meter_id, UP, counter, window)
        self.profile = Profile(flash, period)
        self.profile.load()
        self.stats = {"requests": 0, "responses": 0, "rejected": 0}

    # -- the clock ----------------------------------------------------------

    def catch_up(self, now, history_from=None):
        """Close every interval that has ended by `now` into the profile.
        A meter with no profile starts it at the current interval (or at
        `history_from`, for a simulated meter that comes with history)."""
        p = self.period
        k_now = now // p
        prof = self.profile
        if prof.empty():
            imp, exp = self.source.initial()
            start = k_now if history_from is None else min(k_now, history_from // p)
            prof.append(start - 1, imp, exp, 0)
        imp, exp = prof.registers()
        for k in range(prof.last + 1, k_now):
            di, de, flags = self.source.take(k)
            imp = (imp + di) & _WRAP
            exp = (exp + de) & _WRAP
            prof.append(k, imp, exp, flags)

    def registers(self, now):
        """[tag, value, ...] right now (the profile must be caught up)."""
        k = now // self.period
        imp, exp = self.profile.registers()
        di, de = self.source.peek(k, now - k * self.period)
        return [
            ENERGY_IMPORT, (imp + di) & _WRAP,
            ENERGY_EXPORT, (exp + de) & _WRAP,
            POWER, self.source.power(now),
            VOLTAGE, self.source.voltage(now),
        ]

    # -- sessions -----------------------------------------------------------

    def _seal(self, mtype, body, urandom):
        return self.channel.seal(mtype, body, urandom(NONCE_BYTES))

    def connect(self, now, urandom):
        """Start a new session: (last will, birth). Set the will on the MQTT
        connection, then publish the birth, which names the will's counter
        so the head-end can accept that will however late it comes."""
        self.state.session += 1
        self.state.save()
        s = self.state.session
        will_ctr, will = self._seal(T_DEATH, [s, DEATH_WILL], urandom)
        _, birth = self._seal(
            T_BIRTH, [s, will_ctr, now, self.period, self.profile.oldest_start()], urandom
        )
        return will, birth

    def goodbye(self, urandom):
        """An orderly death, published before a clean disconnect."""
        return self._seal(T_DEATH, [self.state.session, DEATH_ORDERLY], urandom)[1]

    # -- requests -----------------------------------------------------------

    def _reject(self, err):
        self.stats["rejected"] += 1
        key = "rejected:" + err.reason
        self.stats[key] = self.stats.get(key, 0) + 1
        return []

    def handle(self, wire, now, urandom):
        """One message from the downlink. Returns the sealed responses to
        publish (possibly none). Never raises for bad input: it is counted
        in self.stats under its reason."""
        ch = self.channel
        try:
            kind, _ = envelope.peek(wire)
            if kind == ENV_SEALED:
                mtype, ctr, body = ch.unseal(wire)
            else:
                mtype, ctr, body, _ = ch.unseal_group_item(wire)
        except ProtocolError as e:
            return self._reject(e)
        try:
            messages.check_body(mtype, body)
            malformed = False
        except DecodeError:
            malformed = True  # authentic, so it is answered, not ignored
        try:
            ch.accept(mtype, ctr, body)
        except ProtocolError as e:
            return self._reject(e)
        self.state.down_top = ch.window.top
        self.state.save()
        self.stats["requests"] += 1
        if malformed:
            reqid = body[0] if body and type(body[0]) is int and 0 <= body[0] <= _WRAP else 0
            return self._answer(T_STATUS, [reqid, S_MALFORMED, 0], urandom)
        reqid, deadline = body[0], body[1]
        self.catch_up(now)
        if now > deadline:
            return self._answer(T_STATUS, [reqid, S_EXPIRED, now], urandom)
        if mtype == T_READ_CURRENT:
            return self._answer(T_CURRENT, [reqid, now, self.registers(now)], urandom)
        if mtype == T_READ_INTERVAL:
            return self._interval(reqid, body[3], body[4], urandom)
        return self._answer(T_STATUS, [reqid, S_UNSUPPORTED, mtype], urandom)

    def _answer(self, mtype, body, urandom):
        self.stats["responses"] += 1
        return [self._seal(mtype, body, urandom)[1]]

    def _interval(self, reqid, start, end, urandom):
        prof = self.profile
        k0, k1 = prof.span(start, end)
        if k0 >= k1:
            return self._answer(T_STATUS, [reqid, S_NO_DATA, prof.oldest_start()], urandom)
        parts = (k1 - k0 + MAX_ROWS - 1) // MAX_ROWS
        out = []
        for i in range(parts):
            a = k0 + i * MAX_ROWS
            b = min(k1, a + MAX_ROWS)
            out.append(self._seal(T_INTERVAL, [reqid, i, parts] + prof.part(a, b), urandom)[1])
        self.stats["responses"] += parts
        return out
