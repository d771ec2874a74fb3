"""Circuit-level security properties, in memory on tests/simnet.SimNet.

A malicious hop is modelled by tampering with the cells a node *receives* from it (helpers_circuits.
tamper_incoming): links are authenticated, so that is exactly what the neighbour could have sent, and it
does not depend on how the relay's forwarding path is implemented.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from shallot.core.circuit import CircuitClosed, CircuitFailed, CircuitState, DatagramReceived, destroy_text
from shallot.core.wire.cells import CMD_CREATE, CMD_CREATED, CMD_RELAY, DestroyReason, encode_cell
from shallot.crypto import circuit_handshake as ch
from shallot.crypto.params import (
    CELL_HEADER_LEN,
    CELL_LEN,
    CREATE_SLOTS_LEN,
    CREATED_SLOTS_LEN,
    HOP_SEQ_LEN,
    HOP_SLOT_LEN,
    INNER_LEN,
    N_SLOTS,
    RECORD_LEN,
    REPLY_LEN,
    TAG_LEN,
)
from shallot.crypto.primitives import AuthFailure, x25519_public
from tests.simnet import echoed
from tests.unit.helpers_circuits import (
    CLIENT_ADDR,
    CellLog,
    SkewedNode,
    atoms,
    flip_bit,
    make_net,
    relay_addr,
    tamper_incoming,
)
from tests.unit.helpers_vectors import HOP_KEY_FIELDS, compute, onion_ring

VECTOR_FILE = Path(__file__).resolve().parents[1] / "vectors" / "circuit_build_v1.json"
_HDR = CELL_HEADER_LEN  # the onion-layer region starts here: the first hop slot (sequence | tag) ...
_BODY = CELL_HEADER_LEN + HOP_SLOT_LEN  # ... and then the AEAD ciphertext

FLIP_POSITIONS = {
    "header_first": _HDR,
    "header_last": _BODY - 1,
    "body_first": _BODY,
    "body_middle": _BODY + 700,
    "tag_last": CELL_LEN - 1,
}


def _events(client) -> list:
    out = list(client.events)
    client.events.clear()
    return out


def _echo(n, circ, data: bytes) -> list[bytes]:
    n.client.send(circ, data, n.net.now)
    n.net.run()
    return [e.data for e in _events(n.client) if isinstance(e, DatagramReceived)]


def _assert_torn_down_everywhere(n, hops: list[int], circ) -> None:
    assert circ.state is CircuitState.CLOSED
    for i in hops:
        node = n.node(i)
        assert node.circuits == {} and node.open_circuits == 0, f"relay {i} kept circuit state"
        assert all(link.users == 0 for link in node.link.links.values()), f"relay {i} leaked link users"


# ------------------------------------------------------------------------------------------ tampering


def _flip_once(receiver: Any, *, from_relay: int, position: int, bit: int) -> list[bool]:
    """``receiver`` gets the next RELAY cell from relay ``from_relay`` with one bit flipped (a tampering
    neighbour); the returned flag turns False once that happened."""
    armed = [True]

    def flips(link: Any, cell: bytes) -> bytes:
        if armed[0] and link.addr == relay_addr(from_relay) and cell[4] == CMD_RELAY:
            armed[0] = False
            return flip_bit(cell, position, bit)
        return cell

    tamper_incoming(receiver, flips)
    return armed


@pytest.mark.parametrize("where", sorted(FLIP_POSITIONS))
def test_forward_bit_flip_by_the_guard_is_detected_at_the_middle(where: str) -> None:
    n = make_net()
    circ = n.build_open([0, 1, 2])
    assert _echo(n, circ, b"before") == [b"before"]
    guard, middle, exit_ = n.node(0), n.node(1), n.node(2)
    armed = _flip_once(middle, from_relay=0, position=FLIP_POSITIONS[where], bit=3)
    n.client.send(circ, b"tampered", n.net.now)
    n.net.run()
    assert not armed[0]
    events = _events(n.client)
    assert not any(isinstance(e, DatagramReceived) for e in events)
    (closed,) = [e for e in events if isinstance(e, CircuitClosed | CircuitFailed)]
    # the first honest hop (the middle) catches it; the tampered cell never reaches the exit
    assert middle.counters["hop_integrity_failure"] + middle.counters["hop_sequence_failure"] == 1
    assert exit_.counters["circuit_integrity_failure"] == 0
    assert echoed(exit_) == 1, "the tampered datagram must not reach the service"
    # the reason reaches only the middle's neighbours; the client hears a generic DESTROY from its guard
    assert guard.counters["destroy_received_integrity"] == 1
    assert exit_.counters["destroy_received_integrity"] == 1
    assert n.client.counters["destroy_received_destroyed"] == 1
    _assert_torn_down_everywhere(n, [0, 1, 2], circ)
    assert closed.reason == circ.close_reason == destroy_text(DestroyReason.DESTROYED)


# a backward region from the middle: its counter, then (under its layer) the exit's counter, AEAD output and
# junk; the last byte of the exit's tag is the last one that matters
BACKWARD_FLIPS = {**{k: v for k, v in FLIP_POSITIONS.items() if k != "tag_last"},
                  "tag_last": CELL_HEADER_LEN + 2 * HOP_SEQ_LEN + INNER_LEN + TAG_LEN - 1}


@pytest.mark.parametrize("where", sorted(BACKWARD_FLIPS))
def test_backward_bit_flip_by_the_middle_is_detected_by_the_client(where: str) -> None:
    n = make_net()
    circ = n.build_open([0, 1, 2])
    guard, middle, exit_ = n.node(0), n.node(1), n.node(2)
    armed = _flip_once(guard, from_relay=1, position=BACKWARD_FLIPS[where], bit=6)
    n.client.send(circ, b"ping", n.net.now)
    n.net.run()
    assert not armed[0]
    events = _events(n.client)
    assert not any(isinstance(e, DatagramReceived) for e in events)
    assert echoed(exit_) == 1
    assert n.client.counters["circuit_integrity_failure"] == 1
    (closed,) = [e for e in events if isinstance(e, CircuitClosed | CircuitFailed)]
    assert "integrity" in closed.reason
    assert guard.counters["destroy_received_integrity"] == 1
    assert middle.counters["destroy_received_destroyed"] == 1
    assert exit_.counters["destroy_received_destroyed"] == 1
    _assert_torn_down_everywhere(n, [0, 1, 2], circ)


def test_the_bytes_a_hop_cuts_off_backward_carry_nothing() -> None:
    """Behind the exit's AEAD output a backward region is junk: what a hop changes there never reaches the
    client, and it reaches the previous hop only under this hop's fresh keystream (or is cut off)."""
    n = make_net()
    circ = n.build_open([0, 1, 2])
    first_junk = BACKWARD_FLIPS["tag_last"] + 1
    for position in (first_junk, CELL_LEN - HOP_SEQ_LEN - 1, CELL_LEN - 1):
        armed = _flip_once(n.node(0), from_relay=1, position=position, bit=6)
        assert _echo(n, circ, b"ping") == [b"ping"] and not armed[0]
    assert circ.state is CircuitState.OPEN


