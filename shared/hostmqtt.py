"""MQTT connection settings and a configured paho-mqtt 2.x client, for the
roles that run on CPython (DAP, head-end, host simulation). Not part of the
meter firmware: MicroPython never imports this module."""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


class MqttSetupError(Exception):
    """The broker could not be reached, or refused the connection."""


@dataclass(frozen=True)
class BrokerSettings:
    """Where and how to connect. `tls_ca` turns TLS on (server verified
    against that CA file)."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    keepalive: int = 30

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("broker host is empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"broker port {self.port} is not 1 to 65535")
        if not 5 <= self.keepalive <= 3600:
            raise ValueError("keepalive is 5 to 3600 seconds")
        if self.tls_ca is not None and not Path(self.tls_ca).is_file():
            raise ValueError(f"TLS CA file {self.tls_ca} does not exist: see docs/brokers.md")

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: Path | None = None) -> BrokerSettings:
        """From a TOML/JSON table: host, port, username, password,
        password_file (read and stripped), tls_ca, keepalive."""
        known = {"host", "port", "username", "password", "password_file", "tls_ca", "keepalive"}
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown broker setting(s): {', '.join(sorted(extra))}")
        password = d.get("password")
        if d.get("password_file"):
            p = Path(d["password_file"])
            if base is not None and not p.is_absolute():
                p = base / p
            password = p.read_text().strip()
        ca = d.get("tls_ca")
        if ca and base is not None and not Path(ca).is_absolute():
            ca = base / ca
        return cls(host=d.get("host", "127.0.0.1"), port=int(d.get("port", 1883)),
                   username=d.get("username"), password=password,
                   tls_ca=Path(ca) if ca else None, keepalive=int(d.get("keepalive", 30)))


def client(settings: BrokerSettings, client_id: str, *, clean_session: bool = True,
           manual_ack: bool = False, will: tuple[str, bytes, bool] | None = None,
           inflight: int = 0) -> mqtt.Client:
    """A paho client set up for MQTT 3.1.1 with our settings; not yet
    connected. `will`: (topic, payload, retain), published with QoS 1.
    `inflight`: outgoing QoS 1 messages awaiting PUBACK, 0 for no limit
    (paho rescans its whole outgoing table on every PUBACK when there is a
    limit, which costs more than the limit saves here)."""
    if "+" in client_id or "#" in client_id or not client_id:
        raise ValueError(f"client id {client_id!r} is empty or has + or #")
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                    clean_session=clean_session, protocol=mqtt.MQTTv311,
                    manual_ack=manual_ack)
    if settings.username is not None:
        c.username_pw_set(settings.username, settings.password)
    if settings.tls_ca is not None:
        c.tls_set(ca_certs=str(settings.tls_ca), cert_reqs=ssl.CERT_REQUIRED,
                  tls_version=ssl.PROTOCOL_TLS_CLIENT)
    if will is not None:
        c.will_set(will[0], will[1], qos=1, retain=will[2])
    c.reconnect_delay_set(min_delay=1, max_delay=30)
    c.max_inflight_messages_set(inflight)
    c.max_queued_messages_set(0)
    return c


def open_socket(c: mqtt.Client, settings: BrokerSettings) -> None:
    """Open the connection and send CONNECT (the CONNACK comes later, to
    whichever loop drives the client). Raises MqttSetupError with what to
    check."""
    try:
        c.connect(settings.host, settings.port, settings.keepalive)
    except ssl.SSLError as e:
        raise MqttSetupError(
            f"the TLS handshake with the MQTT broker at {settings.host}:{settings.port} "
            f"failed ({e}); check that tls_ca is the CA that signed the broker's certificate "
            "and that the host name matches it (docs/brokers.md, TLS)") from e
    except OSError as e:
        raise MqttSetupError(
            f"cannot reach the MQTT broker at {settings.host}:{settings.port} ({e}); "
            "is it running, and are host and port right?") from e


def no_answer(settings: BrokerSettings, timeout: float) -> MqttSetupError:
    return MqttSetupError(
        f"no answer from the MQTT broker at {settings.host}:{settings.port} in {timeout:.0f} s")


def refused(settings: BrokerSettings, reason: Any) -> MqttSetupError:
    return MqttSetupError(
        f"the broker at {settings.host}:{settings.port} refused the connection: {reason}; "
        "check the username and password (provisioning wrote them) and the broker's ACLs")


def connect(c: mqtt.Client, settings: BrokerSettings, timeout: float = 15.0) -> None:
    """Connect, start paho's network thread and wait for the broker's
    CONNACK. Raises MqttSetupError with what to check."""
    done = threading.Event()
    result: dict[str, Any] = {}
    previous = c.on_connect

    def on_connect(client, userdata, flags, reason, properties):
        result["reason"] = reason
        done.set()
        if previous is not None:
            previous(client, userdata, flags, reason, properties)

    c.on_connect = on_connect
    open_socket(c, settings)
    c.loop_start()
    if not done.wait(timeout):
        c.loop_stop()
        raise no_answer(settings, timeout)
    reason = result["reason"]
    if reason.is_failure:
        c.loop_stop()
        c.disconnect()
        raise refused(settings, reason)
    c.on_connect = previous
