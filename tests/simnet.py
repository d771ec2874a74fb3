"""In-memory network for sans-I/O machines: delivers datagrams by address with a fake clock."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from shallot.core.circuit import ClientNode
from shallot.crypto.circuit_handshake import SERVICE_ECHO
from shallot.crypto.descriptor import Descriptor
from shallot.crypto.keys import RelayKeys
from shallot.exit.endpoints import endpoint_services
from shallot.relay.forwarder import RelayConfig, RelayNode

WALL0 = 1_800_000_000.0


def det_rng(seed: int) -> Callable[[int], bytes]:
    r = random.Random(seed)
    return lambda n: r.randbytes(n)


class SimNet:
    def __init__(self) -> None:
        self.nodes: dict[tuple[str, int], Any] = {}
        self.now = 100.0
        self.log: list[tuple[tuple[str, int], tuple[str, int], bytes]] = []  # (src, dst, data)
        self.tap: Callable[[tuple[str, int], tuple[str, int], bytes], bytes | None] | None = None

    @property
    def wall(self) -> float:
        return WALL0 + self.now

    def add(self, addr: tuple[str, int], node: Any) -> None:
        self.nodes[addr] = node

    def run(self, max_steps: int = 10000) -> int:
        """Deliver until quiet; returns datagrams delivered."""
        delivered = 0
        for _ in range(max_steps):
            moved = False
            for src, node in list(self.nodes.items()):
                for data, dst in node.datagrams_to_send():
                    moved = True
                    if self.tap is not None:
                        data = self.tap(src, dst, data)
                        if data is None:
                            continue
                    self.log.append((src, dst, data))
                    target = self.nodes.get(dst)
                    if target is not None:
                        target.receive_datagram(data, src, self.now, self.wall)
                        delivered += 1
            if not moved:
                # as the asyncio adapter does: a timer that is already due fires now (core/io/udp.py)
                due = [node for node in self.nodes.values()
                       if hasattr(node, "timer") and (t := node.timer()) is not None and t <= self.now]
                if not due:
                    return delivered
                for node in due:
                    node.handle_timer(self.now, self.wall)
        raise AssertionError("network did not go quiet")

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for node in self.nodes.values():
            node.handle_timer(self.now, self.wall)
        self.run()


def make_relays(net: SimNet, n: int, *, exits: set[int], seed: int = 1) -> list[tuple[RelayNode, Descriptor]]:
    out = []
    for i in range(n):
        rng = det_rng(seed * 1000 + i)
        keys = RelayKeys.generate(rng, net.wall)
        addr = (f"10.{i}.0.1", 9000 + i)
        desc = Descriptor.create(keys, nickname=f"r{i}", addresses=(addr,), exit_node=i in exits,
                                 published=int(net.wall), lifetime_s=86400)
        node = RelayNode(keys, rng=rng, wall=net.wall, config=RelayConfig(is_exit=i in exits),
                         services=endpoint_services())  # as `shallot relay` does: only exits accept them
        net.add(addr, node)
        out.append((node, desc))
    return out


def echoed(node: RelayNode) -> int:
    """Datagrams an exit's echo service answered."""
    return node.services[SERVICE_ECHO].status()["echoed"]


def make_client(net: SimNet, seed: int = 99) -> ClientNode:
    client = ClientNode(rng=det_rng(seed))
    net.add(("192.0.2.10", 5555), client)
    return client
