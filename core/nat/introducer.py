"""The introducer, or relay-server, role of a public relay (docs/NAT.md, PROTOCOL §13.3-13.4).

Relays behind NATs register on an authenticated link (REGISTER cell).  A dialer's INTRO_REQUEST (an
unauthenticated datagram, padded, rate limited per source, answered with a smaller INTRO_ANSWER) makes a relay
session between the dialer's address and the registered relay's link, and an INTRODUCE cell tells the
relay.  RELAYED datagrams of a session are forwarded unchanged, only between its two addresses: the
relay-server sees link ciphertext and two addresses, nothing else.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from shallot.core.link import Address, Link, LinkLayer, LinkState
from shallot.core.nat.limits import (
    INTRO_BURST,
    INTRO_RATE,
    MAX_REGISTRATIONS,
    MAX_REGISTRATIONS_PER_SOURCE,
    MAX_SESSIONS,
    MAX_SESSIONS_PER_SOURCE,
    SESSION_IDLE_S,
    TARGET_INTRO_BURST,
    TARGET_INTRO_RATE,
)
from shallot.core.nat.virtual import Send
from shallot.core.ratelimit import TokenBuckets
from shallot.core.wire import nat_frames as nm
from shallot.core.wire.addresses import source_key
from shallot.crypto.codec import DecodeError


@dataclass(eq=False)
class RelaySession:
    a: Address  # the requester's address
    b: Link  # the registered relay's link (its address follows the relay's NAT)
    last: float
    forwarded: int = 0


@dataclass(eq=False)
class Registration:
    link: Link
    source: str  # source_key of the link's address when it registered


class Introducer:
    def __init__(self, link: LinkLayer, *, rng: Callable[[int], bytes], send: Send, counters: Counter[str]) -> None:
        self.link = link
        self._rng = rng
        self._send = send
        self.counters = counters
        self.registrations: dict[bytes, Link] = {}  # relay id -> its registration link
        self._reg_source: dict[bytes, str] = {}  # relay id -> source key, oldest registration first
        self.sessions: dict[bytes, RelaySession] = {}
        # sessions that never carried a RELAYED datagram, oldest first: what a spoofed INTRO_REQUEST makes,
        # and what a full table evicts first
        self._unused: dict[bytes, None] = {}
        self._buckets = TokenBuckets(INTRO_RATE, INTRO_BURST)  # per source (IPv4 address, IPv6 /64)
        self._target_buckets = TokenBuckets(TARGET_INTRO_RATE, TARGET_INTRO_BURST)  # per registered relay
        self._by_source: dict[str, dict[bytes, None]] = {}  # source key -> its session ids, least recent first

    def on_register(self, link: Link) -> None:
        """REGISTER on a relay link: the relay id is the one its link certificate proved."""
        rid = link.peer_relay_id
        assert rid is not None
        if self.registrations.get(rid) is link:
            return
        source = source_key(link.addr[0])
        if rid not in self.registrations:
            mine = [r for r, src in self._reg_source.items() if src == source]
            if len(mine) >= MAX_REGISTRATIONS_PER_SOURCE:
                # one source cannot hold the table: its oldest registration goes
                self.counters["nat_registration_source_evicted"] += 1
                self._unregister(mine[0])
            elif len(self.registrations) >= MAX_REGISTRATIONS and not self._evict_registration():
                self.counters["nat_drop_registrations_full"] += 1
                return
        self._reg_source.pop(rid, None)
        self._reg_source[rid] = source
        self.registrations[rid] = link
        link.users += 1  # we keep it alive from our side too
        self.counters["nat_registered"] += 1

    def _unregister(self, rid: bytes) -> None:
        link = self.registrations.pop(rid)
        self._reg_source.pop(rid, None)
        link.users = max(0, link.users - 1)

    def _evict_registration(self) -> bool:
        """A full table: the oldest registration of the source that holds the most goes, if that source holds
        more than one (a table full of one registration per address is refused, not churned)."""
        per: Counter[str] = Counter(self._reg_source.values())
        heavy, count = per.most_common(1)[0]
        if count < 2:
            return False
        self.counters["nat_registration_evicted"] += 1
        self._unregister(next(r for r, src in self._reg_source.items() if src == heavy))
        return True

    def on_intro_request(self, data: bytes, addr: Address, now: float, wall: float) -> None:
        try:
            req = nm.IntroRequest.decode(data)
        except DecodeError:
            self.counters["nat_drop_bad_intro"] += 1
            return
        source = source_key(addr[0])
        if not self._buckets.allow(source, now):
            self.counters["nat_drop_intro_rate"] += 1
            return
        link = self.registrations.get(req.target)
        if link is None or link.state is not LinkState.UP:
            self.counters["nat_intro_unknown_target"] += 1
            self._send(nm.IntroAnswer(req.request_id, nm.STATUS_UNKNOWN_TARGET).encode(), addr)
            return
        if not self._target_buckets.allow(req.target, now):
            # spoofed requests must not flush the registered relay's table of pending introductions
            self.counters["nat_drop_intro_target_rate"] += 1
            self._send(nm.IntroAnswer(req.request_id, nm.STATUS_BUSY).encode(), addr)
            return
        mine = self._by_source.setdefault(source, {})
        session = next((s for s in mine if self.sessions[s].a == addr and self.sessions[s].b is link), None)
        if session is not None:
            del mine[session]  # most recently used goes last
        else:
            if len(mine) >= MAX_SESSIONS_PER_SOURCE:
                # one source cannot hold the table: its least recently used session goes
                self.counters["nat_intro_source_evicted"] += 1
                self._drop_session(next(iter(mine)))
            if len(self.sessions) >= MAX_SESSIONS:
                # evict instead of refusing every new dialer (review M4)
                self.counters["nat_intro_session_evicted"] += 1
                self._drop_session(self._eviction_victim())
                mine = self._by_source.setdefault(source, mine)
            session = self._rng(8)
            self.sessions[session] = RelaySession(addr, link, now)
            self._unused[session] = None
        mine[session] = None
        self.counters["nat_introduced"] += 1
        self.link.send_cell(link, nm.Introduce(addr, req.request_id, session, req.mapping, req.filtering).cell(), now)
        self._send(nm.IntroAnswer(req.request_id, nm.STATUS_OK, link.addr, session).encode(), addr)

    def _eviction_victim(self) -> bytes:
        """The oldest session that never carried a datagram; if every session carries traffic, the least
        recently used session of the source that holds the most."""
        if self._unused:
            return next(iter(self._unused))
        heavy = max(self._by_source.values(), key=len)
        return min(heavy, key=lambda sid: self.sessions[sid].last)

    def _drop_session(self, sid: bytes) -> None:
        self._unused.pop(sid, None)
        rs = self.sessions.pop(sid)
        key = source_key(rs.a[0])
        mine = self._by_source.get(key)
        if mine is not None:
            mine.pop(sid, None)
            if not mine:
                del self._by_source[key]

    def forward(self, data: bytes, session: bytes, addr: Address, now: float) -> None:
        """A RELAYED datagram from ``addr``: on to the other end of its session, unchanged."""
        rs = self.sessions.get(session)
        if rs is None:
            self.counters["nat_drop_relayed_unknown_session"] += 1
            return
        if addr == rs.a:
            dest = rs.b.addr
        elif addr == rs.b.addr:
            dest = rs.a
        else:
            self.counters["nat_drop_relayed_wrong_source"] += 1
            return
        rs.last = now
        if not rs.forwarded:
            self._unused.pop(session, None)
        rs.forwarded += 1
        self.counters["nat_relayed"] += 1
        self._send(data, dest)

    def expire(self, now: float) -> None:
        """Forget idle sessions and what closed links leave behind."""
        for sid in [s for s, rs in self.sessions.items() if now - rs.last > SESSION_IDLE_S
                    or rs.b.state is LinkState.CLOSED]:
            self._drop_session(sid)
        for reg_id in [r for r, lk in self.registrations.items() if lk.state is LinkState.CLOSED]:
            self._unregister(reg_id)
