# A tiny test runner for MicroPython: runs every test_* function of a module
# and prints one machine-readable line per test for the pytest side
# (tests/mpy_harness.py) to parse. Plain MicroPython, no unittest needed.
import sys


def run(module_name):
    mod = __import__(module_name)
    names = sorted(n for n in dir(mod) if n.startswith("test_"))
    failed = 0
    for name in names:
        fn = getattr(mod, name)
        try:
            fn()
        except Exception as e:  # report every failure, keep going
            failed += 1
            print("@@FAIL", name, repr(e))
            sys.print_exception(e)
        else:
            print("@@PASS", name)
    print("@@DONE", len(names), failed)
