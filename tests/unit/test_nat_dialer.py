"""Dialing a relay behind a NAT (core/nat/dialer.py, PROTOCOL §13.4): the DialState table, asking the introducers in
turn, punching, falling back to the relay-server, and what the dialer does once the link is up."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from shallot.core.circuit import client_link_layer
from shallot.core.link import Address, Link, LinkState
from shallot.core.nat.classify import Behaviour, NatType
from shallot.core.nat.dialer import (
    TRANSITIONS,
    Dial,
    DialState,
    DialStep,
    IllegalDialStep,
    LinkMethod,
    NatDialer,
)
from shallot.core.nat.events import NatEvent
from shallot.core.nat.limits import INTRO_RETRY_S, INTRO_TRIES, MAX_DIALS, PUNCH_INTERVAL_S, PUNCH_TIMEOUT_S
from shallot.core.nat.virtual import RelayedPaths, is_virtual, virtual_address
from shallot.core.wire import nat_frames as nm
from shallot.crypto.descriptor import Descriptor, Reachability
from tests.simnet import det_rng
from tests.unit.helpers_nat import keys

EI, APD = Behaviour.ENDPOINT_INDEPENDENT, Behaviour.ADDRESS_AND_PORT_DEPENDENT
I1: Address = ("198.51.100.1", 9000)
I2: Address = ("198.51.100.2", 9000)
B_PUBLIC: Address = ("203.0.113.5", 40000)  # the relay's published address
B_SEEN: Address = ("203.0.113.5", 40001)  # where the introducer sees it
SESSION = b"S" * 8
WALL = 1.8e9


def _desc(seed: int = 1, b_nat: NatType | None = None, introducers: tuple[Address, ...] = (I1, I2)) -> Descriptor:
    b_nat = b_nat or NatType(EI, APD)
    reach = Reachability(int(b_nat.mapping), int(b_nat.filtering), tuple((bytes(20), a) for a in introducers)) \
        if introducers else None
    return Descriptor.create(keys(seed), nickname=f"b{seed}", addresses=(B_PUBLIC,), exit_node=False,
                             published=int(WALL), lifetime_s=3600, reachability=reach)


class Scene:
    def __init__(self, mine: NatType | None = None) -> None:
        self.sent: list[tuple[bytes, Address]] = []
        self.events: list[NatEvent] = []
        self.counters: Counter[str] = Counter()
        self.paths = RelayedPaths()
        self.layer = client_link_layer(det_rng(5))
        own = mine or NatType(EI, APD)
        self.dialer = NatDialer(self.layer, rng=det_rng(6), send=lambda d, a: self.sent.append((d, a)),
                                counters=self.counters, paths=self.paths, mine=lambda: own,
                                emit=self.events.append)

    def dial(self, desc: Descriptor, now: float = 0.0) -> tuple[Link, Dial]:
        link = self.dialer.dial(desc, now, WALL)
        dial = next(d for d in self.dialer.dials.values() if d.link is link)
        return link, dial

    def requests(self) -> list[tuple[nm.IntroRequest, Address]]:
        return [(nm.IntroRequest.decode(d), a) for d, a in self.sent if d[0] == nm.MSG_INTRO_REQUEST]

    def answer(self, dial: Dial, src: Address = I1, now: float = 1.0, status: int = nm.STATUS_OK) -> None:
        peer = B_SEEN if status == nm.STATUS_OK else None
        ans = nm.IntroAnswer(dial.request_id, status, peer, SESSION if peer else bytes(8))
        self.dialer.on_intro_answer(ans.encode(), src, now, WALL)

    def punches(self) -> list[Address]:
        return [a for d, a in self.sent if d[0] == nm.MSG_PUNCH]


# ---------------------------------------------------------------- the table
def test_the_transition_table_is_the_documented_machine() -> None:
    assert TRANSITIONS == {
        (DialState.ASKING, DialStep.ANSWERED): DialState.PUNCHING,
        (DialState.ASKING, DialStep.FALL_BACK): DialState.RELAYED,
        (DialState.ASKING, DialStep.NO_INTRODUCER): DialState.FAILED,
        (DialState.PUNCHING, DialStep.FALL_BACK): DialState.RELAYED,
        (DialState.ASKING, DialStep.LINK_UP): DialState.UP,
        (DialState.PUNCHING, DialStep.LINK_UP): DialState.UP,
        (DialState.RELAYED, DialStep.LINK_UP): DialState.UP,
    }
    assert not any(state in (DialState.UP, DialState.FAILED) for state, _ in TRANSITIONS)  # both are final


@pytest.mark.parametrize(("state", "step"), list(itertools.product(DialState, DialStep)))
def test_an_illegal_step_raises_and_leaves_the_state(state: DialState, step: DialStep) -> None:
    dial = Dial(_desc(), Link(1, B_PUBLIC, None, True), bytes(8), 0.0, state=state)  # type: ignore[arg-type]
    if (state, step) in TRANSITIONS:
        assert dial.can(step)
        dial.move(step)
        assert dial.state is TRANSITIONS[state, step]
    else:
        assert not dial.can(step)
        with pytest.raises(IllegalDialStep):
            dial.move(step)
        assert dial.state is state


# ---------------------------------------------------------------- asking
def test_a_public_relay_is_dialed_plainly() -> None:
    s = Scene()
    link = s.dialer.dial(_desc(introducers=()), 0.0, WALL)
    assert link.addr == B_PUBLIC and not s.dialer.dials and not s.sent and not s.dialer.dialed(link)


def test_introducers_are_asked_in_turn_then_the_dial_fails() -> None:
    s = Scene(NatType(APD, EI))
    link, dial = s.dial(_desc())
    assert link.addr == B_PUBLIC  # the initiation goes to the published address meanwhile
    (req, to), = s.requests()
    assert to == I1 and (req.mapping, req.filtering) == (int(APD), int(EI)) and req.request_id == dial.request_id
    now = 0.0
    while dial.state is DialState.ASKING:
        now += INTRO_RETRY_S
        s.dialer.handle_timer(now, WALL)
    assert [to for _, to in s.requests()] == [I1] * INTRO_TRIES + [I2] * INTRO_TRIES
    assert dial.state is DialState.FAILED and s.counters["nat_dial_no_introducer"] == 1


def test_answers_must_come_from_the_introducer_asked() -> None:
    s = Scene()
    _, dial = s.dial(_desc())
    s.answer(dial, src=I2)  # we asked I1
    s.dialer.on_intro_answer(b"\x56" * 37, I1, 1.0, WALL)
    s.dialer.on_intro_answer(nm.IntroAnswer(b"?" * 8, nm.STATUS_OK, B_SEEN, SESSION).encode(), I1, 1.0, WALL)
    assert dial.state is DialState.ASKING
    assert s.counters["nat_drop_unexpected_intro_answer"] == 2 and s.counters["nat_drop_bad_intro_answer"] == 1
    s.answer(dial, src=I1, status=nm.STATUS_UNKNOWN_TARGET)  # not registered there: the next one, at once
    assert [to for _, to in s.requests()] == [I1, I2] and dial.state is DialState.ASKING


# ---------------------------------------------------------------- punching and falling back
def test_an_answer_starts_punching_and_a_timeout_falls_back_to_the_relay() -> None:
    s = Scene()
    link, dial = s.dial(_desc())
    s.answer(dial, now=1.0)
    assert dial.state is DialState.PUNCHING and link.addr == B_SEEN and B_SEEN in s.dialer.punched
    assert s.paths.server_for(SESSION) == I1
    while dial.state is DialState.PUNCHING:  # driven as the adapter drives it: at the machine's own deadline
        s.dialer.handle_timer(min(s.dialer.timers()), WALL)
    expected = PUNCH_TIMEOUT_S / PUNCH_INTERVAL_S
    assert expected - 1 <= len(s.punches()) <= expected + 1 and set(s.punches()) == {B_SEEN}
    assert dial.state is DialState.RELAYED and link.addr == virtual_address(SESSION)
    assert s.counters["nat_relay_fallback"] == 1


def test_when_no_punch_can_work_the_dial_goes_to_the_relay_at_once() -> None:
    s = Scene(NatType(APD, APD))
    link, dial = s.dial(_desc(b_nat=NatType(APD, APD)))
    s.answer(dial)
    assert dial.state is DialState.RELAYED and is_virtual(link.addr) and not s.punches()


def test_the_peers_first_punch_moves_the_handshake_to_where_it_came_from() -> None:
    s = Scene()
    link, dial = s.dial(_desc())
    s.answer(dial)
    elsewhere = ("203.0.113.5", 40999)  # its NAT let our packets in from there
    s.dialer.on_punch(dial.request_id, elsewhere, 1.1, WALL)
    assert link.addr == elsewhere and dial.resent and s.counters["nat_punch_received"] == 1
    s.dialer.on_punch(b"?" * 8, elsewhere, 1.2, WALL)
    assert s.counters["nat_drop_unknown_punch"] == 1


# ---------------------------------------------------------------- up
def test_a_link_that_comes_up_ends_the_dial_with_its_method() -> None:
    s = Scene()
    link, dial = s.dial(_desc())
    s.answer(dial)
    link.state = LinkState.UP  # the handshake completed
    s.dialer.handle_timer(1.5, WALL)
    assert dial.state is DialState.UP and dial.method is LinkMethod.PUNCHED
    assert s.counters["nat_link_hole-punched"] == 1 and s.dialer.dialed(link)
    relayed = Scene(NatType(APD, APD))
    rlink, rdial = relayed.dial(_desc(b_nat=NatType(APD, APD)))
    relayed.answer(rdial)
    rlink.state = LinkState.UP
    relayed.dialer.handle_timer(1.5, WALL)
    assert rdial.method is LinkMethod.RELAYED and relayed.counters["nat_link_relayed"] == 1


def test_closed_links_leave_the_table_and_the_table_is_bounded() -> None:
    s = Scene()
    link, _ = s.dial(_desc())
    s.layer.close_link(link, "test")
    s.dialer.handle_timer(1.0, WALL)
    assert not s.dialer.dials
    for seed in range(10, 10 + MAX_DIALS + 1):
        s.dialer.dial(_desc(seed), 2.0, WALL)
    assert len(s.dialer.dials) == MAX_DIALS and s.counters["nat_dial_table_full"] == 1
