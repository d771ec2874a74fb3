"""Dialing a relay behind a NAT (docs/NAT.md, PROTOCOL §13.4 steps 2-6): ask, punch, fall back, upgrade.

A dial is a small state machine; its transitions are a table (h11 style), and an input that is not legal
in the current state raises and leaves the state unchanged (a bug here, never a network input: every
network input is checked before it moves a dial)::

    ASKING --ANSWERED--> PUNCHING --FALL_BACK (punch timed out)--> RELAYED
    ASKING --FALL_BACK (the plan says relay)--> RELAYED
    ASKING --NO_INTRODUCER--> FAILED
    ASKING | PUNCHING | RELAYED --LINK_UP--> UP

While a dial is UP over the relay-server it keeps probing for a direct path; the link itself moves
there by roaming (``virtual.probe_direct``), and the dial notices and says so (``LinkUpgraded``).
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from shallot.core.link import Address, Link, LinkLayer, LinkState
from shallot.core.nat.classify import Behaviour, NatType, Plan, plan_link
from shallot.core.nat.events import LinkUpgraded, NatEvent
from shallot.core.nat.limits import (
    INTRO_RETRY_S,
    INTRO_TRIES,
    MAX_DIALS,
    MAX_PUNCHED,
    PUNCH_INTERVAL_S,
    PUNCH_TIMEOUT_S,
    UPGRADE_INTERVAL_S,
    UPGRADE_TRIES,
)
from shallot.core.nat.virtual import RelayedPaths, Send, is_virtual, probe_direct, virtual_address
from shallot.core.wire import nat_frames as nm
from shallot.crypto.codec import DecodeError
from shallot.crypto.descriptor import Descriptor, Reachability


class RecentSet:
    """A set of addresses that forgets the least recently added beyond ``limit`` (review M4: unbounded)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: dict[Address, None] = {}

    def add(self, item: Address) -> None:
        self._items.pop(item, None)
        self._items[item] = None
        if len(self._items) > self.limit:
            del self._items[next(iter(self._items))]

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __len__(self) -> int:
        return len(self._items)


class DialState(enum.Enum):
    ASKING = "asking"  # INTRO_REQUESTs to the introducers, in turn
    PUNCHING = "punching"  # both ends send at once; the first PUNCH through shows where to initiate
    RELAYED = "relayed"  # the handshake goes through the relay-server
    UP = "up"
    FAILED = "failed"  # no introducer answered


class DialStep(enum.Enum):
    ANSWERED = "answered"  # the introducer told us the peer's public address
    FALL_BACK = "fall-back"  # to the relay-server: planned, or the punch timed out
    NO_INTRODUCER = "no-introducer"
    LINK_UP = "link-up"


TRANSITIONS: dict[tuple[DialState, DialStep], DialState] = {
    (DialState.ASKING, DialStep.ANSWERED): DialState.PUNCHING,
    (DialState.ASKING, DialStep.FALL_BACK): DialState.RELAYED,
    (DialState.ASKING, DialStep.NO_INTRODUCER): DialState.FAILED,
    (DialState.PUNCHING, DialStep.FALL_BACK): DialState.RELAYED,
    (DialState.ASKING, DialStep.LINK_UP): DialState.UP,
    (DialState.PUNCHING, DialStep.LINK_UP): DialState.UP,
    (DialState.RELAYED, DialStep.LINK_UP): DialState.UP,
}


class LinkMethod(enum.Enum):
    """How a link runs (``status()`` ``links[].method``, ``probe``'s ``guard_link``)."""

    DIRECT = Plan.DIRECT.value
    PUNCHED = Plan.PUNCH.value
    RELAYED = Plan.RELAY.value


class IllegalDialStep(Exception):
    """A dial was moved by an input its state does not allow (a bug; the state is left unchanged)."""


def peer_nat(reach: Reachability | None) -> NatType | None:
    if reach is None:
        return None
    return NatType(Behaviour(reach.mapping), Behaviour(reach.filtering))


