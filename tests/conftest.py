"""Shared pytest fixtures. Keep this file small: the logic lives in
tests/brokers.py (and other helper modules)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from headend.brokerconf import Account, Layout
from tests.brokers import KINDS, Broker, start_broker


@pytest.fixture(params=KINDS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    """Each test that uses it runs once per broker: "amqtt", "mosquitto"."""
    return str(request.param)


@pytest.fixture
def open_broker(broker_kind: str, tmp_path: Path) -> Iterator[Broker]:
    """An anonymous broker of that kind, stopped after the test."""
    broker = start_broker(broker_kind, tmp_path / "open-broker", anonymous=True)
    try:
        yield broker
    finally:
        broker.stop()


SecuredBrokerFactory = Callable[..., Broker]


@pytest.fixture
def secured_broker(broker_kind: str, tmp_path: Path) -> Iterator[SecuredBrokerFactory]:
    """secured_broker(layout, accounts=None) -> a broker of that kind with
    accounts and ACLs (accounts generated when None; see Broker.accounts).
    Every broker it started is stopped after the test."""
    started: list[Broker] = []

    def factory(layout: Layout, accounts: Iterable[Account] | None = None) -> Broker:
        workdir = tmp_path / f"secured-broker-{len(started)}"
        broker = start_broker(broker_kind, workdir, layout=layout, accounts=accounts,
                              anonymous=False)
        started.append(broker)
        return broker

    try:
        yield factory
    finally:
        for broker in started:
            broker.stop()
