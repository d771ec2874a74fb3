"""Every limit and drop path of the link layer (core/link/layer.py, docs/PROTOCOL.md §4.4-4.5, §8.3): the
handshake rate, the link table, the per-link queue, session expiry, the initiation replay cache, and the
cheap filters in front of the Diffie-Hellman.  Each test asserts the counter and that nothing was
answered, and shows the input one step inside the limit being taken."""

from __future__ import annotations

import pytest

from shallot.core.link import PADDING_CELL, LinkConfig, LinkError, LinkLayer, LinkState, Session
from shallot.crypto import link_handshake as lh
from shallot.crypto.keys import RelayKeys
from shallot.crypto.params import (
    HANDSHAKE_SKEW_S,
    LINK_PACKET_LEN,
    MSG_INIT_CLIENT,
    MSG_INIT_RELAY,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    REJECT_AFTER_S,
    REKEY_AFTER_S,
)
from shallot.crypto.primitives import x25519_keypair
from tests.simnet import SimNet, det_rng
from tests.unit.helpers_links import CellSink, client_layer, packets, relay_cell, relay_layer, step_until

R_ADDR = ("10.0.0.1", 9000)
B_ADDR = ("10.0.0.2", 9001)
WALL = 1_800_000_100.0


def responder(*, seed: int = 1, **limits: float) -> tuple[LinkLayer, RelayKeys]:
    """A relay's link layer (accepts clients and relays) with some limits changed."""
    keys = RelayKeys.generate(det_rng(seed), WALL)
    expires = int(WALL) + 86400
    config = LinkConfig(link_private=keys.link_private, link_pub=keys.link_pub, accept_clients=True,
                        accept_relays=True, identity_pub=keys.identity_pub, cert_expires=expires,
                        cert_sig=keys.link_cert(expires), **limits)  # type: ignore[arg-type]
    return LinkLayer(config, rng=det_rng(seed + 100)), keys


def client_init(keys: RelayKeys, i: int, *, resume: bytes = lh.NO_RESUME) -> bytes:
    """A fresh, well-formed INIT_CLIENT (its own ephemeral) for the relay with ``keys``."""
    _state, packet = lh.client_initiation(responder_link_pub=keys.link_pub, sender_index=1000 + i,
                                         rng=det_rng(5000 + i), resume=resume)
    return packet


def relay_init(initiator: RelayKeys, keys: RelayKeys, i: int, *, timestamp_ns: int) -> bytes:
    expires = int(WALL) + 86400
    _state, packet = lh.relay_initiation(
        link_private=initiator.link_private, identity_pub=initiator.identity_pub, cert_expires=expires,
        cert_sig=initiator.link_cert(expires), responder_link_pub=keys.link_pub, sender_index=2000 + i,
        timestamp_ns=timestamp_ns, rng=det_rng(6000 + i))
    return packet


def first_packet(state: lh.InitiatorState, response: bytes) -> bytes:
    """The initiator's first transport packet (a PADDING cell) under the session ``response`` completes."""
    keys, remote = lh.read_response(state, response)
    return Session(keys, state.sender_index, remote, 0.0, 0).seal(PADDING_CELL)


def connect(layer: LinkLayer, keys: RelayKeys, i: int, addr: tuple[str, int], now: float,
            *, relay: RelayKeys | None = None) -> bool:
    """A whole client (or, with ``relay``, relay) handshake and its first transport packet: is there a link?"""
    if relay is None:
        state, packet = lh.client_initiation(responder_link_pub=keys.link_pub, sender_index=1000 + i,
                                             rng=det_rng(5000 + i))
    else:
        expires = int(WALL) + 86400
        state, packet = lh.relay_initiation(
            link_private=relay.link_private, identity_pub=relay.identity_pub, cert_expires=expires,
            cert_sig=relay.link_cert(expires), responder_link_pub=keys.link_pub, sender_index=2000 + i,
            timestamp_ns=int(WALL * 1e9), rng=det_rng(6000 + i))
    before = layer.counters["link_promoted"]
    layer.receive_datagram(packet, addr, now, WALL)
    responses = [d for d, a in layer.datagrams_to_send() if d[0] == MSG_RESPONSE and a == addr]
    if not responses:
        return False
    layer.receive_datagram(first_packet(state, responses[0]), addr, now, WALL)
    return layer.counters["link_promoted"] > before


