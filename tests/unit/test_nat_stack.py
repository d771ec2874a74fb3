"""Whole node stacks (core/nat/stack.py and part.py) on tests/simnet: introductions that punch, fall back to the
relay and upgrade; NAT control cells handed from the node to the NAT part; the status object; the events the
adapters react to."""

from __future__ import annotations

from collections import Counter

from shallot.core.circuit import ClientNode
from shallot.core.link import Link, LinkState, PeerKind
from shallot.core.nat import LinkMethod, LinkUpgraded, NatClassified, PublicAddressChanged
from shallot.core.nat import part as nat_part
from shallot.core.nat.classify import ALT_PORT_OFFSET, Behaviour, NatProbe, NatType
from shallot.core.nat.limits import REBIND_CHECK_S, UPGRADE_INTERVAL_S
from shallot.core.nat.virtual import is_virtual
from shallot.core.wire import nat_frames as nm
from shallot.core.wire.cells import encode_cell
from shallot.crypto import link_handshake as lh
from shallot.crypto.params import LINK_PACKET_LEN, MSG_INIT_CLIENT, MSG_RESPONSE, MSG_TRANSPORT
from shallot.relay.forwarder import RelayNode
from tests.simnet import SimNet, det_rng
from tests.unit.helpers_nat import CLIENT_ADDR, Scene, client_stack, keys, relay_stack

EI, APD = Behaviour.ENDPOINT_INDEPENDENT, Behaviour.ADDRESS_AND_PORT_DEPENDENT
LINK_LENGTHS = {MSG_INIT_CLIENT: lh.INIT_CLIENT_LEN, MSG_RESPONSE: lh.RESPONSE_LEN, MSG_TRANSPORT: LINK_PACKET_LEN}


# ---------------------------------------------------------------- whole introductions
def test_introduction_punches_a_direct_link() -> None:
    scene = Scene(NatType(EI, APD), NatType(EI, APD))
    link = scene.dial()
    assert link.state is LinkState.UP and link.addr == scene.b_addr
    assert scene.a.nat.link_method(link) is LinkMethod.PUNCHED
    assert scene.intro.nat.counters["nat_introduced"] == 1 and scene.b.nat.counters["nat_introduced_to_peer"] == 1
    assert scene.intro.nat.counters["nat_relayed"] == 0
    b_links = scene.b.nat.status()["links"]
    assert {"client": "hole-punched"}.items() <= {lk["peer"]: lk["method"] for lk in b_links}.items()


def test_impossible_punch_goes_through_the_relay_then_upgrades_when_a_path_opens() -> None:
    scene = Scene(NatType(APD, APD), NatType(APD, APD))
    scene.direct_ok = False
    link = scene.dial()
    assert link.state is LinkState.UP and link.addr[1] == 0 and scene.a.nat.link_method(link) is LinkMethod.RELAYED
    relayed = scene.intro.nat.counters["nat_relayed"]
    assert relayed >= 2 and scene.a.nat.counters["nat_relay_fallback"] == 1
    _introducer_saw_only_ciphertext_of_the_two_ends(scene)
    scene.direct_ok = True  # e.g. one NAT was replaced: the next punch gets through and both ends roam
    for _ in range(25):
        scene.net.advance(1.0)
        if link.addr == scene.b_addr:
            break
    assert link.state is LinkState.UP and link.addr == scene.b_addr
    assert scene.a.nat.link_method(link) is LinkMethod.PUNCHED
    # and the dialer says so at its next look (at most one upgrade interval later)
    scene.net.advance(UPGRADE_INTERVAL_S)
    assert [e for e in scene.a.nat.events if isinstance(e, LinkUpgraded)] == [LinkUpgraded(link)]


