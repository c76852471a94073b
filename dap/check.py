"""`meter-dap --check`: is the configuration usable? Checks the settings,
the state folder, and connects once to each broker (with a client id of its
own, so the DAP's persistent session is not disturbed). Prints one line per
check; raises DapError at the first failure."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TextIO

from dap.config import Config
from dap.errors import BrokerError, QueueError
from shared.hostmqtt import BrokerSettings, MqttSetupError, client, connect


def _state_dir(path: Path) -> str:
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise QueueError(f"state_dir {path} is not writable by this user: "
                             "change its owner or pick another folder")
        db = path / "queue.sqlite3"
        return f"state_dir {path} is writable" + (" (queue present)" if db.exists() else "")
    if path.exists():
        raise QueueError(f"state_dir {path} exists but is not a folder")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QueueError(f"state_dir {path} does not exist and {parent} is not writable: "
                         "create the folder for the DAP's user")
    return f"state_dir {path} will be created at the first start"


def _broker(role: str, settings: BrokerSettings, client_id: str, timeout: float) -> str:
    c = client(settings, client_id, clean_session=True)
    try:
        connect(c, settings, timeout)
    except MqttSetupError as e:
        raise BrokerError(f"{role}: {e}") from None
    c.disconnect()
    c.loop_stop()
    tls = "TLS" if settings.tls_ca else "plain TCP"
    who = f"as {settings.username}" if settings.username else "anonymously"
    return f"{role}: connected to {settings.host}:{settings.port} ({tls}, {who})"


def run(cfg: Config, timeout: float, out: TextIO) -> None:
    """Check everything; print what was checked to `out`."""
    a, q = cfg.aggregate, cfg.queue
    print(f"config: DAP d{cfg.dap}, {cfg.mode} mode", file=out)
    if cfg.mode == "aggregate":
        print(f"config: bundles every {a.window:g} s or {a.max_items} envelopes or "
              f"{a.max_bytes} bytes, whichever comes first", file=out)
    print(f"config: disk budget {q.disk_budget_bytes} bytes (warn at {100 * q.warn_fraction:.0f}%),"
          f" re-send after {q.ack_timeout:g} s at up to {q.drain_rate:g} bundles/s", file=out)
    for w in cfg.warnings():
        print(f"warning: {w}", file=out)
    print(_state_dir(cfg.state_dir), file=out)
    print(_broker("meters_broker", cfg.meters_broker, f"{cfg.name}-check", timeout), file=out)
    if cfg.headend_broker is not None:
        print(_broker("headend_broker", cfg.headend_broker, f"{cfg.name}-check", timeout),
              file=out)
    else:
        print("headend_broker: not set, the meters' broker serves the head-end too", file=out)
