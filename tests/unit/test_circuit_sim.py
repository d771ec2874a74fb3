"""Whole circuits in memory: build in one round trip, move datagrams, detect tampering and replays."""

from __future__ import annotations

from shallot.core.circuit import CircuitBuilt, CircuitState, DatagramReceived
from tests.simnet import SimNet, echoed, make_client, make_relays


def _setup():
    net = SimNet()
    relays = make_relays(net, 4, exits={2, 3})
    client = make_client(net)
    return net, relays, client


def test_build_and_echo() -> None:
    net, relays, client = _setup()
    path = [relays[0][1], relays[1][1], relays[2][1]]
    circ = client.build(path, net.now, net.wall)
    net.run()
    assert circ.state is CircuitState.OPEN
    assert isinstance(client.events.popleft(), CircuitBuilt)
    for i in range(20):
        client.send(circ, f"hello {i}".encode() * 10, net.now)
    net.run()
    got = [e.data for e in client.events if isinstance(e, DatagramReceived)]
    assert got == [f"hello {i}".encode() * 10 for i in range(20)]
    assert echoed(relays[2][0]) == 20
