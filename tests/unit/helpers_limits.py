"""Helpers for the limit and drop-path tests (tests/unit/test_*_limits.py): SimNets whose relays run with a
changed ``RelayConfig``, the DESTROY cells a node sends, inner messages a client could send by hand."""

from __future__ import annotations

import dataclasses
from typing import Any

from shallot.core.circuit import CircuitClosed, CircuitFailed, ClientCircuit, ClientNode
from shallot.core.link import Link
from shallot.core.wire.cells import CMD_DESTROY, DestroyReason, encode_message
from shallot.crypto.params import CELL_HEADER_LEN
from shallot.exit.endpoints import endpoint_services
from shallot.relay.forwarder import RelayNode
from tests.simnet import det_rng
from tests.unit.helpers_circuits import Net, intercept_sends, make_net, relay_addr


def configured_net(configs: dict[int, dict[str, Any]], *, n: int = 4, exits: set[int] | None = None) -> Net:
    """tests/unit/helpers_circuits.make_net, with relay i built from a RelayConfig changed by configs[i] (the
    token buckets read their rates when the node is made, so the node is made again)."""
    net = make_net(n, exits=exits)
    for i, changes in configs.items():
        old, desc = net.relays[i]
        node = RelayNode(old.keys, rng=det_rng(7000 + i), wall=net.net.wall,
                         config=dataclasses.replace(old.config, **changes), services=endpoint_services())
        net.net.add(relay_addr(i), node)
        net.relays[i] = (node, desc)
    return net


def link_to(node: RelayNode | ClientNode, addr: tuple[str, int]) -> Link:
    return next(link for link in node.link.links.values() if link.addr == addr)


class Destroys:
    """Every DESTROY a node sends: (link address, circuit id, reason)."""

    def __init__(self, node: RelayNode | ClientNode) -> None:
        self.sent: list[tuple[tuple[str, int], int, DestroyReason]] = []

        def watch(link: Link, cell: bytes) -> bytes:
            if cell[4] == CMD_DESTROY:
                self.sent.append((link.addr, int.from_bytes(cell[:4], "big"), DestroyReason(cell[CELL_HEADER_LEN])))
            return cell

        intercept_sends(node, watch)

    def reasons(self) -> list[tuple[tuple[str, int], DestroyReason]]:
        return [(addr, reason) for addr, _cid, reason in self.sent]


def send_inner(n: Net, circ: ClientCircuit, msg_type: int, data: bytes = b"") -> None:
    """An end-to-end message of any type from the client (ClientNode itself sends only DATA and CONFIG)."""
    assert circ.layers is not None and circ.link is not None
    region = circ.layers.wrap(encode_message(msg_type, data))
    n.client.link.send_cell(circ.link, circ.prefix + region, n.net.now)
    n.net.run()


def ends(client: ClientNode) -> list[CircuitClosed | CircuitFailed]:
    """The CircuitClosed / CircuitFailed events so far (taken off the queue)."""
    out = [e for e in client.events if isinstance(e, CircuitClosed | CircuitFailed)]
    client.events.clear()
    return out
