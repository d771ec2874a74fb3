"""Every limit and drop path of the relay forwarder (relay/forwarder.py, docs/PROTOCOL.md §5.7, §7, §8.2),
each asserting the refusal a client sees and the counter that names it, in memory on tests/simnet.SimNet.

Each test also shows the other side of its limit (one under it passes, or the same build through another
link passes), so a test that cannot see the refusal cannot pass either."""

from __future__ import annotations

import pytest

from shallot.core.circuit import CircuitState, ClientNode, destroy_text
from shallot.core.wire.cells import (
    CMD_CREATE,
    CMD_CREATED,
    CMD_RELAY,
    MSG_CONFIG,
    MSG_DROP,
    MSG_END,
    DestroyReason,
    encode_cell,
)
from shallot.crypto.descriptor import Descriptor
from shallot.crypto.keys import RelayKeys
from shallot.crypto.params import CELL_LEN, CIRCUIT_IDLE_S, CREATE_TIMEOUT_S, RECORD_EPOCH_S, RECORD_SLACK_S
from tests.simnet import det_rng, echoed
from tests.unit.helpers_circuits import CLIENT_ADDR, Net, make_net, relay_addr, tamper_incoming
from tests.unit.helpers_limits import Destroys, configured_net, ends, link_to, send_inner

# §5.7: the longest a build record's X stays in the replay cache (a record of the current hour, made at its start)
REPLAY_KEEP_S = RECORD_EPOCH_S + RECORD_SLACK_S + 60


def _refused(n: Net, hops: list[int], reason: DestroyReason):
    """Build through ``hops``; one relay refuses with ``reason``.  Reasons stop at the refuser's neighbours
    (§7.2): the client reads it only from its guard, otherwise it hears DESTROYED."""
    before = [dict(n.node(i).counters) for i in hops]
    circ = n.build(hops)
    assert circ.state is CircuitState.CLOSED, f"the build through {hops} was not refused"
    refusers = [k for k, i in enumerate(hops) if any(c.startswith("reject_create_") and v > before[k].get(c, 0)
                                                      for c, v in n.node(i).counters.items())]
    assert len(refusers) == 1, refusers
    (k,) = refusers
    assert circ.close_reason == destroy_text(reason if k == 0 else DestroyReason.DESTROYED)
    if k > 0:  # the refuser's previous hop heard the reason itself
        prev = n.node(hops[k - 1]).counters
        assert prev[f"destroy_received_{reason.name.lower()}"] > before[k - 1].get(
            f"destroy_received_{reason.name.lower()}", 0)
    return circ


def _echo(n: Net, circ, data: bytes = b"ping") -> bool:
    n.client.events.clear()
    n.client.send(circ, data, n.net.now)
    n.net.run()
    return any(getattr(e, "data", None) == data for e in n.client.events)


# ---------------------------------------------------------------------------------------------- §5.7 checks


def test_an_exit_refuses_a_one_hop_circuit_from_a_client_link() -> None:
    n = make_net()
    exit_ = n.node(2)
    _refused(n, [2], DestroyReason.HOP_REJECTED)
    assert exit_.counters["reject_create_one_hop"] == 1
    assert exit_.counters["circuit_terminated_here"] == 0 and exit_.open_circuits == 0
    # the same exit behind one relay link is an exit as usual: the refusal is about the client link only
    circ = n.build_open([0, 2])
    assert _echo(n, circ) and echoed(exit_) == 1
    assert exit_.counters["circuit_terminated_here"] == 1 and exit_.counters["reject_create_one_hop"] == 1


def test_max_circuits_refuses_the_first_build_over_the_limit() -> None:
    n = make_net()
    guard = n.node(0)
    guard.config.max_circuits = 2
    first, _second = n.build_open([0, 1, 2]), n.build_open([0, 1, 3])
    assert guard.open_circuits == 2
    _refused(n, [0, 1, 2], DestroyReason.RESOURCE_LIMIT)
    assert guard.counters["reject_create_max_circuits"] == 1 and guard.open_circuits == 2
    assert n.node(1).counters["circuit_extended"] == 2  # the refused build never went further
    n.client.close(first, n.net.now)
    n.net.run()
    assert guard.open_circuits == 1
    n.build_open([0, 1, 2])  # one under the limit again
    assert guard.counters["reject_create_max_circuits"] == 1


