"""Whole circuits in memory: build in one round trip, move datagrams, detect tampering and replays.

"One round trip" is counted here as the live tests count it at the client's socket, but on every link and
with the clock under control: the client sends its handshake and one CREATE and receives the handshake
response and one CREATED, whatever the relays' timers do while the CREATE travels (docs/PROTOCOL.md §1.2).
Tampering and replays here are on the wire (datagrams changed or repeated between two nodes) and at the onion
layer by a hop; tests/unit/test_circuit_security.py has the bit-by-bit tampering of cells by a hop.
"""

from __future__ import annotations

from collections import Counter

import pytest

from shallot.core.circuit import CircuitBuilt, CircuitClosed, CircuitFailed, CircuitState, DatagramReceived
from shallot.core.wire.cells import CMD_RELAY, DestroyReason
from shallot.crypto.params import MSG_INIT_CLIENT, MSG_RESPONSE, MSG_TRANSPORT
from tests.simnet import SimNet, echoed, make_client, make_relays
from tests.unit.helpers_circuits import CLIENT_ADDR, flip_bit, relay_addr, tamper_incoming

GUARD, MIDDLE = relay_addr(0), relay_addr(1)


def _setup():
    net = SimNet()
    relays = make_relays(net, 4, exits={2, 3})
    client = make_client(net)
    return net, relays, client


def _traffic(net: SimNet, since: int, node: tuple[str, int]) -> tuple[list[int], list[int]]:
    """First bytes of the datagrams ``node`` sent and received since log entry ``since``."""
    log = net.log[since:]
    return [d[0] for s, _, d in log if s == node], [d[0] for _, t, d in log if t == node]


def _echoes(client) -> list[bytes]:
    return [e.data for e in client.events if isinstance(e, DatagramReceived)]


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


# ------------------------------------------------------------------------------------------ one round trip


def test_a_fresh_client_builds_in_one_round_trip() -> None:
    """Client: INIT_CLIENT and one CREATE out, RESPONSE and one CREATED in.  Every relay link is new too: one
    handshake each way, then exactly one cell packet each way (the CREATE forward, the CREATED back)."""
    net, relays, client = _setup()
    circ = client.build([relays[0][1], relays[1][1], relays[2][1]], net.now, net.wall)
    net.run()
    assert circ.state is CircuitState.OPEN
    assert _traffic(net, 0, CLIENT_ADDR) == ([MSG_INIT_CLIENT, MSG_TRANSPORT], [MSG_RESPONSE, MSG_TRANSPORT])
    per_link = Counter((s, d, data[0] == MSG_TRANSPORT) for s, d, data in net.log)
    for a, b in ((relay_addr(0), relay_addr(1)), (relay_addr(1), relay_addr(2))):
        assert per_link[a, b, True] == per_link[b, a, True] == 1, (a, b, per_link)
        assert per_link[a, b, False] == per_link[b, a, False] == 1, (a, b, per_link)  # INIT_RELAY, RESPONSE
    assert len(net.log) == 2 * 2 * 3  # three links, two datagrams each way, and nothing else


@pytest.mark.parametrize("held_s", [1.0, 2.5, 9.0])
def test_one_round_trip_while_the_middle_is_slow_and_every_timer_runs(held_s: float) -> None:
    """The middle sits on the CREATE (a loaded relay) while every node's timer ticks.  The guard got the CREATE
    just after the client's handshake, so its link to the client has a circuit and has sent nothing since the
    handshake: it must not send a keepalive into the build (the "spurious keepalive" a fresh client used to
    see in tests/integration/test_live_relays.py; installing a session counts as sending, §4.7)."""
    net, relays, client = _setup()
    held: list[tuple[tuple[str, int], tuple[str, int], bytes]] = []
    net.tap = lambda src, dst, data: (held.append((src, dst, data)), None)[1] if dst == MIDDLE else data
    circ = client.build([relays[0][1], relays[1][1], relays[2][1]], net.now, net.wall)
    net.run()
    assert circ.state is CircuitState.BUILDING and held
    steps = int(held_s / 0.5)
    for _ in range(steps):  # every node ticks (the guard also retries its handshake with the middle)
        net.advance(0.5)
    assert relays[0][0].link.links and all(link.users for link in relays[0][0].link.links.values())
    net.tap = None
    for src, dst, data in held:
        net.nodes[dst].receive_datagram(data, src, net.now, net.wall)
    net.run()
    assert circ.state is CircuitState.OPEN, circ.close_reason
    assert _traffic(net, 0, CLIENT_ADDR) == ([MSG_INIT_CLIENT, MSG_TRANSPORT], [MSG_RESPONSE, MSG_TRANSPORT])
    client.send(circ, b"after a slow build", net.now)
    net.run()
    assert _echoes(client) == [b"after a slow build"]


