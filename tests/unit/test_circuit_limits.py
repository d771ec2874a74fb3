"""The client's own defences on its circuits (core/circuit/client.py, docs/PROTOCOL.md §5.8, §7): its build
timeout, a CREATED that does not authenticate, a guard link that goes down, and cells that do not fit
the circuit's state.  Each asserts what the user is told, the counter, and what the guard is sent."""

from __future__ import annotations

import pytest

from shallot.core.circuit import CircuitClosed, CircuitFailed, CircuitState, ClientNode, destroy_text
from shallot.core.wire.cells import (
    CMD_CREATE,
    CMD_CREATED,
    CMD_RELAY,
    MSG_DROP,
    MSG_END,
    DestroyReason,
    encode_cell,
    encode_message,
)
from shallot.crypto.params import CELL_HEADER_LEN, CELL_LEN, CREATE_TIMEOUT_S
from tests.simnet import det_rng
from tests.unit.helpers_circuits import CLIENT_ADDR, flip_bit, make_net, relay_addr, tamper_incoming
from tests.unit.helpers_limits import Destroys, ends


def _drop_creates(node) -> None:
    tamper_incoming(node, lambda link, cell: None if cell[4] == CMD_CREATE else cell)


@pytest.mark.parametrize("stuck", ["guard link", "build"])
def test_the_client_gives_up_a_build_after_its_timeout(stuck: str) -> None:
    n = make_net()
    if stuck == "guard link":
        del n.net.nodes[relay_addr(0)]  # the guard never answers the link handshake
    else:
        _drop_creates(n.node(0))  # the link comes up, the CREATE is never answered
    destroys = Destroys(n.client)
    circ = n.build([0, 1, 2])
    start = n.net.now
    while n.net.now - start < CREATE_TIMEOUT_S:
        n.net.advance(1.0)
    assert circ.state is not CircuitState.CLOSED and not ends(n.client)
    n.net.advance(1.0)
    (end,) = ends(n.client)
    assert isinstance(end, CircuitFailed) and end.reason == "circuit build timed out" == circ.close_reason
    if stuck == "build":  # a CREATE went out: the guard is told
        assert destroys.reasons() == [(relay_addr(0), DestroyReason.TIMEOUT)]
        assert n.node(0).counters["drop_destroy_unknown_circuit"] == 1  # it never saw the CREATE
    else:
        assert destroys.reasons() == []


@pytest.mark.parametrize("damage", ["reply", "padding"])
def test_a_created_that_does_not_authenticate_fails_the_build(damage: str) -> None:
    n = make_net()
    byte = CELL_HEADER_LEN + 40 if damage == "reply" else CELL_LEN - 1  # a hop's auth tag / the zero padding

    def forge(link, cell: bytes) -> bytes:
        return flip_bit(cell, byte) if cell[4] == CMD_CREATED else cell

    tamper_incoming(n.client, forge)
    circ = n.build([0, 1, 2])
    assert n.client.counters["created_auth_failure"] == 1 and n.client.counters["circuit_built"] == 0
    assert circ.state is CircuitState.CLOSED and circ.close_reason == "the circuit reply did not authenticate"
    (end,) = ends(n.client)
    assert isinstance(end, CircuitFailed)
    assert n.node(0).counters["destroy_received_protocol"] == 1
    assert [n.node(i).open_circuits for i in range(3)] == [0, 0, 0]  # the DESTROY went all the way


@pytest.mark.parametrize("state", ["waiting for the link", "open"])
def test_a_guard_link_that_goes_down_ends_its_circuits(state: str) -> None:
    n = make_net()
    if state == "open":
        circ = n.build_open([0, 1, 2])
        other = n.build_open([0, 1, 3])
    else:
        del n.net.nodes[relay_addr(0)]
        circ, other = n.build([0, 1, 2]), n.build([0, 1, 3])
    ends(n.client)
    assert circ.link is not None and circ.link is other.link
    n.client.link.close_link(circ.link, "peer silent")
    n.net.advance(0.0)
    got = ends(n.client)
    assert {e.circuit for e in got} == {circ, other} and not n.client.circuits
    if state == "open":
        assert all(isinstance(e, CircuitClosed) and e.reason == "link to the guard went down" for e in got)
    else:
        assert all(isinstance(e, CircuitFailed) and e.reason == "could not reach the guard: peer silent" for e in got)


