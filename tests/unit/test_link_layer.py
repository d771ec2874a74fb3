"""Link layer (core/link/layer.py) on the in-memory SimNet: handshakes, replay protection, rekey, liveness."""

from __future__ import annotations

import itertools

import pytest

from shallot.core.circuit import CircuitState, DatagramReceived
from shallot.core.link import LinkDown, LinkState, LinkUp, PeerKind
from shallot.crypto import link_handshake as lh
from shallot.crypto.keys import RelayKeys, link_cert_message
from shallot.crypto.params import (
    HANDSHAKE_ATTEMPTS,
    HANDSHAKE_RETRY_S,
    LINK_DEAD_AFTER_S,
    LINK_PACKET_LEN,
    MSG_INIT_CLIENT,
    MSG_INIT_RELAY,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    REJECT_AFTER_S,
    REKEY_AFTER_S,
)
from tests.simnet import SimNet, det_rng, echoed, make_client, make_relays
from tests.unit.helpers_links import (
    CLIENT_ADDR,
    CellSink,
    client_layer,
    packets,
    relay_cell,
    relay_layer,
    step_until,
)

R_ADDR = ("10.0.0.1", 9000)
B_ADDR = ("10.0.0.2", 9001)
ATTACKER = ("203.0.113.66", 6666)


def _client_and_relay():
    net = SimNet()
    relay, rkeys = relay_layer(net, 1, R_ADDR)
    client = client_layer(net, 2)
    link = client.open_link(R_ADDR, rkeys.link_pub, net.now, net.wall)
    return net, relay, rkeys, client, link


def _two_relays():
    net = SimNet()
    a, akeys = relay_layer(net, 11, R_ADDR)
    b, bkeys = relay_layer(net, 12, B_ADDR)
    return net, a, akeys, b, bkeys


# ------------------------------------------------------------------------------------------ handshakes


def test_client_link_handshake_completes_and_carries_cells_both_ways() -> None:
    net, relay, _rkeys, client, link = _client_and_relay()
    assert link.state is LinkState.CONNECTING
    net.run()
    assert link.state is LinkState.UP and link.session is not None
    assert [type(e) for e in client.events] == [LinkUp]
    assert client.counters["handshake_sent"] == 1 and client.counters["handshake_completed"] == 1
    assert relay.counters["handshake_responded"] == 1
    (rlink,) = relay.links.values()
    assert rlink.state is LinkState.UP and rlink.kind is PeerKind.CLIENT and not rlink.initiator
    assert rlink.peer_relay_id is None  # anonymous
    init = packets(net, CLIENT_ADDR, R_ADDR, MSG_INIT_CLIENT)
    assert len(init) == 1 and len(init[0]) == lh.INIT_CLIENT_LEN
    assert len(packets(net, R_ADDR, CLIENT_ADDR, MSG_RESPONSE)[0]) == lh.RESPONSE_LEN

    to_relay, to_client = CellSink(relay), CellSink(client)
    sent = [relay_cell(i) for i in range(3)]
    for cell in sent:
        client.send_cell(link, cell, net.now)
    relay.send_cell(rlink, relay_cell(9), net.now)
    net.run()
    assert to_relay.payloads() == sent and to_client.payloads() == [relay_cell(9)]
    padding, *wire = packets(net, CLIENT_ADDR, R_ADDR, MSG_TRANSPORT)  # the first made the relay's link (§4.5)
    assert len(padding) == LINK_PACKET_LEN
    assert len(wire) == 3 and all(len(p) == LINK_PACKET_LEN for p in wire)
    assert not any(cell[:40] in p for cell, p in zip(sent, wire)), "cells must be encrypted on the wire"


def test_transport_counters_start_at_a_random_48_bit_value_per_session() -> None:
    """PROTOCOL §4.4: each session's first counter is random, so counters on two links never line up (a
    counter starting at 0 or shared by both directions would let an observer match a packet's place in
    two streams)."""
    net = SimNet()
    relay, rkeys = relay_layer(net, 1, R_ADDR)
    addrs = [("10.0.0.9", 5000 + i) for i in range(3)]
    clients = [client_layer(net, 2 + i, addr) for i, addr in enumerate(addrs)]
    links = [c.open_link(R_ADDR, rkeys.link_pub, net.now, net.wall) for c in clients]
    net.run()
    firsts: list[int] = []
    for addr, client, link in zip(addrs, clients, links):
        client.send_cell(link, relay_cell(1), net.now)
        net.run()
        wire = packets(net, addr, R_ADDR, MSG_TRANSPORT)[0]  # the PADDING sent when the handshake completed
        firsts.append(int.from_bytes(wire[5:13], "little"))  # type(1) + receiver index(4) + counter(8)
    for rlink in relay.links.values():
        assert rlink.session is not None
        firsts.append(rlink.session.send_counter)
    assert len(set(firsts)) == len(firsts) == 6, firsts
    assert all(0 < c < 1 << 48 for c in firsts), firsts


