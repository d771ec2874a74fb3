"""A relay behind a NAT (docs/NAT.md, PROTOCOL §13.4 steps 1, 4 and 6): registrations, introductions, punches.

* **Registration is a link.**  An authenticated link to each introducer, marked in use so that its
  keepalives hold our NAT mapping open; REGISTER goes on it, and a link that closed is reopened.
* **Introduced peers.**  An INTRODUCE cell on a registration link names a dialer: we send PUNCH probes to
  it (unless the plan is the relay), and later, while its link runs through the relay-server, a probe
  every ``UPGRADE_INTERVAL_S`` to find a direct path.
* **Rebinding check.**  Every ``REBIND_CHECK_S`` a Binding request to the first introducer; the owner
  compares the mapped address with the published one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from shallot.core.link import Address, Link, LinkLayer, LinkState
from shallot.core.nat.classify import Behaviour, NatType, Plan, plan_link
from shallot.core.nat.dialer import RecentSet
from shallot.core.nat.limits import (
    INTRODUCED_KEEP_S,
    MAX_INTRODUCED,
    MAX_PUNCHED,
    PUNCH_INTERVAL_S,
    PUNCH_PROBES_UNANSWERED,
    PUNCH_TIMEOUT_S,
    REBIND_CHECK_S,
    REREGISTER_S,
    UPGRADE_INTERVAL_S,
    UPGRADE_TRIES,
)
from shallot.core.nat.virtual import RelayedPaths, Send, is_virtual, probe_direct, virtual_address
from shallot.core.wire import nat_frames as nm
from shallot.core.wire import stun
from shallot.crypto.codec import DecodeError

Introducer = tuple[bytes, Address, bytes]  # relay id, address, link key


@dataclass(eq=False)
class Introduced:
    """A peer an introducer told us about."""

    token: bytes
    peer: Address
    session: bytes
    introducer: Address
    plan: Plan
    punch_until: float
    expires: float
    next_at: float = 0.0
    sources: set[Address] = field(default_factory=set)
    upgrades: int = 0
    probes: int = 0  # PUNCH probes sent while punching
    link: Link | None = None  # the link that came through the relay-server, once there is one


class Registrant:
    def __init__(self, link: LinkLayer, *, rng: Callable[[int], bytes], send: Send, counters: Counter[str],
                 paths: RelayedPaths, mine: Callable[[], NatType], check_rebinding: bool = True) -> None:
        self.link = link
        self._rng = rng
        self._send = send
        self.counters = counters
        self._paths = paths
        self._mine = mine  # our own NAT type, as far as known
        self._check_rebinding = check_rebinding
        self.introducers: list[Introducer] = []
        self.links: dict[bytes, Link] = {}  # introducer relay id -> our registration link
        self._retry: dict[bytes, float] = {}
        self.introduced: dict[bytes, Introduced] = {}  # by token
        self._by_session: dict[bytes, Introduced] = {}
        self._rebind_txid = b""
        self._rebind_at = 0.0
        self.punched = RecentSet(MAX_PUNCHED)  # addresses a punch came from or went to

    # ------------------------------------------------------------------ commands and queries
    def register(self, introducers: list[Introducer], now: float, wall: float) -> None:
        self.introducers = list(introducers)
        self._tick_registrations(now, wall)

    def is_registration(self, link: Link) -> bool:
        return link.peer_relay_id in self.links and self.links[link.peer_relay_id] is link

    def registered_with(self) -> list[str]:
        return [rid.hex() for rid, lk in self.links.items() if lk.state is LinkState.UP]

    # ------------------------------------------------------------------ inputs
    def on_introduce(self, cell: bytes, link: Link, now: float) -> None:
        """An INTRODUCE cell on one of our registration links."""
        try:
            intro = nm.Introduce.decode(cell)
        except DecodeError:
            self.counters["nat_drop_bad_introduce"] += 1
            return
        if intro.token not in self.introduced and len(self.introduced) >= MAX_INTRODUCED:
            # evict the oldest instead of refusing the newest: spoofed requests (rate-limited per registered
            # relay at the introducer) cannot lock out every new dialer for INTRODUCED_KEEP_S
            self.counters["nat_introduced_evicted"] += 1
            old = self.introduced.pop(next(iter(self.introduced)))
            self._by_session.pop(old.session, None)
        theirs = NatType(Behaviour(intro.mapping), Behaviour(intro.filtering))
        entry = Introduced(intro.token, intro.requester, intro.session, link.addr, plan_link(self._mine(), theirs),
                           now + PUNCH_TIMEOUT_S, now + INTRODUCED_KEEP_S)
        self.introduced[intro.token] = self._by_session[intro.session] = entry
        self._paths.add(intro.session, link.addr)
        self.punched.add(intro.requester)
        self.counters["nat_introduced_to_peer"] += 1

    def on_punch(self, kind: int, token: bytes, addr: Address, now: float) -> bool:
        """A PUNCH; False if its token is not one we were introduced with."""
        intro = self.introduced.get(token)
        if intro is None:
            return False
        # the peer we were introduced to: tell it where we are seen from
        self.counters["nat_punch_received"] += 1
        intro.sources.add(addr)
        self.punched.add(addr)
        if kind == nm.PUNCH_PROBE:
            self._send(nm.encode_punch(nm.PUNCH_REPLY, token), addr)
        if intro.link is None:
            intro.link = self._relayed_link_to(intro.session)
        link = intro.link
        if link is not None and link.state is LinkState.UP and link.session is not None \
                and (is_virtual(link.addr) or link.addr == addr):
            probe_direct(link, addr, now, self._send, self.counters)  # also after we moved: the peer may not have
        return True

    def relayed_arrived(self, session: bytes) -> None:
        """A link packet of ``session`` came through the relay-server: remember the link it belongs to."""
        intro = self._by_session.get(session)
        if intro is not None and intro.link is None:
            intro.link = self._relayed_link_to(session)

    def owns_rebind(self, txid: bytes) -> bool:
        """Is this Binding answer the one to our rebinding check?  (Each check is answered once.)"""
        if self._rebind_txid and txid == self._rebind_txid:
            self._rebind_txid = b""
            return True
        return False

    # ------------------------------------------------------------------ time
    def handle_timer(self, now: float, wall: float) -> None:
        self._tick_introduced(now)
        self._tick_registrations(now, wall)

    def timers(self) -> list[float]:
        out = [i.next_at for i in self.introduced.values()]
        if self.introducers:
            out.append(self._rebind_at)
            out += [self._retry.get(rid, 0.0) for rid, lk in self.links.items() if lk.state is LinkState.CLOSED]
        return out

    def _tick_registrations(self, now: float, wall: float) -> None:
        for rid, addr, link_pub in self.introducers:
            link = self.links.get(rid)
            if link is not None and link.state is not LinkState.CLOSED:
                continue
            if now < self._retry.get(rid, 0.0):
                continue
            self._retry[rid] = now + REREGISTER_S
            link = self.link.open_link(addr, link_pub, now, wall, peer_relay_id=rid)
            link.users += 1  # keepalives every 10 s hold our NAT mapping open
            self.link.send_cell(link, nm.register_cell(), now)
            self.links[rid] = link
        if self.introducers and self._check_rebinding and now >= self._rebind_at:
            self._rebind_at = now + REBIND_CHECK_S
            self._rebind_txid = self._rng(stun.TXID_LEN)
            self._send(stun.binding_request(self._rebind_txid), self.introducers[0][1])

    def _tick_introduced(self, now: float) -> None:
        for token in [t for t, i in self.introduced.items() if now > i.expires]:
            self._by_session.pop(self.introduced.pop(token).session, None)
        for intro in self.introduced.values():
            if now < intro.next_at:
                continue
            if intro.plan is not Plan.RELAY and now < intro.punch_until \
                    and (intro.probes < PUNCH_PROBES_UNANSWERED or intro.sources):
                # unanswered, at most what the (padded, spoofable) INTRO_REQUEST paid for
                intro.probes += 1
                intro.next_at = now + PUNCH_INTERVAL_S
                self._send(nm.encode_punch(nm.PUNCH_PROBE, intro.token), intro.peer)
            elif intro.upgrades < UPGRADE_TRIES and (intro.link or self._relayed_link_to(intro.session)) is not None \
                    and (intro.link is None or is_virtual(intro.link.addr)):
                intro.upgrades += 1
                intro.next_at = now + UPGRADE_INTERVAL_S
                self._send(nm.encode_punch(nm.PUNCH_PROBE, intro.token), intro.peer)
            else:
                intro.next_at = now + UPGRADE_INTERVAL_S

    def _relayed_link_to(self, session: bytes) -> Link | None:
        vaddr = virtual_address(session)
        for link in self.link.links.values():
            if link.addr == vaddr and link.state is LinkState.UP:
                return link
        return None
