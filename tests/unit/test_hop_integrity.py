"""No silent confirmation channel between a colluding guard and exit (docs/PROTOCOL.md §6.4-§6.6, review H3).

A malicious exit duplicates, flips and injects backward cells and a malicious guard does the same forward;
the honest middle between them must tear the circuit down (counted) where it can tell, and otherwise turn
whatever it forwards into bytes unrelated to what the attacker sent; the client must see the circuit end.
Everything the attackers do here happens after link authentication, i.e. it is exactly what a malicious
neighbour can send.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from shallot.core.circuit import CircuitClosed, CircuitFailed, CircuitState, DatagramReceived
from shallot.core.link import Link
from shallot.core.wire.cells import CMD_RELAY
from shallot.crypto.circuit_handshake import HopKeys
from shallot.crypto.onion import JUNK_LEN, ClientLayers, EndpointLayer, IntegrityError, RelayLayer, SequenceError
from shallot.crypto.params import CELL_HEADER_LEN, HOP_SEQ_LEN, HOP_WINDOW, INNER_LEN, RELAY_LEN
from tests.simnet import echoed
from tests.unit.helpers_circuits import Net, make_net, relay_addr

GUARD, MIDDLE, EXIT = 0, 1, 2


def _hooks(node, sender: int, action: Callable[[bytes], list[bytes]]) -> None:
    """Every RELAY cell ``node`` receives from relay ``sender`` goes through ``action``, which returns the
    cells to deliver instead (none, the same, copies, changed or extra ones)."""
    layer = node.link
    inner = layer.on_cell

    def on_cell(link: Link, cell: bytes) -> None:
        if link.addr == relay_addr(sender) and cell[4] == CMD_RELAY:
            for out in action(cell):
                inner(link, out)
        else:
            inner(link, cell)

    layer.on_cell = on_cell


def _received(node, sender: int) -> list[bytes]:
    """The RELAY cells ``node`` receives from ``sender`` (what a malicious node would inspect)."""
    seen: list[bytes] = []

    def keep(cell: bytes) -> list[bytes]:
        seen.append(cell)
        return [cell]

    _hooks(node, sender, keep)
    return seen


def _flip(cell: bytes, position: int) -> bytes:
    return cell[:position] + bytes([cell[position] ^ 0x01]) + cell[position + 1:]


def _bump_counter(cell: bytes) -> bytes:
    """A backward cell with the sender's counter moved on by one: it looks new to the next hop."""
    c = int.from_bytes(cell[CELL_HEADER_LEN:CELL_HEADER_LEN + HOP_SEQ_LEN], "big") + 1
    return cell[:CELL_HEADER_LEN] + c.to_bytes(HOP_SEQ_LEN, "big") + cell[CELL_HEADER_LEN + HOP_SEQ_LEN:]


def _setup() -> tuple[Net, object]:
    n = make_net()
    circ = n.build_open([GUARD, MIDDLE, EXIT])
    n.client.events.clear()
    return n, circ


def _ping(n: Net, circ, data: bytes = b"ping") -> list[bytes]:
    n.client.send(circ, data, n.net.now)
    n.net.run()
    out = [e.data for e in n.client.events if isinstance(e, DatagramReceived)]
    return out


def _client_saw_the_end(n: Net, circ) -> None:
    assert circ.state is CircuitState.CLOSED
    assert [e for e in n.client.events if isinstance(e, CircuitClosed | CircuitFailed)]
    for i in (GUARD, MIDDLE, EXIT):
        assert n.node(i).open_circuits == 0, f"relay {i} kept the circuit"


def _unrelated(a: bytes, b: bytes) -> bool:
    """Two regions whose XOR looks random (about half the bits differ), i.e. no mark survived."""
    diff = int.from_bytes(a, "big") ^ int.from_bytes(b, "big")
    return 0.4 < bin(diff).count("1") / (8 * len(a)) < 0.6


# ------------------------------------------------------------------------------ backward: a malicious exit


def test_an_exit_that_duplicates_a_backward_cell_is_torn_down_by_the_middle() -> None:
    n, circ = _setup()
    middle, guard = n.node(MIDDLE), n.node(GUARD)
    at_guard = _received(guard, MIDDLE)
    _hooks(middle, EXIT, lambda cell: [cell, cell])  # the review's PoC A.1: the same cell twice
    assert _ping(n, circ) == [b"ping"]  # the first copy is delivered ...
    assert middle.counters["hop_sequence_failure"] == 1  # ... the second kills the circuit at the middle
    assert len(at_guard) == 1, "the copy must not reach the guard"
    assert guard.counters["destroy_received_integrity"] == 1
    assert n.client.counters["destroy_received_destroyed"] == 1
    _client_saw_the_end(n, circ)


