"""meter-dap: run a DAP (Data Aggregation Point).

    python -m dap --config dap.toml            serve until SIGTERM or Ctrl-C
    python -m dap --config dap.toml --check    check the config and brokers, exit

Exit status: 0 after a clean stop (or a passing check), 1 for a
configuration, queue or broker error, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType

from dap import __version__, check
from dap.config import Config
from dap.errors import ConfigError, DapError
from dap.service import Dap

log = logging.getLogger("dap")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meter-dap",
        description="DAP gateway for sealed smart-meter readings: buffers meters' sealed "
                    "responses on disk and sends them to the head-end as bundles; delivers "
                    "the head-end's requests and fans out group requests. It holds no keys.",
        epilog="Every option of the config file is described in dap/dap.example.toml.")
    p.add_argument("--config", "-c", default="dap.toml", metavar="FILE",
                   help="TOML configuration file (default: %(default)s)")
    p.add_argument("--check", action="store_true",
                   help="check the configuration, the state folder and the brokers, then exit")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="how long --check waits for each broker (default: %(default)s)")
    p.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="override [log] level")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = Config.load(args.config)
    except ConfigError as e:
        print(f"meter-dap: {e}", file=sys.stderr)
        return 1
    if args.check:
        try:
            check.run(cfg, args.timeout, sys.stdout)
        except DapError as e:
            print(f"meter-dap: check failed: {e}", file=sys.stderr)
            return 1
        print("ok", file=sys.stdout)
        return 0

    logging.basicConfig(level=args.log_level or cfg.log.level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for w in cfg.warnings():
        log.warning("%s", w)

    dap = Dap(cfg)

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("%s received", signal.Signals(signum).name)
        dap.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        dap.run()
    except DapError as e:
        log.error("%s", e)
        return 1
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
