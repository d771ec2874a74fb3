"""Sans-I/O link layer (docs/PROTOCOL.md §4): handshakes, sessions, replay windows, rekey, keepalive.

One ``LinkLayer`` owns every link of a node.  Inputs: ``receive_datagram(data, addr, now, wall)``,
``handle_timer(now, wall)`` and commands (``open_link``, ``send_cell``, ``close_link``).  Outputs:
``datagrams_to_send()`` (the queue ``outbox`` of datagrams with their destination, handed over), ``events``
(LinkUp / LinkDown) and ``timer()``.
Cells are handed to ``on_cell(link, cell)``, set by the owner, because that is the per-packet path.

A link never answers a packet it cannot authenticate.  The only unauthenticated input it answers is
a well-formed handshake initiation that carries a valid mac1 and passes the rate limit and replay
checks.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable

from cryptography.exceptions import InvalidTag

from shallot.core.link.events import LinkDown, LinkUp
from shallot.core.link.session import NONCE_PREFIX, Session
from shallot.core.link.state import Link, LinkConfig, LinkError, LinkState, PeerKind
from shallot.core.ratelimit import TokenBuckets
from shallot.core.wire.cells import CMD_PADDING, encode_cell
from shallot.crypto import link_handshake as lh
from shallot.crypto.codec import Address, DecodeError
from shallot.crypto.params import (
    HANDSHAKE_ATTEMPTS,
    HANDSHAKE_RETRY_S,
    HANDSHAKE_SKEW_S,
    KEEPALIVE_S,
    LINK_DEAD_AFTER_S,
    LINK_HEADER_LEN,
    LINK_PACKET_LEN,
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
        self._seen_ephemerals: dict[bytes, float] = {}  # NK replay cache: ephemeral -> expiry (now)
        self._buckets = TokenBuckets(config.handshake_rate, config.handshake_burst)
        self._next_tick: float | None = None

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
        if len(self.links) >= self.config.max_links:
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
        self.events.append(LinkDown(link, reason))

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
        else:
            self.counters["drop_unknown_type"] += 1

    def _receive_transport(self, data: bytes, addr: Address, now: float) -> None:
        # the per-packet path: keep it short
        if len(data) != LINK_PACKET_LEN:
            self.counters["drop_bad_length"] += 1
            return
        entry = self._by_index.get(data[1:5])
        if entry is None:
            self.counters["drop_unknown_index"] += 1
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
        if not self._buckets.allow(addr[0], now):
            self.counters["drop_handshake_rate"] += 1
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
        self._expire_ephemerals(now)
        if init.ephemeral in self._seen_ephemerals:
            self.counters["drop_initiation_replay"] += 1
            return
        if len(self._seen_ephemerals) >= cfg.max_seen_ephemerals:
            self.counters["drop_replay_cache_full"] += 1
            return
        self._seen_ephemerals[init.ephemeral] = now + 2 * HANDSHAKE_SKEW_S
        link: Link | None
        if init.relay is None:
            link = self._resume.get(init.resume) if init.resume != lh.NO_RESUME else None
            if link is None:
                if len(self.links) >= cfg.max_links:
                    self.counters["drop_too_many_links"] += 1
                    return
                link = self._new_link(addr, PeerKind.CLIENT, initiator=False, now=now)
            else:
                self.counters["link_resumed"] += 1
        else:
            peer_pub = init.noise.rs
            assert peer_pub is not None
            link = self._accepted.get(peer_pub)
            if link is not None and init.timestamp_ns <= link.last_rx_timestamp:
                self.counters["drop_initiation_replay"] += 1
                return
            if link is None:
                if len(self.links) >= cfg.max_links:
                    self.counters["drop_too_many_links"] += 1
                    return
                link = self._new_link(addr, PeerKind.RELAY, initiator=False, now=now)
                link.peer_link_pub = peer_pub
                self._accepted[peer_pub] = link
            link.peer_relay_id = init.relay.relay_id  # authenticated by the link certificate
        link.last_rx_timestamp = max(link.last_rx_timestamp, init.timestamp_ns)
        local_index = self._new_index()
        keys, response = lh.write_response(init, sender_index=local_index, rng=self._rng)
        session = Session(keys, local_index, init.sender_index, now, self._first_counter())
        if link.session is None:
            link.addr = addr  # a new link; an existing one moves only on an authenticated transport packet
            self._install_session(link, session, now)
        else:
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
        self._install_session(link, Session(keys, index, remote_index, now, self._first_counter()), now)
        self.counters["handshake_completed"] += 1

    def handle_timer(self, now: float, wall: float) -> None:
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
        deadline = self._next_tick if self.links else None
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
            if index and index.to_bytes(4, "big") not in self._by_index and index not in self._pending_by_index:
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
        if link.kind is PeerKind.RELAY and cfg.identity_pub is not None:
            state, packet = lh.relay_initiation(
                link_private=cfg.link_private, identity_pub=cfg.identity_pub, cert_expires=cfg.cert_expires,
                cert_sig=cfg.cert_sig, responder_link_pub=link.peer_link_pub, sender_index=index,
                timestamp_ns=int(wall * 1e9), rng=self._rng)
        else:
            resume = link.session.resume if link.session is not None else lh.NO_RESUME
            state, packet = lh.client_initiation(responder_link_pub=link.peer_link_pub, sender_index=index,
                                                 rng=self._rng, resume=resume)
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

    def _expire_ephemerals(self, now: float) -> None:
        cache = self._seen_ephemerals
        while cache:
            first = next(iter(cache))
            if cache[first] > now:
                break
            del cache[first]