def answered(layer: LinkLayer) -> int:
    """RESPONSE packets the layer has queued (and takes them off the queue)."""
    out = [d for d, _a in layer.datagrams_to_send() if d[0] == MSG_RESPONSE]
    return len(out)


# ---------------------------------------------------------------------------------------------- rate and tables


def test_handshakes_are_rate_limited_per_source_address() -> None:
    layer, keys = responder(handshake_rate=1.0, handshake_burst=3.0)
    for i in range(5):  # five valid initiations from one address (other ports: the bucket is per IP)
        layer.receive_datagram(client_init(keys, i), ("198.51.100.5", 4000 + i), 10.0, WALL)
    assert answered(layer) == 3 and layer.counters["drop_handshake_rate"] == 2
    assert layer.half_open_count == 3 and not layer.links  # no link before a transport packet (§4.5)
    layer.receive_datagram(client_init(keys, 5), ("198.51.100.6", 4000), 10.0, WALL)  # another address
    assert answered(layer) == 1
    layer.receive_datagram(client_init(keys, 6), ("198.51.100.5", 4000), 11.0, WALL + 1)  # a second later
    layer.receive_datagram(client_init(keys, 7), ("198.51.100.5", 4001), 11.0, WALL + 1)
    assert answered(layer) == 1 and layer.counters["drop_handshake_rate"] == 3


def test_the_rate_limit_comes_after_mac1_so_garbage_costs_no_tokens() -> None:
    layer, keys = responder(handshake_rate=1.0, handshake_burst=1.0)
    good = client_init(keys, 1)
    layer.receive_datagram(good[:-17] + bytes([good[-17] ^ 1]) + good[-16:], ("198.51.100.5", 1), 10.0, WALL)
    assert layer.counters["drop_bad_mac1"] == 1 and layer.counters["drop_handshake_rate"] == 0
    layer.receive_datagram(good, ("198.51.100.5", 1), 10.0, WALL)
    assert answered(layer) == 1


@pytest.mark.parametrize("kind", ["client", "relay"])
def test_a_new_link_beyond_max_links_evicts_the_oldest_idle_link_of_the_heaviest_source(kind: str) -> None:
    """The table is full: the newcomer gets in, the source with most links loses its oldest idle one (§8.3)."""
    layer, keys = responder(max_links=3)
    peers = [RelayKeys.generate(det_rng(300 + i), WALL) for i in range(4)]
    relay = (lambda i: peers[i]) if kind == "relay" else (lambda i: None)
    heavy, light, new = ("198.51.100.1", 9000), ("198.51.100.2", 9000), ("203.0.113.3", 9000)
    for i, addr in enumerate((heavy, (heavy[0], 9001), light)):
        assert connect(layer, keys, i, addr, 10.0 + i, relay=relay(i))
    first, second, third = layer.links.values()
    second.users = 1  # carries a circuit: not idle
    assert connect(layer, keys, 3, new, 20.0, relay=relay(3))
    assert first.state is LinkState.CLOSED and second.state is LinkState.UP and third.state is LinkState.UP
    assert layer.counters["link_table_evicted"] == 1 and len(layer.links) == 3


def test_a_resumed_client_link_is_not_a_new_link() -> None:
    net = SimNet()
    relay, rkeys = relay_layer(net, 1, R_ADDR)
    client = client_layer(net, 2)
    link = client.open_link(R_ADDR, rkeys.link_pub, net.now, net.wall)
    net.run()
    assert link.state is LinkState.UP and link.session is not None
    relay.config.max_links = 1  # full, with the client's own link
    link.users = next(iter(relay.links.values())).users = 1  # in use on both ends: keepalives, then a rekey
    step_until(net, lambda: relay.counters["link_resumed"] > 0, limit=REKEY_AFTER_S + 10)
    assert relay.counters["link_table_evicted"] == 0 and link.state is LinkState.UP


