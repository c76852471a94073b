"""Provisioning: create identities and keys, and write every file a
deployment needs.

    site/headend.toml, headend.key (0600), headend.pass (0600), headend.db
    site/daps/d<id>/dap.toml, password (0600)
    site/meters/m<id>/meter.json (0600: holds the meter's secret key)
    site/broker/...  Mosquitto and amqtt files with the accounts and ACLs

Keys are generated here, at provisioning time; a secret never goes to
stdout or into git. Each meter's secret key is written only into its own
meter.json, which goes onto the board; the registry keeps public keys.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from nacl.public import PrivateKey

from headend import brokerconf
from headend.config import HeadEndConfig
from headend.errors import ConfigError
from headend.store import Store
from shared import topics

DAP_DEFAULTS = {"window": 10.0, "max_items": 500, "max_bytes": 262144}


def _private(path: Path, data: str | bytes) -> None:
    """Create a file only its owner can read (0600 from the start)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(path, 0o600)


def _public(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _password() -> str:
    return secrets.token_urlsafe(32)


def init(site: Path, *, host: str = "127.0.0.1", port: int = 1883,
         tls_ca: Path | None = None) -> HeadEndConfig:
    """Create a site: the head-end's key pair, its broker account, its
    config and an empty store."""
    site = Path(site)
    if (site / "headend.toml").exists():
        raise ConfigError(f"{site} already holds a site; use another --site, or add DAPs and "
                          "meters to it with `provision dap` / `provision meters`")
    site.mkdir(parents=True, exist_ok=True)
    sk = PrivateKey.generate()
    _private(site / "headend.key", bytes(sk))
    _public(site / "headend.pub", bytes(sk.public_key).hex() + "\n")
    _private(site / "headend.pass", _password())
    broker = [f'host = "{host}"', f"port = {port}", f'username = "{topics.HEADEND}"',
              'password_file = "headend.pass"']
    if tls_ca is not None:
        broker.append(f'tls_ca = "{Path(tls_ca).resolve()}"')
    _public(site / "headend.toml", "\n".join([
        "# The head-end's configuration, written by `python -m headend provision init`.",
        'db = "headend.db"                 # SQLite store (WAL mode)',
        'secret_key_file = "headend.key"   # X25519 secret key, 0600',
        "",
        "[broker]",
        *broker,
        "",
        "[requests]",
        "retries = 2                       # re-sends of an unanswered request",
        "",
        "[ingest]",
        "workers = 1                       # > 1: `serve --worker K` for K = 1..workers-1 as",
        "                                  # well; a shared subscription (Mosquitto only)",
        "",
        "[collect]                         # routine collection and gap re-reads (serve)",
        "enabled = true",
        "every = 3600.0                    # look at each meter at least this often, s",
        "settle = 120                      # expect an interval this long after it closed, s",
        "backfill = 86400                  # history expected from a newly seen meter, s",
        "backoff = 300.0                   # first wait after a failed read (doubles), s",
        "backoff_max = 21600.0",
        "daily_budget = 48                 # collection reads per meter per day",
        "max_span = 172800                 # longest range in one request, s",
        "",
    ]))
    Store(site / "headend.db").close()
    write_broker_files(site)
    return HeadEndConfig.load(site)


def _broker_table(cfg: HeadEndConfig, username: str, password_file: str) -> list[str]:
    lines = [f'host = "{cfg.broker.host}"', f"port = {cfg.broker.port}",
             f'username = "{username}"', f'password_file = "{password_file}"']
    if cfg.broker.tls_ca is not None:
        lines.append(f'tls_ca = "{cfg.broker.tls_ca}"')
    return lines


def add_dap(site: Path, dap: int, mode: str, operator: str = "utility") -> Path:
    """Register a DAP and write its config; returns the config path."""
    cfg = HeadEndConfig.load(site)
    if mode not in ("aggregate", "router"):
        raise ConfigError(f"DAP mode {mode!r}: use 'aggregate' or 'router'")
    if operator != "utility" and mode != "router":
        raise ConfigError("a third-party DAP must run in router mode (it may not aggregate)")
    store = Store(cfg.db)
    try:
        if dap in store.daps():
            raise ConfigError(f"DAP {dap} is already provisioned")
        store.add_dap(dap, mode, operator)
    finally:
        store.close()
    name = topics.dap_name(dap)
    home = Path(site) / "daps" / name
    _private(home / "password", _password())
    agg = [f"{k} = {v}" for k, v in DAP_DEFAULTS.items()]
    _public(home / "dap.toml", "\n".join([
        f"# DAP {dap} ({operator}), written by `python -m headend provision dap`.",
        "# Every option is described in dap/dap.example.toml.",
        f"dap = {dap}",
        f'mode = "{mode}"',
        'state_dir = "state"',
        "",
        "[meters_broker]",
        *_broker_table(cfg, name, "password"),
        "",
        "[aggregate]",
        *agg,
        "",
    ]))
    write_broker_files(site)
    return home / "dap.toml"


def parse_ids(spec: str) -> list[int]:
    """'1001-1020,1050' -> [1001, ..., 1020, 1050]."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo or hi - lo > 100_000:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ConfigError(f"meter ids {spec!r}: write them like 1001-1020,1050") from None
    if any(not 0 < i <= 0xFFFFFFFF for i in out) or len(set(out)) != len(out):
        raise ConfigError(f"meter ids {spec!r}: each must be 1 to 4294967295, once")
    return out


def add_meters(site: Path, ids: list[int], *, dap: int | None = None,
               group: int | None = None, period: int = 900,
               wifi: tuple[str, str] | None = None) -> list[Path]:
    """Create key pairs for these meters, register their public keys and
    write each meter.json; returns their paths."""
    cfg = HeadEndConfig.load(site)
    if 86400 % period:
        raise ConfigError("--period must divide a day evenly (900 for 15 minutes)")
    headend_pk = (Path(site) / "headend.pub").read_text().strip()
    store = Store(cfg.db)
    paths = []
    try:
        if dap is not None and dap not in store.daps():
            raise ConfigError(f"DAP {dap} is not provisioned: run `provision dap --id {dap}` first")
        known = {m.meter for m in store.meters()}
        taken = [i for i in ids if i in known]
        if taken:
            raise ConfigError(f"meter(s) {taken[:5]} already provisioned")
        rows = []
        for meter in ids:
            sk = PrivateKey.generate()
            rows.append((meter, bytes(sk.public_key), dap, group, period))
            doc = {
                "meter": meter,
                "secret_key": bytes(sk).hex(),
                "headend_public_key": headend_pk,
                "dap": dap,
                "group": group,
                "period": period,
                "broker": {
                    "host": cfg.broker.host,
                    "port": cfg.broker.port,
                    "username": topics.meter_name(meter),
                    "password": _password(),
                    "tls": cfg.broker.tls_ca is not None,
                    "ca": "ca.pem" if cfg.broker.tls_ca is not None else None,
                },
            }
            if wifi is not None:
                doc["wifi"] = {"ssid": wifi[0], "password": wifi[1]}
            path = Path(site) / "meters" / topics.meter_name(meter) / "meter.json"
            _private(path, json.dumps(doc, indent=1) + "\n")
            if cfg.broker.tls_ca is not None:  # the CA goes onto the board with meter.json
                _public(path.parent / "ca.pem", Path(cfg.broker.tls_ca).read_text())
            paths.append(path)
        store.add_meters(rows)
    finally:
        store.close()
    write_broker_files(site)
    return paths


def accounts(site: Path) -> list[brokerconf.Account]:
    """Every account of the site, read from the devices' own files (the only
    place the passwords are kept)."""
    site = Path(site)
    out = [brokerconf.Account(topics.HEADEND, (site / "headend.pass").read_text().strip())]
    for p in sorted((site / "daps").glob("d*/password")):
        out.append(brokerconf.Account(p.parent.name, p.read_text().strip()))
    for p in sorted((site / "meters").glob("m*/meter.json")):
        doc = json.loads(p.read_text())
        out.append(brokerconf.Account(doc["broker"]["username"], doc["broker"]["password"]))
    return out


def layout(site: Path) -> brokerconf.Layout:
    store = Store(Path(site) / "headend.db")
    try:
        return brokerconf.Layout(meters=tuple((m.meter, m.dap) for m in store.meters()),
                                 daps=tuple(sorted(store.daps())))
    finally:
        store.close()


def write_broker_files(site: Path, port: int | None = None) -> dict[str, Path]:
    """(Re)write the Mosquitto and amqtt files for the whole site."""
    cfg = HeadEndConfig.load(site) if (Path(site) / "headend.toml").exists() else None
    port = port or (cfg.broker.port if cfg else 1883)
    lay, accts = layout(site), accounts(site)
    out = Path(site) / "broker"
    return {
        "mosquitto": brokerconf.write_mosquitto(out / "mosquitto", layout=lay, accounts=accts,
                                                port=port, persistence=out / "mosquitto" / "data"),
        "amqtt": brokerconf.write_amqtt(out / "amqtt", layout=lay, accounts=accts, port=port),
    }