def test_create_rate_is_limited_per_client_source_address() -> None:
    n = configured_net({0: {"creates_per_second": 1.0, "creates_burst": 3.0}})
    guard = n.node(0)
    for _ in range(3):
        n.build_open([0, 1, 2])
    _refused(n, [0, 1, 2], DestroyReason.RESOURCE_LIMIT)
    assert guard.counters["reject_create_rate"] == 1 and guard.open_circuits == 3
    # another client (another source address) has its own bucket
    other = ClientNode(rng=det_rng(1234))
    n.net.add(("192.0.2.11", 5555), other)
    assert n.build([0, 1, 2], client=other).state is CircuitState.OPEN
    # and the bucket refills at its rate
    n.net.advance(1.0)
    n.build_open([0, 1, 2])
    _refused(n, [0, 1, 2], DestroyReason.RESOURCE_LIMIT)
    assert guard.counters["reject_create_rate"] == 2


def test_create_rate_on_a_relay_link_has_its_own_larger_bucket_per_link() -> None:
    # the middle takes one CREATE per client address but three per relay link: a guard carries many clients
    n = configured_net({1: {"creates_per_second": 0.001, "creates_burst": 1.0,
                            "relay_creates_per_second": 0.001, "relay_creates_burst": 3.0}})
    middle = n.node(1)
    for _ in range(3):
        n.build_open([0, 1, 2])
    circ = _refused(n, [0, 1, 2], DestroyReason.RESOURCE_LIMIT)
    assert circ.close_reason == destroy_text(DestroyReason.DESTROYED)  # the middle's reason stops at the guard
    assert middle.counters["reject_create_rate"] == 1 and middle.open_circuits == 3
    assert n.node(0).counters["destroy_received_resource_limit"] == 1
    n.build_open([3, 1, 2])  # the same middle through another guard: another link, another bucket
    assert middle.counters["reject_create_rate"] == 1


