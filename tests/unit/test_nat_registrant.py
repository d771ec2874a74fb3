"""A relay behind a NAT (core/nat/registrant.py, PROTOCOL §13.4): registration links that come back, the
rebinding check, introduced peers it punches towards (or not, when the plan is the relay), bounded tables."""

from __future__ import annotations

from collections import Counter

from shallot.core.link import Address, Link, LinkState, PeerKind
from shallot.core.nat.classify import Behaviour, NatType
from shallot.core.nat.limits import (
    INTRODUCED_KEEP_S,
    MAX_INTRODUCED,
    PUNCH_INTERVAL_S,
    PUNCH_PROBES_UNANSWERED,
    PUNCH_TIMEOUT_S,
    REBIND_CHECK_S,
    REREGISTER_S,
)
from shallot.core.nat.registrant import Registrant
from shallot.core.nat.virtual import RelayedPaths, virtual_address
from shallot.core.wire import nat_frames as nm
from shallot.core.wire import stun
from shallot.relay.forwarder import relay_link_layer
from tests.simnet import det_rng
from tests.unit.helpers_nat import keys

EI, APD = Behaviour.ENDPOINT_INDEPENDENT, Behaviour.ADDRESS_AND_PORT_DEPENDENT
I1, I2 = keys(1), keys(2)
I1_ADDR: Address = ("198.51.100.1", 9000)
I2_ADDR: Address = ("198.51.100.2", 9000)
A_ADDR: Address = ("203.0.113.40", 50000)  # a dialer the introducer names
SESSION, TOKEN = b"S" * 8, b"T" * 8
PUNCHABLE = NatType(EI, APD)


class Scene:
    def __init__(self, mine: NatType = PUNCHABLE, *, check_rebinding: bool = True) -> None:
        self.sent: list[tuple[bytes, Address]] = []
        self.counters: Counter[str] = Counter()
        self.paths = RelayedPaths()
        self.layer = relay_link_layer(keys(3), rng=det_rng(3), wall=1.8e9)
        self.reg = Registrant(self.layer, rng=det_rng(4), send=lambda d, a: self.sent.append((d, a)),
                              counters=self.counters, paths=self.paths, mine=lambda: mine,
                              check_rebinding=check_rebinding)

    def register(self, now: float = 0.0) -> None:
        self.reg.register([(I1.relay_id, I1_ADDR, I1.link_pub), (I2.relay_id, I2_ADDR, I2.link_pub)], now, 1.8e9)

    def introduce(self, now: float, token: bytes = TOKEN, theirs: NatType = PUNCHABLE) -> None:
        link = self.reg.links[I1.relay_id]
        cell = nm.Introduce(A_ADDR, token, SESSION, int(theirs.mapping), int(theirs.filtering)).cell()
        self.reg.on_introduce(cell, link, now)

    def punches_to(self, addr: Address) -> int:
        return sum(1 for d, a in self.sent if a == addr and d[0] == nm.MSG_PUNCH)


def test_registering_opens_one_link_in_use_per_introducer_with_register_queued() -> None:
    s = Scene()
    s.register()
    assert set(s.reg.links) == {I1.relay_id, I2.relay_id}
    for rid, addr in ((I1.relay_id, I1_ADDR), (I2.relay_id, I2_ADDR)):
        link = s.reg.links[rid]
        assert link.addr == addr and link.users == 1 and s.reg.is_registration(link)
        assert list(link.queued) == [nm.register_cell()]  # sent once the handshake completes
    assert s.reg.registered_with() == []  # none is up yet


def test_a_closed_registration_comes_back_after_a_pause() -> None:
    s = Scene()
    s.register()
    first = s.reg.links[I1.relay_id]
    s.layer.close_link(first, "test")
    s.reg.handle_timer(REREGISTER_S / 2, 1.8e9)
    assert s.reg.links[I1.relay_id] is first  # not yet
    assert REREGISTER_S in s.reg.timers()  # the owner's timer wakes it
    s.reg.handle_timer(REREGISTER_S, 1.8e9)
    again = s.reg.links[I1.relay_id]
    assert again is not first and again.state is LinkState.CONNECTING and not s.reg.is_registration(first)