def test_cells_sent_before_the_link_is_up_are_queued_then_delivered() -> None:
    net, relay, _rkeys, client, link = _client_and_relay()
    sink = CellSink(relay)
    client.send_cell(link, relay_cell(1), net.now)
    client.send_cell(link, relay_cell(2), net.now)
    assert sink.cells == []
    net.run()
    assert sink.payloads() == [relay_cell(1), relay_cell(2)]


def test_relay_ik_handshake_authenticates_the_initiators_relay_id() -> None:
    net, a, akeys, b, bkeys = _two_relays()
    link = a.open_link(B_ADDR, bkeys.link_pub, net.now, net.wall, peer_relay_id=bkeys.relay_id)
    net.run()
    assert link.state is LinkState.UP and link.kind is PeerKind.RELAY and link.initiator
    (blink,) = b.links.values()
    assert blink.kind is PeerKind.RELAY and not blink.initiator and blink.state is LinkState.UP
    assert blink.peer_relay_id == akeys.relay_id
    assert blink.peer_link_pub == akeys.link_pub
    (init,) = packets(net, R_ADDR, B_ADDR, MSG_INIT_RELAY)
    assert len(init) == lh.INIT_RELAY_LEN
    assert akeys.identity_pub not in init, "the initiator's identity must travel encrypted"
    # reuse: a second open_link to the same relay id returns the same link, no new handshake
    assert a.open_link(B_ADDR, bkeys.link_pub, net.now, net.wall, peer_relay_id=bkeys.relay_id) is link
    net.run()
    assert a.counters["handshake_sent"] == 1


def _relay_init(net: SimNet, *, link_private: bytes, identity: RelayKeys, cert_for: bytes, cert_expires: int,
                responder_pub: bytes, signer: RelayKeys | None = None) -> bytes:
    sig = (signer or identity).sign(link_cert_message(cert_for, cert_expires))
    _state, packet = lh.relay_initiation(link_private=link_private, identity_pub=identity.identity_pub,
                                         cert_expires=cert_expires, cert_sig=sig, responder_link_pub=responder_pub,
                                         sender_index=77, timestamp_ns=int(net.wall * 1e9), rng=det_rng(5))
    return packet


@pytest.mark.parametrize("variant", ["genuine", "stolen_cert", "forged_cert", "expired_cert"])
def test_relay_initiation_must_prove_the_claimed_identity(variant: str) -> None:
    """An impostor with its own link key cannot claim another relay's identity: the link certificate
    binds the identity key to the Noise static key actually used."""
    net, _a, akeys, b, bkeys = _two_relays()
    mallory = RelayKeys.generate(det_rng(66), net.wall)
    expires = int(net.wall) + 3600
    if variant == "genuine":
        packet = _relay_init(net, link_private=akeys.link_private, identity=akeys, cert_for=akeys.link_pub,
                             cert_expires=expires, responder_pub=bkeys.link_pub)
    elif variant == "stolen_cert":  # A's real certificate (for A's link key), replayed with Mallory's link key
        packet = _relay_init(net, link_private=mallory.link_private, identity=akeys, cert_for=akeys.link_pub,
                             cert_expires=expires, responder_pub=bkeys.link_pub)
    elif variant == "forged_cert":  # Mallory certifies her own link key but claims A's identity
        packet = _relay_init(net, link_private=mallory.link_private, identity=akeys, cert_for=mallory.link_pub,
                             cert_expires=expires, responder_pub=bkeys.link_pub, signer=mallory)
    else:
        packet = _relay_init(net, link_private=akeys.link_private, identity=akeys, cert_for=akeys.link_pub,
                             cert_expires=int(net.wall) - 1, responder_pub=bkeys.link_pub)
    b.receive_datagram(packet, R_ADDR, net.now, net.wall)
    if variant == "genuine":
        assert b.counters["handshake_responded"] == 1 and len(b.outbox) == 1
        assert not b.links  # a half-open handshake until A's first transport packet (§4.5)
        (half,) = b._half_open.values()
        assert half.peer_relay_id == akeys.relay_id
    else:
        assert b.counters["drop_bad_initiation"] == 1
        assert b.outbox == [] and not b.links