def test_on_links_that_are_up_a_build_is_one_datagram_each_way_on_every_link() -> None:
    net, relays, client = _setup()
    path = [relays[0][1], relays[1][1], relays[2][1]]
    client.build(path, net.now, net.wall)
    net.run()
    mark = len(net.log)
    net.advance(5.0)  # timers run between the builds; the links stay up (keepalives are 10 s apart)
    assert len(net.log) == mark
    second = client.build(path, net.now, net.wall)
    net.run()
    assert second.state is CircuitState.OPEN
    assert _traffic(net, mark, CLIENT_ADDR) == ([MSG_TRANSPORT], [MSG_TRANSPORT])
    assert Counter((s, d) for s, d, _ in net.log[mark:]) == Counter(
        {(a, b): 1 for x, y in ((CLIENT_ADDR, GUARD), (GUARD, MIDDLE), (MIDDLE, relay_addr(2)))
         for a, b in ((x, y), (y, x))})


# ------------------------------------------------------------------------------------------ tampering, replays


def _open_circuit():
    net, relays, client = _setup()
    circ = client.build([relays[0][1], relays[1][1], relays[2][1]], net.now, net.wall)
    net.run()
    assert circ.state is CircuitState.OPEN
    client.events.clear()
    return net, relays, client, circ


def test_a_datagram_changed_on_the_wire_is_dropped_and_the_circuit_lives_on() -> None:
    net, relays, client, circ = _open_circuit()
    guard, exit_ = relays[0][0], relays[2][0]
    armed = [True]

    def flip(src: tuple[str, int], dst: tuple[str, int], data: bytes) -> bytes:
        if armed[0] and src == GUARD and dst == MIDDLE:
            armed[0] = False
            return flip_bit(data, 700)  # inside the link ciphertext
        return data

    net.tap = flip
    client.send(circ, b"changed in flight", net.now)
    net.run()
    assert not armed[0] and _echoes(client) == [] and echoed(exit_) == 0
    assert relays[1][0].link.counters["drop_bad_tag"] == 1
    assert circ.state is CircuitState.OPEN and guard.open_circuits == 1
    client.send(circ, b"the next one", net.now)
    net.run()
    assert _echoes(client) == [b"the next one"]


def test_a_datagram_repeated_on_the_wire_is_delivered_once() -> None:
    net, relays, client, circ = _open_circuit()
    net.tap = lambda src, dst, data: (copies.append((src, dst, data)), data)[1]
    copies: list[tuple[tuple[str, int], tuple[str, int], bytes]] = []
    client.send(circ, b"once", net.now)
    net.run()
    assert _echoes(client) == [b"once"]
    net.tap = None
    for src, dst, data in copies:  # an observer replays every datagram of that echo, on every link
        net.nodes[dst].receive_datagram(data, src, net.now, net.wall)
    net.run()
    assert _echoes(client) == [b"once"] and echoed(relays[2][0]) == 1
    for node in (client, relays[0][0], relays[1][0], relays[2][0]):
        assert node.link.counters["drop_replay"] >= 1
    assert sum(n.link.counters["drop_replay"] for n in (client, *(r for r, _ in relays))) == len(copies) == 6
    assert circ.state is CircuitState.OPEN


def test_a_relay_cell_replayed_by_the_guard_is_detected_at_the_middle() -> None:
    """The guard sends the middle the same RELAY cell twice (new link packets, so the link accepts both): the
    middle's own window catches the second and tears the circuit down; the exit never sees the copy."""
    net, relays, client, circ = _open_circuit()
    guard, middle, exit_ = (r for r, _ in relays[:3])

    def record(link, cell: bytes) -> bytes:
        if cell[4] == CMD_RELAY and link.addr == GUARD:
            replays.append(cell)
        return cell

    replays: list[bytes] = []
    tamper_incoming(middle, record)  # what the middle gets from the guard is exactly what the guard sent
    client.send(circ, b"first", net.now)
    net.run()
    assert _echoes(client) == [b"first"] and len(replays) == 1
    to_middle = next(link for link in guard.link.links.values() if link.addr == MIDDLE)
    guard.link.send_cell(to_middle, replays[0], net.now)
    net.run()
    assert middle.counters["hop_sequence_failure"] == 1 and echoed(exit_) == 1
    assert exit_.counters["circuit_integrity_failure"] == 0
    closed = [e for e in client.events if isinstance(e, CircuitClosed | CircuitFailed)]
    assert [e.reason for e in closed] == ["a relay further along the circuit ended it"]
    assert guard.counters["destroy_received_integrity"] == 1 and exit_.counters["destroy_received_integrity"] == 1
    assert client.counters[f"destroy_received_{DestroyReason.DESTROYED.name.lower()}"] == 1
    assert circ.state is CircuitState.CLOSED and middle.open_circuits == exit_.open_circuits == 0