def test_dialing_beyond_max_links_raises_and_reusing_a_link_does_not() -> None:
    net = SimNet()
    a, _akeys = relay_layer(net, 11, R_ADDR)
    _b, bkeys = relay_layer(net, 12, B_ADDR)
    a.config.max_links = 1
    link = a.open_link(B_ADDR, bkeys.link_pub, net.now, net.wall, peer_relay_id=bkeys.relay_id)
    assert a.open_link(B_ADDR, bkeys.link_pub, net.now, net.wall) is link  # the same key: reused, not new
    third = RelayKeys.generate(det_rng(13), net.wall)
    with pytest.raises(LinkError, match="too many links"):
        a.open_link(("10.0.0.3", 9002), third.link_pub, net.now, net.wall)
    assert len(a.links) == 1 and not packets(net, R_ADDR, ("10.0.0.3", 9002), MSG_INIT_RELAY)


def test_a_relay_at_max_links_refuses_an_extend_that_needs_a_new_link() -> None:
    from shallot.core.circuit import CircuitState, destroy_text
    from shallot.core.wire.cells import DestroyReason
    from tests.unit.helpers_circuits import make_net

    n = make_net()
    guard = n.node(0)
    guard.link.config.max_links = 1  # the client's link fills it
    circ = n.build([0, 1, 2])
    assert circ.state is CircuitState.CLOSED and circ.close_reason == destroy_text(DestroyReason.CONNECT_FAILED)
    assert guard.counters["reject_create_cannot_dial"] == 1 and len(guard.link.links) == 1


def test_cells_queued_before_the_handshake_are_capped_per_link() -> None:
    net = SimNet()
    relay, rkeys = relay_layer(net, 1, R_ADDR)
    sink = CellSink(relay)
    client = client_layer(net, 2)
    link = client.open_link(R_ADDR, rkeys.link_pub, net.now, net.wall)
    cap = client.config.max_queued_cells
    for i in range(cap + 2):
        client.send_cell(link, relay_cell(i), net.now)
    assert len(link.queued) == cap and client.counters["drop_queue_full"] == 2
    net.run()
    assert sink.payloads() == [relay_cell(i) for i in range(cap)]  # the first ``cap``, in order
    client.close_link(link, "done")
    client.send_cell(link, relay_cell(0), net.now)
    assert client.counters["drop_send_closed_link"] == 1 and not link.queued


# ---------------------------------------------------------------------------------------------- sessions


def test_a_transport_packet_on_an_expired_session_is_dropped() -> None:
    net = SimNet()
    relay, rkeys = relay_layer(net, 1, R_ADDR)
    sink = CellSink(relay)
    client = client_layer(net, 2)
    link = client.open_link(R_ADDR, rkeys.link_pub, net.now, net.wall)
    net.run()
    start = net.now
    for age, n in ((REJECT_AFTER_S - 1, 1), (REJECT_AFTER_S + 1, 2)):
        client.send_cell(link, relay_cell(n), start + age)
        (packet, _addr), = client.datagrams_to_send()
        # straight to the relay, before any timer of its own retires the session
        relay.receive_datagram(packet, client_addr(net, client), start + age, net.wall + age)
    assert sink.payloads() == [relay_cell(1)]
    assert relay.counters["drop_expired_session"] == 1


def client_addr(net: SimNet, layer: LinkLayer) -> tuple[str, int]:
    return next(addr for addr, node in net.nodes.items() if node is layer)


# ---------------------------------------------------------------------------------------------- replay


def test_a_full_initiation_replay_cache_drops_its_oldest_bucket_and_never_refuses() -> None:
    """Review H4 (ii): the cache ages out by time and, when full, forgets its oldest time bucket (§4.5)."""
    layer, keys = responder(max_seen_ephemerals=32)  # 16 buckets of 2
    for i in range(40):  # more fresh initiations than it holds, from many sources, in one instant
        layer.receive_datagram(client_init(keys, i), (f"198.51.100.{i + 1}", 1), 10.0, WALL)
    assert answered(layer) == 40 and layer.counters["ecache_bucket_evicted"] == 4
    # the newest are still remembered, the oldest were forgotten (a replay of those gets an answer)
    layer.receive_datagram(client_init(keys, 39), ("198.51.100.99", 1), 11.0, WALL)
    assert answered(layer) == 0 and layer.counters["drop_initiation_replay"] == 1
    layer.receive_datagram(client_init(keys, 0), ("198.51.100.98", 1), 11.0, WALL)
    assert answered(layer) == 1


