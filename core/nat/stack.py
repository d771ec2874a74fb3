"""A node stack on one UDP socket: the first-byte demux in front of a node and its NAT part.

This is what the socket adapter (core/io/udp.py) drives.  Build it in order, once, with no hook replaced
afterwards::

    link = client_link_layer(rng)                   # or relay_link_layer(keys, ...)
    nat = NatPart(link, rng=rng)                    # needs only the link layer
    node = ClientNode(rng=rng, link=link, dialer=nat.dialer, nat_cells=nat.control_cell)
    stack = NodeStack(node, nat)

Link packets go straight to the node (one table lookup, demux.py); STUN and NAT frames to the NAT part.
Node and NAT part share one datagram queue, the link layer's.  A link through a relay-server has a
virtual address there (virtual.py); ``datagrams_to_send`` frames those datagrams as RELAYED to the
server, and RELAYED datagrams of a session we are an end of reach the node under that address.
"""

from __future__ import annotations

from typing import Protocol

from shallot.core.link import Address, LinkLayer
from shallot.core.nat.demux import Kind, route_table
from shallot.core.nat.part import NatPart
from shallot.core.nat.virtual import virtual_address
from shallot.core.wire.nat_frames import RELAYED_HEADER_LEN


class StackedNode(Protocol):
    """A ClientNode or RelayNode: a sans-I/O machine that owns the link layer."""

    link: LinkLayer

    def receive_datagram(self, data: bytes, addr: Address, now: float, wall: float) -> None: ...

    def handle_timer(self, now: float, wall: float) -> None: ...

    def timer(self) -> float | None: ...

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]: ...


class NodeStack:
    def __init__(self, node: StackedNode, nat: NatPart) -> None:
        if nat.link is not node.link:
            raise ValueError("the NAT part must work on the node's own link layer")
        self.node = node
        self.nat = nat
        self._route = route_table({Kind.LINK: node.receive_datagram, Kind.RELAYED: self._on_relayed,
                                   **nat.handlers()})

    def receive_datagram(self, data: bytes, addr: Address, now: float, wall: float) -> None:
        self._route[data[0] if data else 0](data, addr, now, wall)

    def handle_timer(self, now: float, wall: float) -> None:
        inner = self.node.timer()
        if inner is not None and inner <= now:
            self.node.handle_timer(now, wall)
        self.nat.handle_timer(now, wall)

    def timer(self) -> float | None:
        node, nat = self.node.timer(), self.nat.timer()
        if node is None or (nat is not None and nat < node):
            return nat
        return node

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out = self.node.datagrams_to_send()
        if out and self.nat.paths:  # we are an end of a relayed session: its datagrams go via the relay-server
            self.nat.paths.frame(out)
        return out

    def _on_relayed(self, data: bytes, addr: Address, now: float, wall: float) -> None:
        session = self.nat.on_relayed(data, addr, now)
        if session is not None:
            self.node.receive_datagram(data[RELAYED_HEADER_LEN:], virtual_address(session), now, wall)
            self.nat.relayed_delivered(session)
