"""NAT traversal's remaining limits and guards (core/nat/*, docs/NAT.md, PROTOCOL §13.1, §13.5-13.6), beside the
role tests (test_nat_introducer/stun_server/registrant/dialer/stack.py): an introduction only to a link that
is up, STUN answers and forwards bounded by their cause for IPv6 too, one global bucket for every forward,
timers that act at their deadline and not at every tick, no second dial of a relay, and how a link's
method is named."""

from __future__ import annotations

from shallot.core.link import Address, Link, LinkState, PeerKind
from shallot.core.nat import LinkMethod, NatPart
from shallot.core.nat.dialer import DialState
from shallot.core.nat.limits import FORWARD_BURST, INTRO_RETRY_S, PUNCH_INTERVAL_S
from shallot.core.wire import nat_frames as nm
from shallot.core.wire import stun
from shallot.relay.forwarder import relay_link_layer
from tests.simnet import det_rng
from tests.unit.helpers_nat import keys
from tests.unit.test_nat_dialer import B_SEEN, WALL, _desc
from tests.unit.test_nat_dialer import Scene as DialScene
from tests.unit.test_nat_introducer import A_ADDR, B_ADDR
from tests.unit.test_nat_introducer import Scene as IntroScene
from tests.unit.test_nat_registrant import A_ADDR as INTRODUCED
from tests.unit.test_nat_registrant import I1, I2
from tests.unit.test_nat_registrant import Scene as RegScene
from tests.unit.test_nat_stun_server import TXID
from tests.unit.test_nat_stun_server import Server as StunScene

V6_SRC: Address = ("2001:db8::50", 1234)


# ---------------------------------------------------------------------------------------------- introducer


def test_an_introduction_goes_only_to_a_registration_link_that_is_up() -> None:
    s = IntroScene()
    link = s.relay_link()
    s.intro.on_register(link)
    link.state = LinkState.CONNECTING  # the relay's link is being re-made: nothing can be told to it now
    s.request()
    (ans, _), = s.answers()
    assert ans.status == nm.STATUS_UNKNOWN_TARGET and not link.queued and not s.intro.sessions
    link.state = LinkState.UP
    s.request(request_id=b"\x01" * 8)
    (ans, _), = s.answers()
    assert ans.status == nm.STATUS_OK and ans.peer == B_ADDR and len(link.queued) == 1


# ---------------------------------------------------------------------------------------------- STUN server


def test_an_ipv6_requester_is_answered_exactly_within_its_padded_request() -> None:
    s = StunScene()
    req = stun.binding_request(TXID)
    s.ask(req, V6_SRC)
    (resp, dest), = s.sent
    assert dest == V6_SRC and stun.mapped_address(stun.decode(resp)) == V6_SRC
    assert len(resp) == len(req) == stun.MAX_RESPONSE_LEN  # the largest answer there is: exactly the padding


def test_a_forward_that_would_grow_is_refused() -> None:
    other = ("10.2.0.1", 9000)
    s = StunScene()
    req = stun.binding_request(TXID, change_ip=True, change_port=True, other_relay=other, pad_to=0)
    s.ask(req, V6_SRC)  # the forward would carry a 16-byte address where the request had a 4-byte one
    assert not s.sent and s.counters["nat_drop_stun_amplification"] == 1
    s.ask(req, ("203.0.113.50", 1234))
    assert [dest for _, dest in s.sent] == [other] and len(s.sent[0][0]) <= len(req)


def test_a_forward_exactly_as_long_as_its_request_is_sent() -> None:
    other = ("10.2.0.1", 9000)
    s = StunScene()
    attrs = stun.decode(stun.binding_request(TXID, change_ip=True, change_port=True, other_relay=other,
                                             pad_to=0)).attributes
    padded = stun.encode(stun.StunMessage(stun.BINDING_REQUEST, TXID, (*attrs[:-1], (0x8FFF, b""))), fingerprint=True)
    s.ask(padded, V6_SRC)  # an unknown empty attribute makes the request exactly as long as the forward
    (fwd, dest), = s.sent
    assert dest == other and len(fwd) == len(padded) and "nat_drop_stun_amplification" not in s.counters


def test_change_ip_forwards_share_one_global_bucket() -> None:
    other = ("10.2.0.1", 9000)
    s = StunScene()
    req = stun.binding_request(TXID, change_ip=True, change_port=True, other_relay=other)
    for i in range(int(FORWARD_BURST) + 7):
        s.ask(req, (f"203.0.113.{i}", 1))  # every source only once: only the global bucket can say no
    assert len(s.sent) == int(FORWARD_BURST) and s.counters["nat_drop_stun_change_ip"] == 7


