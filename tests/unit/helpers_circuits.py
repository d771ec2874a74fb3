"""Helpers for whole-circuit tests on tests/simnet.SimNet: cell capture and tampering by wrapping a node's
link layer (``on_cell`` / ``send_cell`` are plain attributes), clock-skewed nodes, state scans."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from shallot.core.circuit import CircuitState, ClientCircuit, ClientNode
from shallot.core.link import Link, LinkLayer
from shallot.crypto.descriptor import Descriptor
from shallot.relay.forwarder import RelayNode
from tests.simnet import SimNet, make_client, make_relays

CLIENT_ADDR = ("192.0.2.10", 5555)  # tests/simnet.make_client


def relay_addr(i: int) -> tuple[str, int]:
    return (f"10.{i}.0.1", 9000 + i)  # tests/simnet.make_relays


@dataclasses.dataclass
class Net:
    net: SimNet
    relays: list[tuple[RelayNode, Descriptor]]
    client: ClientNode

    def node(self, i: int) -> RelayNode:
        return self.relays[i][0]

    def desc(self, i: int) -> Descriptor:
        return self.relays[i][1]

    def build(self, hops: list[int], *, wall_offset: float = 0.0, client: ClientNode | None = None) -> ClientCircuit:
        client = client or self.client
        circ = client.build([self.desc(i) for i in hops], self.net.now, self.net.wall + wall_offset)
        self.net.run()
        return circ

    def build_open(self, hops: list[int]) -> ClientCircuit:
        circ = self.build(hops)
        assert circ.state is CircuitState.OPEN, circ.close_reason
        return circ


def make_net(n: int = 4, *, exits: set[int] | None = None, seed: int = 1) -> Net:
    net = SimNet()
    relays = make_relays(net, n, exits={2, 3} if exits is None else exits, seed=seed)
    return Net(net, relays, make_client(net))


@dataclasses.dataclass(frozen=True)
class Seen:
    who: str  # receiving node
    link: Link
    cell: bytes

    @property
    def cid(self) -> int:
        return int.from_bytes(self.cell[:4], "big")

    @property
    def command(self) -> int:
        return self.cell[4]


class CellLog:
    """Every cell handed up by the link layer of the given nodes (i.e. every cell each node receives)."""

    def __init__(self, nodes: dict[str, RelayNode | ClientNode]) -> None:
        self.seen: list[Seen] = []
        for name, node in nodes.items():
            self._wrap(name, node.link)

    def _wrap(self, name: str, layer: LinkLayer) -> None:
        inner = layer.on_cell

        def on_cell(link: Link, cell: bytes) -> None:
            self.seen.append(Seen(name, link, cell))
            inner(link, cell)

        layer.on_cell = on_cell

    def cells(self, who: str, command: int) -> list[Seen]:
        return [s for s in self.seen if s.who == who and s.command == command]


def intercept_sends(node: RelayNode | ClientNode, fn: Callable[[Link, bytes], bytes | None]) -> None:
    """Pass every cell the node sends through ``fn`` (return the cell to send, possibly modified, or None)."""
    layer = node.link
    send = layer.send_cell

    def send_cell(link: Link, cell: bytes, now: float) -> None:
        out = fn(link, cell)
        if out is not None:
            send(link, out, now)

    layer.send_cell = send_cell  # type: ignore[method-assign]


def flip_bit(data: bytes, byte: int, bit: int = 0) -> bytes:
    return data[:byte] + bytes([data[byte] ^ (1 << bit)]) + data[byte + 1:]


class SkewedNode:
    """Runs a node with its wall clock ``skew_s`` off (monotonic time unchanged)."""

    def __init__(self, node: Any, skew_s: float) -> None:
        self.node, self.skew_s = node, skew_s

    def datagrams_to_send(self) -> list:
        return self.node.datagrams_to_send()

    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float, wall: float) -> None:
        self.node.receive_datagram(data, addr, now, wall + self.skew_s)

    def handle_timer(self, now: float, wall: float) -> None:
        self.node.handle_timer(now, wall + self.skew_s)


def atoms(obj: Any, *, stop: tuple[type, ...] = (LinkLayer, RelayNode, ClientNode)) -> list[Any]:
    """Every str / bytes / int / tuple-of-atoms reachable from obj through dataclass fields, __slots__,
    __dict__ and containers (not through the node or link layer objects themselves)."""
    out: list[Any] = []
    seen: set[int] = set()

    def walk(o: Any) -> None:
        if id(o) in seen or isinstance(o, stop):
            return
        seen.add(id(o))
        if isinstance(o, str | bytes | bytearray | int | float):
            out.append(o)
            return
        if isinstance(o, tuple):
            out.append(o)
        if isinstance(o, dict):
            for k, v in o.items():
                walk(k)
                walk(v)
            return
        if isinstance(o, list | tuple | set | frozenset) or type(o).__name__ == "deque":
            for v in o:
                walk(v)
            return
        if callable(o) and not hasattr(o, "__dict__") and not hasattr(type(o), "__slots__"):
            return
        for name in getattr(type(o), "__slots__", ()):
            if hasattr(o, name):
                walk(getattr(o, name))
        for v in getattr(o, "__dict__", {}).values():
            walk(v)

    walk(obj)
    return out


def tamper_incoming(node: RelayNode | ClientNode, fn: Callable[[Link, bytes], bytes | None]) -> None:
    """Pass every cell the node receives through ``fn`` before the node sees it (None drops it).  Links are
    authenticated, so this is exactly what a malicious previous/next hop could have sent."""
    layer = node.link
    inner = layer.on_cell

    def on_cell(link: Link, cell: bytes) -> None:
        out = fn(link, cell)
        if out is not None:
            inner(link, out)

    layer.on_cell = on_cell