def test_an_exit_that_replays_a_cell_late_is_torn_down_by_the_middle() -> None:
    n, circ = _setup()
    middle = n.node(MIDDLE)
    kept: list[bytes] = []

    def hold_first(cell: bytes) -> list[bytes]:
        kept.append(cell)
        return [cell] if len(kept) < HOP_WINDOW + 2 else [cell, kept[0]]

    _hooks(middle, EXIT, hold_first)
    for i in range(HOP_WINDOW + 2):
        assert _ping(n, circ, b"%d" % i)[-1:] == [b"%d" % i] or circ.state is CircuitState.CLOSED
    assert middle.counters["hop_sequence_failure"] == 1
    _client_saw_the_end(n, circ)


def test_an_exit_that_flips_a_bit_gives_the_guard_nothing_and_the_client_tears_down() -> None:
    """The middle cannot authenticate what the exit writes (the exit is its author), but its layer runs on its
    own counter: a flipped copy under a fresh exit counter reaches the guard as unrelated bytes, and the
    client's end-to-end check tears the circuit down."""
    n, circ = _setup()
    middle, guard = n.node(MIDDLE), n.node(GUARD)
    at_guard = _received(guard, MIDDLE)
    _hooks(middle, EXIT, lambda cell: [cell, _flip(_bump_counter(cell), CELL_HEADER_LEN + 700)])
    _ping(n, circ)
    assert len(at_guard) == 2
    a, b = (cell[CELL_HEADER_LEN + HOP_SEQ_LEN:] for cell in at_guard)
    assert _unrelated(a, b), "the exit's one-bit mark must not survive the honest middle"
    assert n.client.counters["circuit_integrity_failure"] == 1
    assert guard.counters["destroy_received_integrity"] == 1
    assert middle.counters["destroy_received_destroyed"] == 1
    _client_saw_the_end(n, circ)


@pytest.mark.parametrize("counter", ["fresh", "repeated"])
def test_an_exit_that_injects_a_cell_is_caught(counter: str) -> None:
    n, circ = _setup()
    middle = n.node(MIDDLE)

    def inject(cell: bytes) -> list[bytes]:
        c = cell[CELL_HEADER_LEN:CELL_HEADER_LEN + HOP_SEQ_LEN] if counter == "repeated" else \
            _bump_counter(cell)[CELL_HEADER_LEN:CELL_HEADER_LEN + HOP_SEQ_LEN]
        forged = cell[:CELL_HEADER_LEN] + c + os.urandom(RELAY_LEN - HOP_SEQ_LEN)
        return [cell, forged]

    _hooks(middle, EXIT, inject)
    _ping(n, circ)
    if counter == "repeated":
        assert middle.counters["hop_sequence_failure"] == 1
    else:  # passes the middle as unrelated bytes; the client's AEAD refuses it
        assert n.client.counters["circuit_integrity_failure"] == 1
    _client_saw_the_end(n, circ)


# ------------------------------------------------------------------------------ forward: a malicious guard


@pytest.mark.parametrize("attack", ["duplicate", "flip_slot", "flip_body", "inject", "replace"])
def test_a_guard_that_tampers_forward_is_torn_down_by_the_middle(attack: str) -> None:
    n, circ = _setup()
    middle, exit_ = n.node(MIDDLE), n.node(EXIT)
    at_exit = _received(exit_, MIDDLE)
    assert _ping(n, circ, b"first") == [b"first"]
    actions = {
        "duplicate": lambda cell: [cell, cell],
        "flip_slot": lambda cell: [_flip(cell, CELL_HEADER_LEN + 12)],  # in the tag
        "flip_body": lambda cell: [_flip(cell, CELL_HEADER_LEN + 1000)],  # the review's XOR tag
        "inject": lambda cell: [cell, cell[:CELL_HEADER_LEN] + os.urandom(RELAY_LEN)],
        "replace": lambda cell: [cell[:CELL_HEADER_LEN] + cell[CELL_HEADER_LEN:CELL_HEADER_LEN + HOP_SEQ_LEN]
                                 + os.urandom(RELAY_LEN - HOP_SEQ_LEN)],  # right sequence number, forged rest
    }
    _hooks(middle, GUARD, actions[attack])
    n.client.send(circ, b"second", n.net.now)
    n.net.run()
    failures = middle.counters["hop_integrity_failure"] + middle.counters["hop_sequence_failure"]
    assert failures == 1
    expected = "hop_sequence_failure" if attack == "duplicate" else "hop_integrity_failure"
    assert middle.counters[expected] == 1
    # the exit (the guard's accomplice) got nothing it could read a mark from: only the honest copy, if any
    assert exit_.counters["circuit_integrity_failure"] == 0
    assert echoed(exit_) == (2 if attack in ("duplicate", "inject") else 1)
    assert len(at_exit) == echoed(exit_)
    assert exit_.counters["destroy_received_integrity"] == 1
    assert n.client.counters["destroy_received_destroyed"] == 1
    _client_saw_the_end(n, circ)