# ---------------------------------------------------------------------------------------------- registrant


def test_a_live_registration_is_not_reopened_on_every_tick() -> None:
    s = RegScene()
    s.register()
    links = dict(s.reg.links)
    for i in range(50):
        s.reg.handle_timer(0.1 * i, 1.8e9)
    assert s.reg.links == links and len(s.layer.links) == 2
    # one REGISTER each, waiting for its link to come up, and one user each (ours)
    assert [(len(lk.queued), lk.users) for lk in links.values()] == [(1, 1), (1, 1)]
    assert {I1.relay_id, I2.relay_id} == set(links)


def test_an_introduced_peer_is_punched_at_the_punch_interval_not_at_every_tick() -> None:
    s = RegScene()
    s.register()
    s.introduce(10.0)
    ticks = 0
    now = 10.0
    while now < 10.0 + 10 * PUNCH_INTERVAL_S:
        s.reg.handle_timer(now, 1.8e9)
        ticks += 1
        now += PUNCH_INTERVAL_S / 10  # an adapter that wakes far more often than it has to
    assert ticks >= 100 and s.punches_to(INTRODUCED) <= 11


# ---------------------------------------------------------------------------------------------- dialer


def test_a_relay_being_dialed_is_not_dialed_twice() -> None:
    s = DialScene()
    link, _ = s.dial(_desc())
    assert s.dialer.dial(_desc(), 0.1, WALL) is link
    assert len(s.dialer.dials) == 1 and len(s.requests()) == 1


def test_a_relay_with_a_link_up_is_not_dialed_through_its_introducers() -> None:
    s = DialScene()
    layer = s.layer
    desc = _desc()
    up = layer.open_link(desc.address, desc.link_pub, 0.0, WALL)
    up.state = LinkState.UP  # as if its handshake had completed, and a rekey were in flight now
    assert up.pending is not None
    assert s.dialer.dial(desc, 0.1, WALL) is up
    assert not s.dialer.dials and s.requests() == []


def test_intro_requests_are_retried_at_their_interval_not_at_every_tick() -> None:
    s = DialScene()
    s.dial(_desc())
    now = 0.0
    while now < 3 * INTRO_RETRY_S:
        s.dialer.handle_timer(now, WALL)
        now += INTRO_RETRY_S / 20
    assert len(s.requests()) <= 4  # the first, then one per interval


def test_an_answer_that_comes_again_after_punching_began_is_dropped() -> None:
    s = DialScene()
    link, dial = s.dial(_desc())
    s.answer(dial, now=1.0)
    assert dial.state is DialState.PUNCHING
    s.answer(dial, now=1.1)  # the same answer again (a duplicate, or a replay from the introducer's address)
    assert s.counters["nat_drop_unexpected_intro_answer"] == 1 and dial.state is DialState.PUNCHING
    assert link.addr == B_SEEN


# ---------------------------------------------------------------------------------------------- NAT part


def test_a_link_is_named_hole_punched_by_its_dial_or_by_a_punched_address() -> None:
    nat = NatPart(relay_link_layer(keys(9), rng=det_rng(9), wall=WALL), rng=det_rng(10))
    accepted = Link(1, ("203.0.113.80", 4000), PeerKind.RELAY, initiator=False, state=LinkState.UP)
    assert nat.link_method(accepted) is LinkMethod.DIRECT
    nat.dialer.punched.add(accepted.addr)  # a punch came from there
    assert nat.link_method(accepted) is LinkMethod.PUNCHED
    s = DialScene()
    link, dial = s.dial(_desc())
    s.answer(dial)
    nat2 = NatPart(s.layer, rng=det_rng(11))
    nat2.dialer = s.dialer
    link.addr = ("203.0.113.5", 41234)  # it roamed after it came up: still the link the dial made
    assert link.addr not in s.dialer.punched and nat2.link_method(link) is LinkMethod.PUNCHED


def test_a_relayed_datagram_for_no_known_session_is_dropped_by_a_node_that_serves_nothing() -> None:
    nat = NatPart(relay_link_layer(keys(9), rng=det_rng(9), wall=WALL), rng=det_rng(10))  # serve=False
    assert nat.introducer is None
    assert nat.on_relayed(bytes([nm.MSG_RELAYED]) + b"S" * 8 + b"\x54" * 40, A_ADDR, 1.0) is None
    assert nat.counters["nat_drop_relayed_unknown_session"] == 1 and nat.link.outbox == []
