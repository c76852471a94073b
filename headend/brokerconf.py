"""Broker accounts and access rules, defined once, written out for Mosquitto
and for the embedded amqtt broker.

`permissions(layout)` is the single statement of who may publish and
subscribe where; `write_mosquitto` and `write_amqtt` only translate it. The
functions do no I/O beyond writing the files they are asked for. Password
files are written 0600 and hold only salted hashes: the plaintext secrets
live in the provisioning records of each device, never in a broker file.

docs/brokers.md explains every broker setting written here and why.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared import topics
from shared.const import MAX_GATEWAY_MSG, MAX_U32

__all__ = [
    "Account",
    "Layout",
    "TlsFiles",
    "Permissions",
    "permissions",
    "generate_accounts",
    "mosquitto_hash",
    "write_mosquitto",
    "write_amqtt",
    "MOSQUITTO_PBKDF2_ITERATIONS",
    "AMQTT_ARGON2",
    "SHARE_FILTER",
]

# username -> (publish filters, subscribe filters)
Permissions = dict[str, tuple[tuple[str, ...], tuple[str, ...]]]

# The head-end's shared subscription for scale-out (Mosquitto only): several
# head-end processes split the uplinks of `+/up` between them.
SHARE_FILTER = "$share/+/+/up"

# Mosquitto's own default for `mosquitto_passwd` (2.0.x). The secrets are
# random 32-byte values, so stretching buys nothing; the broker pays this
# cost on every CONNECT.
MOSQUITTO_PBKDF2_ITERATIONS = 101
_MOSQUITTO_SALT_BYTES = 12

# argon2id cost for amqtt's FileAuthPlugin: the minimum that argon2 allows
# for one lane. amqtt verifies passwords on its event loop, so every CONNECT
# stalls the whole broker for the time of one verification (the library
# default, m=64 MiB t=3, costs ~160 ms: a reconnect storm of 10,000 meters
# would stall it for half an hour).
AMQTT_ARGON2 = {"time_cost": 1, "memory_cost": 64, "parallelism": 1}

# Queue limits. A QoS 1 message to a subscriber that is slow or offline with
# a persistent session waits in its queue; Mosquitto's default of 1,000
# drops the rest silently. The bound below is about 2 GiB of readings at
# ~1 KiB each for one subscriber, which is the broker's memory to plan for.
MAX_QUEUED_MESSAGES = 2_000_000
MAX_INFLIGHT_MESSAGES = 100
# The largest MQTT packet: the protocol's largest payload (a DAP bundle or a
# group request) plus room for the fixed header, topic and packet id.
MAX_PACKET_SIZE = MAX_GATEWAY_MSG + 4096

_FORBIDDEN_IN_NAMES = set("+#/:-$%")


def _check_name(name: object, what: str = "username") -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty string, not {name!r}")
    if not name.isascii() or not name.isprintable() or " " in name:
        raise ValueError(f"{what} {name!r} must be printable ASCII without spaces")
    bad = sorted(_FORBIDDEN_IN_NAMES.intersection(name))
    if bad:
        raise ValueError(
            f"{what} {name!r} contains {''.join(bad)!r}: '+' and '#' are MQTT wildcards, "
            "'/' would reach into other topics through the %u ACL patterns, ':' separates "
            "the password file fields, '-' separates a client id suffix, '$' and '%' are "
            "reserved by the brokers"
        )
    if len(name) > 64:
        raise ValueError(f"{what} {name!r} is longer than 64 characters")
    return name


def _check_id(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_U32:
        raise ValueError(f"{what} must be an integer in 0..{MAX_U32}, not {value!r}")
    return value


@dataclass(frozen=True)
class Account:
    """One broker login. `password` never appears in repr()."""

    username: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        _check_name(self.username)
        p = self.password
        if not isinstance(p, str) or not p:
            raise ValueError(f"account {self.username}: password must be a non-empty string")
        if not p.isascii() or not p.isprintable() or len(p) > 256:
            raise ValueError(
                f"account {self.username}: password must be at most 256 printable ASCII characters"
            )

    @classmethod
    def generate(cls, username: str) -> Account:
        """A fresh account with a random 32-byte secret (base64url, 43 chars)."""
        return cls(username, secrets.token_urlsafe(32))


@dataclass(frozen=True)
class Layout:
    """Who exists: meters as (meter id, DAP id or None for flow A), and DAPs.
    The head-end ("headend") always exists."""

    meters: tuple[tuple[int, int | None], ...] = ()
    daps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        try:
            meters = tuple((m, d) for m, d in self.meters)
            daps = tuple(self.daps)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"layout: meters must be (meter id, DAP id or None) pairs: {exc}") from exc
        object.__setattr__(self, "meters", meters)
        object.__setattr__(self, "daps", daps)
        for d in daps:
            _check_id(d, "DAP id")
        if len(set(daps)) != len(daps):
            raise ValueError("a DAP id appears twice in the layout")
        known = set(daps)
        seen: set[int] = set()
        for meter, dap in meters:
            _check_id(meter, "meter id")
            if meter in seen:
                raise ValueError(f"meter {meter} appears twice in the layout")
            seen.add(meter)
            if dap is not None:
                _check_id(dap, "DAP id")
                if dap not in known:
                    raise ValueError(f"meter {meter} is behind DAP {dap}, which is not in the layout")

    def names(self) -> tuple[str, ...]:
        """Every account name of the layout: meters, DAPs, then the head-end."""
        return (
            tuple(topics.meter_name(m) for m, _ in self.meters)
            + tuple(topics.dap_name(d) for d in self.daps)
            + (topics.HEADEND,)
        )


@dataclass(frozen=True)
class TlsFiles:
    """A TLS listener on `port` (on `host`, or the plain listener's host when
    None). With `cafile`, client certificates signed by that CA are checked;
    `require_certificate` makes one mandatory (Mosquitto only: amqtt cannot)."""

    certfile: Path
    keyfile: Path
    port: int
    cafile: Path | None = None
    require_certificate: bool = False
    host: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "certfile", Path(self.certfile))
        object.__setattr__(self, "keyfile", Path(self.keyfile))
        if self.cafile is not None:
            object.__setattr__(self, "cafile", Path(self.cafile))
        _check_port(self.port)
        if self.require_certificate and self.cafile is None:
            raise ValueError("require_certificate needs a cafile to check client certificates with")


def _check_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be an integer in 1..65535, not {port!r}")
    return port


def permissions(layout: Layout) -> Permissions:
    """username -> (publish filters, subscribe filters). Everything not
    listed is refused. This is the product's access model; both brokers'
    files are generated from it and nothing else."""
    out: Permissions = {}
    for meter, dap in layout.meters:
        out[topics.meter_name(meter)] = (
            (topics.meter_up(meter, dap),),
            (topics.meter_down(meter, dap),),
        )
    for dap in layout.daps:
        name = topics.dap_name(dap)
        out[name] = (
            (f"{name}/+/down", topics.dap_up(dap), topics.dap_state(dap)),
            (topics.dap_meters_up(dap), topics.dap_req(dap), topics.dap_ack(dap)),
        )
    out[topics.HEADEND] = (
        ("+/down", "+/req", "+/ack"),
        ("+/up", "+/state", SHARE_FILTER),
    )
    return out


def generate_accounts(layout: Layout) -> tuple[Account, ...]:
    """A fresh random account for every name of the layout."""
    return tuple(Account.generate(n) for n in layout.names())


def mosquitto_hash(password: str, *, salt: bytes | None = None,
                   iterations: int = MOSQUITTO_PBKDF2_ITERATIONS) -> str:
    """A Mosquitto 2.x password hash, exactly as `mosquitto_passwd` writes
    it: $7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512>."""
    salt = secrets.token_bytes(_MOSQUITTO_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return "$7$%d$%s$%s" % (
        iterations,
        base64.b64encode(salt).decode(),
        base64.b64encode(digest).decode(),
    )


def _accounts_for(layout: Layout, accounts: Iterable[Account], anonymous: bool) -> dict[str, Account]:
    by_name: dict[str, Account] = {}
    for a in accounts:
        if not isinstance(a, Account):
            raise TypeError(f"accounts must be Account objects, not {type(a).__name__}")
        if a.username in by_name:
            raise ValueError(f"two accounts for {a.username}")
        by_name[a.username] = a
    if anonymous:
        return by_name
    names = set(layout.names())
    missing = sorted(names - set(by_name))
    if missing:
        raise ValueError(f"no account for {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    extra = sorted(set(by_name) - names)
    if extra:
        raise ValueError(
            f"accounts without a place in the layout: {', '.join(extra[:5])}"
            + (" ..." if len(extra) > 5 else "")
        )
    return by_name


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only, created so from the start."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _write_public(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="ascii")
    os.replace(tmp, path)


def _conf_path(path: Path) -> str:
    """An absolute path for a broker config line; a control character (a
    newline, say) would start a config line of its own."""
    text = str(Path(path).resolve())
    if any(not c.isprintable() for c in text):
        raise ValueError(f"path {text!r} contains a control character")
    return text


def _check_host(host: object) -> str:
    if not isinstance(host, str) or not host or any(c.isspace() for c in host):
        raise ValueError(f"host must be a non-empty address without spaces, not {host!r}")
    return host


def _mosquitto_acl(perms: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]],
                   flow_a: set[str]) -> str:
    lines = [
        "# Generated by headend.brokerconf from permissions(); regenerate, do not edit.",
        "# Mosquitto 2.0 checks 'write' on every PUBLISH and when it sends a Will, and",
        "# 'read' on every delivery, retained messages included (it grants every",
        "# SUBSCRIBE). Anything not granted here is refused. '$share/<group>/...'",
        "# subscriptions need no line: the read check on each message applies.",
        "#",
        "# Flow-A meters: a meter may publish its uplink and read its downlink.",
        "# These patterns apply to every account; the 'deny' lines below take the",
        "# grant back from accounts that are not flow-A meters.",
        "pattern write %u/up",
        "pattern read %u/down",
    ]
    for name in sorted(perms):
        if name in flow_a:
            continue
        pub, sub = perms[name]
        lines.append("")
        lines.append(f"user {name}")
        for t in (f"{name}/up", f"{name}/down"):
            if t not in pub and t not in sub:
                lines.append(f"topic deny {t}")
        for t in pub:
            lines.append(f"topic write {t}")
        for t in sub:
            if not t.startswith("$share/"):
                lines.append(f"topic read {t}")
    return "\n".join(lines) + "\n"


def write_mosquitto(
    directory: Path,
    *,
    layout: Layout,
    accounts: Iterable[Account],
    port: int,
    host: str = "127.0.0.1",
    persistence: Path | None = None,
    tls: TlsFiles | None = None,
    anonymous: bool = False,
) -> Path:
    """Write mosquitto.conf, passwd (0600) and acl into `directory`; return
    the path of mosquitto.conf. With `anonymous=True` the broker is open
    (no passwd, no acl): only for tests and benchmarks that say so."""
    directory = Path(directory).resolve()
    _check_port(port)
    _check_host(host)
    by_name = _accounts_for(layout, accounts, anonymous)
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "mosquitto.conf"
    lines = [
        "# Generated by headend.brokerconf.write_mosquitto; docs/brokers.md explains",
        "# every setting. Regenerate rather than edit.",
        "per_listener_settings false",
        f"allow_anonymous {'true' if anonymous else 'false'}",
        # The broker must run as the account that owns the 0600 files below.
        # Run as root, Mosquitto would otherwise drop to 'mosquitto' or 'nobody'.
        f"user {_current_user()}",
        "",
        "# Queues: QoS 1 messages for a slow or offline persistent subscriber.",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        "max_queued_bytes 0",
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
        "max_inflight_bytes 0",
        "queue_qos0_messages false",
        f"max_packet_size {MAX_PACKET_SIZE}",
        "retain_available true",
        "check_retain_source true",
        "set_tcp_nodelay true",
        "",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "log_timestamp true",
        "connection_messages true",
        "",
    ]
    if persistence is not None:
        p = Path(persistence).resolve()
        p.mkdir(parents=True, exist_ok=True)
        lines += [
            "persistence true",
            f"persistence_location {_conf_path(p)}/",
            "persistence_file mosquitto.db",
            "autosave_interval 10",
            "",
        ]
    else:
        lines += ["persistence false", ""]
    if not anonymous:
        passwd = directory / "passwd"
        acl = directory / "acl"
        _write_private(
            passwd,
            "".join(f"{n}:{mosquitto_hash(by_name[n].password)}\n" for n in sorted(by_name)),
        )
        perms = permissions(layout)
        flow_a = {topics.meter_name(m) for m, d in layout.meters if d is None}
        _write_public(acl, _mosquitto_acl(perms, flow_a))
        lines += [f"password_file {_conf_path(passwd)}", f"acl_file {_conf_path(acl)}", ""]
    lines += [f"listener {port} {host}", "protocol mqtt", ""]
    if tls is not None:
        lines += [
            f"listener {tls.port} {tls.host or host}",
            "protocol mqtt",
            f"certfile {_conf_path(tls.certfile)}",
            f"keyfile {_conf_path(tls.keyfile)}",
            "tls_version tlsv1.2",
        ]
        if tls.cafile is not None:
            lines.append(f"cafile {_conf_path(tls.cafile)}")
        lines.append(f"require_certificate {'true' if tls.require_certificate else 'false'}")
        lines.append("")
    _write_public(conf, "\n".join(lines))
    return conf


def _current_user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid without a passwd entry (some containers)
        return str(os.geteuid())


def _amqtt_acls(perms: Permissions) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    publish = {n: list(p) for n, (p, _) in sorted(perms.items())}
    # amqtt has no shared subscriptions: a '$share/...' filter would be a
    # literal topic there, so it is left out.
    subscribe = {
        n: [f for f in s if not f.startswith("$share/")] for n, (_, s) in sorted(perms.items())
    }
    for n, p in publish.items():
        if not p or not subscribe[n]:
            # amqtt lets everything through for an empty publish-acl; never write one.
            raise ValueError(f"{n} has an empty publish or subscribe list")
    return publish, subscribe


def write_amqtt(
    directory: Path,
    *,
    layout: Layout,
    accounts: Iterable[Account],
    port: int,
    host: str = "127.0.0.1",
    tls: TlsFiles | None = None,
    anonymous: bool = False,
) -> Path:
    """Write amqtt.json (a config for headend.broker) and, unless
    `anonymous`, its password file amqtt.passwd (0600); return the config
    path. JSON is also YAML, so `amqtt -c` reads it too (without our guard
    against session hijacking: use `python -m headend.broker`)."""
    directory = Path(directory).resolve()
    _check_port(port)
    _check_host(host)
    by_name = _accounts_for(layout, accounts, anonymous)
    directory.mkdir(parents=True, exist_ok=True)
    listeners: dict[str, dict[str, object]] = {
        "default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0},
    }
    if tls is not None:
        if tls.require_certificate:
            raise ValueError(
                "amqtt cannot require client certificates (it only ever asks for one "
                "optionally); use Mosquitto for that deployment"
            )
        tl: dict[str, object] = {
            "type": "tcp",
            "bind": f"{tls.host or host}:{tls.port}",
            "max_connections": 0,
            "ssl": True,
            "certfile": str(Path(tls.certfile).resolve()),
            "keyfile": str(Path(tls.keyfile).resolve()),
        }
        if tls.cafile is not None:
            tl["cafile"] = str(Path(tls.cafile).resolve())
        listeners["tls"] = tl
    guard = "headend.amqtt_plugins.SessionGuardPlugin"
    plugins: dict[str, object]
    if anonymous:
        # Not amqtt's AnonymousAuthPlugin: its sessions lose their offline queue.
        plugins = {guard: {"bind_client_id": False, "accept_all": True}}
    else:
        from argon2 import PasswordHasher

        hasher = PasswordHasher(**AMQTT_ARGON2)
        passwd = directory / "amqtt.passwd"
        _write_private(
            passwd,
            "".join(f"{n}:{hasher.hash(by_name[n].password)}\n" for n in sorted(by_name)),
        )
        publish, subscribe = _amqtt_acls(permissions(layout))
        plugins = {
            guard: {"bind_client_id": True, "publish_acl": publish},
            "amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(passwd)},
            # 'acl' is amqtt 0.12's name for the subscribe ACL in this config
            # style ('subscribe-acl' and 'receive-acl' exist only in the
            # deprecated 'topic-check' section).
            "amqtt.plugins.topic_checking.TopicAccessControlListPlugin": {
                "publish_acl": publish,
                "acl": subscribe,
            },
        }
    config = {
        "listeners": listeners,
        "timeout_disconnect_delay": 0,
        "plugins": plugins,
    }
    path = directory / "amqtt.json"
    _write_public(path, json.dumps(config, indent=2, sort_keys=False) + "\n")
    return path