# ------------------------------------------------------------------------------------------ replay


def test_replayed_transport_packet_is_dropped_and_not_delivered_twice() -> None:
    net, relay, _rkeys, client, link = _client_and_relay()
    net.run()
    sink = CellSink(relay)
    for i in range(3):
        client.send_cell(link, relay_cell(i), net.now)
    net.run()
    assert len(sink.cells) == 3
    wire = packets(net, CLIENT_ADDR, R_ADDR, MSG_TRANSPORT)[1:]  # after the PADDING that made the link
    relay.receive_datagram(wire[1], CLIENT_ADDR, net.now, net.wall)
    assert len(sink.cells) == 3 and relay.counters["drop_replay"] == 1
    for p in wire:  # from another address too: the attacker does not need the client's address
        relay.receive_datagram(p, ATTACKER, net.now, net.wall)
    assert len(sink.cells) == 3 and relay.counters["drop_replay"] == 4
    assert relay.outbox == []
    (rlink,) = relay.links.values()
    assert rlink.addr == CLIENT_ADDR, "a replayed packet must not move the link to the sender's address"


def test_reordered_transport_packets_are_each_delivered_once() -> None:
    net, relay, _rkeys, client, link = _client_and_relay()
    net.run()
    held: list[bytes] = []

    def hold_transport(src, dst, data):
        if data[0] == MSG_TRANSPORT:
            held.append(data)
            return None
        return data

    net.tap = hold_transport
    for i in range(3):
        client.send_cell(link, relay_cell(i), net.now)
    net.run()
    net.tap = None
    sink = CellSink(relay)
    for i in (2, 0, 1, 0, 2):
        relay.receive_datagram(held[i], CLIENT_ADDR, net.now, net.wall)
    assert sink.payloads() == [relay_cell(2), relay_cell(0), relay_cell(1)]
    assert relay.counters["drop_replay"] == 2


def test_replayed_client_initiation_is_dropped_without_a_response() -> None:
    net, relay, _rkeys, _client, _link = _client_and_relay()
    net.run()
    (init,) = packets(net, CLIENT_ADDR, R_ADDR, MSG_INIT_CLIENT)
    net.advance(5.0)
    for src in (CLIENT_ADDR, ATTACKER):
        relay.receive_datagram(init, src, net.now, net.wall)
    assert relay.counters["drop_initiation_replay"] == 2
    assert relay.counters["handshake_responded"] == 1
    assert relay.outbox == [] and len(relay.links) == 1


def test_replayed_relay_initiation_is_dropped_without_a_response() -> None:
    net, a, _akeys, b, bkeys = _two_relays()
    a.open_link(B_ADDR, bkeys.link_pub, net.now, net.wall, peer_relay_id=bkeys.relay_id)
    net.run()
    (init,) = packets(net, R_ADDR, B_ADDR, MSG_INIT_RELAY)
    net.advance(5.0)
    b.receive_datagram(init, ATTACKER, net.now, net.wall)
    assert b.counters["drop_initiation_replay"] == 1 and b.counters["handshake_responded"] == 1
    assert b.outbox == [] and len(b.links) == 1


@pytest.mark.parametrize("scenario", ["link_closed", "crossing_dials"])
def test_replayed_relay_initiation_is_dropped_in_every_link_state(scenario: str) -> None:
    """IK replays are caught even when the responder has no accepted link for the initiator (it was closed)
    or has dialed the initiator itself: the replay check must not depend on link bookkeeping."""
    net, a, akeys, b, bkeys = _two_relays()
    if scenario == "crossing_dials":  # both relays extend a circuit to each other at the same moment
        a.open_link(B_ADDR, bkeys.link_pub, net.now, net.wall, peer_relay_id=bkeys.relay_id)
        b.open_link(R_ADDR, akeys.link_pub, net.now, net.wall, peer_relay_id=akeys.relay_id)
        net.run()
        net.advance(5.0)
    else:  # A stops using the link; B closes its side after LINK_DEAD_AFTER_S of silence
        link = a.open_link(B_ADDR, bkeys.link_pub, net.now, net.wall, peer_relay_id=bkeys.relay_id)
        net.run()
        a.close_link(link, "done")
        step_until(net, lambda: not b.links)
    (init,) = packets(net, R_ADDR, B_ADDR, MSG_INIT_RELAY)
    responded = b.counters["handshake_responded"]
    b.outbox.clear()
    b.receive_datagram(init, ATTACKER, net.now, net.wall)  # well within HANDSHAKE_SKEW_S of its timestamp
    assert b.counters["handshake_responded"] == responded, "a replayed initiation was answered"
    assert b.outbox == []


