"""Every tests/mpy/mpytest_*.py module, run twice: under the real MicroPython
WebAssembly port and under CPython. Same module, same assertions."""

from __future__ import annotations

import importlib
import sys

import pytest

from tests.mpy_harness import MPY_TESTS, mpy_test_modules, mpy_test_names, run_mpy_module

CASES = [(m, n) for m in mpy_test_modules() for n in mpy_test_names(m)]
_results: dict[str, dict[str, str | None]] = {}


@pytest.mark.parametrize(("module", "name"), CASES)
def test_on_micropython(module: str, name: str) -> None:
    if module not in _results:
        _results[module] = run_mpy_module(module)
    results = _results[module]
    assert name in results, f"{module}.{name} never ran under MicroPython"
    assert results[name] is None, results[name]


@pytest.mark.parametrize(("module", "name"), CASES)
def test_on_cpython(module: str, name: str) -> None:
    if str(MPY_TESTS) not in sys.path:
        sys.path.insert(0, str(MPY_TESTS))
    getattr(importlib.import_module(module), name)()