def test_replayed_create_is_rejected_by_the_next_hop() -> None:
    n = make_net()
    log = CellLog({"guard": n.node(0), "middle": n.node(1)})
    circ = n.build_open([0, 1, 2])
    guard, middle, exit_ = n.node(0), n.node(1), n.node(2)
    (create,) = log.cells("middle", CMD_CREATE)
    to_middle = next(link for link in guard.link.links.values() if link.addr == relay_addr(1))
    # the guard re-sends the same CREATE bytes on a new circuit id (same id space: flip the lowest bit)
    replay = encode_cell(create.cid ^ 1, CMD_CREATE, create.cell[CELL_HEADER_LEN:])
    guard.link.send_cell(to_middle, replay, n.net.now)
    n.net.run()
    assert middle.counters["reject_create_replay"] == 1
    assert middle.open_circuits == 1 and exit_.counters["circuit_terminated_here"] == 1
    assert guard.counters["drop_destroy_unknown_circuit"] == 1  # the DESTROY(HOP_REJECTED) for the replay
    assert _echo(n, circ, b"still fine") == [b"still fine"]

    # the client's CREATE replayed to the guard on another circuit id: rejected the same way
    (first,) = log.cells("guard", CMD_CREATE)
    n.client.link.send_cell(circ.link, encode_cell(first.cid ^ 1, CMD_CREATE, first.cell[CELL_HEADER_LEN:]),
                            n.net.now)
    n.net.run()
    assert guard.counters["reject_create_replay"] == 1 and guard.open_circuits == 1

    # and still after the circuit is gone (the replay cache outlives circuits)
    n.client.close(circ, n.net.now)
    n.net.run()
    assert middle.open_circuits == 0
    guard.link.send_cell(to_middle, replay, n.net.now)
    n.net.run()
    assert middle.counters["reject_create_replay"] == 2 and middle.open_circuits == 0


