"""Run code under the real MicroPython WebAssembly port from pytest.

The port is the npm package pinned in package.json; `make test` installs it.
A missing Node.js or package is a test failure with a fix in its message,
never a skip: the meter-side code is only trusted once MicroPython ran it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tests" / "mpy" / "runner.mjs"
PACKAGE = ROOT / "node_modules" / "@micropython" / "micropython-webassembly-pyscript"
MPY_TESTS = ROOT / "tests" / "mpy"


class MicroPythonUnavailable(RuntimeError):
    pass


@dataclass
class MpyRun:
    returncode: int
    stdout: str
    stderr: str
    outputs: dict[str, bytes] = field(default_factory=dict)

    def check(self) -> MpyRun:
        if self.returncode != 0:
            raise AssertionError(
                f"MicroPython exited {self.returncode}\n--- stdout\n{self.stdout[-4000:]}"
                f"\n--- stderr\n{self.stderr[-4000:]}"
            )
        return self


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        raise MicroPythonUnavailable(
            "node is not on PATH: install Node.js 20+ (apt-get install nodejs) and run `npm ci`"
        )
    if not PACKAGE.exists():
        raise MicroPythonUnavailable(
            f"{PACKAGE.relative_to(ROOT)} is missing: run `npm ci` in the project root"
        )
    return node


def run_script(
    source: str,
    *,
    files: dict[str, Path | bytes | str] | None = None,
    outputs: list[str] | None = None,
    trees: list[tuple[Path, str]] | None = None,
    heap: str = "1024k",
    timeout: float = 600,
) -> MpyRun:
    """Run `source` under MicroPython. `files` maps guest paths to host paths
    or contents; `outputs` names guest files to read back after the run."""
    node = _node()
    with tempfile.TemporaryDirectory(prefix="mpy-") as tmp:
        tmpdir = Path(tmp)
        script = tmpdir / "script.py"
        script.write_text(source)
        cmd = [node, str(RUNNER), str(script), "--heap", heap]
        for host, guest in trees or []:
            cmd += ["--tree", f"{host}:{guest}"]
        for i, (guest, content) in enumerate((files or {}).items()):
            if isinstance(content, Path):
                host = content
            else:
                host = tmpdir / f"in{i}"
                host.write_bytes(content.encode() if isinstance(content, str) else content)
            cmd += ["--file", f"{host}:{guest}"]
        out_paths = {}
        for i, guest in enumerate(outputs or []):
            out_paths[guest] = tmpdir / f"out{i}"
            cmd += ["--out", f"{guest}:{out_paths[guest]}"]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
            env={**os.environ, "NODE_OPTIONS": ""},
        )
        got = {g: p.read_bytes() for g, p in out_paths.items() if p.exists()}
        return MpyRun(proc.returncode, proc.stdout, proc.stderr, got)


def run_json(source: str, payload: object, **kw) -> object:
    """Run `source` with `payload` at /proj/in.json; it must write /proj/out.json."""
    run = run_script(
        source, files={"/proj/in.json": json.dumps(payload)}, outputs=["/proj/out.json"], **kw
    ).check()
    if "/proj/out.json" not in run.outputs:
        raise AssertionError(f"script wrote no /proj/out.json\n{run.stdout}\n{run.stderr}")
    return json.loads(run.outputs["/proj/out.json"])


_TEST_DEF = re.compile(r"^def (test_\w+)\(\):", re.M)


def mpy_test_modules() -> list[str]:
    return sorted(p.stem for p in MPY_TESTS.glob("mpytest_*.py"))


def mpy_test_names(module: str) -> list[str]:
    return _TEST_DEF.findall((MPY_TESTS / f"{module}.py").read_text())


_RESULT = re.compile(r"^@@(PASS|FAIL|DONE) ?(\S*) ?(.*)$", re.M)


def run_mpy_module(module: str) -> dict[str, str | None]:
    """Run every test_* in tests/mpy/<module>.py under MicroPython.
    Returns name -> None (passed) or the failure text."""
    run = run_script(f"import mpyunit\nmpyunit.run({module!r})\n")
    results: dict[str, str | None] = {}
    done = False
    for kind, name, rest in _RESULT.findall(run.stdout):
        if kind == "PASS":
            results[name] = None
        elif kind == "FAIL":
            results[name] = rest
        else:
            done = True
    if not done:
        raise AssertionError(
            f"MicroPython run of {module} did not finish (exit {run.returncode})\n"
            f"--- stdout\n{run.stdout[-4000:]}\n--- stderr\n{run.stderr[-4000:]}"
        )
    if any(v is not None for v in results.values()):
        detail = run.stdout[-6000:]
        results = {k: (v if v is None else f"{v}\n{detail}") for k, v in results.items()}
    return results
