"""The head-end's configuration file (headend.toml, written by `provision
init`), as a frozen, self-checking value."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from headend.collect import CollectPolicy
from headend.errors import ConfigError
from shared import topics
from shared.hostmqtt import BrokerSettings

MAX_WORKERS = 16
# What every ingest process of a site subscribes to when [ingest] workers
# is more than 1: the head-end's uplinks as one shared subscription, so the
# broker hands each uplink to one of them (Mosquitto; amqtt has none).
SHARED_UPLINKS = tuple(f"$share/{topics.HEADEND}/{t}" for t in topics.HEADEND_SUBSCRIPTIONS)


@dataclass(frozen=True)
class HeadEndConfig:
    site: Path
    db: Path
    secret_key_file: Path
    broker: BrokerSettings
    retries: int = 2
    collect: CollectPolicy | None = None  # None: no scheduled collection
    workers: int = 1  # ingest processes sharing the uplinks (docs/scaling.md)

    def __post_init__(self) -> None:
        if not 0 <= self.retries <= 10:
            raise ConfigError("headend.toml: [requests] retries must be 0 to 10")
        if type(self.workers) is not int or not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"headend.toml: [ingest] workers must be 1 to {MAX_WORKERS}")

    @property
    def uplinks(self) -> tuple[str, ...]:
        """What an ingesting process subscribes to: with several workers,
        the shared subscription they split."""
        return SHARED_UPLINKS if self.workers > 1 else topics.HEADEND_SUBSCRIPTIONS

    @property
    def secret_key(self) -> bytes:
        try:
            raw = self.secret_key_file.read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read the head-end key {self.secret_key_file} ({e}); "
                              "run `python -m headend provision init` first") from e
        if len(raw) != 32:
            raise ConfigError(f"{self.secret_key_file} must hold 32 raw bytes; "
                              "it is damaged: restore it from backup")
        return raw

    @classmethod
    def load(cls, site: Path | str) -> HeadEndConfig:
        site = Path(site)
        path = site / "headend.toml"
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} not found: create the site with "
                              f"`python -m headend provision init --site {site}`") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
        try:
            broker = BrokerSettings.from_dict(data.get("broker", {}), base=site)
        except (ValueError, OSError) as e:
            raise ConfigError(f"{path} [broker]: {e}") from None
        col = dict(data.get("collect", {}))
        try:
            collect = CollectPolicy(**col) if col.pop("enabled", True) else None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{path} [collect]: {e}") from None
        return cls(
            site=site,
            db=site / data.get("db", "headend.db"),
            secret_key_file=site / data.get("secret_key_file", "headend.key"),
            broker=broker,
            retries=int(data.get("requests", {}).get("retries", 2)),
            collect=collect,
            workers=data.get("ingest", {}).get("workers", 1),
        )