def test_a_guard_that_holds_a_cell_back_past_the_window_is_torn_down_by_the_middle() -> None:
    """Dropped now, re-inserted later: accepted within the window (datagram reordering), torn down after."""
    n, circ = _setup()
    middle = n.node(MIDDLE)
    held: list[bytes] = []

    def hold(cell: bytes) -> list[bytes]:
        if not held:
            held.append(cell)
            return []
        return [cell]

    _hooks(middle, GUARD, hold)
    for i in range(HOP_WINDOW + 1):  # sequence numbers 0 (held) .. 64: 0 is now just outside the window
        _ping(n, circ, b"%d" % i)
    assert circ.state is CircuitState.OPEN and middle.counters["hop_sequence_failure"] == 0
    _hooks(middle, GUARD, lambda cell: [cell])
    middle.link.on_cell(next(lk for lk in middle.link.links.values() if lk.addr == relay_addr(GUARD)), held[0])
    n.net.run()
    assert middle.counters["hop_sequence_failure"] == 1
    _client_saw_the_end(n, circ)


def test_a_cell_reordered_within_the_window_is_still_delivered() -> None:
    n, circ = _setup()
    middle = n.node(MIDDLE)
    held: list[bytes] = []

    def swap(cell: bytes) -> list[bytes]:
        if not held:
            held.append(cell)
            return []
        return [cell, held.pop()] if held else [cell]

    _hooks(middle, GUARD, swap)
    n.client.send(circ, b"a", n.net.now)
    n.client.send(circ, b"b", n.net.now)
    n.net.run()
    got = sorted(e.data for e in n.client.events if isinstance(e, DatagramReceived))
    assert got == [b"a", b"b"] and circ.state is CircuitState.OPEN
    assert middle.counters["hop_sequence_failure"] == 0


# ------------------------------------------------------------------------------ the layers themselves


def _keys(n: int) -> list[HopKeys]:
    return [HopKeys(*(os.urandom(32) for _ in range(8))) for _ in range(n)]


@pytest.mark.parametrize("hops", [1, 2, 3, 4])
def test_every_hop_of_every_path_length_opens_its_layer(hops: int) -> None:
    keys = _keys(hops)
    client, relays, exit_ = ClientLayers(keys), [RelayLayer(k) for k in keys[:-1]], EndpointLayer(keys[-1])
    for _ in range(3):
        inner = os.urandom(INNER_LEN)
        region = client.wrap(inner)
        for relay in relays:
            region = relay.forward(region)
            assert len(region) == RELAY_LEN
        assert exit_.open_forward(region) == inner
        back = os.urandom(INNER_LEN)
        region = exit_.seal_backward(back, os.urandom(JUNK_LEN))
        for relay in reversed(relays):
            region = relay.backward(region)
            assert len(region) == RELAY_LEN
        assert client.unwrap(region) == back


def test_each_forward_layer_rejects_a_copy_and_a_change() -> None:
    keys = _keys(3)
    client, guard = ClientLayers(keys), RelayLayer(keys[0])
    region = client.wrap(bytes(INNER_LEN))
    guard.forward(region)
    with pytest.raises(SequenceError):
        guard.forward(region)
    region = client.wrap(bytes(INNER_LEN))
    for position in (0, HOP_SEQ_LEN, RELAY_LEN // 2, RELAY_LEN - 1):
        with pytest.raises(IntegrityError):
            RelayLayer(keys[0]).forward(_flip(region, position))


def test_a_backward_layer_renumbers_so_equal_inputs_give_unrelated_outputs() -> None:
    keys = _keys(3)
    relay = RelayLayer(keys[1])
    cell = os.urandom(RELAY_LEN)
    out1 = relay.backward(cell)
    with pytest.raises(SequenceError):
        relay.backward(cell)
    out2 = relay.backward(_bump_counter(bytes(CELL_HEADER_LEN) + cell)[CELL_HEADER_LEN:])
    assert int.from_bytes(out2[:HOP_SEQ_LEN], "big") == int.from_bytes(out1[:HOP_SEQ_LEN], "big") + 1
    assert _unrelated(out1[HOP_SEQ_LEN:], out2[HOP_SEQ_LEN:])