def _introducer_saw_only_ciphertext_of_the_two_ends(scene: Scene) -> None:
    """What the relay-server (the introducer) sees of a relayed link: A's and B's link packets, which it holds
    no key for, each passed on unchanged to the other end and to no one else."""
    log = scene.net.log
    into = [(src, data) for src, dst, data in log if dst == scene.i_addr and data[:1] == bytes((nm.MSG_RELAYED,))]
    out = [(dst, data) for src, dst, data in log if src == scene.i_addr and data[:1] == bytes((nm.MSG_RELAYED,))]
    assert {src for src, _ in into} == {scene.a_addr, scene.b_addr}, "both ends' packets went through it"
    other = {scene.a_addr: scene.b_addr, scene.b_addr: scene.a_addr}
    assert Counter((other[src], data) for src, data in into) == Counter(out), "forwarded unchanged, to the other end"
    own_indexes = {s.local_index for lk in scene.intro.node.link.links.values()
                   for s in (lk.session, lk.previous, lk.next_session) if s is not None}
    for _, data in into:
        inner = data[nm.RELAYED_HEADER_LEN:]
        assert LINK_LENGTHS.get(inner[0]) == len(inner), f"not a link packet: {inner[:8].hex()}"
        if inner[0] == MSG_TRANSPORT:  # a session of the A-B link, not one of the introducer's own
            assert int.from_bytes(inner[1:5], "big") not in own_indexes


def test_punch_that_times_out_falls_back_to_the_relay() -> None:
    scene = Scene(NatType(EI, APD), NatType(EI, APD))  # predicted to punch ...
    scene.direct_ok = False  # ... but the path is broken
    link = scene.dial()
    assert link.state is LinkState.UP and scene.a.nat.link_method(link) is LinkMethod.RELAYED
    assert scene.a.nat.counters["nat_relay_fallback"] == 1


def test_status_object_keeps_its_shape(monkeypatch) -> None:
    scene = Scene(NatType(EI, APD), NatType(EI, APD))
    scene.dial()
    status = scene.b.nat.status()
    assert list(status) == ["public", "nat", "registered_with", "registrations", "relay_sessions", "links",
                            "links_total", "counters"]
    assert status["links_total"] == len(status["links"]) >= 1
    # a full link table must still fit in one control line: the list is capped, the total is not
    monkeypatch.setattr(nat_part, "STATUS_LINKS", 0)
    capped = scene.b.nat.status()
    assert capped["links"] == [] and capped["links_total"] == status["links_total"]
    assert status["public"] == list(scene.b_addr) and status["nat"] == NatType(EI, APD).as_json()
    assert status["registered_with"] == [scene.intro.node.keys.relay_id.hex()]
    assert (status["registrations"], status["relay_sessions"]) == (0, 0)
    links = status["links"]
    assert isinstance(links, list) and all(list(lk) == ["peer", "kind", "state", "address", "method"] for lk in links)
    intro = scene.intro.nat.status()
    assert (intro["registrations"], intro["relay_sessions"], intro["registered_with"]) == (1, 1, [])


# ---------------------------------------------------------------- NAT control cells: an explicit hand-off
def test_nat_control_cells_are_handed_from_the_node_to_the_nat_part() -> None:
    net = SimNet()
    relay, _, _ = relay_stack(net, 1, serve=True)
    peer = Link(99, ("10.9.0.1", 9000), PeerKind.RELAY, initiator=False, peer_relay_id=bytes(20),
                state=LinkState.UP)
    relay.node.link.on_cell(peer, nm.register_cell())  # what the link layer does with a decrypted cell
    assert relay.nat.counters["nat_registered"] == 1
    assert relay.nat.introducer is not None and relay.nat.introducer.registrations[bytes(20)] is peer
    relay.node.link.on_cell(peer, encode_cell(0, 200))  # in the NAT command range, unknown
    assert relay.nat.counters["nat_drop_unexpected_cell"] == 1
    relay.node.link.on_cell(peer, encode_cell(0, 0))  # below it: the node's own business
    relay.node.link.on_cell(peer, encode_cell(5, nm.CMD_NAT_REGISTER))  # not circuit id 0: the node's too
    assert relay.node.counters["drop_unknown_command"] == 2 and relay.nat.counters["nat_registered"] == 1
    # a client's NAT part serves nobody: the same cell is unexpected there
    client = client_stack(net)
    client.node.link.on_cell(peer, nm.register_cell())
    assert client.nat.counters["nat_drop_unexpected_cell"] == 1 and not client.node.counters
    # nodes built without a NAT part drop NAT cells as they drop any cell they do not know
    plain_relay = RelayNode(keys(5), rng=det_rng(5), wall=net.wall)
    plain_relay.link.on_cell(peer, nm.register_cell())
    assert plain_relay.counters["drop_unknown_command"] == 1
    plain_client = ClientNode(rng=det_rng(6))
    plain_client.link.on_cell(peer, nm.register_cell())
    assert plain_client.counters["drop_unknown_circuit"] == 1