# ------------------------------------------------------------------------------------------ unlinkability


def test_each_relay_knows_only_its_neighbours() -> None:
    n = make_net()
    circ = n.build_open([0, 1, 2])
    assert circ.state is CircuitState.OPEN
    expected = {0: (CLIENT_ADDR, relay_addr(1)), 1: (relay_addr(0), relay_addr(2)), 2: (relay_addr(1), None)}
    everyone = {"client": (CLIENT_ADDR, b"")} | {
        f"r{i}": (relay_addr(i), n.desc(i)) for i in range(3)}
    for i, (prev, nxt) in expected.items():
        node = n.node(i)
        circuits = {id(c): c for c, _ in node.circuits.values()}
        assert len(circuits) == 1
        (rc,) = circuits.values()
        assert node.neighbours_of(rc) == (prev, nxt)
        assert {link.addr for link in node.link.links.values()} == {a for a in (prev, nxt) if a}
        known = atoms(rc)
        strings = {a for a in known if isinstance(a, str | tuple)}
        blobs = b"\x00".join(bytes(a) for a in known if isinstance(a, bytes | bytearray))
        for name, (addr, desc) in everyone.items():
            if addr in (prev, nxt) or addr == relay_addr(i):
                continue
            assert addr not in strings and addr[0] not in strings, f"relay {i} holds {name}'s address"
            if desc:
                for field in ("relay_id", "link_pub", "onion_pub", "identity_pub"):
                    assert getattr(desc, field) not in blobs, f"relay {i} holds {name}'s {field}"


def _cells_by_link(log: CellLog, command: int) -> dict[tuple[str, tuple[str, int]], list[bytes]]:
    out: dict[tuple[str, tuple[str, int]], list[bytes]] = {}
    for s in log.seen:
        if s.command == command:
            out.setdefault((s.who, s.link.addr), []).append(s.cell)
    return out


def _pairwise_distinct(values: list[bytes], what: str) -> None:
    assert len(set(values)) == len(values), f"{what} repeats across links"