# ------------------------------------------------------------------------------------------ cheap filters


@pytest.mark.parametrize("kind", ["client", "relay"])
def test_initiation_with_a_bad_mac1_gets_no_response(kind: str) -> None:
    net, _a, akeys, b, bkeys = _two_relays()
    if kind == "client":
        _s, packet = lh.client_initiation(responder_link_pub=bkeys.link_pub, sender_index=3,
                                          rng=det_rng(3))
    else:
        packet = _relay_init(net, link_private=akeys.link_private, identity=akeys, cert_for=akeys.link_pub,
                             cert_expires=int(net.wall) + 3600, responder_pub=bkeys.link_pub)
    flipped = packet[:-17] + bytes([packet[-17] ^ 0x01]) + packet[-16:]  # the last byte of mac1
    body = packet[:-32]
    wrong_key = body + lh.mac1(akeys.link_pub, body) + lh.NO_MAC2  # mac1 for another relay's link key
    for bad in (flipped, wrong_key):
        b.receive_datagram(bad, R_ADDR, net.now, net.wall)
    assert b.counters["drop_bad_mac1"] == 2
    assert b.outbox == [] and not b.links and b.counters["handshake_responded"] == 0
    b.receive_datagram(packet, R_ADDR, net.now, net.wall)  # control: the untouched packet is answered
    assert b.counters["handshake_responded"] == 1 and len(b.outbox) == 1


@pytest.mark.parametrize("offset_s", [-600.0, 600.0, -60.0, 60.0])
@pytest.mark.parametrize("kind", ["client", "relay"])
def test_initiation_timestamp_must_be_within_the_handshake_skew(kind: str, offset_s: float) -> None:
    """A relay initiation stamped 10 minutes off is dropped silently; one minute off is fine.  A client
    sends no clock (review M5): its link comes up whatever its clock says."""
    net, a, _akeys, b, bkeys = _two_relays()
    initiator = client_layer(net, 4) if kind == "client" else a
    link = initiator.open_link(B_ADDR, bkeys.link_pub, net.now, net.wall + offset_s,
                               peer_relay_id=None if kind == "client" else bkeys.relay_id)
    net.run()
    if abs(offset_s) > 120 and kind == "relay":
        assert b.counters["drop_initiation_clock_skew"] == 1
        assert b.counters["handshake_responded"] == 0 and not b.links
        assert not [1 for s, _d, _p in net.log if s == B_ADDR], "the responder must stay silent"
        assert link.state is LinkState.CONNECTING
    else:
        assert link.state is LinkState.UP and b.counters["drop_initiation_clock_skew"] == 0


# ------------------------------------------------------------------------------------------ rekey


def test_rekey_after_rekey_after_s_keeps_circuits_working() -> None:
    net = SimNet()
    relays = make_relays(net, 3, exits={2}, seed=3)
    client = make_client(net, seed=4)
    (guard, _), (middle, _), (exit_, _) = relays
    circ = client.build([d for _n, d in relays], net.now, net.wall)
    net.run()
    assert circ.state is CircuitState.OPEN
    link = circ.link
    assert link is not None
    first_session = link.session
    old_packet = packets(net, ("192.0.2.10", 5555), ("10.0.0.1", 9000), MSG_TRANSPORT)[0]
    sessions = [first_session]
    received = 0
    client.events.clear()
    for second in range(int(2 * REKEY_AFTER_S) + 15):
        client.send(circ, f"t={second}".encode(), net.now)
        net.run()
        got = [e.data for e in client.events if isinstance(e, DatagramReceived)]
        client.events.clear()
        assert got == [f"t={second}".encode()], f"echo lost at t={second}s"
        received += 1
        if link.session is not sessions[-1]:
            sessions.append(link.session)
        net.advance(1.0)
    assert circ.state is CircuitState.OPEN and link.state is LinkState.UP
    assert received == int(2 * REKEY_AFTER_S) + 15
    assert len(sessions) == 3, "the client link must rekey every REKEY_AFTER_S"
    assert len({s.local_index for s in sessions}) == 3
    assert client.link.counters["handshake_completed"] == 3
    assert guard.link.counters["handshake_completed"] == 3, "guard -> middle link must rekey"
    assert middle.link.counters["handshake_completed"] == 3, "middle -> exit link must rekey"
    assert echoed(exit_) == received
    # the first session was retired after REJECT_AFTER_S: its packets now name an unknown index
    assert net.now - 100.0 > REJECT_AFTER_S
    before = guard.link.counters["drop_unknown_index"]
    guard.receive_datagram(old_packet, ("192.0.2.10", 5555), net.now, net.wall)
    assert guard.link.counters["drop_unknown_index"] == before + 1