def test_the_replay_cache_refuses_only_the_heavy_source_and_empties_as_entries_expire() -> None:
    # soft cap 2: past it only a source under its share may add; hard cap 3: then nobody (§8.2)
    n = configured_net({0: {"max_replay_entries": 2, "replay_hard_cap": 3}})
    guard = n.node(0)
    a, b = n.build_open([0, 1, 2]), n.build_open([0, 1, 3])
    assert len(guard.replay) == 2
    _refused(n, [0, 1, 2], DestroyReason.RESOURCE_LIMIT)
    assert guard.counters["reject_create_replay_share"] == 1 and len(guard.replay) == 2
    assert n.node(1).counters["circuit_extended"] == 2
    # another client holds nothing: it is not refused for what the first did
    other = ClientNode(rng=det_rng(1234))
    n.net.add(("192.0.2.11", 5555), other)
    assert n.build([0, 1, 2], client=other).state is CircuitState.OPEN
    assert len(guard.replay) == 3
    third = ClientNode(rng=det_rng(1235))
    n.net.add(("192.0.2.12", 5555), third)
    assert n.build([0, 1, 2], client=third).state is CircuitState.CLOSED
    assert guard.counters["reject_create_replay_cache_full"] == 1
    for circ in (a, b):
        n.client.close(circ, n.net.now)
    n.net.advance(60.0)  # a sweep keeps what has not expired
    assert len(guard.replay) == 3
    for _ in range(int(REPLAY_KEEP_S // 300) + 1):
        n.net.advance(300.0)
    assert len(guard.replay) == 0 and not guard.replay.by_source
    n.build_open([0, 1, 2])
    assert guard.counters["reject_create_replay_share"] == 1


def _twin(keys: RelayKeys, *, same: str, addr: tuple[str, int], wall: float) -> Descriptor:
    """A descriptor that shares one of ``keys``' identity or link key and nothing else."""
    other = RelayKeys.generate(det_rng(4242), wall)
    twin = RelayKeys(identity_seed=keys.identity_seed if same == "relay id" else other.identity_seed,
                     link_private=keys.link_private if same == "link key" else other.link_private,
                     onion_keys=other.onion_keys)
    return Descriptor.create(twin, nickname="twin", addresses=(addr,), exit_node=False, published=int(wall),
                             lifetime_s=86400)


@pytest.mark.parametrize("same", ["relay id", "link key"])
def test_an_extend_to_the_relay_itself_is_refused(same: str) -> None:
    n = make_net()
    guard = n.node(0)
    twin = _twin(guard.keys, same=same, addr=relay_addr(1), wall=n.net.wall)
    assert (twin.relay_id == guard.keys.relay_id) == (same == "relay id")
    assert (twin.link_pub == guard.keys.link_pub) == (same == "link key")
    circ = n.client.build([n.desc(0), twin, n.desc(2)], n.net.now, n.net.wall)
    n.net.run()
    assert circ.state is CircuitState.CLOSED and circ.close_reason == destroy_text(DestroyReason.HOP_REJECTED)
    assert guard.counters["reject_create_extend_to_self"] == 1
    assert [link.addr for link in guard.link.links.values()] == [CLIENT_ADDR]  # nothing was dialed


def test_an_extend_outside_the_relays_scope_is_refused() -> None:
    n = make_net()
    guard = n.node(0)
    guard.own_host = "8.8.4.4"  # a public relay (in memory only): it never extends into private ranges
    _refused(n, [0, 1, 2], DestroyReason.HOP_REJECTED)
    assert guard.counters["reject_create_extend_address"] == 1
    assert [link.addr for link in guard.link.links.values()] == [CLIENT_ADDR]
    guard.own_host = "10.0.0.1"  # a relay on a private network extends inside it
    n.build_open([0, 1, 2])
    assert guard.counters["reject_create_extend_address"] == 1


# ---------------------------------------------------------------------------------------------- §7 timers, link down


def _drop_creates(node) -> None:
    tamper_incoming(node, lambda link, cell: None if cell[4] == CMD_CREATE else cell)


def test_a_relay_times_out_a_build_that_never_completes() -> None:
    n = make_net()
    guard = n.node(0)
    _drop_creates(n.node(1))  # the middle swallows the CREATE: no CREATED ever comes back
    circ = n.build([0, 1, 2])
    assert circ.state is CircuitState.BUILDING and guard.open_circuits == 1
    del n.net.nodes[CLIENT_ADDR]  # only the relay's own timer may end it (the client has one too)
    destroys = Destroys(guard)
    start = n.net.now
    while n.net.now - start < CREATE_TIMEOUT_S - 1:
        n.net.advance(1.0)
    assert guard.open_circuits == 1 and guard.counters["circuit_build_timeout"] == 0
    n.net.advance(2.0)
    assert guard.counters["circuit_build_timeout"] == 1 and guard.open_circuits == 0 and guard.circuits == {}
    assert sorted(destroys.reasons()) == [(relay_addr(1), DestroyReason.TIMEOUT), (CLIENT_ADDR, DestroyReason.TIMEOUT)]
    assert guard.counters["circuit_idle_timeout"] == 0


def test_a_relay_times_out_an_idle_circuit_and_traffic_keeps_it() -> None:
    n = make_net()
    circ = n.build_open([0, 1, 2])
    start = n.net.now
    while n.net.now - start < 200:
        n.net.advance(10.0)
    assert _echo(n, circ)  # traffic at +200 s: idle from here
    while n.net.now - start < 200 + CIRCUIT_IDLE_S - 10:
        n.net.advance(10.0)
    assert circ.state is CircuitState.OPEN and all(n.node(i).open_circuits == 1 for i in range(3))
    n.client.events.clear()
    n.net.advance(20.0)
    assert [n.node(i).counters["circuit_idle_timeout"] for i in range(3)] == [1, 1, 1]
    assert all(n.node(i).open_circuits == 0 for i in range(3))
    assert circ.state is CircuitState.CLOSED and circ.close_reason == destroy_text(DestroyReason.TIMEOUT)
    assert n.node(0).counters["circuit_build_timeout"] == 0


@pytest.mark.parametrize("state", ["open", "building"])
def test_a_dead_link_tears_down_every_circuit_on_it(state: str) -> None:
    n = make_net()
    guard = n.node(0)
    if state == "building":
        _drop_creates(n.node(1))
    circ = n.build([0, 1, 2])
    assert circ.state is (CircuitState.OPEN if state == "open" else CircuitState.BUILDING)
    destroys = Destroys(guard)
    dead = link_to(guard, relay_addr(1))
    guard.link.close_link(dead, "peer silent")
    n.net.advance(0.0)
    reason = DestroyReason.LINK_DOWN if state == "open" else DestroyReason.CONNECT_FAILED
    assert guard.counters["link_down"] == 1 and guard.open_circuits == 0 and guard.circuits == {}
    assert destroys.reasons() == [(CLIENT_ADDR, reason)]  # nothing goes to the dead link
    assert circ.state is CircuitState.CLOSED and circ.close_reason == destroy_text(reason)
    assert n.client.counters[f"destroy_received_{reason.name.lower()}"] == 1


# ---------------------------------------------------------------------------------------------- malformed cells


def test_a_malformed_created_is_a_protocol_error_both_ways() -> None:
    n = make_net()
    guard, middle = n.node(0), n.node(1)

    def bad_padding(link, cell: bytes) -> bytes:
        return cell[:-1] + b"\x01" if cell[4] == CMD_CREATED and link.addr == relay_addr(1) else cell

    tamper_incoming(guard, bad_padding)
    circ = n.build([0, 1, 2])
    assert guard.counters["drop_created_malformed"] == 1
    assert circ.state is CircuitState.CLOSED and circ.close_reason == destroy_text(DestroyReason.PROTOCOL)
    # the guard originated it: the middle hears the reason, the exit only that the circuit is gone (§7.2)
    assert middle.counters["destroy_received_protocol"] == 1 and n.node(2).counters["destroy_received_destroyed"] == 1
    assert [n.node(i).open_circuits for i in range(3)] == [0, 0, 0]


def test_cells_that_match_no_circuit_state_are_dropped_and_counted() -> None:
    n = make_net()
    guard, middle = n.node(0), n.node(1)
    circ = n.build_open([0, 1, 2])
    client_link = circ.link
    assert client_link is not None
    send = n.client.link.send_cell

    def cell(cid: int, cmd: int) -> None:
        send(client_link, encode_cell(cid, cmd, bytes(CELL_LEN - 5)), n.net.now)
        n.net.run()

    cell(circ.cid ^ 1, CMD_RELAY)
    assert guard.counters["drop_relay_unknown_circuit"] == 1
    cell(circ.cid, CMD_CREATE)
    assert guard.counters["drop_create_duplicate_circuit"] == 1
    cell(circ.cid, CMD_CREATED)  # CREATED from the previous hop, on an open circuit
    assert guard.counters["drop_created_unexpected"] == 1
    cell(circ.cid & 0x7FFFFFFF, CMD_CREATE)  # an id from the guard's half of the id space (§6.2)
    cell(0, CMD_CREATE)
    assert guard.counters["drop_create_bad_circuit_id"] == 2
    cell(circ.cid, 99)
    assert guard.counters["drop_unknown_command"] == 1
    assert guard.open_circuits == 1 and _echo(n, circ)  # none of it touched the circuit
    # CREATED from the next hop for a circuit that is already open
    (relay_circ, _), *_ = guard.circuits.values()
    middle.link.send_cell(link_to(middle, relay_addr(0)),
                          encode_cell(relay_circ.next_cid, CMD_CREATED, bytes(CELL_LEN - 5)), n.net.now)
    n.net.run()
    assert guard.counters["drop_created_unexpected"] == 2 and _echo(n, circ)


def test_cells_on_a_circuit_still_building_are_dropped() -> None:
    n = make_net()
    guard = n.node(0)
    _drop_creates(n.node(1))
    circ = n.build([0, 1, 2])
    assert circ.link is not None
    n.client.link.send_cell(circ.link, encode_cell(circ.cid, CMD_RELAY, bytes(CELL_LEN - 5)), n.net.now)
    n.net.run()
    assert guard.counters["drop_relay_not_open"] == 1
    assert n.node(1).counters["drop_relay_unknown_circuit"] == 0  # nothing went on
    # a CREATED from the previous hop (the client) is not the answer the guard waits for
    n.client.link.send_cell(circ.link, encode_cell(circ.cid, CMD_CREATED, bytes(CELL_LEN - 5)), n.net.now)
    n.net.run()
    assert guard.counters["drop_created_unexpected"] == 1 and circ.state is CircuitState.BUILDING
    (relay_circ, _), *_ = guard.circuits.values()
    assert relay_circ.state.value == "building"
    # nor is a CREATED on the next link for a circuit id the guard never used
    middle = n.node(1)
    middle.link.send_cell(link_to(middle, relay_addr(0)),
                          encode_cell(relay_circ.next_cid ^ 1, CMD_CREATED, bytes(CELL_LEN - 5)), n.net.now)
    n.net.run()
    assert guard.counters["drop_created_unexpected"] == 2 and relay_circ.state.value == "building"


# ---------------------------------------------------------------------------------------------- at the exit


def test_the_exit_counts_padding_and_ends_the_circuit_on_end() -> None:
    n = make_net()
    exit_ = n.node(2)
    circ = n.build_open([0, 1, 2])
    send_inner(n, circ, MSG_DROP, b"cover traffic")
    assert exit_.counters["e2e_padding_received"] == 1 and echoed(exit_) == 0
    send_inner(n, circ, MSG_CONFIG)  # the echo service takes only DATA
    assert exit_.counters["e2e_unexpected_message"] == 1 and echoed(exit_) == 0
    assert circ.state is CircuitState.OPEN and _echo(n, circ)
    ends(n.client)
    send_inner(n, circ, MSG_END)
    (end,) = ends(n.client)
    assert end.reason == destroy_text(DestroyReason.DESTROYED) and circ.state is CircuitState.CLOSED
    assert exit_.open_circuits == 0 and exit_.counters["circuit_destroyed"] == 1
    assert [n.node(i).open_circuits for i in range(3)] == [0, 0, 0]
    assert n.node(1).counters["destroy_received_requested"] == 1  # the exit's reason stops at the middle
    assert n.node(0).counters["destroy_received_destroyed"] == 1


def test_a_service_that_is_full_or_missing_refuses_the_circuit() -> None:
    from shallot.crypto.circuit_handshake import SERVICE_DISCARD, SERVICE_IP
    from shallot.exit.ipservice import IpExitService

    n = make_net()
    exit_ = n.node(2)
    exit_.services[SERVICE_IP] = IpExitService(rng=det_rng(5), max_circuits=1)
    first = n.client.build([n.desc(i) for i in (0, 1, 2)], n.net.now, n.net.wall, service=SERVICE_IP)
    n.net.run()
    assert first.state is CircuitState.OPEN
    full = n.client.build([n.desc(i) for i in (0, 1, 2)], n.net.now, n.net.wall, service=SERVICE_IP)
    n.net.run()
    assert full.state is CircuitState.CLOSED and full.close_reason == destroy_text(DestroyReason.DESTROYED)
    assert n.node(1).counters["destroy_received_resource_limit"] == 1
    assert exit_.counters["reject_create_ip_full"] == 1
    del exit_.services[SERVICE_DISCARD]
    gone = n.client.build([n.desc(i) for i in (0, 1, 2)], n.net.now, n.net.wall, service=SERVICE_DISCARD)
    n.net.run()
    assert gone.state is CircuitState.CLOSED and gone.close_reason == destroy_text(DestroyReason.DESTROYED)
    assert n.node(1).counters["destroy_received_hop_rejected"] == 1
    assert exit_.counters["reject_create_no_discard_service"] == 1
    n.client.close(first, n.net.now)
    n.net.run()
    again = n.client.build([n.desc(i) for i in (0, 1, 2)], n.net.now, n.net.wall, service=SERVICE_IP)
    n.net.run()
    assert again.state is CircuitState.OPEN  # the address came back when the circuit ended