def test_every_header_field_differs_on_every_link() -> None:
    n = make_net()
    log = CellLog({"client": n.client, "guard": n.node(0), "middle": n.node(1), "exit": n.node(2)})
    circ = n.build_open([0, 1, 2])
    assert _echo(n, circ, b"x" * 100) == [b"x" * 100]
    c, g, m, e = CLIENT_ADDR, relay_addr(0), relay_addr(1), relay_addr(2)
    forward_links = [("guard", c), ("middle", g), ("exit", m)]  # (receiver, sender address)
    backward_links = [("middle", e), ("guard", m), ("client", g)]

    creates = [cells[0] for k, cells in _cells_by_link(log, CMD_CREATE).items() if k in forward_links]
    assert len(creates) == 3
    _pairwise_distinct([x[:4] for x in creates], "CREATE circuit id")
    slots = [x[_HDR:_HDR + CREATE_SLOTS_LEN] for x in creates]
    _pairwise_distinct(slots, "CREATE slots region")
    every_slot = [s[k * RECORD_LEN:(k + 1) * RECORD_LEN] for s in slots for k in range(N_SLOTS)]
    _pairwise_distinct(every_slot, "a 148-byte build slot")

    createds = [cells[0] for k, cells in _cells_by_link(log, CMD_CREATED).items() if k in backward_links]
    assert len(createds) == 3
    _pairwise_distinct([x[:4] for x in createds], "CREATED circuit id")
    replies = [x[_HDR + k * REPLY_LEN:_HDR + (k + 1) * REPLY_LEN] for x in createds
               for k in range(CREATED_SLOTS_LEN // REPLY_LEN)]
    _pairwise_distinct(replies, "a 48-byte reply slot")

    relay = _cells_by_link(log, CMD_RELAY)
    for direction in (forward_links, backward_links):
        cells = [relay[k][0] for k in direction]
        _pairwise_distinct([x[:4] for x in cells], "RELAY circuit id")
        _pairwise_distinct([x[_HDR:_BODY] for x in cells], "24-byte hop slot")
        _pairwise_distinct([x[_BODY:] for x in cells], "RELAY body")
        assert all(x[4] == CMD_RELAY and len(x) == CELL_LEN for x in cells)
    # a circuit keeps one id per link, in both directions
    for fwd_key, bwd_key in zip(forward_links, reversed(backward_links)):
        assert relay[fwd_key][0][:4] == relay[bwd_key][0][:4]


def _create_layout(payload: bytes, own_key_id: bytes, all_key_ids: set[bytes]) -> tuple:
    slots = [payload[k * RECORD_LEN:(k + 1) * RECORD_LEN] for k in range(N_SLOTS)]
    return (
        len(payload),
        not any(payload[CREATE_SLOTS_LEN:]),  # zero padding after the slots
        slots[0][:4] == own_key_id,  # our record always in slot 0
        any(s[:4] in all_key_ids for s in slots[1:]),  # no other slot names a known onion key
        all(len(set(s)) > 60 for s in slots),  # no constant or zero filler (148 random bytes: ~112 values)
    )


def test_a_hop_cannot_tell_its_position_from_the_create_it_receives() -> None:
    n = make_net(5, exits={3, 4})
    log = CellLog({f"r{i}": n.node(i) for i in range(5)})
    key_ids = {n.desc(i).onion_key_id for i in range(5)}
    layouts = set()
    seen_positions = set()
    for path in ([0, 3], [1, 0, 4], [2, 1, 0, 3], [4, 2, 3]):
        log.seen.clear()
        n.build_open(path)
        for pos, hop in enumerate(path):
            (create,) = log.cells(f"r{hop}", CMD_CREATE)
            layouts.add(_create_layout(create.cell[CELL_HEADER_LEN:], n.desc(hop).onion_key_id, key_ids))
            seen_positions.add((pos, len(path)))
        # every CREATED a hop sends back looks the same whatever its position: 4 random-looking slots
        for s in log.seen:
            if s.command == CMD_CREATED:
                payload = s.cell[CELL_HEADER_LEN:]
                assert not any(payload[CREATED_SLOTS_LEN:])
                assert all(len(set(payload[k:k + REPLY_LEN])) > 25 for k in range(0, CREATED_SLOTS_LEN, REPLY_LEN))
    assert len(seen_positions) == 9
    assert layouts == {(CELL_LEN - CELL_HEADER_LEN, True, True, False, True)}



# ------------------------------------------------------------------------------------------ build records


@pytest.mark.parametrize("skew_min", [-90, 90, -8, 8])
def test_exit_checks_the_build_record_clock(skew_min: int) -> None:
    """The exit's clock is 90 minutes off (guard and middle are right): only the exit rejects.  Records carry
    the client's hour, accepted within RECORD_SLACK_S (10 min) beyond it: 8 minutes off always passes."""
    n = make_net()
    first = n.build_open([0, 1, 2])  # links up while every clock agrees
    exit_ = n.node(2)
    n.net.nodes[relay_addr(2)] = SkewedNode(exit_, skew_min * 60.0)
    circ = n.build([0, 1, 2])
    if abs(skew_min) > 70:
        assert exit_.counters["reject_create_clock_skew"] == 1
        assert circ.state is CircuitState.CLOSED
        (failed,) = [e for e in _events(n.client) if isinstance(e, CircuitFailed)]
        assert failed.reason == destroy_text(DestroyReason.DESTROYED)  # the reason stops at the middle
        assert n.node(1).counters["destroy_received_hop_rejected"] == 1
        assert n.node(0).open_circuits == n.node(1).open_circuits == exit_.open_circuits == 1
    else:
        assert circ.state is CircuitState.OPEN and exit_.counters["reject_create_clock_skew"] == 0
    assert _echo(n, first, b"first still works") == [b"first still works"]


@pytest.mark.parametrize("path", [[0, 1], [1]])
def test_a_relay_that_is_not_an_exit_rejects_a_terminate_record(path: list[int]) -> None:
    n = make_net()  # relays 0 and 1 are not exits
    circ = n.build(path)
    assert n.node(path[-1]).counters["reject_create_not_exit"] == 1
    assert circ.state is CircuitState.CLOSED
    (failed,) = [e for e in _events(n.client) if isinstance(e, CircuitFailed)]
    # the client reads the reason only from its guard (§7.2)
    assert failed.reason == destroy_text(DestroyReason.HOP_REJECTED if len(path) == 1 else DestroyReason.DESTROYED)
    _assert_torn_down_everywhere(n, path, circ)


def test_a_relay_reuses_a_link_only_for_the_authenticated_link_key() -> None:
    """A build record names the next hop by address, link key and relay id; only the link key is
    authenticated (by the Noise IK handshake).  A record that pairs relay X's id with relay Y's address
    and key must not make the guard file its link to Y as 'the link to X'."""
    n = make_net(5, exits={2})
    x, y = n.desc(1), n.desc(3)
    impostor = dataclasses.replace(y, identity_pub=x.identity_pub)  # claims X's relay id; Y's address and keys
    assert impostor.relay_id == x.relay_id and impostor.link_pub == y.link_pub
    evil = n.client  # any client can write any record
    bad = evil.build([n.desc(0), impostor, n.desc(2)], n.net.now, n.net.wall)
    n.net.run()
    # Y carries it, but Y's relay id and link key are bound into its keys (§5.4, review L1): the client,
    # who meant X, refuses Y's reply
    assert bad.state is CircuitState.CLOSED and n.client.counters["created_auth_failure"] == 1
    honest = n.build([0, 1, 2])
    assert honest.state is CircuitState.OPEN, f"the honest build through X failed: {honest.close_reason}"
    assert n.node(1).open_circuits == 1, "X never saw the honest circuit"


# ------------------------------------------------------------------------------------------ test vectors


def test_circuit_build_vector_reproduces_byte_for_byte() -> None:
    vector = json.loads(VECTOR_FILE.read_text())
    got = compute(vector["inputs"])
    expected = vector["expected"]
    assert set(got) == set(expected)
    for name in expected:
        assert got[name] == expected[name], f"{name} differs from tests/vectors/circuit_build_v1.json"


def test_circuit_build_vector_depends_on_every_secret_input() -> None:
    """The byte-for-byte comparison is meaningful: changing any ephemeral changes the expected values."""
    vector = json.loads(VECTOR_FILE.read_text())
    base = compute(vector["inputs"])
    for i in range(len(vector["inputs"]["hops"])):
        for secret, changes in (("x_private", "create_slots"), ("y_private", "replies"),
                                ("onion_private", "create_slots")):
            inputs = json.loads(json.dumps(vector["inputs"]))
            hop = inputs["hops"][i]
            hop[secret] = bytes(b ^ 0x01 for b in bytes.fromhex(hop[secret])).hex()
            got = compute(inputs)
            assert got[changes] != base[changes], (i, secret)
            assert got["hop_keys"][i] != base["hop_keys"][i], (i, secret)


@pytest.mark.parametrize("n_hops", [1, 2, 3, 4])
def test_fixed_ephemerals_derive_identical_hop_keys_on_both_sides(n_hops: int) -> None:
    onion = [bytes([0x10 + i]) * 32 for i in range(n_hops)]
    xs = [bytes([0x20 + i]) * 32 for i in range(n_hops)]
    ys = [bytes([0x30 + i]) * 32 for i in range(n_hops)]
    instructions = [ch.ExtendTo(f"10.0.0.{i}", 9000 + i, bytes([i]) * 32, bytes([i]) * 20)
                    for i in range(n_hops - 1)] + [ch.Terminate(ch.SERVICE_ECHO)]
    idents = [ch.HopIdentity(bytes([0x50 + i]) * 20, bytes([0x60 + i]) * 32) for i in range(n_hops)]
    hops = [ch.HopTarget(x25519_public(k), ins, ident) for k, ins, ident in zip(onion, instructions, idents)]
    zero = lambda k: bytes(k)  # noqa: E731 - deterministic filler
    pending, slots = ch.client_create(hops, hour=1000, rng=zero, ephemerals=xs)
    assert [p.x_pub for p in pending] == [x25519_public(x) for x in xs]
    relay_keys, replies = [], []
    for i in range(n_hops):
        opened = ch.relay_open(slots, onion_ring(onion[i]), rng=zero)
        assert opened.instruction == instructions[i] and opened.hour == 1000
        keys, reply = ch.relay_reply(opened, idents[i], rng=zero, y_private=ys[i])
        assert reply[:32] == x25519_public(ys[i])
        relay_keys.append(keys)
        replies.append(reply)
        slots = opened.forward_slots
    back = ch.relay_created_first(replies[-1], rng=zero)
    for i in range(n_hops - 2, -1, -1):
        back = ch.relay_created_wrap(relay_keys[i], replies[i], back)
    client_keys = ch.client_created(pending, back)
    assert client_keys == relay_keys
    for k in client_keys:  # all eight keys distinct: no two roles share a key
        assert len({getattr(k, f) for f in HOP_KEY_FIELDS}) == len(HOP_KEY_FIELDS)
    # any change to any hop's reply (its Y or its auth tag, under the layers of the hops before it) fails
    for i in range(n_hops):
        for offset in (0, 31, 32, REPLY_LEN - 1):
            with pytest.raises(AuthFailure):
                ch.client_created(pending, flip_bit(back, i * REPLY_LEN + offset))


def test_one_hop_vector_from_the_protocol_document() -> None:
    """docs/PROTOCOL.md §11.2, "One-hop build" (all of §11.2: test_protocol_vectors.py, vectors/independent.py)."""
    vectors = json.loads((Path(__file__).parent.parent / "vectors" / "protocol_v1.json").read_text())
    keys_in, v = vectors["keys"]["expected"], vectors["one_hop_build"]
    onion_private = bytes.fromhex(v["inputs"]["onion_private"])
    x, y = bytes.fromhex(v["inputs"]["x_private"]), bytes.fromhex(v["inputs"]["y_private"])
    ident = ch.HopIdentity(bytes.fromhex(keys_in["relay_id"]), bytes.fromhex(keys_in["link_pub"]))
    hop = ch.HopTarget(x25519_public(onion_private), ch.Terminate(ch.SERVICE_ECHO), ident)
    pending, slots = ch.client_create([hop], hour=v["inputs"]["hour"], rng=lambda k: bytes(k), ephemerals=[x])
    assert slots[:RECORD_LEN].hex() == v["expected"]["slot0"]
    opened = ch.relay_open(slots, onion_ring(onion_private), rng=lambda k: bytes(k))
    keys, reply = ch.relay_reply(opened, ident, rng=lambda k: bytes(k), y_private=y)
    assert reply.hex() == v["expected"]["reply"]
    assert {f: getattr(keys, f).hex() for f in HOP_KEY_FIELDS} == {
        f: v["expected"]["hop_keys"]["auth_key" if f == "auth" else f] for f in HOP_KEY_FIELDS}
    assert ch.client_created(pending, ch.relay_created_first(reply, rng=lambda k: bytes(k))) == [keys]
    # L1: the same reply checked against another relay id or link key (a relay fronting for the holder of
    # this onion key) fails
    for other in (ch.HopIdentity(bytes(20), ident.link_pub), ch.HopIdentity(ident.relay_id, bytes(32))):
        front = ch.HopTarget(hop.onion_pub, hop.instruction, other)
        pending2, _ = ch.client_create([front], hour=v["inputs"]["hour"], rng=lambda k: bytes(k), ephemerals=[x])
        with pytest.raises(AuthFailure):
            ch.client_created(pending2, ch.relay_created_first(reply, rng=lambda k: bytes(k)))
