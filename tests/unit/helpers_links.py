"""Helpers for link-layer and circuit tests on tests/simnet.SimNet (no product code changes, no monkeypatch)."""

from __future__ import annotations

from collections.abc import Callable

from shallot.core.link import Link, LinkConfig, LinkLayer
from shallot.core.wire.cells import CMD_RELAY, encode_cell
from shallot.crypto.keys import RelayKeys
from shallot.crypto.primitives import x25519_public
from tests.simnet import SimNet, det_rng

Address = tuple[str, int]
CLIENT_ADDR: Address = ("192.0.2.20", 4444)


class CellSink:
    """Records every cell a LinkLayer hands to its owner."""

    def __init__(self, layer: LinkLayer) -> None:
        self.cells: list[tuple[Link, bytes]] = []
        layer.on_cell = lambda link, cell: self.cells.append((link, cell))

    def payloads(self) -> list[bytes]:
        return [cell for _link, cell in self.cells]


def relay_layer(net: SimNet, seed: int, addr: Address, *, cert_lifetime_s: int = 86400,
                keys: RelayKeys | None = None) -> tuple[LinkLayer, RelayKeys]:
    """A LinkLayer configured like a relay's (accepts clients and relays, IK identity + link cert)."""
    rng = det_rng(seed)
    keys = keys or RelayKeys.generate(rng, net.wall)
    expires = int(net.wall) + cert_lifetime_s
    layer = LinkLayer(LinkConfig(link_private=keys.link_private, link_pub=keys.link_pub, accept_clients=True,
                                 accept_relays=True, identity_pub=keys.identity_pub, cert_expires=expires,
                                 cert_sig=keys.link_cert(expires)), rng=rng)
    net.add(addr, layer)
    return layer, keys


def client_layer(net: SimNet, seed: int, addr: Address = CLIENT_ADDR) -> LinkLayer:
    """A LinkLayer configured like a client's (anonymous Noise NK, accepts nothing)."""
    rng = det_rng(seed)
    private = rng(32)
    layer = LinkLayer(LinkConfig(link_private=private, link_pub=x25519_public(private)), rng=rng)
    net.add(addr, layer)
    return layer


def relay_cell(n: int) -> bytes:
    return encode_cell(1000 + n, CMD_RELAY, n.to_bytes(4, "big") * 10)


def packets(net: SimNet, src: Address, dst: Address, msg_type: int) -> list[bytes]:
    """Datagrams of one type the SimNet carried from src to dst, in order."""
    return [data for s, d, data in net.log if s == src and d == dst and data and data[0] == msg_type]


def step_until(net: SimNet, done: Callable[[], bool], *, step: float = 1.0, limit: float = 120.0) -> float:
    """Advance the SimNet clock in ``step`` increments until ``done()``; return the elapsed time."""
    start = net.now
    while not done():
        if net.now - start > limit:
            raise AssertionError(f"condition not reached within {limit} s")
        net.advance(step)
    return net.now - start