def test_initiation_ephemerals_are_remembered_for_twice_the_skew_and_then_forgotten() -> None:
    layer, keys = responder()
    layer.receive_datagram(client_init(keys, 1), ("198.51.100.1", 1), 10.0, WALL)
    assert answered(layer) == 1
    layer.receive_datagram(client_init(keys, 1), ("198.51.100.2", 1), 10.0 + 2 * HANDSHAKE_SKEW_S - 1, WALL)
    assert answered(layer) == 0 and layer.counters["drop_initiation_replay"] == 1
    layer.receive_datagram(client_init(keys, 1), ("198.51.100.3", 1), 10.0 + 2 * HANDSHAKE_SKEW_S + 16, WALL)
    assert answered(layer) == 1


def test_a_replayed_initiation_is_dropped_from_anywhere() -> None:
    layer, keys = responder()
    packet = client_init(keys, 1)
    layer.receive_datagram(packet, ("198.51.100.1", 1), 10.0, WALL)
    layer.receive_datagram(packet, ("198.51.100.1", 1), 11.0, WALL + 1)
    layer.receive_datagram(packet, ("203.0.113.9", 2), 12.0, WALL + 2)
    assert answered(layer) == 1 and layer.counters["drop_initiation_replay"] == 2 and layer.half_open_count == 1


def test_a_relay_initiation_must_be_newer_than_the_last_one_on_its_link() -> None:
    """IK, beyond the ephemeral cache: a fresh ephemeral with an old timestamp is still a replay (§4.5)."""
    layer, keys = responder()
    peer = RelayKeys.generate(det_rng(77), WALL)
    ts = int(WALL * 1e9)
    assert connect(layer, keys, 1, B_ADDR, 10.0, relay=peer)  # the link exists: its timestamp counts
    layer.receive_datagram(relay_init(peer, keys, 2, timestamp_ns=ts), B_ADDR, 11.0, WALL + 1)
    layer.receive_datagram(relay_init(peer, keys, 3, timestamp_ns=ts - 1), B_ADDR, 11.0, WALL + 1)
    assert answered(layer) == 0 and layer.counters["drop_initiation_replay"] == 2
    layer.receive_datagram(relay_init(peer, keys, 4, timestamp_ns=ts + 1), B_ADDR, 12.0, WALL + 2)
    assert answered(layer) == 1 and len(layer.links) == 1  # a rekey of the same link


def test_a_relay_initiation_outside_the_clock_skew_is_dropped() -> None:
    layer, keys = responder()
    peers = [RelayKeys.generate(det_rng(700 + i), WALL) for i in range(3)]
    for i, off in enumerate((-HANDSHAKE_SKEW_S - 5, HANDSHAKE_SKEW_S + 5)):
        ts = int((WALL + off) * 1e9)
        layer.receive_datagram(relay_init(peers[i], keys, i, timestamp_ns=ts), ("198.51.100.1", i), 10.0, WALL)
    assert layer.counters["drop_initiation_clock_skew"] == 2 and answered(layer) == 0
    ts = int((WALL + HANDSHAKE_SKEW_S - 5) * 1e9)
    layer.receive_datagram(relay_init(peers[2], keys, 9, timestamp_ns=ts), ("198.51.100.1", 9), 10.0, WALL)
    assert answered(layer) == 1


def test_a_client_initiation_carries_no_clock() -> None:
    """Review M5: the client's reserved field is zero whatever its clock; a nonzero one is refused."""
    layer, keys = responder()
    layer.receive_datagram(client_init(keys, 1), ("198.51.100.1", 1), 10.0, WALL + 86400)  # any relay clock
    assert answered(layer) == 1 and layer.counters["drop_initiation_clock_skew"] == 0
    # a client that put its clock in the reserved field is refused (no fingerprint can creep back in)
    from shallot.crypto.noise import NoiseHandshake
    head = bytes([0x51, 1]) + (7).to_bytes(4, "big")
    noise = NoiseHandshake("NK", initiator=True, rs=keys.link_pub,
                           prologue=b"shallot-link-v1" + head)
    body = head + noise.write_message(int(WALL * 1e9).to_bytes(8, "big") + lh.NO_RESUME, det_rng(9))
    layer.receive_datagram(body + lh.mac1(keys.link_pub, body) + lh.NO_MAC2, ("198.51.100.2", 1), 11.0, WALL)
    assert layer.counters["drop_bad_initiation"] == 1 and answered(layer) == 0