@dataclass(eq=False)
class Dial:
    """A link we are making to a relay behind a NAT."""

    desc: Descriptor
    link: Link
    request_id: bytes  # also the punch token
    started: float
    plan: Plan = Plan.PUNCH
    intro_index: int = 0
    tries: int = 0
    next_at: float = 0.0
    peer: Address | None = None  # its reflexive address, from the introducer
    session: bytes = b""
    introducer: Address | None = None
    punch_until: float = 0.0
    state: DialState = DialState.ASKING
    method: LinkMethod | None = None  # once UP
    upgrades: int = 0
    up_at: float = 0.0
    resent: bool = False  # initiation resent once when the peer's first punch shows its NAT is open

    def can(self, step: DialStep) -> bool:
        return (self.state, step) in TRANSITIONS

    def move(self, step: DialStep) -> None:
        try:
            self.state = TRANSITIONS[self.state, step]
        except KeyError:
            raise IllegalDialStep(f"{step.value} while {self.state.value}") from None


class NatDialer:
    """Reaches relays whose descriptor names introducers (and any other relay plainly): the client node's
    dialer (``core.circuit.client.Dialer``)."""

    def __init__(self, link: LinkLayer, *, rng: Callable[[int], bytes], send: Send, counters: Counter[str],
                 paths: RelayedPaths, mine: Callable[[], NatType], emit: Callable[[NatEvent], None]) -> None:
        self.link = link
        self._rng = rng
        self._send = send
        self.counters = counters
        self._paths = paths
        self._mine = mine  # our own NAT type, as far as known
        self._emit = emit
        self.dials: dict[bytes, Dial] = {}  # by request id
        self.punched = RecentSet(MAX_PUNCHED)  # addresses a punch came from or went to
        self._on_tick: dict[DialState, Callable[[Dial, float, float], None]] = {
            DialState.ASKING: self._ask, DialState.PUNCHING: self._punch, DialState.UP: self._try_direct}

    # ------------------------------------------------------------------ commands and queries
    def dial(self, desc: Descriptor, now: float, wall: float) -> Link:
        """A link to ``desc``: plain for a public relay, through its introducers for one behind a NAT."""
        link = self.link.open_link(desc.address, desc.link_pub, now, wall, peer_relay_id=desc.relay_id)
        reach = desc.reachability
        if reach is None or link.state is not LinkState.CONNECTING or link.pending is None:
            return link
        if self.dialed(link):
            return link
        if len(self.dials) >= MAX_DIALS:
            self.counters["nat_dial_table_full"] += 1
            return link
        dial = Dial(desc, link, self._rng(8), now, plan=plan_link(self._mine(), peer_nat(reach)))
        self.dials[dial.request_id] = dial
        self._ask(dial, now, wall)
        return link

    def dialed(self, link: Link) -> bool:
        """Did this link come through an introducer (punched, or relayed and maybe since upgraded)?"""
        return any(d.link is link for d in self.dials.values())

    # ------------------------------------------------------------------ inputs
    def on_intro_answer(self, data: bytes, addr: Address, now: float, wall: float) -> None:
        try:
            ans = nm.IntroAnswer.decode(data)
        except DecodeError:
            self.counters["nat_drop_bad_intro_answer"] += 1
            return
        dial = self.dials.get(ans.request_id)
        reach = dial.desc.reachability if dial is not None else None
        if dial is None or reach is None or not dial.can(DialStep.ANSWERED) \
                or reach.introducers[min(dial.intro_index, len(reach.introducers) - 1)][1] != addr:
            self.counters["nat_drop_unexpected_intro_answer"] += 1
            return
        if ans.status != nm.STATUS_OK or ans.peer is None:
            dial.tries = INTRO_TRIES  # try the next introducer
            self._ask(dial, now, wall)
            return
        dial.peer, dial.session, dial.introducer = ans.peer, ans.session, addr
        self._paths.add(ans.session, addr)
        if dial.plan is Plan.RELAY:
            self._fall_back(dial, now, wall)
            return
        dial.move(DialStep.ANSWERED)
        dial.punch_until = now + PUNCH_TIMEOUT_S
        dial.next_at = now
        self.link.retarget(dial.link, ans.peer, now, wall)
        self.punched.add(ans.peer)

    def on_punch(self, token: bytes, addr: Address, now: float, wall: float) -> None:
        dial = self.dials.get(token)
        if dial is None:
            self.counters["nat_drop_unknown_punch"] += 1
            return
        self.counters["nat_punch_received"] += 1
        self.punched.add(addr)
        link = dial.link
        if link.state is LinkState.CONNECTING and dial.state is DialState.PUNCHING \
                and (addr != link.addr or not dial.resent):
            # its NAT now lets our packets in from where its punch came: initiate there at once
            dial.resent = True
            self.link.retarget(link, addr, now, wall, force=True)
        elif link.state is LinkState.UP and is_virtual(link.addr) and link.session is not None:
            probe_direct(link, addr, now, self._send, self.counters)

    # ------------------------------------------------------------------ time
    def handle_timer(self, now: float, wall: float) -> None:
        for rid, dial in list(self.dials.items()):
            link = dial.link
            if link.state is LinkState.CLOSED:
                del self.dials[rid]
                continue
            if link.state is LinkState.UP and dial.can(DialStep.LINK_UP):
                self._up(dial, now)
                continue
            if now < dial.next_at:
                continue
            tick = self._on_tick.get(dial.state)
            if tick is not None:
                tick(dial, now, wall)

    def timers(self) -> list[float]:
        return [d.next_at for d in self.dials.values()]

    def _ask(self, dial: Dial, now: float, wall: float) -> None:
        reach = dial.desc.reachability
        assert reach is not None
        if dial.tries >= INTRO_TRIES:
            dial.intro_index += 1
            dial.tries = 0
        if dial.intro_index >= len(reach.introducers):
            dial.move(DialStep.NO_INTRODUCER)
            self.counters["nat_dial_no_introducer"] += 1
            return
        mine = self._mine()
        req = nm.IntroRequest(dial.request_id, dial.desc.relay_id, int(mine.mapping), int(mine.filtering))
        dial.tries += 1
        dial.next_at = now + INTRO_RETRY_S
        self._send(req.encode(), reach.introducers[dial.intro_index][1])

    def _punch(self, dial: Dial, now: float, wall: float) -> None:
        if now >= dial.punch_until:
            self._fall_back(dial, now, wall)
            return
        dial.next_at = now + PUNCH_INTERVAL_S
        assert dial.peer is not None
        self._send(nm.encode_punch(nm.PUNCH_PROBE, dial.request_id), dial.peer)

    def _fall_back(self, dial: Dial, now: float, wall: float) -> None:
        dial.move(DialStep.FALL_BACK)
        self.counters["nat_relay_fallback"] += 1
        self.link.retarget(dial.link, virtual_address(dial.session), now, wall)

    def _up(self, dial: Dial, now: float) -> None:
        dial.move(DialStep.LINK_UP)
        dial.method = LinkMethod.RELAYED if is_virtual(dial.link.addr) else LinkMethod.PUNCHED
        dial.up_at = now
        dial.next_at = now + UPGRADE_INTERVAL_S
        self.counters[f"nat_link_{dial.method.value}"] += 1

    def _try_direct(self, dial: Dial, now: float, wall: float) -> None:
        link = dial.link
        if is_virtual(link.addr) and dial.peer is not None and dial.upgrades < UPGRADE_TRIES:
            dial.upgrades += 1
            self._send(nm.encode_punch(nm.PUNCH_PROBE, dial.request_id), dial.peer)
        elif not is_virtual(link.addr):
            if dial.method is LinkMethod.RELAYED:
                self._emit(LinkUpgraded(link))
            dial.method = LinkMethod.PUNCHED
        dial.next_at = now + UPGRADE_INTERVAL_S