def test_rebinding_check_asks_the_first_introducer_every_interval() -> None:
    s = Scene()
    s.register(0.0)
    s.reg.handle_timer(REBIND_CHECK_S - 1, 1.8e9)
    s.reg.handle_timer(REBIND_CHECK_S, 1.8e9)
    checks = [stun.decode(d) for d, a in s.sent if stun.is_stun(d)]
    assert [a for d, a in s.sent if stun.is_stun(d)] == [I1_ADDR, I1_ADDR]
    assert not s.reg.owns_rebind(checks[0].txid)  # an old check's answer is not taken
    assert s.reg.owns_rebind(checks[1].txid) and not s.reg.owns_rebind(checks[1].txid)  # answered once
    quiet = Scene(check_rebinding=False)  # a public relay that registers (not in production): no checks
    quiet.register()
    assert not any(stun.is_stun(d) for d, _ in quiet.sent)


def test_an_introduced_peer_gets_punches_for_the_punch_timeout() -> None:
    s = Scene()
    s.register()
    s.introduce(10.0)
    assert s.counters["nat_introduced_to_peer"] == 1 and s.paths.server_for(SESSION) == I1_ADDR
    assert A_ADDR in s.reg.punched
    s.reg.on_punch(nm.PUNCH_REPLY, TOKEN, A_ADDR, 10.0)  # the dialer's punch got through: no cap on probes
    now = 10.0
    while now < 10.0 + 2 * PUNCH_TIMEOUT_S:  # driven as the adapter drives it: at the machine's own deadline
        s.reg.handle_timer(now, 1.8e9)
        now = min(s.reg.timers())
    expected = PUNCH_TIMEOUT_S / PUNCH_INTERVAL_S
    assert expected - 1 <= s.punches_to(A_ADDR) <= expected + 1
    assert nm.decode_punch(s.sent[-1][0]) == (nm.PUNCH_PROBE, TOKEN)


def test_no_punches_when_the_plan_is_the_relay() -> None:
    s = Scene(mine=NatType(APD, APD))
    s.register()
    s.introduce(10.0, theirs=NatType(APD, APD))
    for i in range(30):
        s.reg.handle_timer(10.0 + i * PUNCH_INTERVAL_S, 1.8e9)
    assert s.punches_to(A_ADDR) == 0


def test_punches_from_the_introduced_peer_are_answered_and_others_are_not_ours() -> None:
    s = Scene()
    s.register()
    s.introduce(10.0)
    src = ("203.0.113.40", 50077)  # its NAT maps it elsewhere towards us
    assert s.reg.on_punch(nm.PUNCH_PROBE, TOKEN, src, 10.5)
    assert s.reg.on_punch(nm.PUNCH_REPLY, TOKEN, src, 10.6)  # a reply is not answered
    assert [nm.decode_punch(d) for d, a in s.sent if a == src] == [(nm.PUNCH_REPLY, TOKEN)]
    assert src in s.reg.punched and s.counters["nat_punch_received"] == 2
    assert not s.reg.on_punch(nm.PUNCH_PROBE, b"?" * 8, src, 10.7)  # the dialer's business, or nobody's


