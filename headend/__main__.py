"""`python -m headend ...` (also the `meter-headend` console script)."""

from headend.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
