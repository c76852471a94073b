"""Real MQTT brokers for tests: amqtt (as `python -m headend.broker`) and
Mosquitto, each a subprocess on an ephemeral loopback port, configured by
headend.brokerconf.

    broker = start_mosquitto(tmp_path, layout=layout)   # accounts generated
    broker.accounts["m1"].password
    broker.restart()      # same port, same persistence
    broker.stop()

A missing mosquitto binary is an error (install it: apt-get install
mosquitto), never a reason to skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from headend.brokerconf import (
    Account,
    Layout,
    TlsFiles,
    generate_accounts,
    write_amqtt,
    write_mosquitto,
)

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
KINDS = ("amqtt", "mosquitto")


class BrokerStartError(RuntimeError):
    """A broker did not start; the message carries the fix or the log tail."""


def mosquitto_binary() -> str:
    """The mosquitto executable, or BrokerStartError saying how to install it."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for d in ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin"):
        p = Path(d) / "mosquitto"
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    raise BrokerStartError(
        "the mosquitto broker is not installed, and the tests need it: "
        "run `apt-get install mosquitto` (Debian/Ubuntu; CI does this too)"
    )


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _encode_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        digit, n = n % 128, n // 128
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(
    client_id: str,
    *,
    username: str | None = None,
    password: str | None = None,
    clean: bool = True,
    will: tuple[str, bytes, int, bool] | None = None,
    keepalive: int = 30,
) -> bytes:
    """An MQTT 3.1.1 CONNECT. `will` is (topic, payload, qos, retain)."""
    flags = 0x02 if clean else 0
    payload = _encode_str(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += _encode_str(topic) + _encode_str(message)
    if username is not None:
        flags |= 0x80
        payload += _encode_str(username)
    if password is not None:
        flags |= 0x40
        payload += _encode_str(password)
    variable = _encode_str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
    body = variable + payload
    return bytes([0x10]) + _remaining_length(len(body)) + body


def raw_connect(
    host: str,
    port: int,
    client_id: str,
    *,
    username: str | None = None,
    password: str | None = None,
    clean: bool = True,
    will: tuple[str, bytes, int, bool] | None = None,
    timeout: float = 5.0,
) -> tuple[socket.socket, int]:
    """Open a TCP connection, send CONNECT, return (socket, CONNACK return
    code). The socket stays open: close it without a DISCONNECT to make the
    broker publish the Will. Raises OSError if no CONNACK comes."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.sendall(connect_packet(client_id, username=username, password=password,
                                    clean=clean, will=will))
        data = b""
        while len(data) < 4:
            chunk = sock.recv(4 - len(data))
            if not chunk:
                raise ConnectionError(f"broker closed the connection before CONNACK (got {data!r})")
            data += chunk
        if data[0] != 0x20 or data[1] != 0x02:
            raise ConnectionError(f"not a CONNACK: {data!r}")
        return sock, data[3]
    except BaseException:
        sock.close()
        raise


@dataclass
class Broker:
    """A broker subprocess. `accounts` maps username -> Account (empty for an
    anonymous broker); `conf` is the config file it runs from."""

    kind: str
    host: str
    port: int
    workdir: Path
    conf: Path
    layout: Layout | None
    accounts: dict[str, Account]
    anonymous: bool
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _argv: list[str] = field(default_factory=list, repr=False)

    # -- lifecycle ---------------------------------------------------------

    def _spawn(self) -> None:
        log = open(self.log_path, "ab")
        try:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
            env.setdefault("PYTHONUNBUFFERED", "1")
            self.proc = subprocess.Popen(
                self._argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=str(REPO),
                env=env,
                start_new_session=True,
            )
        finally:
            log.close()

    def _wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until the broker answers a CONNECT with a CONNACK."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise BrokerStartError(
                    f"{self.kind} broker exited with status {self.proc.returncode} "
                    f"before accepting connections\n{self.log_tail()}"
                )
            if self.kind == "amqtt" and self.port == 0:
                self._read_port_from_log()
                if self.port == 0:
                    time.sleep(0.05)
                    continue
            try:
                sock, _rc = raw_connect(self.host, self.port, "readiness-probe", timeout=2.0)
                sock.close()
                return
            except OSError as exc:
                last = exc
                time.sleep(0.05)
        self.kill()
        raise BrokerStartError(
            f"{self.kind} broker on {self.host}:{self.port} did not accept an MQTT "
            f"connection within {timeout:.0f} s (last error: {last})\n{self.log_tail()}"
        )

    def _read_port_from_log(self) -> None:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return
        for line in reversed(text.splitlines()):
            if line.startswith("broker listening on "):
                self.port = int(line.rsplit(":", 1)[1])
                self._argv[self._argv.index("--port") + 1] = str(self.port)
                return

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM and wait (Mosquitto saves its persistence file then);
        SIGKILL if it does not exit in time. Safe to call twice."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: a crash. Mosquitto keeps only what it last autosaved."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.kill()
        p.wait(STOP_TIMEOUT)

    def restart(self, timeout: float = READY_TIMEOUT) -> None:
        """Stop (if running) and start again on the same port with the same
        config and persistence, then wait until it accepts connections."""
        self.stop()
        with open(self.log_path, "ab") as log:
            log.write(b"\n--- restart ---\n")
        for attempt in range(40):
            self._spawn()
            try:
                self._wait_ready(timeout)
                return
            except BrokerStartError:
                # The old socket may linger for a moment; try again briefly.
                if attempt == 39 or "in use" not in self.log_tail().lower():
                    raise
                time.sleep(0.25)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        tail = text.splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _prepare(
    layout: Layout | None,
    accounts: Iterable[Account] | None,
    anonymous: bool | None,
) -> tuple[Layout, tuple[Account, ...], bool]:
    if anonymous is None:
        anonymous = layout is None and accounts is None
    if layout is None:
        layout = Layout()
    if anonymous:
        return layout, tuple(accounts or ()), True
    accs = tuple(accounts) if accounts is not None else generate_accounts(layout)
    return layout, accs, False


def start_amqtt(
    workdir: Path,
    *,
    layout: Layout | None = None,
    accounts: Iterable[Account] | None = None,
    anonymous: bool | None = None,
    tls: TlsFiles | None = None,
    port: int = 0,
) -> Broker:
    """The embedded broker (`python -m headend.broker`) on an ephemeral port.
    Without layout and accounts it is anonymous; with a layout and no
    accounts, accounts are generated (see Broker.accounts)."""
    layout, accs, anonymous = _prepare(layout, accounts, anonymous)
    workdir = Path(workdir) / "amqtt"
    workdir.mkdir(parents=True, exist_ok=True)
    conf = write_amqtt(workdir, layout=layout, accounts=accs, port=port or 1883,
                       host=HOST, tls=tls, anonymous=anonymous)
    b = Broker(
        kind="amqtt", host=HOST, port=port, workdir=workdir, conf=conf, layout=layout,
        accounts={a.username: a for a in accs}, anonymous=anonymous,
        log_path=workdir / "broker.log",
    )
    b._argv = [sys.executable, "-m", "headend.broker", "--config", str(conf),
               "--port", str(port), "--host", HOST]
    b._spawn()
    b._wait_ready()
    return b


def start_mosquitto(
    workdir: Path,
    *,
    layout: Layout | None = None,
    accounts: Iterable[Account] | None = None,
    anonymous: bool | None = None,
    tls: TlsFiles | None = None,
    persistence: bool = True,
) -> Broker:
    """Mosquitto with files from write_mosquitto, on an ephemeral port, with
    persistence in workdir/mosquitto/db (kept across restart())."""
    binary = mosquitto_binary()
    layout, accs, anonymous = _prepare(layout, accounts, anonymous)
    workdir = Path(workdir) / "mosquitto"
    workdir.mkdir(parents=True, exist_ok=True)
    last: BrokerStartError | None = None
    for _ in range(3):  # the free port may be taken between choosing and binding
        port = free_port()
        conf = write_mosquitto(
            workdir, layout=layout, accounts=accs, port=port, host=HOST,
            persistence=(workdir / "db") if persistence else None,
            tls=tls, anonymous=anonymous,
        )
        b = Broker(
            kind="mosquitto", host=HOST, port=port, workdir=workdir, conf=conf,
            layout=layout, accounts={a.username: a for a in accs}, anonymous=anonymous,
            log_path=workdir / "broker.log",
        )
        b._argv = [binary, "-c", str(conf)]
        b._spawn()
        try:
            b._wait_ready()
            return b
        except BrokerStartError as exc:
            last = exc
            if "in use" not in str(exc).lower():
                raise
    assert last is not None
    raise last


def start_broker(kind: str, workdir: Path, **kwargs: object) -> Broker:
    """start_amqtt or start_mosquitto by name ("amqtt" or "mosquitto")."""
    if kind == "amqtt":
        return start_amqtt(workdir, **kwargs)  # type: ignore[arg-type]
    if kind == "mosquitto":
        return start_mosquitto(workdir, **kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown broker kind {kind!r}; expected one of {KINDS}")