def test_the_client_node_dials_through_the_nat_part_it_was_built_with() -> None:
    scene = Scene(NatType(EI, APD), NatType(EI, APD))
    assert scene.a.node.dialer is scene.a.nat.dialer
    circ = scene.a.node.build([scene.desc], scene.net.now, scene.net.wall)
    assert circ.link is not None and scene.a.nat.dialer.dialed(circ.link)  # through the introducer
    assert scene.intro.nat.counters["nat_intro_unknown_target"] == 0
    scene.net.run()
    assert scene.intro.nat.counters["nat_introduced"] == 1


# ---------------------------------------------------------------- events instead of polled flags
def test_classification_ends_with_one_nat_classified_event() -> None:
    net = SimNet()
    _, _, r1 = relay_stack(net, 1, serve=True)
    _, _, r2 = relay_stack(net, 2, serve=True)
    client = client_stack(net)
    alt1, alt2 = (r1[0], r1[1] + ALT_PORT_OFFSET), (r2[0], r2[1] + ALT_PORT_OFFSET)  # no alternate ports here
    client.nat.start_probe(NatProbe(r1, alt1, r2, alt2, det_rng(3), local=CLIENT_ADDR), net.now)
    for _ in range(40):
        net.run()
        if client.nat.nat_type is not None:
            break
        net.advance(0.31)
    nat = client.nat.nat_type
    assert nat is not None and not nat.behind_nat and nat.filtering is EI and client.nat.public == CLIENT_ADDR
    assert list(client.nat.events) == [NatClassified(nat)]


def test_a_new_public_address_is_an_event() -> None:
    scene = Scene(NatType(EI, APD), NatType(EI, APD))
    assert scene.b.nat.public == scene.b_addr and not scene.b.nat.events  # the first check just learns it
    moved = ("10.2.0.99", 4000)  # B's NAT rebinds: its datagrams now come from another address
    scene.net.nodes[moved] = scene.net.nodes.pop(scene.b_addr)
    scene.net.advance(REBIND_CHECK_S)
    assert list(scene.b.nat.events) == [PublicAddressChanged(moved, scene.b_addr)]
    assert scene.b.nat.public == moved and scene.b.nat.counters["nat_public_address_changed"] == 1
    reg = scene.intro.nat.introducer
    assert reg is not None and all(lk.addr == moved for lk in reg.registrations.values())  # the link roamed


def test_relayed_datagrams_leave_framed_for_the_relay_server() -> None:
    scene = Scene(NatType(APD, APD), NatType(APD, APD))  # relay planned
    scene.direct_ok = False
    link = scene.dial()
    assert is_virtual(link.addr)
    scene.a.node.link.send_cell(link, encode_cell(0, 5), scene.net.now)  # a keepalive on the relayed link
    (data, dest), = scene.a.datagrams_to_send()
    assert dest == scene.i_addr and data[:1] == bytes((nm.MSG_RELAYED,)) and nm.relayed_session(data)