# ------------------------------------------------------------------------------------------ liveness


@pytest.mark.parametrize("peer", ["silent", "talking"])
def test_silent_peer_is_declared_down_after_link_dead_after_s_when_the_link_has_users(peer: str) -> None:
    net, relay, _rkeys, client, link = _client_and_relay()
    net.run()
    link.users = 1  # a circuit uses the link
    client.events.clear()
    start = net.now
    if peer == "silent":
        net.tap = lambda src, dst, data: None if src == R_ADDR else data  # the relay goes silent
        elapsed = step_until(net, lambda: bool(client.events), limit=60)
        (event,) = client.events
        assert isinstance(event, LinkDown) and event.link is link and event.reason == "peer silent"
        assert LINK_DEAD_AFTER_S < elapsed <= LINK_DEAD_AFTER_S + 2
        assert link.state is LinkState.CLOSED and link.link_id not in client.links
        keepalives = [1 for s, _d, p in net.log if s == CLIENT_ADDR and p[0] == MSG_TRANSPORT]
        assert len(keepalives) >= 2, "a link with users sends keepalives while it waits"
    else:  # control: keepalives in both directions keep a used link up indefinitely
        (relay_side,) = relay.links.values()
        relay_side.users = 1
        while net.now - start < 3 * LINK_DEAD_AFTER_S:
            net.advance(1.0)
        assert not client.events and link.state is LinkState.UP


def test_handshake_retries_with_backoff_then_times_out_when_the_responder_is_absent() -> None:
    net = SimNet()
    client = client_layer(net, 7)
    absent = ("10.66.0.1", 9000)
    sent_at: list[tuple[float, bytes]] = []

    def tap(src, dst, data):
        if dst == absent:
            sent_at.append((net.now, data))
        return data

    net.tap = tap
    start = net.now
    link = client.open_link(absent, RelayKeys.generate(det_rng(8), net.wall).link_pub, net.now, net.wall)
    net.run()
    elapsed = step_until(net, lambda: bool(client.events), step=HANDSHAKE_RETRY_S / 2, limit=120)
    (event,) = client.events
    assert isinstance(event, LinkDown) and event.reason == "handshake timed out"
    assert link.state is LinkState.CLOSED and not client.links
    assert client.counters["handshake_timeout"] == 1
    assert len(sent_at) == HANDSHAKE_ATTEMPTS == client.counters["handshake_sent"]
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(sent_at)]
    assert gaps == [HANDSHAKE_RETRY_S * 2**i for i in range(HANDSHAKE_ATTEMPTS - 1)]
    assert sent_at[0][0] == start
    assert elapsed == pytest.approx(HANDSHAKE_RETRY_S * (2**HANDSHAKE_ATTEMPTS - 1))
    assert len({p for _t, p in sent_at}) == HANDSHAKE_ATTEMPTS
    assert len({p[2:6] for _t, p in sent_at}) == HANDSHAKE_ATTEMPTS, "each attempt uses a fresh sender index"
    net.advance(60.0)
    assert len(sent_at) == HANDSHAKE_ATTEMPTS, "a closed link sends nothing more"


def test_forged_response_does_not_break_the_pending_handshake() -> None:
    net, _relay, _rkeys, client, link = _client_and_relay()

    def tap(src, dst, data):
        if src == R_ADDR and data[0] == MSG_RESPONSE:  # an on-path attacker races the genuine response
            client.receive_datagram(data[:5] + bytes(len(data) - 5), ATTACKER, net.now, net.wall)
        return data

    net.tap = tap
    net.run()
    assert link.state is LinkState.UP, "the genuine response must still complete the handshake"
    assert client.counters["drop_bad_response"] == 1
