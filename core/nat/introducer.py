"""The introducer, or relay-server, role of a public relay (docs/NAT.md, PROTOCOL §13.3-13.4).

Relays behind NATs register on an authenticated link (REGISTER cell).  A dialer's INTRO_REQUEST (an
unauthenticated datagram, rate limited per source IP, answered with a smaller INTRO_ANSWER) makes a relay
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


class Introducer:
    def __init__(self, link: LinkLayer, *, rng: Callable[[int], bytes], send: Send, counters: Counter[str]) -> None:
        self.link = link
        self._rng = rng
        self._send = send
        self.counters = counters
        self.registrations: dict[bytes, Link] = {}  # relay id -> its registration link
        self.sessions: dict[bytes, RelaySession] = {}
        self._buckets = TokenBuckets(INTRO_RATE, INTRO_BURST)  # per source (IPv4 address, IPv6 /64)
        self._target_buckets = TokenBuckets(TARGET_INTRO_RATE, TARGET_INTRO_BURST)  # per registered relay
        self._by_source: dict[str, dict[bytes, None]] = {}  # source key -> its session ids, least recent first

    def on_register(self, link: Link) -> None:
        """REGISTER on a relay link: the relay id is the one its link certificate proved."""
        rid = link.peer_relay_id
        assert rid is not None
        if rid not in self.registrations and len(self.registrations) >= MAX_REGISTRATIONS:
            self.counters["nat_drop_registrations_full"] += 1
            return
        if self.registrations.get(rid) is not link:
            self.registrations[rid] = link
            link.users += 1  # we keep it alive from our side too
            self.counters["nat_registered"] += 1

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
                if not mine:
                    del self._by_source[source]
                self.counters["nat_intro_busy"] += 1
                self._send(nm.IntroAnswer(req.request_id, nm.STATUS_BUSY).encode(), addr)
                return
            session = self._rng(8)
            self.sessions[session] = RelaySession(addr, link, now)
        mine[session] = None
        self.counters["nat_introduced"] += 1
        self.link.send_cell(link, nm.Introduce(addr, req.request_id, session, req.mapping, req.filtering).cell(), now)
        self._send(nm.IntroAnswer(req.request_id, nm.STATUS_OK, link.addr, session).encode(), addr)

    def _drop_session(self, sid: bytes) -> None:
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
        rs.forwarded += 1
        self.counters["nat_relayed"] += 1
        self._send(data, dest)

    def expire(self, now: float) -> None:
        """Forget idle sessions and what closed links leave behind."""
        for sid in [s for s, rs in self.sessions.items() if now - rs.last > SESSION_IDLE_S
                    or rs.b.state is LinkState.CLOSED]:
            self._drop_session(sid)
        for reg_id in [r for r, lk in self.registrations.items() if lk.state is LinkState.CLOSED]:
            del self.registrations[reg_id]
