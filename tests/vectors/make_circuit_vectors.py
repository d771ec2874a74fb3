#!/usr/bin/env python3
"""Regenerate tests/vectors/circuit_build_v1.json (run from the repository root, with the venv's python):

    .venv/bin/python tests/vectors/make_circuit_vectors.py

The inputs are fixed (derived from labels with SHAKE-256), so running this again must reproduce the file
byte for byte unless the circuit-build wire format changed -- which is exactly what the vector guards.
Only regenerate it on purpose, together with a protocol version bump.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.unit.helpers_vectors import compute, make_inputs  # noqa: E402

OUT = Path(__file__).with_name("circuit_build_v1.json")


def main() -> int:
    inputs = make_inputs()
    vector = {
        "description": "Shallot circuit build v1: client_create -> relay_open/relay_reply per hop -> "
                       "relay_created_first/relay_created_wrap -> client_created, with fixed keys, ephemerals "
                       "and random tapes (hex).  create_slots[i] is what hop i receives; created_slots[i] is "
                       "what hop i sends back; hop_keys[i] is what hop i and the client both derive.",
        "inputs": inputs,
        "expected": compute(inputs),
    }
    text = json.dumps(vector, indent=1) + "\n"
    if "--check" in sys.argv:
        same = OUT.exists() and OUT.read_text() == text
        print("up to date" if same else "DIFFERENT")
        return 0 if same else 1
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
