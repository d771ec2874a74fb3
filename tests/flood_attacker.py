"""The flood attacker of tests/integration/test_flood.py: ONE process, many loopback source addresses.

    python tests/flood_attacker.py --directory FILE --guard NICK --middle NICK --exit NICK \\
        --ghost HOST:PORT --sources 120 --phase circuits|extends|links|all [--seconds 40]

Each source is an address 127.77.x.y (Linux routes all of 127/8 to lo: binding needs no setup) with two
UDP sockets.  Per phase, every source does as much as the process can, round-robin:

* ``circuits``: builds guard -> middle -> exit circuits (valid records) and keeps them, up to 256 open or
  in flight per source: fills the guard's circuit table;
* ``extends``: CREATEs whose record tells the guard to extend to a made-up relay at ``--ghost`` (fresh keys,
  and the real middle's keys at the ghost address), 8 in flight per source: a handshake cannon if the guard
  dialed them;
* ``links``: new anonymous links to the guard (valid Noise NK initiations, each a fresh ephemeral), kept
  alive once up: fills the link table and floods handshakes;
* ``all``: all three at once.

Prints ``flood: attacking`` once its sockets are bound, ``flood: progress {json}`` (its counts so far) four
times a second, and ``flood: {json}`` (what it sent and what happened to it) at the end: after ``--seconds``
or on SIGTERM.  Talks only to loopback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import secrets
import select
import signal
import socket
import sys
import time
from collections import Counter
from pathlib import Path

from shallot.core.circuit import CircuitState, ClientCircuit, ClientNode, client_link_layer
from shallot.core.discovery.directory import load_directory
from shallot.core.link import Link, LinkLayer, LinkState
from shallot.crypto.descriptor import Descriptor
from shallot.crypto.keys import RelayKeys

MAX_CIRCUITS_PER_SOURCE = 256
MAX_EXTENDS_IN_FLIGHT = 8
MAX_LINKS_PER_SOURCE = 512
GHOST_POOL = 16


class Source:
    def __init__(self, host: str) -> None:
        self.host = host
        self.circ_sock = _bind(host)
        self.link_sock = _bind(host)
        self.node = ClientNode(rng=secrets.token_bytes)
        self.links: LinkLayer = client_link_layer(secrets.token_bytes)
        self.circuits: list[ClientCircuit] = []
        self.extends: list[ClientCircuit] = []
        self.flood_links: list[Link] = []


def _bind(host: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.bind((host, 0))
    s.setblocking(False)
    return s


class Attacker:
    def __init__(self, args: argparse.Namespace) -> None:
        relays = {d.nickname: d for d in load_directory(args.directory)}
        self.guard, self.middle, self.exit = relays[args.guard], relays[args.middle], relays[args.exit]
        host, port = args.ghost.rsplit(":", 1)
        ghost_addr = (host, int(port))
        wall = time.time()
        self.ghosts: list[Descriptor] = [
            Descriptor.create(RelayKeys.generate(secrets.token_bytes, wall), nickname=f"ghost{i}",
                              addresses=(ghost_addr,), exit_node=False, published=int(wall), lifetime_s=86400)
            for i in range(GHOST_POOL)]
        # a real relay named at the made-up address: only a view that checks addresses refuses it
        self.ghosts.append(dataclasses.replace(self.middle, addresses=(ghost_addr,)))
        self.phase = args.phase
        self.sources = [Source(f"127.77.{i // 200}.{i % 200 + 1}") for i in range(args.sources)]
        self.by_fd: dict[int, tuple[socket.socket, ClientNode | LinkLayer]] = {}
        for s in self.sources:
            self.by_fd[s.circ_sock.fileno()] = (s.circ_sock, s.node)
            self.by_fd[s.link_sock.fileno()] = (s.link_sock, s.links)
        self.stats: Counter[str] = Counter()
        self.stop = False
        self._next_timer = 0.0
        self._next_progress = 0.0
        self._ghost_i = 0
        self._built: set[int] = set()

    # ---------------------------------------------------------------------------------------- actions
    def act(self, s: Source, now: float, wall: float) -> None:
        phase = self.phase
        if phase in ("circuits", "all"):
            self._settle(s.circuits, "circuit", keep_open=True)
            if len(s.circuits) < MAX_CIRCUITS_PER_SOURCE:
                s.circuits.append(s.node.build([self.guard, self.middle, self.exit], now, wall))
                self.stats["circuit_builds_sent"] += 1
        if phase in ("extends", "all"):
            self._settle(s.extends, "extend", keep_open=False)
            if len(s.extends) < MAX_EXTENDS_IN_FLIGHT:
                ghost = self.ghosts[self._ghost_i % len(self.ghosts)]
                self._ghost_i += 1
                s.extends.append(s.node.build([self.guard, ghost], now, wall))
                self.stats["extends_sent"] += 1
        if phase in ("links", "all"):
            s.flood_links = [link for link in s.flood_links if link.state is not LinkState.CLOSED]
            # in "all" the builds take most of the time: more initiations per round keep the link flood on
            for _ in range(3 if phase == "all" else 1):
                if len(s.flood_links) >= MAX_LINKS_PER_SOURCE:
                    break
                link = s.links.open_link(self.guard.address, self.guard.link_pub, now, wall, reuse=False)
                link.users = 1  # keep it alive with keepalives once up
                s.flood_links.append(link)
                self.stats["link_initiations"] += 1

    def _settle(self, circs: list[ClientCircuit], what: str, *, keep_open: bool) -> None:
        """Count what became of each build; keep the ones still building (and, if ``keep_open``, open)."""
        keep = []
        for c in circs:
            counted = id(c) in self._built
            if c.state is CircuitState.OPEN:
                if not counted:
                    self.stats[f"{what}_built"] += 1
                    self._built.add(id(c))
                if keep_open:
                    keep.append(c)
            elif c.state is CircuitState.CLOSED:
                self.stats[f"{what}_{'closed_later' if counted else 'refused'}: {c.close_reason}"] += 1
                self._built.discard(id(c))
            else:
                keep.append(c)
        circs[:] = keep

    # ---------------------------------------------------------------------------------------- I/O
    def flush(self, s: Source) -> None:
        for sock, owner in ((s.circ_sock, s.node), (s.link_sock, s.links)):
            for data, addr in owner.datagrams_to_send():
                try:
                    sock.sendto(data, addr)
                    self.stats["datagrams_sent"] += 1
                except (BlockingIOError, OSError):
                    self.stats["send_errors"] += 1

    def receive(self, timeout: float) -> None:
        readable, _, _ = select.select(list(self.by_fd), [], [], timeout)
        now, wall = time.monotonic(), time.time()
        for fd in readable:
            sock, owner = self.by_fd[fd]
            for _ in range(64):
                try:
                    data, addr = sock.recvfrom(2048)
                except (BlockingIOError, OSError):
                    break
                self.stats["datagrams_received"] += 1
                owner.receive_datagram(data, addr[:2], now, wall)

    def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        print("flood: attacking", flush=True)
        while not self.stop and time.monotonic() < deadline:
            now, wall = time.monotonic(), time.time()
            for s in self.sources:
                self.act(s, now, wall)
                self.flush(s)
            self.receive(0.0)
            if now >= self._next_progress:
                self._next_progress = now + 0.25
                print("flood: progress " + json.dumps({k: v for k, v in self.stats.items() if ":" not in k}),
                      flush=True)
            if now >= self._next_timer:
                self._next_timer = now + 0.05
                for s in self.sources:
                    s.node.handle_timer(now, wall)
                    s.links.handle_timer(now, wall)
                    self.flush(s)
        self.stats["links_up_at_end"] = sum(1 for s in self.sources for link in s.flood_links
                                            if link.state is LinkState.UP)
        self.stats["circuits_open_at_end"] = sum(1 for s in self.sources for c in s.circuits
                                                 if c.state is CircuitState.OPEN)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--directory", type=Path, required=True)
    ap.add_argument("--guard", required=True)
    ap.add_argument("--middle", required=True)
    ap.add_argument("--exit", required=True)
    ap.add_argument("--ghost", required=True, metavar="HOST:PORT")
    ap.add_argument("--sources", type=int, default=120)
    ap.add_argument("--phase", choices=("circuits", "extends", "links", "all"), required=True)
    ap.add_argument("--seconds", type=float, default=40.0)
    args = ap.parse_args()
    attacker = Attacker(args)

    def stop(*_: object) -> None:
        attacker.stop = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    started = time.monotonic()
    attacker.run(args.seconds)
    attacker.stats["seconds"] = round(time.monotonic() - started, 2)  # type: ignore[assignment]
    print("flood: " + json.dumps(dict(attacker.stats), sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
