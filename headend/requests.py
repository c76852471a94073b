"""Building read requests: on-demand and interval reads to one meter, and
group reads either fanned out by a DAP or sent per meter through it.

Sans-IO: each call returns the MQTT messages to publish and records the
request in the store; the service publishes, waits and retries.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from headend.errors import UnknownMeterError
from headend.store import MeterRow, Store
from shared import gateway, group, topics
from shared.backend import DEFAULT, Backend
from shared.channel import Channel
from shared.const import (
    DOWN,
    MAX_U32,
    NONCE_BYTES,
    T_READ_CURRENT,
    T_READ_INTERVAL,
)

# Seconds a meter has to answer, by flow (the seed: flow A a few seconds,
# flow B 15 to 30 s to the DAP). A request's deadline is its issue time plus
# its delay tolerance plus this.
BUDGET = {"A": 10, "B": 30}
# The longest delay tolerance a request may carry (about 18 h): it keeps a
# sealed on-demand request within 72 bytes.
MAX_TOLERANCE = 65535
GROUP_CHUNK = 1000  # members per group-request message


@dataclass(frozen=True)
class ReadSpec:
    """What to read: the current registers, or the interval rows in
    [start, end) (epoch seconds), with an optional delay tolerance."""

    kind: Literal["current", "interval"]
    start: int | None = None
    end: int | None = None
    tolerance: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("current", "interval"):
            raise ValueError(f"unknown read kind {self.kind!r}: use 'current' or 'interval'")
        if not 0 <= self.tolerance <= MAX_TOLERANCE:
            raise ValueError(f"tolerance is 0 to {MAX_TOLERANCE} seconds")
        if self.kind == "interval":
            if self.start is None or self.end is None or not 0 <= self.start < self.end <= MAX_U32:
                raise ValueError("an interval read needs --from before --to")
        elif self.start is not None or self.end is not None:
            raise ValueError("a current read takes no range")

    @property
    def mtype(self) -> int:
        return T_READ_CURRENT if self.kind == "current" else T_READ_INTERVAL

    def body(self, reqid: int, deadline: int) -> list[int]:
        body = [reqid, deadline, self.tolerance]
        if self.kind == "interval":
            body += [self.start, self.end]
        return body


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes


@dataclass(frozen=True)
class Issued:
    """A request as sent: its id, the meters it went to, and when each
    answer is due (epoch seconds)."""

    request: int
    meters: tuple[int, ...]
    due: float
    messages: tuple[Outgoing, ...]


class DownlinkCounter:
    """The head-end's downlink counter, shared by every process on the
    store. Each send reserves exactly the values it is about to use, in one
    transaction, and uses them at once: meters see the counter rise in time
    order even when several head-end processes send (a block reserved early
    and used late would land below another process's newer values, outside
    the meters' 64-wide windows)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._next = self._end = 0

    def reserve(self, n: int) -> None:
        self._next = self.store.reserve("downlink", n)
        self._end = self._next + n

    def next(self) -> int:
        if self._next >= self._end:
            raise RuntimeError("reserve downlink counters right before sealing with them")
        value = self._next
        self._next += 1
        return value


class BlockCounter:
    """A sequence shared by every process on the store, for values that only
    need to be unique (request ids): reserved in blocks, so none is ever
    handed out twice, even across crashes."""

    def __init__(self, store: Store, name: str, block: int = 256) -> None:
        self.store, self.name, self.block = store, name, block
        self._next = self._end = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            if self._next >= self._end:
                self._next = self.store.reserve(self.name, self.block)
                self._end = self._next + self.block
            value = self._next
            self._next += 1
            return value


class Requester:
    def __init__(self, store: Store, secret_key: bytes, backend: Backend = DEFAULT,
                 urandom=os.urandom, budget: dict[str, int] = BUDGET) -> None:
        self.budget = dict(budget)
        self.store = store
        self.secret_key = secret_key
        self.backend = backend
        self.urandom = urandom
        self.downlink = DownlinkCounter(store)
        self.request_ids = BlockCounter(store, "request")
        self._channels: dict[int, tuple[Channel, MeterRow]] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.RLock()  # one send at a time: reserve, then seal

    def _channel(self, meter: int) -> tuple[Channel, MeterRow]:
        with self._lock:
            got = self._channels.get(meter)
            if got is None:
                row = self.store.meter(meter)
                if row is None:
                    raise UnknownMeterError(
                        f"meter {meter} is not provisioned: run `python -m headend provision`")
                key = self.backend.beforenm(row.public_key, self.secret_key)
                got = self._channels[meter] = (
                    Channel(self.backend, key, meter, DOWN, self.downlink), row)
            return got

    def new_request_id(self) -> int:
        return self.request_ids.next() & MAX_U32

    def _sealed(self, meter: int, spec: ReadSpec, reqid: int, deadline: int) -> tuple[bytes, MeterRow]:
        ch, row = self._channel(meter)
        _, wire = ch.seal(spec.mtype, spec.body(reqid, deadline), self.urandom(NONCE_BYTES))
        return wire, row

    def _record(self, reqid: int, meters: list[int], spec: ReadSpec, flow: str,
                deadline: int, now: float) -> None:
        self.store.add_requests([
            (reqid, m, spec.kind, flow, spec.start, spec.end, spec.tolerance, deadline, now)
            for m in meters])

    def unicast(self, meter: int, spec: ReadSpec, now: float, reqid: int | None = None,
                kind_flow: str | None = None) -> Issued:
        """A read to one meter, by its registered path: straight to it
        (flow A) or through its DAP (flow B). Also used to re-send a request
        (same id, fresh counter and nonce)."""
        reqid = self.new_request_id() if reqid is None else reqid
        row = self._channel(meter)[1]
        flow = "A" if row.dap is None else "B"
        deadline = int(now) + spec.tolerance + self.budget[flow]
        with self._send_lock:
            self.downlink.reserve(1)
            wire, row = self._sealed(meter, spec, reqid, deadline)
        if row.dap is None:
            out = Outgoing(topics.meter_down(meter), wire)
        else:
            out = Outgoing(topics.dap_req(row.dap),
                           gateway.forward(self.backend, spec.tolerance, [wire]))
        self._record(reqid, [meter], spec, kind_flow or flow, deadline, now)
        return Issued(reqid, (meter,), deadline, (out,))

    def group_router(self, grp: int, spec: ReadSpec, now: float) -> Issued:
        """The same request to every member, one message each, through the
        members' DAPs acting as routers (and straight to direct members)."""
        members = self._members(grp)
        reqid = self.new_request_id()
        deadline = int(now) + spec.tolerance + self.budget["B"]
        out = []
        with self._send_lock:
            self.downlink.reserve(len(members))
            wires = [self._sealed(m, spec, reqid, deadline)[0] for m, _ in members]
        for (meter, dap), wire in zip(members, wires):
            if dap is None:
                out.append(Outgoing(topics.meter_down(meter), wire))
            else:
                out.append(Outgoing(topics.dap_req(dap),
                                    gateway.forward(self.backend, spec.tolerance, [wire])))
        self._record(reqid, [m for m, _ in members], spec, "group-router", deadline, now)
        return Issued(reqid, tuple(m for m, _ in members), deadline, tuple(out))

    def group_fanout(self, grp: int, spec: ReadSpec, now: float) -> Issued:
        """One group request per DAP (in chunks of GROUP_CHUNK members),
        which the DAP splits and delivers to every member. Members with no
        DAP get their own sealed copy."""
        members = self._members(grp)
        reqid = self.new_request_id()
        deadline = int(now) + spec.tolerance + self.budget["B"]
        by_dap: dict[int, list[int]] = defaultdict(list)
        direct = [m for m, dap in members if dap is None]
        for meter, dap in members:
            if dap is not None:
                by_dap[dap].append(meter)
        out = []
        with self._send_lock:
            self.downlink.reserve(len(direct) + 1)
            for meter in direct:
                wire, _ = self._sealed(meter, spec, reqid, deadline)
                out.append(Outgoing(topics.meter_down(meter), wire))
            ctr = self.downlink.next()
        body_fields = spec.body(reqid, deadline)
        for dap, meters in by_dap.items():
            for i in range(0, len(meters), GROUP_CHUNK):
                chunk = meters[i:i + GROUP_CHUNK]
                nonce = self.urandom(NONCE_BYTES)
                keyed = [(m, self._channel(m)[0].key) for m in chunk]
                body, entries = group.build(self.backend, grp, spec.mtype, ctr, body_fields,
                                            keyed, nonce)
                out.append(Outgoing(topics.dap_req(dap), gateway.group(
                    self.backend, spec.tolerance, grp, nonce, body, entries)))
        self._record(reqid, [m for m, _ in members], spec, "group-fanout", deadline, now)
        return Issued(reqid, tuple(m for m, _ in members), deadline, tuple(out))

    def _members(self, grp: int) -> list[tuple[int, int | None]]:
        members = self.store.group_members(grp)
        if not members:
            raise UnknownMeterError(
                f"group {grp} has no meters: provision meters with --group {grp}")
        return members
