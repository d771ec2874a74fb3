"""A tampering relay for the integration tests: ``shallot relay`` with one bit flipped.

    python tests/integration/evil_relay.py --state DIR --flip forward|backward [--nth N] [--part body|header]

It runs the real relay service (shallot.relay.service.RelayService: same socket, same control API, same
listening line) with a RelayNode subclass that flips one bit of the Nth RELAY cell of a circuit it knows,
counted over all circuits (1-based), in the chosen direction: ``forward`` for cells arriving from the
previous hop, ``backward`` for cells arriving from the next hop.  The bit is flipped after the link layer
has authenticated the cell and before the relay adds or removes its own onion layer, which is exactly what
a malicious relay can do.  The end-to-end check at the exit (forward) or at the client (backward) must
catch it.  Each flip is reported on stdout as ``evil: flipped <direction> cell <n>``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from shallot.core.errors import ShallotError
from shallot.core.io.udp import run
from shallot.core.wire.cells import CMD_RELAY
from shallot.crypto.params import CELL_HEADER_LEN, HOP_SLOT_LEN
from shallot.relay import forwarder, service

_HDR_END = CELL_HEADER_LEN + HOP_SLOT_LEN


class Tamper:
    def __init__(self, direction: str, nth: int, part: str) -> None:
        self.direction, self.nth, self.part = direction, nth, part
        self.seen = 0

    def apply(self, direction: str, cell: bytes) -> bytes:
        if direction != self.direction:
            return cell
        self.seen += 1
        if self.seen != self.nth:
            return cell
        out = bytearray(cell)
        if self.part == "header":
            out[CELL_HEADER_LEN + 3] ^= 0x10
        else:
            out[_HDR_END + (len(out) - _HDR_END) // 2] ^= 0x01
        print(f"evil: flipped {direction} cell {self.seen}", flush=True)
        return bytes(out)


def install(tamper: Tamper) -> None:
    class EvilRelayNode(forwarder.RelayNode):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            if getattr(self.link.on_cell, "__func__", None) is not EvilRelayNode._on_cell:
                raise SystemExit("evil_relay: RelayNode no longer hands cells to self._on_cell; "
                                 "update the tamper hook")

        def _on_cell(self, link: Any, cell: bytes) -> None:
            if len(cell) > 4 and cell[4] == CMD_RELAY:
                entry = self.circuits.get((link.link_id << 32) | int.from_bytes(cell[:4], "big"))
                if entry is not None:
                    cell = tamper.apply("forward" if entry[1] else "backward", cell)
            super()._on_cell(link, cell)

    if getattr(service, "RelayNode", None) is not forwarder.RelayNode:
        raise SystemExit("evil_relay: shallot.relay.service no longer builds a forwarder.RelayNode; "
                         "update the tamper hook")
    service.RelayNode = EvilRelayNode  # type: ignore[misc]  # RelayService.run builds its node from this name


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", required=True, type=Path)
    p.add_argument("--flip", required=True, choices=("forward", "backward"))
    p.add_argument("--nth", type=int, default=1, help="flip the Nth RELAY cell in that direction (default 1)")
    p.add_argument("--part", choices=("body", "header"), default="body")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install(Tamper(args.flip, args.nth, args.part))
    try:
        run(service.run_relay(args.state))
    except ShallotError as exc:
        print(f"shallot: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
