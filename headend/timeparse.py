"""Times on the command line: ISO 8601 (UTC unless an offset is given) or
epoch seconds."""

from __future__ import annotations

from datetime import UTC, datetime


def parse_time(text: str) -> int:
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not a time: write 2026-11-23T14:00 (UTC), "
                         "2026-11-23T14:00+01:00, or epoch seconds") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


def show_time(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
