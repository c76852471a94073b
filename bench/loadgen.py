"""Pre-sealed load: valid meter responses made ahead of time, so that the
load generator costs (almost) nothing while a measurement runs.

Each meter's envelopes are sealed by a meter-side Channel with the meter's
real pairwise key (as provisioned in a bench.common.Site), with increasing
counters and reading times, so the head-end accepts and stores every one.
"""

from __future__ import annotations

import os

from bench.common import Site
from shared import gateway, topics
from shared.backend import NATIVE
from shared.channel import Channel
from shared.const import T_CURRENT, UP
from tests.dap_helpers import Counter

T0 = 1767229200


class Sealer:
    def __init__(self, site: Site, meters: list[int], counter_base: int = 1000) -> None:
        self.chans = {m: Channel(NATIVE, NATIVE.beforenm(site.public_key, site.meter_secret[m]),
                                 m, UP, Counter(counter_base)) for m in meters}
        self.meters = meters
        self.round = 0

    def current_rounds(self, rounds: int) -> list[tuple[int, bytes]]:
        """(meter, envelope) for `rounds` current readings of every meter,
        round-major (every meter once, then again)."""
        out = []
        for _ in range(rounds):
            r = self.round
            self.round += 1
            for m in self.meters:
                body = [r, T0 + 900 * r, [1, 3304512 + r * 41 + m, 2, m % 5, 3, 412 + r % 97,
                                          4, 2301]]
                out.append((m, self.chans[m].seal(T_CURRENT, body, os.urandom(24))[1]))
        return out


def uplinks(items: list[tuple[int, bytes]], dap: int) -> list[tuple[str, bytes]]:
    """As the meters publish them: d<dap>/m<id>/up."""
    return [(topics.meter_up(m, dap), env) for m, env in items]


def bundles(items: list[tuple[int, bytes]], dap: int, size: int = 500,
            seq0: int = 1) -> list[tuple[str, bytes]]:
    """As an aggregating DAP sends them: CBOR bundles on d<dap>/up."""
    envs = [e for _, e in items]
    return [(topics.dap_up(dap), gateway.bundle(NATIVE, dap, seq0 + i // size,
                                                envs[i:i + size]))
            for i in range(0, len(envs), size)]