def test_introductions_are_bounded_checked_and_forgotten() -> None:
    s = Scene()
    s.register()
    link = s.reg.links[I1.relay_id]
    s.reg.on_introduce(nm.register_cell(), link, 0.0)  # not an INTRODUCE payload
    assert s.counters["nat_drop_bad_introduce"] == 1
    for i in range(MAX_INTRODUCED + 2):
        s.introduce(0.0, token=i.to_bytes(8, "big"))
    # a full table evicts its oldest introductions, never refuses the newest (spoofed requests cannot lock
    # out the next honest dialer; review M4)
    assert len(s.reg.introduced) == MAX_INTRODUCED and s.counters["nat_introduced_evicted"] == 2
    assert (0).to_bytes(8, "big") not in s.reg.introduced
    assert (MAX_INTRODUCED + 1).to_bytes(8, "big") in s.reg.introduced
    s.reg.handle_timer(INTRODUCED_KEEP_S + 1, 1.8e9)
    assert not s.reg.introduced


def test_a_relayed_packet_ties_the_introduction_to_its_link() -> None:
    s = Scene()
    s.register()
    s.introduce(0.0)
    s.reg.relayed_arrived(SESSION)  # no link under the virtual address yet
    assert s.reg.introduced[TOKEN].link is None
    relayed = Link(77, virtual_address(SESSION), PeerKind.CLIENT, initiator=False, state=LinkState.UP)
    s.layer.links[relayed.link_id] = relayed  # what the dialer's relayed handshake leaves in our link layer
    s.reg.relayed_arrived(SESSION)
    assert s.reg.introduced[TOKEN].link is relayed


def test_an_introduced_address_that_never_answers_gets_at_most_the_unanswered_probes() -> None:
    # a spoofed INTRO_REQUEST names a victim: what we send it is no more than that request's padded size
    n = PUNCH_PROBES_UNANSWERED
    assert nm.INTRO_ANSWER_LEN + n * nm.PUNCH_LEN + (n + 1) * 28 <= nm.INTRO_REQUEST_LEN + 28  # IPv4 wire too
    s = Scene()
    s.register()
    s.introduce(0.0)
    s.reg.handle_timer(0.0, 1.8e9)
    s.reg.handle_timer(PUNCH_INTERVAL_S / 2, 1.8e9)  # within one interval: one probe, not two
    assert s.punches_to(A_ADDR) == 1
    t = 0.0
    while t < PUNCH_TIMEOUT_S + 1:
        s.reg.handle_timer(t, 1.8e9)
        t += PUNCH_INTERVAL_S / 4
    assert s.punches_to(A_ADDR) == PUNCH_PROBES_UNANSWERED < PUNCH_TIMEOUT_S / PUNCH_INTERVAL_S - 1


def test_an_introduced_peer_that_punched_back_is_probed_for_the_whole_punch() -> None:
    s = Scene()
    s.register()
    s.introduce(0.0)
    s.reg.on_punch(nm.PUNCH_PROBE, TOKEN, A_ADDR, 0.05)
    t = 0.0
    while t < PUNCH_TIMEOUT_S + 1:
        s.reg.handle_timer(t, 1.8e9)
        t += PUNCH_INTERVAL_S / 4
    assert s.punches_to(A_ADDR) > 10  # it answered: no cap


def test_relayed_paths_are_bounded_and_forget_the_least_recently_used() -> None:
    paths = RelayedPaths(limit=3)
    for i in range(3):
        paths.add(bytes([i]) * 8, ("198.51.100.1", 9000 + i))
    assert paths.server_for(bytes([0]) * 8) == ("198.51.100.1", 9000)  # used: now the most recent
    paths.add(b"\x09" * 8, ("198.51.100.1", 9009))
    assert len(paths) == 3 and paths.server_for(bytes([1]) * 8) is None
    assert paths.server_for(bytes([0]) * 8) is not None
    out = [(b"\x54", virtual_address(bytes([2]) * 8))]
    paths.frame(out)  # a datagram sent on a path touches it too
    paths.add(b"\x0a" * 8, ("198.51.100.1", 9010))
    assert paths.server_for(b"\x09" * 8) is None  # the least recently used of 9, 0, 2
    assert paths.server_for(bytes([2]) * 8) is not None and paths.server_for(bytes([0]) * 8) is not None