# ---------------------------------------------------------------------------------------------- cheap filters


@pytest.mark.parametrize("refuses", ["clients", "relays", "both"])
def test_initiations_of_a_kind_the_node_does_not_accept_are_dropped(refuses: str) -> None:
    keys = RelayKeys.generate(det_rng(1), WALL)
    expires = int(WALL) + 86400
    layer = LinkLayer(LinkConfig(link_private=keys.link_private, link_pub=keys.link_pub,
                                 accept_clients=refuses == "relays", accept_relays=refuses == "clients",
                                 identity_pub=keys.identity_pub, cert_expires=expires,
                                 cert_sig=keys.link_cert(expires)), rng=det_rng(2))
    peer = RelayKeys.generate(det_rng(3), WALL)
    layer.receive_datagram(client_init(keys, 1), ("198.51.100.1", 1), 10.0, WALL)
    layer.receive_datagram(relay_init(peer, keys, 1, timestamp_ns=int(WALL * 1e9)), B_ADDR, 10.0, WALL)
    refused = {"clients": 1, "relays": 1, "both": 2}[refuses]
    assert layer.counters["drop_initiation_not_accepted"] == refused
    assert answered(layer) == 2 - refused and layer.half_open_count == 2 - refused


def test_a_client_answers_no_initiation_at_all() -> None:
    priv, pub = x25519_keypair(det_rng(1))
    client = LinkLayer(LinkConfig(link_private=priv, link_pub=pub), rng=det_rng(2))
    _s, packet = lh.client_initiation(responder_link_pub=pub, sender_index=1,
                                      rng=det_rng(3))
    client.receive_datagram(packet, ("198.51.100.1", 1), 10.0, WALL)
    assert client.counters["drop_initiation_not_accepted"] == 1 and client.outbox == [] and not client.links


def test_malformed_datagrams_are_dropped_before_any_lookup() -> None:
    layer, keys = responder()
    good = client_init(keys, 1)
    src = ("198.51.100.1", 1)
    for data in (b"", bytes([0x7F]) + bytes(60), good[:-1], good + b"\x00",
                 bytes([MSG_TRANSPORT]) + bytes(LINK_PACKET_LEN - 2),
                 bytes([MSG_TRANSPORT]) + bytes(LINK_PACKET_LEN - 1),
                 bytes([MSG_RESPONSE]) + bytes(10), bytes([MSG_RESPONSE]) + bytes(lh.RESPONSE_LEN - 1)):
        layer.receive_datagram(data, src, 10.0, WALL)
    c = layer.counters
    assert (c["drop_empty"], c["drop_unknown_type"], c["drop_bad_length"], c["drop_unknown_index"]) == (1, 1, 4, 2)
    assert layer.outbox == [] and not layer.links and good[0] == MSG_INIT_CLIENT


def test_a_transport_packet_that_fails_its_tag_is_dropped() -> None:
    net = SimNet()
    relay, rkeys = relay_layer(net, 1, R_ADDR)
    sink = CellSink(relay)
    client = client_layer(net, 2)
    link = client.open_link(R_ADDR, rkeys.link_pub, net.now, net.wall)
    net.run()
    client.send_cell(link, relay_cell(1), net.now)
    (packet, _), = client.datagrams_to_send()
    relay.receive_datagram(packet[:-1] + bytes([packet[-1] ^ 1]), client_addr(net, client), net.now, net.wall)
    assert relay.counters["drop_bad_tag"] == 1 and sink.cells == []
    relay.receive_datagram(packet, client_addr(net, client), net.now, net.wall)
    relay.receive_datagram(packet, client_addr(net, client), net.now, net.wall)
    assert sink.payloads() == [relay_cell(1)] and relay.counters["drop_replay"] == 1


# ---------------------------------------------------------------------------------------------- retarget (NAT)


