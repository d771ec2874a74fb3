"""A tampering relay for the integration tests: ``shallot relay`` with one bit flipped, or a cell duplicated.

    python tests/integration/evil_relay.py --state DIR --flip forward|backward [--nth N] [--part body|header]
    python tests/integration/evil_relay.py --state DIR --attack dup|flip|inject --on forward|backward [--nth N]

It runs the real relay service (shallot.relay.service.RelayService: same socket, same control API, same
listening line) with a RelayNode subclass that flips one bit of the Nth RELAY cell of a circuit it knows,
counted over all circuits (1-based), in the chosen direction: ``forward`` for cells arriving from the
previous hop, ``backward`` for cells arriving from the next hop.  The bit is flipped after the link layer
has authenticated the cell and before the relay adds or removes its own onion layer, which is exactly what
a malicious relay can do.  The next hop's layer check (forward) or the client (backward) must catch it.
Each flip is reported on stdout as ``evil: flipped <direction> cell <n>``.

``--attack`` works on what the relay *sends* instead, after its own (honest) layer: the Nth RELAY cell it
sends ``forward`` (as a guard or middle) or ``backward`` (as an exit or middle) goes out twice (``dup``),
with one bit flipped (``flip``), or followed by a random cell that keeps the sequence field (forward) or
moves the counter on (backward) (``inject``).  Reported as ``evil: <attack> <direction> cell <n>``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from shallot.core.errors import ShallotError
from shallot.core.io.udp import run
from shallot.core.wire.cells import CMD_RELAY
from shallot.crypto.params import CELL_HEADER_LEN, HOP_SEQ_LEN, HOP_SLOT_LEN
from shallot.exit.endpoints import endpoint_services
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


class Attack:
    def __init__(self, attack: str, direction: str, nth: int) -> None:
        self.attack, self.direction, self.nth = attack, direction, nth
        self.seen = 0

    def apply(self, direction: str, cell: bytes) -> list[bytes]:
        if direction != self.direction:
            return [cell]
        self.seen += 1
        if self.seen != self.nth:
            return [cell]
        print(f"evil: {self.attack} {direction} cell {self.seen}", flush=True)
        if self.attack == "dup":
            return [cell, cell]
        if self.attack == "flip":
            out = bytearray(cell)
            out[_HDR_END + 500] ^= 0x01
            return [bytes(out)]
        keep = CELL_HEADER_LEN + HOP_SEQ_LEN
        if direction == "forward":  # a forged cell with a new sequence field: only its tag can give it away
            return [cell, cell[:CELL_HEADER_LEN] + os.urandom(len(cell) - CELL_HEADER_LEN)]
        counter = int.from_bytes(cell[CELL_HEADER_LEN:keep], "big") + 1
        return [cell, cell[:CELL_HEADER_LEN] + counter.to_bytes(HOP_SEQ_LEN, "big") + os.urandom(len(cell) - keep)]


def install_attack(attack: Attack) -> None:
    class AttackingRelayNode(forwarder.RelayNode):
        """Runs every layer honestly, then tampers with what it sends."""

        def _on_cell(self, link: Any, cell: bytes) -> None:
            route = self._routes.get((link.link_id << 32) | int.from_bytes(cell[:4], "big"))
            if len(cell) > 4 and cell[4] == CMD_RELAY and route is not None:
                out_link, prefix, step, _circ = route
                try:
                    region = step(memoryview(cell)[CELL_HEADER_LEN:])
                except forwarder.IntegrityError:
                    super()._on_cell(link, cell)  # let the real code count and tear down (it fails the same way)
                    return
                direction = "forward" if step.__name__ == "forward" else "backward"
                for out in attack.apply(direction, prefix + region):
                    self.link.send_cell(out_link, out, self._now)
                return
            super()._on_cell(link, cell)

        def _endpoint_send(self, circ: Any, inner: bytes) -> None:
            region = circ.endpoint.seal_backward(inner, self._rng(forwarder.JUNK_LEN))
            for out in attack.apply("backward", circ.prev_prefix + region):
                self.link.send_cell(circ.prev_link, out, self._now)

    if getattr(service, "RelayNode", None) is not forwarder.RelayNode:
        raise SystemExit("evil_relay: shallot.relay.service no longer builds a forwarder.RelayNode; "
                         "update the tamper hook")
    service.RelayNode = AttackingRelayNode  # type: ignore[misc]


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
    p.add_argument("--flip", choices=("forward", "backward"))
    p.add_argument("--attack", choices=("dup", "flip", "inject"))
    p.add_argument("--on", choices=("forward", "backward"), help="with --attack: which cells it sends to spoil")
    p.add_argument("--nth", type=int, default=1, help="flip the Nth RELAY cell in that direction (default 1)")
    p.add_argument("--part", choices=("body", "header"), default="body")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.attack:
        install_attack(Attack(args.attack, args.on, args.nth))
    elif args.flip:
        install(Tamper(args.flip, args.nth, args.part))
    else:
        p.error("give --flip or --attack")
    try:
        run(service.run_relay(args.state, services=endpoint_services()))  # echo and discard, as `shallot relay`
    except ShallotError as exc:
        print(f"shallot: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
