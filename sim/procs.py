"""Child processes of the simulation (the broker, the DAPs): started with
their output going to a log file, waited for until they say they are ready,
and always stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False


class Proc:
    def __init__(self, name: str, argv: list[str], *, cwd: Path, log: Path,
                 ready: str | None = None, timeout: float = 30.0,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.cwd, self.log = name, argv, cwd, log
        self._ready = threading.Event()
        self._needle = ready
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "ab")
        self.p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env={**os.environ, **(env or {})}, start_new_session=True)
        threading.Thread(target=self._pump, daemon=True).start()
        if ready is not None and not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"{name} did not start within {timeout:.0f} s; "
                               f"its log:\n{self.tail()}")

    def _pump(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self._log.write(line)
            self._log.flush()
            if self._needle is not None and self._needle.encode() in line:
                self._ready.set()

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self._log.close()
        return self.p.returncode

    def kill9(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(5)


PYTHON = sys.executable