def test_only_a_handshake_in_flight_is_retargeted_and_only_to_a_new_address_unless_forced() -> None:
    net = SimNet()
    _relay, rkeys = relay_layer(net, 1, R_ADDR)
    client = client_layer(net, 2)
    link = client.open_link(("198.51.100.9", 9000), rkeys.link_pub, net.now, net.wall)  # nobody there
    client.datagrams_to_send()
    client.retarget(link, ("198.51.100.9", 9000), net.now, net.wall)  # the same address: nothing new
    assert client.datagrams_to_send() == [] and link.attempts == 1
    client.retarget(link, ("198.51.100.9", 9000), net.now, net.wall, force=True)  # a punch said: again, now
    (init, dest), = client.datagrams_to_send()
    assert init[0] == MSG_INIT_CLIENT and dest == ("198.51.100.9", 9000) and link.attempts == 1
    client.retarget(link, R_ADDR, net.now, net.wall)  # where the relay really is
    net.run()
    assert link.state is LinkState.UP and link.addr == R_ADDR
    client.retarget(link, ("203.0.113.7", 1), net.now, net.wall, force=True)  # an established link stays put
    assert link.addr == R_ADDR and client.datagrams_to_send() == []


def test_a_link_rekeying_is_established_and_is_not_retargeted() -> None:
    net = SimNet()
    _relay, rkeys = relay_layer(net, 1, R_ADDR)
    client = client_layer(net, 2)
    link = client.open_link(R_ADDR, rkeys.link_pub, net.now, net.wall)
    net.run()
    link.users = next(iter(_relay.links.values())).users = 1
    net.tap = lambda src, dst, data: None if data[0] == MSG_RESPONSE else data  # the rekey stays unanswered
    step_until(net, lambda: link.pending is not None, limit=REKEY_AFTER_S + 10)  # a rekey handshake in flight
    client.retarget(link, ("203.0.113.7", 1), net.now, net.wall, force=True)
    assert link.addr == R_ADDR and link.state is LinkState.UP


def test_keepalives_are_consumed_by_the_link_layer() -> None:
    net = SimNet()
    relay, rkeys = relay_layer(net, 1, R_ADDR)
    sink = CellSink(relay)
    client = client_layer(net, 2)
    link = client.open_link(R_ADDR, rkeys.link_pub, net.now, net.wall)
    net.run()
    link.users = 1  # in use: keepalives flow when nothing else does
    sent = client.counters["handshake_sent"]
    for _ in range(25):
        net.advance(1.0)
    assert packets(net, client_addr(net, client), R_ADDR, MSG_TRANSPORT), "no keepalive was sent"
    assert sink.cells == [] and client.counters["handshake_sent"] == sent


def test_closing_a_closed_link_changes_nothing() -> None:
    net = SimNet()
    _relay, rkeys = relay_layer(net, 1, R_ADDR)
    client = client_layer(net, 2)
    link = client.open_link(R_ADDR, rkeys.link_pub, net.now, net.wall)
    net.run()
    client.events.clear()
    client.close_link(link, "done")
    client.close_link(link, "again")
    assert [type(e).__name__ for e in client.events] == ["LinkDown"] and client.events[0].reason == "done"


def test_a_session_that_reaches_reject_after_s_without_a_rekey_ends_its_link() -> None:
    net = SimNet()
    relay, rkeys = relay_layer(net, 1, R_ADDR)
    sink = CellSink(relay)
    client = client_layer(net, 2)
    link = client.open_link(R_ADDR, rkeys.link_pub, net.now, net.wall)
    net.run()
    (accepted,) = relay.links.values()
    start = net.now
    # cells keep both ends talking, but nothing is in use, so nobody rekeys: the session only ages
    while net.now - start < REJECT_AFTER_S - 2:
        client.send_cell(link, relay_cell(1), net.now)
        relay.send_cell(accepted, relay_cell(2), net.now)
        net.advance(2.0)
    assert link.state is LinkState.UP and accepted.state is LinkState.UP
    packet = packets(net, client_addr(net, client), R_ADDR, MSG_TRANSPORT)[-1]
    relay.events.clear()
    net.advance(4.0)
    assert accepted.state is LinkState.CLOSED and link.state is LinkState.CLOSED
    assert [e.reason for e in relay.events] == ["session expired"]
    delivered = len(sink.cells)
    relay.receive_datagram(packet, client_addr(net, client), net.now, net.wall)  # under the retired session
    assert len(sink.cells) == delivered and relay.counters["drop_unknown_index"] >= 1
