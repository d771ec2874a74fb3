"""Regression tests for bugs found in review: a node that never dials still runs its timers, an EXTEND
naming an unusable link key is refused cleanly, and the extend-scope rule sees through IPv4-mapped
addresses."""

from __future__ import annotations

from shallot.core.circuit import CircuitState
from shallot.core.link import LinkConfig, LinkLayer
from shallot.core.wire.addresses import extend_target_allowed
from shallot.crypto.primitives import x25519_keypair
from tests.simnet import SimNet, det_rng, make_client, make_relays


def test_a_node_that_only_accepts_links_still_gets_a_timer() -> None:
    net = SimNet()
    relays = make_relays(net, 3, exits={2})
    client = make_client(net)
    exit_node = relays[2][0]
    assert exit_node.timer() is None  # no links yet: nothing to wake up for
    circ = client.build([r[1] for r in relays], net.now, net.wall)
    net.run()
    assert circ.state is CircuitState.OPEN
    deadline = exit_node.timer()
    assert deadline is not None and deadline <= net.now + 1.0  # the exit never dialed, yet it ticks


def test_a_responder_only_link_layer_ticks() -> None:
    priv, pub = x25519_keypair(det_rng(1))
    layer = LinkLayer(LinkConfig(link_private=priv, link_pub=pub, accept_clients=True), rng=det_rng(2))
    client_priv, client_pub = x25519_keypair(det_rng(3))
    client = LinkLayer(LinkConfig(link_private=client_priv, link_pub=client_pub), rng=det_rng(4))
    client.open_link(("192.0.2.1", 1), pub, 10.0, 1_800_000_000.0)
    for data, _ in client.outbox:
        layer.receive_datagram(data, ("192.0.2.2", 2), 10.0, 1_800_000_000.0)
    assert layer.half_open_count == 1 and not layer.links and layer.timer() is not None


def test_extend_to_a_low_order_link_key_is_refused_with_destroy() -> None:
    net = SimNet()
    relays = make_relays(net, 3, exits={2})
    client = make_client(net)
    guard, middle, exit_ = (r[1] for r in relays)
    # a path whose middle claims an all-zero (low-order) link key: the guard cannot dial it
    bad_middle = type(middle)(**{**middle.__dict__, "link_pub": bytes(32)})
    circ = client.build([guard, bad_middle, exit_], net.now, net.wall)
    net.run()  # must not raise out of receive_datagram
    assert circ.state is CircuitState.CLOSED
    g = relays[0][0]
    assert g.counters["reject_create_cannot_dial"] == 1
    assert len(g.link.links) == 1  # only the client's link: no half-made link to nowhere
    for _ in range(40):
        net.advance(1.0)
    assert len(g.link.links) <= 1


def test_extend_scope_sees_through_mapped_addresses() -> None:
    assert not extend_target_allowed("10.0.0.5", "::ffff:127.0.0.1")
    assert not extend_target_allowed("0.0.0.0", "::ffff:169.254.169.254")
    assert not extend_target_allowed("8.8.4.4", "100.64.0.9")  # CGNAT is not public
    assert not extend_target_allowed("8.8.4.4", "::ffff:10.0.0.1")
    assert extend_target_allowed("8.8.4.4", "1.1.1.1")
    assert extend_target_allowed("127.0.0.1", "127.0.0.1")
    assert not extend_target_allowed("127.0.0.1", "1.1.1.1")
    assert not extend_target_allowed("8.8.4.4", "224.0.0.1")
