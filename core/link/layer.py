"""Sans-I/O link layer (docs/PROTOCOL.md §4): handshakes, sessions, replay windows, rekey, keepalive.

One ``LinkLayer`` owns every link of a node.  Inputs: ``receive_datagram(data, addr, now, wall)``,
``handle_timer(now, wall)`` and commands (``open_link``, ``send_cell``, ``close_link``).  Outputs:
``datagrams_to_send()`` (the queue ``outbox`` of datagrams with their destination, handed over), ``events``
(LinkUp / LinkDown) and ``timer()``.
Cells are handed to ``on_cell(link, cell)``, set by the owner, because that is the per-packet path.

A link never answers a packet it cannot authenticate.  The only unauthenticated input it answers is
a well-formed handshake initiation that carries a valid mac1: with a RESPONSE if it passes the rate limit
and replay checks, or, while the node is under load and its mac2 is not valid, with a smaller COOKIE_REPLY
(§4.12).  A responder keeps nothing for an answered handshake but a bounded half-open entry; the link
exists from the first authenticated transport packet on (§4.5), within per-source quotas (§8.3).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable

from cryptography.exceptions import InvalidTag

from shallot.core.link.events import LinkDown, LinkUp
from shallot.core.link.limits import EphemeralCache, address_bytes
from shallot.core.link.session import NONCE_PREFIX, Session
from shallot.core.link.state import HalfOpen, Link, LinkConfig, LinkError, LinkState, PeerKind
from shallot.core.ratelimit import TokenBuckets
from shallot.core.wire.addresses import aggregate_key, source_key
from shallot.core.wire.cells import CMD_PADDING, encode_cell
from shallot.crypto import link_handshake as lh
from shallot.crypto.codec import Address, DecodeError
from shallot.crypto.params import (
    COOKIE_SECRET_S,
    HALF_OPEN_S,
    HANDSHAKE_ATTEMPTS,
    HANDSHAKE_RETRY_S,
    HANDSHAKE_SKEW_S,
    KEEPALIVE_S,
    LINK_DEAD_AFTER_S,
    LINK_HEADER_LEN,
    LINK_PACKET_LEN,
    MSG_COOKIE_REPLY,
    MSG_INIT_CLIENT,
    MSG_INIT_RELAY,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    REJECT_AFTER_S,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_S,
)
from shallot.crypto.primitives import AuthFailure, RandomBytes

PADDING_CELL = encode_cell(0, CMD_PADDING)  # keepalive: circ id 0, consumed by the link layer


class LinkLayer:
    def __init__(self, config: LinkConfig, *, rng: RandomBytes) -> None:
        self.config = config
        self._rng = rng
        self.outbox: list[tuple[bytes, Address]] = []
        self.events: deque[LinkUp | LinkDown] = deque()
        self.counters: Counter[str] = Counter()
        self.on_cell: Callable[[Link, bytes], None] = lambda link, cell: None
        self.links: dict[int, Link] = {}
        self._next_link_id = 1
        self._by_index: dict[bytes, tuple[Link, Session]] = {}  # our index (4 bytes) -> session
        self._pending_by_index: dict[int, Link] = {}
        # relay links by the peer's link public key, which the Noise handshake authenticates (never by a
        # relay id someone merely claimed): links we dialed, and links relays dialed to us
        self._dialed: dict[bytes, Link] = {}
        self._accepted: dict[bytes, Link] = {}
        self._resume: dict[bytes, Link] = {}  # resume token -> client link
        # initiation replay cache (NK and IK): time buckets that age out, never full (§4.5)
        self._seen_ephemerals = EphemeralCache(2 * HANDSHAKE_SKEW_S, config.max_seen_ephemerals)
        self._buckets = TokenBuckets(config.handshake_rate, config.handshake_burst)  # by source_key (/64)
        self._loaded_buckets = TokenBuckets(config.loaded_handshake_rate, config.loaded_handshake_burst)
        self._next_tick: float | None = None
        # answered handshakes for new links, by our index, oldest first (§4.5), and by source and aggregate
        self._half_open: dict[bytes, HalfOpen] = {}
        self._half_by_source: dict[str, dict[bytes, None]] = {}
        self._half_by_aggregate: dict[str, dict[bytes, None]] = {}
        # accepted links by source (oldest first) and the sources of each aggregate (§8.3)
        self._by_source: dict[str, dict[Link, None]] = {}
        self._aggregate_sources: dict[str, dict[str, None]] = {}
        self._aggregate_count: Counter[str] = Counter()
        # cookies (§4.12): the secret, the one before it, when it was made; the load meter
        self._cookie_secrets: tuple[bytes, ...] = ()
        self._cookie_born = 0.0
        self._load_second = 0
        self._load_now = 0
        self._load_before = 0

    # ------------------------------------------------------------------ commands
    def open_link(self, addr: Address, peer_link_pub: bytes, now: float, wall: float, *,
                  peer_relay_id: bytes | None = None, reuse: bool = True) -> Link:
        """Start (or reuse) a link to the relay whose link key is ``peer_link_pub``.  Cells sent before it
        is up are queued.  A link is reused only for the same authenticated key; the address is where
        we dial, and the handshake fails unless the holder of that key answers."""
        if reuse:
            for table in (self._dialed, self._accepted):
                existing = table.get(peer_link_pub)
                if existing is not None and existing.state is not LinkState.CLOSED:
                    return existing
        if len(self.links) >= self.config.max_links and not self._evict_one(now):
            raise LinkError("too many links")
        link = self._new_link(addr, PeerKind.RELAY, initiator=True, now=now)
        link.peer_link_pub = peer_link_pub
        link.peer_relay_id = peer_relay_id  # informational only (unauthenticated on the dialing side)
        if reuse:
            self._dialed[peer_link_pub] = link
        link.last_recv = now
        try:
            self._start_handshake(link, now, wall)
        except AuthFailure:  # a low-order key: no handshake can ever complete
            self.close_link(link, "unusable peer key")
            raise LinkError("unusable peer link key") from None
        return link

    def link_to(self, peer_link_pub: bytes) -> Link | None:
        """The live link ``open_link`` would reuse for this key, if any (a relay checks its dial limits
        only for new dials)."""
        for table in (self._dialed, self._accepted):
            existing = table.get(peer_link_pub)
            if existing is not None and existing.state is not LinkState.CLOSED:
                return existing
        return None

    def retarget(self, link: Link, addr: Address, now: float, wall: float, *, force: bool = False) -> None:
        """Move a link whose handshake is still in flight to another address and send a fresh initiation
        there at once, with a full retry schedule (NAT traversal: the introducer's answer, a punch from
        the peer's real address, or the relay fallback).  An established link moves only by roaming."""
        if link.state is not LinkState.CONNECTING or link.pending is None or (addr == link.addr and not force):
            return
        link.addr = addr
        self._start_handshake(link, now, wall)

    def probe(self, link: Link, now: float, wall: float) -> None:
        """Make the peer of an established link we dialed answer now: a fresh handshake (a rekey), which a
        live peer answers within a round trip (``last_recv`` moves) and a dead one never.  The client uses
        it to tell a dead guard from a dead relay beyond it (docs/PROTOCOL.md §9.5)."""
        if link.initiator and link.session is not None and link.pending is None and link.state is LinkState.UP:
            self._start_handshake(link, now, wall)

    def send_cell(self, link: Link, cell: bytes, now: float) -> None:
        session = link.session
        if session is None:
            if link.state is LinkState.CLOSED:
                self.counters["drop_send_closed_link"] += 1
                return
            if len(link.queued) >= self.config.max_queued_cells:
                self.counters["drop_queue_full"] += 1
                return
            link.queued.append(cell)
            return
        link.last_send = now
        self.outbox.append((session.seal(cell), link.addr))

    def close_link(self, link: Link, reason: str) -> None:
        if link.state is LinkState.CLOSED:
            return
        link.state = LinkState.CLOSED
        for s in (link.session, link.previous):
            if s is not None:
                self._by_index.pop(s.local_index.to_bytes(4, "big"), None)
                self._resume.pop(s.resume, None)
        if link.pending is not None:
            self._pending_by_index.pop(link.pending.sender_index, None)
        if link.peer_link_pub is not None:
            for table in (self._dialed, self._accepted):
                if table.get(link.peer_link_pub) is link:
                    del table[link.peer_link_pub]
        if link.next_session is not None:
            self._retire(link.next_session)
        link.session = link.previous = link.pending = link.next_session = None
        link.queued.clear()
        self.links.pop(link.link_id, None)
        if link.source is not None:
            self._uncount(link)
        self.events.append(LinkDown(link, reason))

    @property
    def half_open_count(self) -> int:
        """Answered handshakes for new links still waiting for their first transport packet."""
        return len(self._half_open)

    # ------------------------------------------------------------------ outputs
    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """Everything queued since the last call, handed over: the caller sends it.  Whoever queues (this
        layer, the relay's forwarding path, the NAT part) appends to ``outbox``, the one queue of the socket."""
        out = self.outbox
        if out:
            self.outbox = []
        return out

    # ------------------------------------------------------------------ inputs
    def receive_datagram(self, data: bytes, addr: Address, now: float, wall: float) -> None:
        if not data:
            self.counters["drop_empty"] += 1
            return
        kind = data[0]
        if kind == MSG_TRANSPORT:
            self._receive_transport(data, addr, now)
        elif kind == MSG_RESPONSE:
            self._receive_response(data, addr, now)
        elif kind == MSG_INIT_CLIENT or kind == MSG_INIT_RELAY:
            self._receive_initiation(data, addr, now, wall)
        elif kind == MSG_COOKIE_REPLY:
            self._receive_cookie_reply(data, now, wall)
        else:
            self.counters["drop_unknown_type"] += 1

    def _receive_transport(self, data: bytes, addr: Address, now: float) -> None:
        # the per-packet path: keep it short
        if len(data) != LINK_PACKET_LEN:
            self.counters["drop_bad_length"] += 1
            return
        entry = self._by_index.get(data[1:5])
        if entry is None:
            half = self._half_open.get(data[1:5])
            if half is None:
                self.counters["drop_unknown_index"] += 1
                return
            entry = self._promote(half, data, now)
            if entry is None:
                return
        link, session = entry
        counter = data[5:13]
        view = memoryview(data)  # no copy of the 1416-byte ciphertext before the AEAD reads it
        try:
            cell = session.recv_aead.decrypt(NONCE_PREFIX + counter, view[LINK_HEADER_LEN:], view[:LINK_HEADER_LEN])
        except InvalidTag:
            self.counters["drop_bad_tag"] += 1
            return
        if not session.window.check_and_set(int.from_bytes(counter, "little")):
            self.counters["drop_replay"] += 1
            return
        if now - session.created > REJECT_AFTER_S:
            self.counters["drop_expired_session"] += 1
            return
        link.last_recv = now
        if session is link.next_session:  # the initiator confirmed the rekey
            self._install_session(link, session, now)
        if addr != link.addr:  # authenticated packet from a new address: the peer roamed (NAT rebinding)
            self.counters["link_roamed"] += 1
            link.addr = addr
        if cell[4] == CMD_PADDING:  # keepalive, consumed here
            return
        self.on_cell(link, cell)

    def _receive_initiation(self, data: bytes, addr: Address, now: float, wall: float) -> None:
        cfg = self.config
        is_client = data[0] == MSG_INIT_CLIENT
        if (is_client and not cfg.accept_clients) or (not is_client and not cfg.accept_relays):
            self.counters["drop_initiation_not_accepted"] += 1
            return
        expected = lh.INIT_CLIENT_LEN if is_client else lh.INIT_RELAY_LEN
        if len(data) != expected:
            self.counters["drop_bad_length"] += 1
            return
        if not lh.check_mac1(cfg.link_pub, data):
            self.counters["drop_bad_mac1"] += 1
            return
        loaded = self._under_load(now)
        if loaded:
            # under load only a source that can receive gets a DH: it proves so with mac2 (§4.12)
            where = address_bytes(addr)
            if not self._mac2_valid(data, where, now):
                self.counters["cookie_reply_sent"] += 1
                self.outbox.append((lh.write_cookie_reply(responder_link_pub=cfg.link_pub, initiation=data,
                                                          cookie=self._cookie(where, now), rng=self._rng), addr))
                return
        source = source_key(addr[0])
        if not self._buckets.allow(source, now):
            self.counters["drop_handshake_rate"] += 1
            return
        if loaded and not self._loaded_buckets.allow(source, now):
            self.counters["drop_handshake_rate_loaded"] += 1
            return
        try:
            init = lh.read_initiation(link_private=cfg.link_private, link_pub=cfg.link_pub, packet=data, wall=wall)
        except (DecodeError, AuthFailure):
            self.counters["drop_bad_initiation"] += 1
            return
        # relays stamp their initiations (per-peer monotonic replay check below); clients send no clock
        if init.relay is not None and abs(init.timestamp_ns - int(wall * 1e9)) > HANDSHAKE_SKEW_S * 1e9:
            self.counters["drop_initiation_clock_skew"] += 1
            return
        # replay cache of initiation ephemerals, both patterns; entries outlive the clock-skew window
        before = self._seen_ephemerals.evicted_buckets
        fresh = self._seen_ephemerals.check_and_add(init.ephemeral, now)
        if self._seen_ephemerals.evicted_buckets != before:
            self.counters["ecache_bucket_evicted"] += self._seen_ephemerals.evicted_buckets - before
        if not fresh:
            self.counters["drop_initiation_replay"] += 1
            return
        link: Link | None
        peer_pub = init.noise.rs
        if init.relay is None:
            link = self._resume.get(init.resume) if init.resume != lh.NO_RESUME else None
            if link is not None:
                self.counters["link_resumed"] += 1
        else:
            assert peer_pub is not None
            link = self._accepted.get(peer_pub)
            if link is not None and init.timestamp_ns <= link.last_rx_timestamp:
                self.counters["drop_initiation_replay"] += 1
                return
        local_index = self._new_index()
        keys, response = lh.write_response(init, sender_index=local_index, rng=self._rng)
        session = Session(keys, local_index, init.sender_index, now, self._first_counter())
        if link is None:
            # a new link: nothing but a half-open entry until the initiator's first transport packet
            relay = init.relay
            self._add_half_open(HalfOpen(
                session, addr, PeerKind.CLIENT if relay is None else PeerKind.RELAY, source,
                aggregate_key(addr[0]), now + HALF_OPEN_S, peer_pub if relay is not None else None,
                relay.relay_id if relay is not None else None, init.timestamp_ns))
        else:
            if init.relay is not None:
                link.peer_relay_id = init.relay.relay_id  # authenticated by the link certificate
            link.last_rx_timestamp = max(link.last_rx_timestamp, init.timestamp_ns)
            # a rekey: keep sending on the current session until the initiator uses the new one (its
            # RESPONSE may be lost, and it would then retry with the current session's resume token)
            if link.next_session is not None:
                self._retire(link.next_session)
            link.next_session = session
            self._by_index[local_index.to_bytes(4, "big")] = (link, session)
            if link.kind is PeerKind.CLIENT:
                self._resume[session.resume] = link
        self.counters["handshake_responded"] += 1
        self.outbox.append((response, addr))

    def _receive_response(self, data: bytes, addr: Address, now: float) -> None:
        try:
            index = lh.response_receiver(data)
        except DecodeError:
            self.counters["drop_bad_length"] += 1
            return
        link = self._pending_by_index.get(index)
        if link is None or link.pending is None:
            self.counters["drop_unknown_index"] += 1
            return
        try:
            keys, remote_index = lh.read_response(link.pending, data)
        except (DecodeError, AuthFailure):
            self.counters["drop_bad_response"] += 1
            return
        del self._pending_by_index[index]
        link.pending = None
        link.retry_at = None
        link.addr = addr
        if link.session is None:
            # the responder makes the link only on our first transport packet (§4.5): if our owner sends
            # nothing right away (a CREATE usually follows LinkUp), the tick due now sends a PADDING cell
            link.owes_first = True
            self._next_tick = now
        self._install_session(link, Session(keys, index, remote_index, now, self._first_counter()), now)
        self.counters["handshake_completed"] += 1

    def _receive_cookie_reply(self, data: bytes, now: float, wall: float) -> None:
        try:
            index = lh.cookie_reply_receiver(data)
        except DecodeError:
            self.counters["drop_bad_length"] += 1
            return
        link = self._pending_by_index.get(index)
        if link is None:
            self.counters["drop_unknown_index"] += 1
            return
        # every handshake in flight has its state and the key it was sent to (``_send_initiation``)
        assert link.pending is not None and link.peer_link_pub is not None
        try:
            cookie = lh.read_cookie_reply(responder_link_pub=link.peer_link_pub, state=link.pending, packet=data)
        except (DecodeError, AuthFailure):
            self.counters["drop_bad_cookie_reply"] += 1
            return
        self.counters["cookie_received"] += 1
        link.cookie, link.cookie_at = cookie, now
        # retry at once with mac2: the reply came within a round trip, the responder is reachable.  Each
        # retry is one of the HANDSHAKE_ATTEMPTS, so a responder that answers every one with a cookie
        # cannot keep us sending
        if link.attempts < HANDSHAKE_ATTEMPTS:
            self._send_initiation(link, now, wall)

    def handle_timer(self, now: float, wall: float) -> None:
        self._expire_half_open(now)
        for link in list(self.links.values()):
            if link.state is LinkState.CLOSED:
                continue
            if link.pending is not None and link.retry_at is not None and now >= link.retry_at:
                if link.attempts >= HANDSHAKE_ATTEMPTS:
                    self.counters["handshake_timeout"] += 1
                    if link.session is None:
                        self.close_link(link, "handshake timed out")
                        continue
                    # a rekey that got no answer: the current session stays usable until it expires
                    self._pending_by_index.pop(link.pending.sender_index, None)
                    link.pending = None
                    link.retry_at = None
                else:
                    self._send_initiation(link, now, wall)
            session = link.session
            if session is None:
                if link.pending is None:  # nothing will ever bring this link up
                    self.close_link(link, "no handshake")
                continue
            if link.owes_first:
                link.owes_first = False
                if session.sent == 0:
                    self.send_cell(link, PADDING_CELL, now)
            age = now - session.created
            if link.initiator and link.pending is None and (
                    age >= REKEY_AFTER_S or session.sent >= REKEY_AFTER_MESSAGES) and link.users > 0:
                self._start_handshake(link, now, wall)
            if age >= REJECT_AFTER_S:
                self._retire(session)
                if link.session is session:
                    link.session = None
                    if link.pending is None:
                        self.close_link(link, "session expired")
                        continue
            prev = link.previous
            if prev is not None and now - prev.created >= REJECT_AFTER_S:
                self._retire(prev)
                link.previous = None
            nxt = link.next_session
            if nxt is not None and now - nxt.created >= REJECT_AFTER_S:
                self._retire(nxt)
                link.next_session = None
            if link.pending is None and now - link.last_recv > LINK_DEAD_AFTER_S:
                # both ends drop a link that went quiet (in use, keepalives keep it talking), so
                # neither keeps sending into a link the other side already forgot
                self.close_link(link, "peer silent")
                continue
            if link.users > 0 and link.session is not None and now - link.last_send >= KEEPALIVE_S:
                self.send_cell(link, PADDING_CELL, now)
        self._next_tick = now + 1.0

    def timer(self) -> float | None:
        # housekeeping ticks once a second while any link exists (keepalives, rekeys, silence checks,
        # the owner's own timeouts); a node with no links sleeps
        deadline = self._next_tick if self.links or self._half_open else None
        for link in self._pending_by_index.values():
            if link.retry_at is not None and (deadline is None or link.retry_at < deadline):
                deadline = link.retry_at
        return deadline

    # ------------------------------------------------------------------ internals
    def _new_link(self, addr: Address, kind: PeerKind, *, initiator: bool, now: float) -> Link:
        if self._next_tick is None or self._next_tick > now + 1.0:
            self._next_tick = now + 1.0
        link = Link(self._next_link_id, addr, kind, initiator)
        self._next_link_id += 1
        self.links[link.link_id] = link
        return link

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(self._rng(4), "big")
            key = index.to_bytes(4, "big")
            if index and key not in self._by_index and index not in self._pending_by_index \
                    and key not in self._half_open:
                return index

    def _first_counter(self) -> int:
        # random start so counters on two links never line up (docs/PROTOCOL.md §4.4)
        return int.from_bytes(self._rng(6), "big")

    def _start_handshake(self, link: Link, now: float, wall: float) -> None:
        link.attempts = 0
        self._send_initiation(link, now, wall, fresh=True)

    def _send_initiation(self, link: Link, now: float, wall: float, *, fresh: bool = False) -> None:
        cfg = self.config
        assert link.peer_link_pub is not None
        if link.pending is not None:
            self._pending_by_index.pop(link.pending.sender_index, None)
        index = self._new_index()
        cookie = link.cookie if link.cookie is not None and now - link.cookie_at < COOKIE_SECRET_S else None
        if link.kind is PeerKind.RELAY and cfg.identity_pub is not None:
            state, packet = lh.relay_initiation(
                link_private=cfg.link_private, identity_pub=cfg.identity_pub, cert_expires=cfg.cert_expires,
                cert_sig=cfg.cert_sig, responder_link_pub=link.peer_link_pub, sender_index=index,
                timestamp_ns=int(wall * 1e9), rng=self._rng, cookie=cookie)
        else:
            resume = link.session.resume if link.session is not None else lh.NO_RESUME
            state, packet = lh.client_initiation(responder_link_pub=link.peer_link_pub, sender_index=index,
                                                 rng=self._rng, resume=resume, cookie=cookie)
        link.pending = state
        self._pending_by_index[index] = link
        link.attempts += 1
        link.retry_at = now + HANDSHAKE_RETRY_S * (2 ** (link.attempts - 1))
        self.counters["handshake_sent"] += 1
        self.outbox.append((packet, link.addr))

    def _install_session(self, link: Link, session: Session, now: float) -> None:
        if link.previous is not None:
            self._retire(link.previous)
        if link.next_session is session:
            link.next_session = None
        link.previous = link.session
        link.session = session
        link.last_send = now  # the handshake message itself counts: no keepalive right behind it
        self._by_index[session.local_index.to_bytes(4, "big")] = (link, session)
        if link.kind is PeerKind.CLIENT and not link.initiator:
            if link.previous is not None:
                self._resume.pop(link.previous.resume, None)
            self._resume[session.resume] = link
        link.last_recv = now
        if link.state is LinkState.CONNECTING:
            link.state = LinkState.UP
            self.events.append(LinkUp(link))
        while link.queued:
            self.send_cell(link, link.queued.popleft(), now)

    def _retire(self, session: Session) -> None:
        self._by_index.pop(session.local_index.to_bytes(4, "big"), None)
        self._resume.pop(session.resume, None)

    # ------------------------------------------------------------------ cookies (§4.12)
    def _under_load(self, now: float) -> bool:
        """Under load: ``cookie_load_rate`` or more initiations with a valid mac1 in this whole second or
        the one before, or the half-open table at least half full."""
        second = int(now)
        if second != self._load_second:
            self._load_before = self._load_now if second == self._load_second + 1 else 0
            self._load_second, self._load_now = second, 0
        self._load_now += 1
        rate = self.config.cookie_load_rate
        return (self._load_now > rate or self._load_before >= rate
                or 2 * len(self._half_open) >= self.config.max_half_open)

    def _cookie(self, where: bytes, now: float) -> bytes:
        """The cookie of the source address ``where`` (``address_bytes``) under the current secret."""
        if not self._cookie_secrets or now - self._cookie_born >= COOKIE_SECRET_S:
            self._cookie_secrets = (self._rng(32), *self._cookie_secrets[:1])
            self._cookie_born = now
        return lh.cookie_for(self._cookie_secrets[0], where)

    def _mac2_valid(self, data: bytes, where: bytes, now: float) -> bool:
        self._cookie(where, now)  # rotates the secret when due
        # the previous secret too: a cookie handed out just before a rotation stays good for one period
        return any(lh.check_mac2(lh.cookie_for(secret, where), data) for secret in self._cookie_secrets)

    # ------------------------------------------------------------------ half-open handshakes (§4.5)
    def _add_half_open(self, half: HalfOpen) -> None:
        cfg = self.config
        self._expire_half_open(half.expires - HALF_OPEN_S)
        mine = self._half_by_source.get(half.source)
        if mine is not None and len(mine) >= cfg.max_half_open_per_source:
            self.counters["half_open_source_evicted"] += 1
            self._drop_half_open(next(iter(mine)))
        near = self._half_by_aggregate.get(half.aggregate)
        if near is not None and len(near) >= cfg.max_half_open_per_aggregate:
            self.counters["half_open_aggregate_evicted"] += 1
            self._drop_half_open(next(iter(near)))
        if len(self._half_open) >= cfg.max_half_open:
            self.counters["half_open_evicted"] += 1
            self._drop_half_open(next(iter(self._half_open)))
        key = half.session.local_index.to_bytes(4, "big")
        self._half_open[key] = half
        self._half_by_source.setdefault(half.source, {})[key] = None
        self._half_by_aggregate.setdefault(half.aggregate, {})[key] = None
        if self._next_tick is None or self._next_tick > half.expires:
            self._next_tick = half.expires

    def _drop_half_open(self, key: bytes) -> HalfOpen | None:
        half = self._half_open.pop(key, None)
        if half is not None:
            for table, name in ((self._half_by_source, half.source), (self._half_by_aggregate, half.aggregate)):
                entries = table[name]
                del entries[key]
                if not entries:
                    del table[name]
        return half

    def _expire_half_open(self, now: float) -> None:
        table = self._half_open
        while table:
            key = next(iter(table))
            if table[key].expires > now:
                break
            self.counters["half_open_expired"] += 1
            self._drop_half_open(key)

    def _promote(self, half: HalfOpen, data: bytes, now: float) -> tuple[Link, Session] | None:
        """The first transport packet for a half-open handshake: if it authenticates, the link is made
        (within the quotas of §8.3) and the packet goes on as on any link."""
        session = half.session
        counter = data[5:13]
        view = memoryview(data)
        try:
            session.recv_aead.decrypt(NONCE_PREFIX + counter, view[LINK_HEADER_LEN:], view[:LINK_HEADER_LEN])
        except InvalidTag:
            self.counters["drop_bad_tag"] += 1
            return None
        self._drop_half_open(data[1:5])
        if now >= half.expires:
            self.counters["half_open_expired"] += 1
            return None
        link = self._accepted.get(half.peer_link_pub) if half.peer_link_pub is not None else None
        if link is None:
            if not self._admit(half.source, half.aggregate, now):
                self.counters["drop_link_quota"] += 1
                return None
            link = self._new_link(half.addr, half.kind, initiator=False, now=now)
            link.source, link.aggregate = half.source, half.aggregate
            self._by_source.setdefault(half.source, {})[link] = None
            self._aggregate_sources.setdefault(half.aggregate, {})[half.source] = None
            self._aggregate_count[half.aggregate] += 1
            if half.peer_link_pub is not None:
                link.peer_link_pub = half.peer_link_pub
                self._accepted[half.peer_link_pub] = link
        # else: a second handshake of a relay we already have a link with (both were in flight): the
        # peer uses this one, so it becomes the link's current session
        if half.peer_relay_id is not None:
            link.peer_relay_id = half.peer_relay_id  # authenticated by the link certificate
        link.last_rx_timestamp = max(link.last_rx_timestamp, half.timestamp_ns)
        self._install_session(link, session, now)
        self.counters["link_promoted"] += 1
        return link, session

    # ------------------------------------------------------------------ quotas (§8.3)
    def _admit(self, source: str, aggregate: str, now: float) -> bool:
        """Room for one more accepted link from ``source``: over its own quota its oldest idle link goes
        (or, if all are busy, the newcomer is refused); over the aggregate's quota, or with a full table, a
        link of the heaviest source goes instead of the newcomer."""
        cfg = self.config
        mine = self._by_source.get(source)
        if mine is not None and len(mine) >= cfg.max_links_per_source:
            victim = self._victim(mine, now, idle_only=True)
            if victim is None:
                return False
            self.counters["link_source_evicted"] += 1
            self.close_link(victim, "source quota")
        if self._aggregate_count[aggregate] >= cfg.max_links_per_aggregate:
            heaviest = max(self._aggregate_sources[aggregate], key=lambda s: len(self._by_source[s]))
            victim = self._victim(self._by_source[heaviest], now, idle_only=False)
            if victim is None:
                return False
            self.counters["link_aggregate_evicted"] += 1
            self.close_link(victim, "aggregate quota")
        return len(self.links) < cfg.max_links or self._evict_one(now)

    def _evict_one(self, now: float) -> bool:
        """The table is full: close the least valuable link of the source with the most accepted links."""
        if not self._by_source:
            return False
        heaviest = max(self._by_source, key=lambda s: len(self._by_source[s]))
        victim = self._victim(self._by_source[heaviest], now, idle_only=False)
        if victim is None:
            return False
        self.counters["link_table_evicted"] += 1
        self.close_link(victim, "link table full")
        return True

    @staticmethod
    def _victim(links: dict[Link, None], now: float, *, idle_only: bool) -> Link | None:
        """The oldest idle client link, else the oldest idle relay link, else (unless ``idle_only``) the
        oldest busy client link, else the oldest busy relay link: relays carrying circuits go last.  A link
        that received a packet at this very moment is never taken (its cell may be what needs the room)."""
        best: Link | None = None
        best_rank = 4
        for link in links:
            rank = (2 if link.users > 0 else 0) + (1 if link.kind is PeerKind.RELAY else 0)
            if rank < best_rank and (not idle_only or link.users == 0) and link.last_recv < now:
                best, best_rank = link, rank
        return best

    def _uncount(self, link: Link) -> None:
        source, aggregate = link.source, link.aggregate
        assert source is not None and aggregate is not None
        mine = self._by_source.get(source)
        if mine is not None and link in mine:
            del mine[link]
            if not mine:
                del self._by_source[source]
                sources = self._aggregate_sources[aggregate]
                del sources[source]
                if not sources:
                    del self._aggregate_sources[aggregate]
            self._aggregate_count[aggregate] -= 1
            if not self._aggregate_count[aggregate]:
                del self._aggregate_count[aggregate]