def test_an_unexpected_command_on_a_circuit_tears_it_down() -> None:
    n = make_net()
    guard = n.node(0)
    circ = n.build_open([0, 1, 2])
    to_client = next(iter(link for link in guard.link.links.values() if link.addr == CLIENT_ADDR))
    guard.link.send_cell(to_client, encode_cell(circ.cid, 99, bytes(CELL_LEN - 5)), n.net.now)
    n.net.run()
    assert n.client.counters["drop_unexpected_command"] == 1
    assert circ.state is CircuitState.CLOSED and circ.close_reason == "a relay sent an unexpected cell"
    assert guard.counters["destroy_received_protocol"] == 1 and guard.open_circuits == 0


def test_cells_that_do_not_fit_the_circuit_state_are_dropped() -> None:
    n = make_net()
    guard = n.node(0)
    _drop_creates(n.node(1))
    building = n.build([0, 1, 2])
    open_ = n.build_open([0, 3, 2])  # relay 3 passes CREATEs on: this one opens
    to_client = next(iter(link for link in guard.link.links.values() if link.addr == CLIENT_ADDR))

    def from_guard(cid: int, cmd: int) -> None:
        guard.link.send_cell(to_client, encode_cell(cid, cmd, bytes(CELL_LEN - 5)), n.net.now)
        n.net.run()

    from_guard(building.cid, CMD_RELAY)
    assert n.client.counters["drop_relay_not_open"] == 1 and building.state is CircuitState.BUILDING
    from_guard(open_.cid, CMD_CREATED)
    assert n.client.counters["drop_created_unexpected"] == 1 and open_.state is CircuitState.OPEN
    from_guard(open_.cid ^ 0x1234, CMD_RELAY)
    assert n.client.counters["drop_unknown_circuit"] == 1
    n.client.events.clear()
    n.client.send(open_, b"still", n.net.now)
    n.net.run()
    assert [e.data for e in n.client.events if hasattr(e, "data")] == [b"still"]


def test_the_exits_end_closes_and_its_padding_is_counted() -> None:
    n = make_net()
    circ = n.build_open([0, 1, 2])
    exit_ = n.node(2)
    (circ_at_exit, _), = exit_.circuits.values()
    # the exit's services can send on their own (send_backward): padding, then END
    exit_.send_backward(circ_at_exit, encode_message(MSG_DROP, b"cover"), n.net.now)
    n.net.run()
    assert n.client.counters["e2e_padding_received"] == 1 and circ.state is CircuitState.OPEN
    ends(n.client)
    exit_.send_backward(circ_at_exit, encode_message(MSG_END), n.net.now)
    n.net.run()
    (end,) = ends(n.client)
    assert isinstance(end, CircuitClosed) and end.reason == "closed by the exit"
    assert n.node(0).counters["destroy_received_requested"] == 1


def test_commands_on_a_circuit_that_is_not_open_are_refused() -> None:
    n = make_net()
    with pytest.raises(ValueError, match="empty path"):
        n.client.build([], n.net.now, n.net.wall)
    _drop_creates(n.node(1))
    circ = n.build([0, 1, 2])
    with pytest.raises(ValueError, match="not open"):
        n.client.send(circ, b"x", n.net.now)
    with pytest.raises(ValueError, match="not open"):
        n.client.request_config(circ, n.net.now)
    n.client.close(circ, n.net.now)
    n.client.close(circ, n.net.now)  # twice: one DESTROY, one event
    n.net.run()
    assert len(ends(n.client)) == 1 and n.node(0).counters["destroy_received_requested"] == 1
    assert n.node(0).counters["drop_destroy_unknown_circuit"] == 0


def test_a_one_hop_path_is_sent_to_the_exit_as_is() -> None:
    """The client does not refuse a one-hop path itself (the CLI and path.py do): the exit must (§5.7 check 9)."""
    n = make_net()
    client = ClientNode(rng=det_rng(5))
    n.net.add(("192.0.2.12", 5555), client)
    circ = n.build([2], client=client)
    assert client.counters["create_sent"] == 1 and circ.close_reason == destroy_text(DestroyReason.HOP_REJECTED)
