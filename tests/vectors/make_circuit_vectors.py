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
        "description": "Shallot circuit build v1 (docs/PROTOCOL.md §5, §6.4): a 3-hop build with fixed onion keys, "
                       "hop identities (relay_id, link_pub: bound into each hop's keys, §5.4), the client's hour, "
                       "client ephemerals x, hop ephemerals y and random tapes (hex).  client_rng is 4 x 148 bytes: "
                       "the filler of slot k is client_rng[148k:148(k+1)], used by slots n..3 only.  A hop's "
                       "relay_rng is the 148-byte filler slot it appends to the CREATE it forwards, then (last hop "
                       "only) the 144 filler bytes after its reply in CREATED.  create_slots[i] is the 592 slot "
                       "bytes hop i receives; created_slots[i] the 192 reply bytes hop i sends back; hop_keys[i] "
                       "what hop i and the client both derive, layer_keys[i] its onion-layer keys (§6.4); "
                       "forward_cells[i] the first forward RELAY region (DATA forward_data, seq 0) as hop i "
                       "receives it; backward_cells[i] the first backward one (DATA backward_data, each hop's "
                       "first counter, the exit's 72 junk bytes exit_junk) as hop i sends it.  Written by the "
                       "product code (tests/vectors/make_circuit_vectors.py); tests/vectors/independent.py "
                       "derives it again from the specification alone.",
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
