"""The DAP's configuration: a TOML file (see dap/dap.example.toml, which
lists every option) read into frozen dataclasses that check themselves.

Every error names the file, the key and how to fix it. Relative paths
(state_dir, password_file, tls_ca) are taken from the config file's folder.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dap.errors import ConfigError
from shared.const import MAX_BUNDLE_ITEMS, MAX_ENVELOPE, MAX_GATEWAY_MSG, MAX_U32
from shared.hostmqtt import BrokerSettings

MODES = ("aggregate", "router")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
SYNC = ("full", "normal")
# Bytes a bundle adds around its envelopes: the CBOR array and its fields.
BUNDLE_OVERHEAD = 64
# Bytes CBOR adds to each envelope in a bundle (a byte-string header).
ITEM_OVERHEAD = 3
MIN_BUDGET = 64 * 1024


def _number(section: str, key: str, value: Any, lo: float, hi: float, example: str,
            *, lo_open: bool = False) -> float:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi)
    if not ok:
        low = f"above {lo:g}" if lo_open else f"at least {lo:g}"
        raise ConfigError(f"{section}{key} = {value!r}: must be a number {low} and at most "
                          f"{hi:g} (for example {key} = {example})")
    return float(value)


def _set(obj: object, name: str, value: Any) -> None:
    """Store a normalised value on a frozen dataclass during __post_init__."""
    object.__setattr__(obj, name, value)


def _integer(section: str, key: str, value: Any, lo: int, hi: int, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{section}{key} = {value!r}: must be a whole number from {lo} to "
                          f"{hi} (for example {key} = {example})")
    return value


def _choice(section: str, key: str, value: Any, choices: tuple[str, ...]) -> str:
    for c in choices:
        if isinstance(value, str) and value.lower() == c.lower():
            return c
    raise ConfigError(f"{section}{key} = {value!r}: must be one of "
                      + ", ".join(f'"{c}"' for c in choices))


@dataclass(frozen=True)
class AggregateSettings:
    """[aggregate]: when a bundle goes out (aggregate mode only)."""

    window: float = 10.0  # seconds from the first buffered envelope
    max_items: int = 1000  # envelopes per bundle
    max_bytes: int = 256 * 1024  # bytes of envelopes per bundle
    min_gap: float = 0.25  # seconds between two bundles that are not full (dap/aggregator.py)

    def __post_init__(self) -> None:
        _set(self, "window", _number("[aggregate] ", "window", self.window, 0, 3600, "10.0",
                                     lo_open=True))
        _set(self, "min_gap", _number("[aggregate] ", "min_gap", self.min_gap, 0, 60, "0.25"))
        if self.min_gap > self.window:  # never hold a bundle past its window
            _set(self, "min_gap", self.window)
        _integer("[aggregate] ", "max_items", self.max_items, 1, MAX_BUNDLE_ITEMS, "1000")
        _integer("[aggregate] ", "max_bytes", self.max_bytes, MAX_ENVELOPE + ITEM_OVERHEAD,
                 MAX_GATEWAY_MSG - BUNDLE_OVERHEAD, "262144")


@dataclass(frozen=True)
class QueueSettings:
    """[queue]: the disk queue in state_dir."""

    disk_budget_bytes: int = 256 * 1024 * 1024
    warn_fraction: float = 0.8
    drain_rate: float = 10.0  # bundles per second when re-sending a backlog
    ack_timeout: float = 30.0  # seconds before an unacknowledged bundle is re-sent
    sync: str = "full"  # "full": survives a power cut; "normal": survives a crash

    def __post_init__(self) -> None:
        _integer("[queue] ", "disk_budget_bytes", self.disk_budget_bytes, MIN_BUDGET,
                 1 << 50, "268435456")
        q = "[queue] "
        _set(self, "warn_fraction", _number(q, "warn_fraction", self.warn_fraction, 0, 1, "0.8",
                                            lo_open=True))
        _set(self, "drain_rate", _number(q, "drain_rate", self.drain_rate, 0, 100000, "10",
                                         lo_open=True))
        _set(self, "ack_timeout", _number(q, "ack_timeout", self.ack_timeout, 0.5, 86400, "30"))
        _set(self, "sync", _choice(q, "sync", self.sync, SYNC))


@dataclass(frozen=True)
class LogSettings:
    """[log]"""

    level: str = "INFO"
    stats_interval: float = 60.0  # seconds between status messages and summary lines

    def __post_init__(self) -> None:
        _set(self, "level", _choice("[log] ", "level", self.level, LEVELS))
        _set(self, "stats_interval", _number("[log] ", "stats_interval", self.stats_interval,
                                             0.1, 86400, "60"))


@dataclass(frozen=True)
class Config:
    """The whole file. `headend_broker` None: one connection (to
    meters_broker) serves the meters and the head-end."""

    dap: int
    state_dir: Path
    meters_broker: BrokerSettings
    mode: str = "aggregate"
    headend_broker: BrokerSettings | None = None
    aggregate: AggregateSettings = field(default_factory=AggregateSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    log: LogSettings = field(default_factory=LogSettings)

    def __post_init__(self) -> None:
        _integer("", "dap", self.dap, 0, MAX_U32, "1")
        _set(self, "mode", _choice("", "mode", self.mode, MODES))
        if not isinstance(self.state_dir, Path) or not str(self.state_dir):
            raise ConfigError(f"state_dir = {self.state_dir!r}: must be a folder path "
                              '(for example state_dir = "/var/lib/meter-dap")')
        if self.queue.disk_budget_bytes < self.aggregate.max_bytes:
            raise ConfigError(
                f"[queue] disk_budget_bytes = {self.queue.disk_budget_bytes} is below "
                f"[aggregate] max_bytes = {self.aggregate.max_bytes}: the queue must hold at "
                "least one full bundle; raise the budget or lower max_bytes")

    @property
    def name(self) -> str:
        return f"d{self.dap}"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "queue.sqlite3"

    def warnings(self) -> list[str]:
        """Things that work but are probably not what was meant."""
        out = []
        for key, b in (("meters_broker", self.meters_broker),
                       ("headend_broker", self.headend_broker)):
            if b is not None and b.username is not None and b.username != self.name:
                out.append(f"[{key}] username = {b.username!r}: the broker ACLs grant this "
                           f"DAP's topics to the account {self.name!r}")
        return out

    # -- loading ---------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Config:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file; copy dap/dap.example.toml there "
                              "and set dap, state_dir and [meters_broker]") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        try:
            return cls.from_dict(data, path.resolve().parent)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: Path | None = None) -> Config:
        """From the parsed TOML; relative paths are taken from `base`."""
        base = base or Path.cwd()
        _known("", d, {"dap", "mode", "state_dir", "meters_broker", "headend_broker",
                       "aggregate", "queue", "log"})
        for key, fix in _REQUIRED.items():
            if key not in d:
                raise ConfigError(f"{key} is missing: {fix}")
        state = d["state_dir"]
        if not isinstance(state, str) or not state:
            raise ConfigError(f"state_dir = {state!r}: must be a folder path "
                              '(for example state_dir = "/var/lib/meter-dap")')
        state_dir = Path(state).expanduser()
        if not state_dir.is_absolute():
            state_dir = base / state_dir
        up = d.get("headend_broker")
        return cls(
            dap=d["dap"],
            mode=d.get("mode", "aggregate"),
            state_dir=state_dir,
            meters_broker=_broker("meters_broker", d["meters_broker"], base),
            headend_broker=None if up is None else _broker("headend_broker", up, base),
            aggregate=AggregateSettings(**_table("aggregate", d, AggregateSettings)),
            queue=QueueSettings(**_table("queue", d, QueueSettings)),
            log=LogSettings(**_table("log", d, LogSettings)),
        )


_REQUIRED = {
    "dap": "set dap = <this DAP's id>, the number in its account name d<id>",
    "state_dir": 'set state_dir = "/var/lib/meter-dap" (the disk queue lives there)',
    "meters_broker": 'add a [meters_broker] table with host = "..." and port = 1883',
}


def _known(section: str, d: dict[str, Any], known: set[str]) -> None:
    for key in d:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else \
                "known keys: " + ", ".join(sorted(known))
            where = f"[{section}] " if section else ""
            raise ConfigError(f"{where}unknown key {key!r}: {hint}")


def _table(name: str, d: dict[str, Any], cls: type) -> dict[str, Any]:
    t = d.get(name, {})
    if not isinstance(t, dict):
        raise ConfigError(f"{name} must be a table: write [{name}] on a line of its own")
    _known(name, t, {f.name for f in fields(cls)})
    return t


def _broker(name: str, t: Any, base: Path) -> BrokerSettings:
    if not isinstance(t, dict):
        raise ConfigError(f"{name} must be a table: write [{name}] and its keys below it")
    for key, kind in (("host", str), ("username", str), ("password", str),
                      ("password_file", str), ("tls_ca", str), ("port", int),
                      ("keepalive", int)):
        if key in t and (not isinstance(t[key], kind) or isinstance(t[key], bool)):
            raise ConfigError(f"[{name}] {key} = {t[key]!r}: must be a "
                              + ("whole number" if kind is int else "string"))
    try:
        return BrokerSettings.from_dict(t, base)
    except OSError as e:
        raise ConfigError(f"[{name}] password_file: cannot read {e.filename} "
                          f"({e.strerror})") from None
    except ValueError as e:
        raise ConfigError(f"[{name}] {e}") from None
