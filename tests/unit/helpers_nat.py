"""Helpers for NAT tests: node stacks built as the services build them (core/nat/stack.py), on tests/simnet."""

from __future__ import annotations

from shallot.core.circuit import ClientNode, client_link_layer
from shallot.core.link import Address, Link, LinkState
from shallot.core.nat import NatPart, NodeStack
from shallot.core.nat.classify import NatType
from shallot.crypto.descriptor import Descriptor, Reachability
from shallot.crypto.keys import RelayKeys
from shallot.relay.forwarder import RelayNode, relay_link_layer
from tests.simnet import SimNet, det_rng

CLIENT_ADDR: Address = ("192.0.2.10", 5555)


def keys(seed: int) -> RelayKeys:
    return RelayKeys.generate(det_rng(seed), 1_800_000_000.0)


def relay_stack(net: SimNet, i: int, *, serve: bool) -> tuple[NodeStack, RelayKeys, Address]:
    """Relay ``i`` at 10.i.0.1:9000 on ``net``: a public one (``serve``) or one behind a NAT."""
    rkeys = keys(100 + i)
    addr = (f"10.{i}.0.1", 9000)
    rng = det_rng(i)
    link = relay_link_layer(rkeys, rng=rng, wall=net.wall)
    nat = NatPart(link, rng=det_rng(50 + i), serve=serve)
    node = RelayNode(rkeys, rng=rng, wall=net.wall, link=link, nat_cells=nat.control_cell)
    stack = NodeStack(node, nat)
    net.add(addr, stack)
    return stack, rkeys, addr


def client_stack(net: SimNet, *, seed: int = 7, addr: Address = CLIENT_ADDR) -> NodeStack:
    """A client as CircuitClient builds it: the node dials through the NAT part."""
    rng = det_rng(seed)
    link = client_link_layer(rng)
    nat = NatPart(link, rng=det_rng(seed + 1))
    node = ClientNode(rng=rng, link=link, dialer=nat.dialer, nat_cells=nat.control_cell)
    stack = NodeStack(node, nat)
    net.add(addr, stack)
    return stack


class Scene:
    """Introducer I, a relay B behind a 'NAT' (its descriptor names I), a client A; a tap decides which
    direct A<->B datagrams get through."""

    def __init__(self, a_nat: NatType, b_nat: NatType) -> None:
        self.net = SimNet()
        self.intro, ikeys, self.i_addr = relay_stack(self.net, 1, serve=True)
        self.b, bkeys, self.b_addr = relay_stack(self.net, 2, serve=False)
        self.b.nat.own.nat_type = b_nat
        self.b.nat.register([(ikeys.relay_id, self.i_addr, ikeys.link_pub)], self.net.now, self.net.wall)
        self.a_addr = CLIENT_ADDR
        self.a = client_stack(self.net, addr=self.a_addr)
        self.a.nat.own.nat_type = a_nat
        self.direct_ok = True
        ends = {self.a_addr, self.b_addr}
        self.net.tap = lambda src, dst, data: None if ({src, dst} == ends and not self.direct_ok) else data
        self.net.run()
        self.desc = Descriptor.create(bkeys, nickname="natted", addresses=(self.b_addr,), exit_node=False,
                                      published=int(self.net.wall), lifetime_s=3600,
                                      reachability=Reachability(int(b_nat.mapping), int(b_nat.filtering),
                                                                ((ikeys.relay_id, self.i_addr),)))

    def dial(self) -> Link:
        link = self.a.nat.dialer.dial(self.desc, self.net.now, self.net.wall)
        for _ in range(40):
            self.net.run()
            if link.state is LinkState.UP:
                break
            self.net.advance(0.1)
        return link
