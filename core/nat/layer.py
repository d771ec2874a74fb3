"""Sans-I/O NAT traversal around a node (RelayNode or ClientNode) on one UDP socket (docs/NAT.md, PROTOCOL §13).

``NatLayer`` sits between the socket adapter and the node and has the same shape (``receive_datagram``,
``handle_timer``, ``timer``, ``datagrams_to_send``).  It takes STUN and the NAT messages off the socket and passes
link packets through untouched.  Roles, all optional:

* **server** (every public relay): answers STUN Binding requests (rate limited, no amplification),
  takes registrations of relays behind NATs, introduces peers to them and forwards RELAYED link
  packets between the two ends of a session it made (relay fallback; it sees ciphertext and two
  addresses only);
* **registrant** (a relay behind a NAT): keeps an authenticated link to each introducer (its
  keepalives hold the NAT mapping open), punches towards peers it is introduced to, watches its
  public address for changes;
* **dialer** (anyone): reaches a relay whose descriptor names introducers: ask, punch, fall back.

A relayed link's address is a virtual one, ``("via-<session hex>", 0)`` (port 0 is never a real
destination); this layer rewrites datagrams sent there into RELAYED packets to the relay-server.
Because the link layer moves a link to any address an *authenticated* packet comes from, a relayed
link upgrades itself to a direct path as soon as one packet gets through directly, and a NAT
rebinding is followed the same way.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shallot.core.link import PADDING_CELL, Address, Link, LinkLayer, LinkState, PeerKind
from shallot.core.nat.classify import Behaviour, NatProbe, NatType, Plan, plan_link
from shallot.core.ratelimit import TokenBuckets
from shallot.core.wire import nat_frames as nm
from shallot.core.wire import stun
from shallot.core.wire.addresses import extend_target_allowed
from shallot.crypto.codec import DecodeError
from shallot.crypto.descriptor import Descriptor, Reachability

log = logging.getLogger(__name__)

INTRO_RETRY_S = 0.5
INTRO_TRIES = 4  # per introducer
PUNCH_INTERVAL_S = 0.1
PUNCH_TIMEOUT_S = 2.0  # then relay fallback
UPGRADE_INTERVAL_S = 10.0  # a relayed link keeps trying a direct path this often ...
UPGRADE_TRIES = 6  # ... this many times
SESSION_IDLE_S = 120.0  # relay-server: a session without traffic is forgotten
INTRODUCED_KEEP_S = 120.0
REREGISTER_S = 2.0
REBIND_CHECK_S = 20.0
MAX_REGISTRATIONS = 1024
MAX_SESSIONS = 4096
MAX_INTRODUCED = 256
MAX_DIALS = 256
STUN_MAX_GROWTH = 24  # a STUN answer is at most this many bytes longer than the request (§13.1)
VIRTUAL_PREFIX = "via-"


def virtual_address(session: bytes) -> Address:
    return (VIRTUAL_PREFIX + session.hex(), 0)


def peer_nat(reach: Reachability | None) -> NatType | None:
    if reach is None:
        return None
    return NatType(Behaviour(reach.mapping), Behaviour(reach.filtering))


@dataclass(eq=False)
class Dial:
    """A link we are making to a relay behind a NAT."""

    desc: Descriptor
    link: Link
    request_id: bytes
    started: float
    plan: Plan = Plan.PUNCH
    intro_index: int = 0
    tries: int = 0
    next_at: float = 0.0
    peer: Address | None = None  # its reflexive address, from the introducer
    session: bytes = b""
    introducer: Address | None = None
    punch_until: float = 0.0
    state: str = "asking"  # asking -> punching -> (relayed) -> up | failed
    method: str = ""
    upgrades: int = 0
    up_at: float = 0.0
    resent: bool = False  # initiation resent once when the peer's first punch shows its NAT is open


@dataclass(eq=False)
class Introduced:
    """A peer an introducer told us about (we are the relay behind a NAT)."""

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
    link: Link | None = None  # the link that came through the relay-server, once there is one


@dataclass(eq=False)
class RelaySession:
    a: Address  # the requester's address
    b: Link  # the registered relay's link (its address follows the relay's NAT)
    last: float
    forwarded: int = 0


class NatLayer:
    def __init__(self, node: Any, *, rng: Callable[[int], bytes], serve: bool = False,
                 own_host: str = "0.0.0.0", has_alt_port: bool = False) -> None:
        self.node = node
        self.link: LinkLayer = node.link
        self._rng = rng
        self.serve = serve
        self.own_host = own_host
        self.has_alt_port = has_alt_port
        self.alt_outbox: list[tuple[bytes, Address]] = []  # STUN answers sent from the alternate port
        self.counters: Counter[str] = Counter()
        self.nat_type: NatType | None = None
        self.public: Address | None = None
        self.public_changed = False  # set when the public address moved; the owner republishes
        self.probe: NatProbe | None = None
        # server role
        self._stun_buckets = TokenBuckets(20.0, 40.0)
        self._forward_bucket = TokenBuckets(20.0, 40.0, max_keys=1)  # OTHER-RELAY / RESPONSE-DESTINATION
        self._intro_buckets = TokenBuckets(10.0, 20.0)
        self.registrations: dict[bytes, Link] = {}
        self.sessions: dict[bytes, RelaySession] = {}
        # registrant role
        self._introducers: list[tuple[bytes, Address, bytes]] = []
        self._reg_links: dict[bytes, Link] = {}
        self._reg_retry: dict[bytes, float] = {}
        self._introduced: dict[bytes, Introduced] = {}
        self._intro_by_session: dict[bytes, Introduced] = {}
        self._rebind_txid = b""
        self._rebind_at = 0.0
        # dialer role
        self.dials: dict[bytes, Dial] = {}
        self._sessions_of_ours: dict[bytes, Address] = {}  # relay sessions we are an end of -> relay-server
        self._punched: set[Address] = set()
        self._now = 0.0
        self._wall = 0.0
        self._inner_on_cell = self.link.on_cell
        self.link.on_cell = self._on_cell

    # ------------------------------------------------------------------ node interface
    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out = self.node.datagrams_to_send()
        if self._sessions_of_ours:
            for i, (data, addr) in enumerate(out):
                if addr[1] == 0:  # a virtual address: through the relay-server
                    session = bytes.fromhex(addr[0][len(VIRTUAL_PREFIX):])
                    server = self._sessions_of_ours.get(session)
                    if server is not None:
                        out[i] = (bytes((nm.MSG_RELAYED,)) + session + data, server)
        return out

    def receive_datagram(self, data: bytes, addr: Address, now: float, wall: float) -> None:
        first = data[0] if data else 0
        if 0x51 <= first <= 0x54:
            self.node.receive_datagram(data, addr, now, wall)
            return
        self._now, self._wall = now, wall
        if first < 0x40 and stun.is_stun(data):
            self._on_stun(data, addr, alt=False)
        elif first == nm.MSG_RELAYED:
            self._on_relayed(data, addr, now, wall)
        elif first == nm.MSG_PUNCH:
            self._on_punch(data, addr, now, wall)
        elif first == nm.MSG_INTRO_REQUEST:
            self._on_intro_request(data, addr, now)
        elif first == nm.MSG_INTRO_ANSWER:
            self._on_intro_answer(data, addr, now, wall)
        else:
            self.node.receive_datagram(data, addr, now, wall)  # counted there as an unknown type

    def receive_alt(self, data: bytes, addr: Address, now: float) -> None:
        """A datagram on the alternate STUN port: only Binding requests are answered (from that port)."""
        self._now = now
        if stun.is_stun(data):
            self._on_stun(data, addr, alt=True)
        else:
            self.counters["nat_drop_alt_not_stun"] += 1

    def handle_timer(self, now: float, wall: float) -> None:
        self._now, self._wall = now, wall
        inner = self.node.timer()
        if inner is not None and inner <= now:
            self.node.handle_timer(now, wall)
        if self.probe is not None and not self.probe.done:
            self.probe.handle_timer(now)
            self._take_probe_output()
        self._tick_dials(now, wall)
        self._tick_introduced(now)
        self._tick_registrations(now, wall)
        for sid in [s for s, rs in self.sessions.items() if now - rs.last > SESSION_IDLE_S
                    or rs.b.state is LinkState.CLOSED]:
            del self.sessions[sid]
        for reg_id in [r for r, lk in self.registrations.items() if lk.state is LinkState.CLOSED]:
            del self.registrations[reg_id]

    def timer(self) -> float | None:
        deadline = self.node.timer()
        extra: list[float | None] = [d.next_at for d in self.dials.values()]
        extra += [i.next_at for i in self._introduced.values()]
        if self.probe is not None and not self.probe.done:
            extra.append(self.probe.timer())
        if self._introducers:
            extra.append(self._rebind_at)
            extra += [self._reg_retry.get(rid, 0.0) for rid, lk in self._reg_links.items()
                      if lk.state is LinkState.CLOSED]
        for t in extra:
            if t is not None and (deadline is None or t < deadline):
                deadline = t
        return deadline

    # ------------------------------------------------------------------ commands
    def start_probe(self, probe: NatProbe, now: float) -> None:
        self.probe = probe
        probe.start(now)
        self._take_probe_output()

    def register(self, introducers: list[tuple[bytes, Address, bytes]], now: float, wall: float) -> None:
        """Keep a registration with each introducer (relay id, address, link key); relays only."""
        self._introducers = list(introducers)
        self._tick_registrations(now, wall)

    def dial(self, desc: Descriptor, now: float, wall: float) -> Link:
        """A link to ``desc``: plain for a public relay, through its introducers for one behind a NAT."""
        link = self.link.open_link(desc.address, desc.link_pub, now, wall, peer_relay_id=desc.relay_id)
        reach = desc.reachability
        if reach is None or link.state is not LinkState.CONNECTING or link.pending is None:
            return link
        if any(d.link is link for d in self.dials.values()):
            return link
        if len(self.dials) >= MAX_DIALS:
            self.counters["nat_dial_table_full"] += 1
            return link
        dial = Dial(desc, link, self._rng(8), now, plan=plan_link(self.nat_type or NatType(), peer_nat(reach)))
        self.dials[dial.request_id] = dial
        self._send_intro_request(dial, now)
        return link

    def link_method(self, link: Link) -> str:
        if link.addr[1] == 0:
            return Plan.RELAY.value
        for dial in self.dials.values():
            if dial.link is link:  # through an introducer: punched, or relayed and since upgraded
                return Plan.PUNCH.value
        if link.addr in self._punched:
            return Plan.PUNCH.value
        return Plan.DIRECT.value

    def status(self) -> dict[str, object]:
        links = []
        for link in self.link.links.values():
            links.append({"peer": link.peer_relay_id.hex() if link.peer_relay_id else "client",
                          "kind": link.kind.value, "state": link.state.value,
                          "address": list(link.addr), "method": self.link_method(link)})
        return {"public": list(self.public) if self.public else None,
                "nat": self.nat_type.as_json() if self.nat_type else None,
                "registered_with": [rid.hex() for rid, lk in self._reg_links.items() if lk.state is LinkState.UP],
                "registrations": len(self.registrations), "relay_sessions": len(self.sessions),
                "links": links, "counters": dict(self.counters)}

    # ------------------------------------------------------------------ STUN
    def _on_stun(self, data: bytes, addr: Address, *, alt: bool) -> None:
        try:
            msg = stun.decode(data)
        except DecodeError:
            self.counters["nat_drop_bad_stun"] += 1
            return
        if msg.msg_type == stun.BINDING_SUCCESS:
            self._on_binding_response(msg, addr)
        elif msg.msg_type == stun.BINDING_REQUEST and self.serve:
            self._answer_binding(msg, data, addr, alt=alt)
        else:
            self.counters["nat_drop_stun_unexpected"] += 1

    def _answer_binding(self, msg: stun.StunMessage, data: bytes, addr: Address, *, alt: bool) -> None:
        now = self._now
        if not self._stun_buckets.allow(addr[0], now):
            self.counters["nat_drop_stun_rate"] += 1
            return
        try:
            flags = stun.change_flags(msg)
            dest = stun.address_attr(msg, stun.ATTR_RESPONSE_DESTINATION)
            other = stun.address_attr(msg, stun.ATTR_OTHER_RELAY)
        except DecodeError:
            self.counters["nat_drop_bad_stun"] += 1
            return
        if flags & stun.CHANGE_IP:
            # filtering test: another relay answers the requester's mapped address (never sent to by it)
            if other is None or not extend_target_allowed(self.own_host, other[0]) \
                    or not self._forward_bucket.allow("", now):
                self.counters["nat_drop_stun_change_ip"] += 1
                return
            fwd = stun.binding_request(msg.txid, response_destination=addr)
            if len(fwd) > len(data):
                self.counters["nat_drop_stun_amplification"] += 1
                return
            self.counters["nat_stun_forwarded"] += 1
            self.node.outbox.append((fwd, other))
            return
        target = addr
        if dest is not None:
            if not self._forward_bucket.allow("", now):
                self.counters["nat_drop_stun_rate"] += 1
                return
            target = dest
        resp = stun.binding_response(msg.txid, target, fingerprint=msg.has_fingerprint)
        if len(resp) > len(data) + STUN_MAX_GROWTH:
            self.counters["nat_drop_stun_amplification"] += 1
            return
        self.counters["nat_stun_answered"] += 1
        if flags & stun.CHANGE_PORT or alt:
            if not self.has_alt_port:
                self.counters["nat_drop_stun_no_alt_port"] += 1
                return
            self.alt_outbox.append((resp, target))
        else:
            self.node.outbox.append((resp, target))

    def _on_binding_response(self, msg: stun.StunMessage, addr: Address) -> None:
        if self.probe is not None and self.probe.owns(msg.txid):
            self.probe.receive(msg, addr, self._now)
            self._take_probe_output()
            return
        if self._rebind_txid and msg.txid == self._rebind_txid:
            self._rebind_txid = b""
            try:
                mapped = stun.mapped_address(msg)
            except DecodeError:
                return
            if self.public is not None and mapped != self.public:
                self.counters["nat_public_address_changed"] += 1
                log.info("our public address changed (NAT rebinding or a new network)")
                self.public_changed = True
            self.public = mapped
            return
        self.counters["nat_drop_stun_unexpected"] += 1

    def _take_probe_output(self) -> None:
        probe = self.probe
        assert probe is not None
        self.node.outbox.extend(probe.outbox)
        probe.outbox.clear()
        if probe.done and probe.result is not None and self.nat_type is None:
            self.nat_type = probe.result
            self.public = probe.result.public
            log.info("NAT: %s", probe.result.summary)

    # ------------------------------------------------------------------ introducer / relay-server
    def _on_cell(self, link: Link, cell: bytes) -> None:
        if cell[4] < nm.CMD_NAT_REGISTER or cell[:4] != b"\x00\x00\x00\x00":
            self._inner_on_cell(link, cell)
            return
        if cell[4] == nm.CMD_NAT_REGISTER and self.serve and link.kind is PeerKind.RELAY:
            rid = link.peer_relay_id
            assert rid is not None
            if rid not in self.registrations and len(self.registrations) >= MAX_REGISTRATIONS:
                self.counters["nat_drop_registrations_full"] += 1
                return
            if self.registrations.get(rid) is not link:
                self.registrations[rid] = link
                link.users += 1  # we keep it alive from our side too
                self.counters["nat_registered"] += 1
        elif cell[4] == nm.CMD_NAT_INTRODUCE and link.kind is PeerKind.RELAY \
                and link.peer_relay_id in self._reg_links and self._reg_links[link.peer_relay_id] is link:
            try:
                intro = nm.Introduce.decode(cell)
            except DecodeError:
                self.counters["nat_drop_bad_introduce"] += 1
                return
            self._on_introduce(intro, link)
        else:
            self.counters["nat_drop_unexpected_cell"] += 1

    def _on_intro_request(self, data: bytes, addr: Address, now: float) -> None:
        if not self.serve:
            self.counters["nat_drop_intro_not_served"] += 1
            return
        try:
            req = nm.IntroRequest.decode(data)
        except DecodeError:
            self.counters["nat_drop_bad_intro"] += 1
            return
        if not self._intro_buckets.allow(addr[0], now):
            self.counters["nat_drop_intro_rate"] += 1
            return
        link = self.registrations.get(req.target)
        if link is None or link.state is not LinkState.UP:
            self.counters["nat_intro_unknown_target"] += 1
            self.node.outbox.append((nm.IntroAnswer(req.request_id, nm.STATUS_UNKNOWN_TARGET).encode(), addr))
            return
        session = next((s for s, rs in self.sessions.items() if rs.a == addr and rs.b is link), None)
        if session is None:
            if len(self.sessions) >= MAX_SESSIONS:
                self.counters["nat_intro_busy"] += 1
                self.node.outbox.append((nm.IntroAnswer(req.request_id, nm.STATUS_BUSY).encode(), addr))
                return
            session = self._rng(8)
            self.sessions[session] = RelaySession(addr, link, now)
        self.counters["nat_introduced"] += 1
        self.link.send_cell(link, nm.Introduce(addr, req.request_id, session, req.mapping, req.filtering).cell(), now)
        self.node.outbox.append((nm.IntroAnswer(req.request_id, nm.STATUS_OK, link.addr, session).encode(), addr))

    def _on_relayed(self, data: bytes, addr: Address, now: float, wall: float) -> None:
        try:
            session = nm.relayed_session(data)
        except DecodeError:
            self.counters["nat_drop_bad_relayed"] += 1
            return
        server = self._sessions_of_ours.get(session)
        if server is not None and server == addr:  # we are an end of this session
            self.node.receive_datagram(data[nm.RELAYED_HEADER_LEN:], virtual_address(session), now, wall)
            intro = self._intro_by_session.get(session)
            if intro is not None and intro.link is None:
                intro.link = self._relayed_link_to(session)
            return
        rs = self.sessions.get(session) if self.serve else None
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
        self.node.outbox.append((data, dest))

    # ------------------------------------------------------------------ registrant (behind a NAT)
    def _tick_registrations(self, now: float, wall: float) -> None:
        for rid, addr, link_pub in self._introducers:
            link = self._reg_links.get(rid)
            if link is not None and link.state is not LinkState.CLOSED:
                continue
            if now < self._reg_retry.get(rid, 0.0):
                continue
            self._reg_retry[rid] = now + REREGISTER_S
            link = self.link.open_link(addr, link_pub, now, wall, peer_relay_id=rid)
            link.users += 1  # keepalives every 10 s hold our NAT mapping open
            self.link.send_cell(link, nm.register_cell(), now)
            self._reg_links[rid] = link
        if self._introducers and self.serve is False and now >= self._rebind_at:
            self._rebind_at = now + REBIND_CHECK_S
            self._rebind_txid = self._rng(stun.TXID_LEN)
            self.node.outbox.append((stun.binding_request(self._rebind_txid), self._introducers[0][1]))

    def _on_introduce(self, intro: nm.Introduce, link: Link) -> None:
        now = self._now
        if intro.token not in self._introduced and len(self._introduced) >= MAX_INTRODUCED:
            self.counters["nat_drop_introduced_full"] += 1
            return
        theirs = NatType(Behaviour(intro.mapping), Behaviour(intro.filtering))
        plan = plan_link(self.nat_type or NatType(), theirs)
        entry = Introduced(intro.token, intro.requester, intro.session, link.addr, plan, now + PUNCH_TIMEOUT_S,
                           now + INTRODUCED_KEEP_S)
        self._introduced[intro.token] = self._intro_by_session[intro.session] = entry
        self._sessions_of_ours[intro.session] = link.addr
        self._punched.add(intro.requester)
        self.counters["nat_introduced_to_peer"] += 1

    def _tick_introduced(self, now: float) -> None:
        for token in [t for t, i in self._introduced.items() if now > i.expires]:
            self._intro_by_session.pop(self._introduced.pop(token).session, None)
        for intro in self._introduced.values():
            if now < intro.next_at:
                continue
            if intro.plan is not Plan.RELAY and now < intro.punch_until:
                intro.next_at = now + PUNCH_INTERVAL_S
                self.node.outbox.append((nm.encode_punch(nm.PUNCH_PROBE, intro.token), intro.peer))
            elif intro.upgrades < UPGRADE_TRIES and (intro.link or self._relayed_link_to(intro.session)) is not None \
                    and (intro.link is None or intro.link.addr[1] == 0):
                intro.upgrades += 1
                intro.next_at = now + UPGRADE_INTERVAL_S
                self.node.outbox.append((nm.encode_punch(nm.PUNCH_PROBE, intro.token), intro.peer))
            else:
                intro.next_at = now + UPGRADE_INTERVAL_S

    def _relayed_link_to(self, session: bytes) -> Link | None:
        vaddr = virtual_address(session)
        for link in self.link.links.values():
            if link.addr == vaddr and link.state is LinkState.UP:
                return link
        return None

    # ------------------------------------------------------------------ dialer
    def _send_intro_request(self, dial: Dial, now: float) -> None:
        reach = dial.desc.reachability
        assert reach is not None
        if dial.tries >= INTRO_TRIES:
            dial.intro_index += 1
            dial.tries = 0
        if dial.intro_index >= len(reach.introducers):
            dial.state = "failed"
            self.counters["nat_dial_no_introducer"] += 1
            return
        mine = self.nat_type or NatType()
        req = nm.IntroRequest(dial.request_id, dial.desc.relay_id, int(mine.mapping), int(mine.filtering))
        dial.tries += 1
        dial.next_at = now + INTRO_RETRY_S
        self.node.outbox.append((req.encode(), reach.introducers[dial.intro_index][1]))

    def _on_intro_answer(self, data: bytes, addr: Address, now: float, wall: float) -> None:
        try:
            ans = nm.IntroAnswer.decode(data)
        except DecodeError:
            self.counters["nat_drop_bad_intro_answer"] += 1
            return
        dial = self.dials.get(ans.request_id)
        reach = dial.desc.reachability if dial is not None else None
        if dial is None or reach is None or dial.state != "asking" \
                or reach.introducers[min(dial.intro_index, len(reach.introducers) - 1)][1] != addr:
            self.counters["nat_drop_unexpected_intro_answer"] += 1
            return
        if ans.status != nm.STATUS_OK or ans.peer is None:
            dial.tries = INTRO_TRIES  # try the next introducer
            self._send_intro_request(dial, now)
            return
        dial.peer, dial.session, dial.introducer = ans.peer, ans.session, addr
        self._sessions_of_ours[ans.session] = addr
        if dial.plan is Plan.RELAY:
            self._fall_back(dial, now, wall)
            return
        dial.state = "punching"
        dial.punch_until = now + PUNCH_TIMEOUT_S
        dial.next_at = now
        self.link.retarget(dial.link, ans.peer, now, wall)
        self._punched.add(ans.peer)

    def _on_punch(self, data: bytes, addr: Address, now: float, wall: float) -> None:
        try:
            kind, token = nm.decode_punch(data)
        except DecodeError:
            self.counters["nat_drop_bad_punch"] += 1
            return
        intro = self._introduced.get(token)
        if intro is not None:  # the peer we were introduced to: tell it where we are seen from
            self.counters["nat_punch_received"] += 1
            intro.sources.add(addr)
            self._punched.add(addr)
            if kind == nm.PUNCH_PROBE:
                self.node.outbox.append((nm.encode_punch(nm.PUNCH_REPLY, token), addr))
            if intro.link is None:
                intro.link = self._relayed_link_to(intro.session)
            link = intro.link
            if link is not None and link.state is LinkState.UP and link.session is not None \
                    and (link.addr[1] == 0 or link.addr == addr):
                self._probe_direct(link, addr, now)  # also after we moved: the peer may not have yet
            return
        dial = self.dials.get(token)
        if dial is None:
            self.counters["nat_drop_unknown_punch"] += 1
            return
        self.counters["nat_punch_received"] += 1
        self._punched.add(addr)
        link = dial.link
        if link.state is LinkState.CONNECTING and dial.state == "punching" and (addr != link.addr or not dial.resent):
            # its NAT now lets our packets in from where its punch came: initiate there at once
            dial.resent = True
            self.link.retarget(link, addr, now, wall, force=True)
        elif link.state is LinkState.UP and link.addr[1] == 0 and link.session is not None:
            self._probe_direct(link, addr, now)

    def _probe_direct(self, link: Link, addr: Address, now: float) -> None:
        """A relayed link: one authenticated keepalive on the direct path.  The peer's link layer moves the
        link to where it came from (roaming, §4.8); both ends do this, so the link upgrades either way."""
        assert link.session is not None
        self.counters["nat_upgrade_probe"] += 1
        link.last_send = now
        self.node.outbox.append((link.session.seal(PADDING_CELL), addr))

    def _fall_back(self, dial: Dial, now: float, wall: float) -> None:
        dial.state = "relayed"
        self.counters["nat_relay_fallback"] += 1
        self.link.retarget(dial.link, virtual_address(dial.session), now, wall)

    def _tick_dials(self, now: float, wall: float) -> None:
        for rid, dial in list(self.dials.items()):
            link = dial.link
            if link.state is LinkState.CLOSED:
                del self.dials[rid]
                continue
            if link.state is LinkState.UP and dial.state in ("punching", "relayed", "asking"):
                dial.method = Plan.RELAY.value if link.addr[1] == 0 else Plan.PUNCH.value
                dial.state = "up"
                dial.up_at = now
                dial.next_at = now + UPGRADE_INTERVAL_S
                self.counters[f"nat_link_{dial.method}"] += 1
                continue
            if now < dial.next_at:
                continue
            if dial.state == "asking":
                self._send_intro_request(dial, now)
            elif dial.state == "punching":
                if now >= dial.punch_until:
                    self._fall_back(dial, now, wall)
                else:
                    dial.next_at = now + PUNCH_INTERVAL_S
                    assert dial.peer is not None
                    self.node.outbox.append((nm.encode_punch(nm.PUNCH_PROBE, dial.request_id), dial.peer))
            elif dial.state == "up":
                if link.addr[1] == 0 and dial.peer is not None and dial.upgrades < UPGRADE_TRIES:
                    dial.upgrades += 1
                    self.node.outbox.append((nm.encode_punch(nm.PUNCH_PROBE, dial.request_id), dial.peer))
                elif link.addr[1] != 0:
                    dial.method = Plan.PUNCH.value
                dial.next_at = now + UPGRADE_INTERVAL_S

