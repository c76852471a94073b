"""The hex examples in docs/protocol.md are the committed test vectors."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_protocol_examples_are_the_vectors() -> None:
    doc = (ROOT / "docs" / "protocol.md").read_text()
    cases = json.loads((ROOT / "tests" / "vectors" / "envelope.json").read_text())["cases"]
    plaintexts = {c["plaintext"] for c in cases}
    heads = {f"{c['wire'][0:2]} {c['wire'][2:10]} {c['wire'][10:58]}" for c in cases}
    shown = re.findall(r"^plaintext ([0-9a-f]+)$", doc, re.M)
    wires = re.findall(r"^wire      ([0-9a-f]{2} [0-9a-f]{8} [0-9a-f]{48})$", doc, re.M)
    assert len(shown) >= 8 and len(wires) == len(shown)
    assert set(shown) <= plaintexts, "docs/protocol.md shows a plaintext that is not a vector"
    assert set(wires) <= heads, "docs/protocol.md shows an envelope header that is not a vector"
