"""Sans-I/O relay: forwards cells between links and terminates circuits at an exit (docs/PROTOCOL.md §5-7).

A relay's per-circuit state holds only its neighbours: (previous link, circuit id) <-> (next link,
circuit id) and its own hop keys.  It never learns the rest of the path.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from shallot.core.link import (
    Address,
    CellHandOff,
    Link,
    LinkConfig,
    LinkDown,
    LinkError,
    LinkLayer,
    LinkState,
    LinkUp,
    PeerKind,
    new_circuit_id,
    peer_may_create,
)
from shallot.core.link.owner import LinkOwner
from shallot.core.ratelimit import TokenBuckets
from shallot.core.wire.addresses import extend_target_allowed, source_key
from shallot.core.wire.cells import (
    CMD_CREATE,
    CMD_CREATED,
    CMD_DESTROY,
    CMD_RELAY,
    MSG_DROP,
    MSG_END,
    DestroyReason,
    create_slots,
    created_slots,
    decode_message,
    destroy_reason,
    encode_cell,
)
from shallot.core.wire.nat_frames import is_nat_cell
from shallot.crypto import circuit_handshake as ch
from shallot.crypto.codec import DecodeError
from shallot.crypto.keys import RelayKeys
from shallot.crypto.onion import JUNK_LEN, EndpointLayer, IntegrityError, RelayLayer, SequenceError
from shallot.crypto.params import (
    CELL_HEADER_LEN,
    CIRCUIT_IDLE_S,
    CREATE_TIMEOUT_S,
)
from shallot.crypto.primitives import AuthFailure, KeyPool, RandomBytes, X25519Key, hmac_sha256
from shallot.relay.endpoints import EndpointService
from shallot.relay.quotas import DialGuard, ReplayCache

log = logging.getLogger("shallot.relay")
_RELAY = bytes((CMD_RELAY,))


class CircState(enum.Enum):
    BUILDING = "building"
    OPEN = "open"


@dataclass
class RelayConfig:
    is_exit: bool = False
    max_circuits: int = 20000
    creates_per_second: float = 50.0  # per client source IP: each CREATE costs us three X25519 operations
    creates_burst: float = 200.0
    relay_creates_per_second: float = 500.0  # per relay link: a guard carries many clients' builds
    relay_creates_burst: float = 2000.0
    # per-source quotas (docs/PROTOCOL.md §8.2).  A source is a client link's IPv4 address or IPv6 /64, or
    # a relay-tier link's peer relay; links from relays not in our view count as clients
    max_circuits_per_source: int = 256  # a VPN client holds a few; a busy NAT address some dozens
    max_circuits_per_link: int = 128
    max_pending_per_source: int = 32  # extends sent on and not yet answered by CREATED
    max_pending_per_link: int = 16
    relay_max_pending_per_link: int = 2048  # a guard's link carries many clients' builds
    relay_source_weight: int = 32  # choosing whom to evict, a relay-tier source's circuits weigh 1/32
    # build replay cache: soft cap (then only sources under their share), hard cap, quota per source
    max_replay_entries: int = 500_000
    replay_hard_cap: int = 1_000_000
    replay_per_source: int = 4000
    relay_replay_per_source: int = 200_000


@dataclass(eq=False)
class RelayCircuit:
    prev_link: Link
    prev_cid: int
    created_at: float
    last_active: float
    state: CircState = CircState.BUILDING
    next_link: Link | None = None
    next_cid: int = 0
    layer: RelayLayer | None = None
    endpoint: EndpointLayer | None = None
    reply: bytes = b""
    keys: ch.HopKeys | None = None
    service: EndpointService | None = None  # at the exit: what the circuit ends in
    service_id: int = 0
    prev_prefix: bytes = b""  # circ id bytes on the previous link, precomputed for the hot path
    next_prefix: bytes = b""
    source: str = ""  # whose quota it counts against (docs/PROTOCOL.md §8.2)
    pending: bool = False  # an extend sent on, no CREATED yet
    forward_slots: bytes = b""  # the CREATE for the next hop while a lookup of the target is pending
    replay_entry: tuple[bytes, bytes, float] = (b"", b"", 0.0)  # recorded once the record is accepted


def _key(link_id: int, cid: int) -> int:
    return (link_id << 32) | cid


def _decrement(counter: Counter, key: object) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


REPLAY_TAG_LEN = 8


@dataclass
class OnionKeyRing:
    """Onion keys we accept (current and overlapping).  Their build replay cache is ``RelayNode.replay``:
    8-byte tags, HMAC(replay secret, key id | X), not X itself: compact, and what the relay writes to its
    state directory (relay/replay_store.py) so that a restart forgets nothing."""

    keys: dict[bytes, X25519Key] = field(default_factory=dict)

    @classmethod
    def from_relay_keys(cls, keys: RelayKeys) -> OnionKeyRing:
        ring = cls()
        for ok in keys.onion_keys:
            ring.keys[ok.key_id] = X25519Key(ok.private)
        return ring


SWEEP_INTERVAL_S = 1.0
# (relay id, link key) of a relay link's peer -> is it a relay in this relay's own view?  (docs/PROTOCOL.md
# §5.7 "relay tier"; relay/service.py answers from the DHT view and --directory)
KnownRelay = Callable[[bytes, bytes], bool]
# (relay id, link key, address) of an EXTEND target -> is it a relay in our view at that address?
KnownTarget = Callable[[bytes, bytes, Address], bool]
RelayLookup = Callable[[bytes, bytes], None]
PARK_TIMEOUT_S = 3.0  # a TERMINATE from a relay not in our view waits this long for a DHT lookup of it
MAX_PARKED = 256
MAX_PARKED_PER_SOURCE = 8  # one source cannot take the whole table (nor ask for many lookups)
LOOKUPS_PER_SECOND = 20.0  # new DHT lookups the held CREATEs may ask for (burst 40): made-up relay ids
LOOKUPS_BURST = 40.0  # must not turn the relay into a query cannon at the DHT


def relay_link_layer(keys: RelayKeys, *, rng: RandomBytes, wall: float, cert_lifetime_s: int = 7 * 86400) -> LinkLayer:
    """A relay's link layer: accepts clients and relays, initiates as an authenticated relay (IK)."""
    cert_expires = int(wall) + cert_lifetime_s
    return LinkLayer(LinkConfig(
        link_private=keys.link_private, link_pub=keys.link_pub, accept_clients=True, accept_relays=True,
        identity_pub=keys.identity_pub, cert_expires=cert_expires, cert_sig=keys.link_cert(cert_expires)),
        rng=rng)


class RelayNode(LinkOwner):
    def __init__(self, keys: RelayKeys, *, rng: RandomBytes, wall: float, config: RelayConfig | None = None,
                 cert_lifetime_s: int = 7 * 86400, own_host: str = "0.0.0.0",
                 services: Mapping[int, EndpointService] | None = None, link: LinkLayer | None = None,
                 nat_cells: CellHandOff | None = None, known_relay: KnownRelay | None = None,
                 known_target: KnownTarget | None = None) -> None:
        """``services``: what circuits that end here may ask for, by service id (an exit's echo, discard
        and, with a TUN, IP; exit/ provides them).  A relay without them refuses every TERMINATE.
        ``link``: from ``relay_link_layer`` when the caller builds more on it (a NAT part, core/nat/stack.py);
        ``nat_cells``: who takes NAT control cells (``nat_frames.is_nat_cell``); without it they are
        dropped as unknown commands.  ``known_relay``: this relay's view of the network; without one
        (a relay with neither discovery nor a directory file) every authenticated relay link counts as a
        relay, the pre-view rule.  ``known_target``: the same view for EXTEND targets; without one the
        relay dials any target in its scope, under the per-target dial limits (relay/quotas.py)."""
        self.keys = keys
        self.own_host = own_host
        self.services: dict[int, EndpointService] = dict(services or {})
        self.config = config or RelayConfig()
        self._rng = rng
        self.link = link if link is not None else relay_link_layer(keys, rng=rng, wall=wall,
                                                                   cert_lifetime_s=cert_lifetime_s)
        self.link.on_cell = self._on_cell
        self._nat_cells = nat_cells
        self.known_relay = known_relay
        self.known_target = known_target
        # asks the caller to look up a relay not in our view; it answers with relay_looked_up (relay/service.py)
        self.lookup_relay: RelayLookup | None = None
        self._parked: dict[int, tuple[float, bytes, bytes, Link, int, RelayCircuit, ch.Instruction]] = {}
        self.ring = OnionKeyRing.from_relay_keys(keys)
        cfg = self.config
        self.replay = ReplayCache(soft_cap=cfg.max_replay_entries, hard_cap=cfg.replay_hard_cap)
        self.dials = DialGuard()
        # per-source bookkeeping of the circuits that arrived from a previous hop (docs/PROTOCOL.md §8.2)
        self._by_source: dict[str, dict[RelayCircuit, None]] = {}
        self._per_link: Counter[int] = Counter()
        self._pending_source: Counter[str] = Counter()
        self._pending_link: Counter[int] = Counter()
        self.counters: Counter[str] = Counter()
        self.own_hop = ch.HopIdentity(keys.relay_id, keys.link_pub)
        # replay-cache entries accepted since the caller last saved them, (key id, tag, expiry); None: the
        # caller does not persist them (in-memory tests); relay/service.py does (restore_replay)
        self.replay_secret = rng(32)
        self.replay_journal: list[tuple[bytes, bytes, float]] | None = None
        self.circuits: dict[int, tuple[RelayCircuit, bool]] = {}  # key -> (circuit, arrived_from_prev)
        self.open_circuits = 0
        self.reply_keys = KeyPool(rng, size=16)  # our build-reply ephemerals, made while idle
        self._last_integrity_log = float("-inf")
        # hot-path table for open forwarding circuits: key -> (out link, cell prefix, layer step, circuit)
        self._routes: dict[int, tuple[Link, bytes, Callable[[memoryview], bytes], RelayCircuit]] = {}
        self._now = 0.0
        self._wall = wall
        self._next_sweep = 0.0
        cfg = self.config
        self._client_creates = TokenBuckets(cfg.creates_per_second, cfg.creates_burst)
        self._relay_creates = TokenBuckets(cfg.relay_creates_per_second, cfg.relay_creates_burst)
        self._lookups = TokenBuckets(LOOKUPS_PER_SECOND, LOOKUPS_BURST, max_keys=1)
        self.on_destroyed: Callable[[RelayCircuit], None] | None = None

    # ------------------------------------------------------------------ I/O entry points (and LinkOwner's)
    def handle_timer(self, now: float, wall: float) -> None:
        self._tick_link(now, wall)
        self.reply_keys.refill()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_INTERVAL_S  # timeouts are tens of seconds: a scan per second is plenty
        if self._parked:
            self._expire_parked(now)
        for circ, from_prev in list(self.circuits.values()):
            if not from_prev:
                continue
            if circ.state is CircState.BUILDING and now - circ.created_at > CREATE_TIMEOUT_S:
                self.counters["circuit_build_timeout"] += 1
                self._destroy(circ, DestroyReason.TIMEOUT)
            elif now - circ.last_active > CIRCUIT_IDLE_S:
                self.counters["circuit_idle_timeout"] += 1
                self._destroy(circ, DestroyReason.TIMEOUT)
        self.replay.expire(wall)

    def renew_link_cert(self, wall: float, lifetime_s: int = 7 * 86400) -> bool:
        """Re-sign our link certificate once less than half its lifetime is left.  Returns True if renewed."""
        cfg = self.link.config
        if cfg.cert_expires - wall > lifetime_s / 2:
            return False
        cfg.cert_expires = int(wall) + lifetime_s
        cfg.cert_sig = self.keys.link_cert(cfg.cert_expires)
        return True

    def restore_replay(self, secret: bytes, entries: list[tuple[bytes, bytes, float]], wall: float) -> int:
        """Take back the build replay cache saved before a restart (docs/PROTOCOL.md §5.7): entries of
        keys we still hold and not yet expired.  Returns how many were restored."""
        self.replay_secret = secret
        self.replay_journal = []
        restored = 0
        for key_id, tag, expiry in entries:
            if key_id in self.ring.keys and expiry >= wall:
                self.replay.add(key_id, tag, expiry, "restored")  # one source: never anyone's quota
                restored += 1
        return restored

    def replay_entries(self) -> list[tuple[bytes, bytes, float]]:
        """Every live replay-cache entry (to compact the saved copy)."""
        return self.replay.entries()

    def _replay_tag(self, key_id: bytes, x_pub: bytes) -> bytes:
        return hmac_sha256(self.replay_secret, key_id + x_pub)[:REPLAY_TAG_LEN]

    def rotate_onion_keys(self, wall: float) -> bool:
        changed = self.keys.rotate_onion_keys(self._rng, wall)
        if changed:
            self.ring = OnionKeyRing.from_relay_keys(self.keys)
            self.replay.keep_keys(set(self.ring.keys))
        return changed

    def all_counters(self) -> dict[str, int]:
        out = dict(self.counters)
        for k, v in self.link.counters.items():
            out[f"link_{k}"] = v
        return out

    def stats(self) -> dict[str, object]:
        return {"circuits": self.open_circuits, "links": len(self.link.links),
                "replay_entries": len(self.replay), "held_creates": len(self._parked),
                "counters": self.all_counters(),
                **{k: v for service in self.services.values() for k, v in service.status().items()}}

    # ------------------------------------------------------------------ cells
    def _on_cell(self, link: Link, cell: bytes) -> None:
        cid = int.from_bytes(cell[:4], "big")
        cmd = cell[4]
        key = (link.link_id << 32) | cid
        if cmd == CMD_RELAY:
            route = self._routes.get(key)
            if route is not None:
                # the hot path: check and change one onion layer, then straight into the next link's AEAD
                out_link, prefix, layer_step, circ = route
                try:
                    region = layer_step(memoryview(cell)[CELL_HEADER_LEN:])
                except IntegrityError as exc:
                    self._hop_check_failed(circ, exc)
                    return
                now = self._now
                circ.last_active = now
                session = out_link.session
                if session is not None:
                    self.link.outbox.append((session.seal(prefix + region), out_link.addr))
                    out_link.last_send = now
                else:
                    self.link.send_cell(out_link, prefix + region, now)
                return
            entry = self.circuits.get(key)
            if entry is None:
                self.counters["drop_relay_unknown_circuit"] += 1
                return
            circ = entry[0]
            if circ.endpoint is None:  # a forwarding circuit without routes: not open yet
                self.counters["drop_relay_not_open"] += 1
                return
            # a circuit that ends here is open from its CREATE on and is keyed only by its previous link
            circ.last_active = self._now
            self._endpoint_cell(circ, memoryview(cell)[CELL_HEADER_LEN:])
            return
        entry = self.circuits.get(key)
        if cmd == CMD_CREATE:
            if entry is not None or key in self._parked:
                self.counters["drop_create_duplicate_circuit"] += 1
                return
            self._handle_create(link, cid, cell[CELL_HEADER_LEN:])
            return
        if cmd == CMD_CREATED:
            if entry is None or entry[1] or entry[0].state is not CircState.BUILDING:
                self.counters["drop_created_unexpected"] += 1
                return
            self._handle_created(entry[0], cell[CELL_HEADER_LEN:])
            return
        if cmd == CMD_DESTROY:
            if entry is None:
                self.counters["drop_destroy_unknown_circuit"] += 1
                return
            circ = entry[0]
            reason = destroy_reason(cell[CELL_HEADER_LEN:])
            self.counters[f"destroy_received_{reason.name.lower()}"] += 1
            # the reason stays with the neighbour that told us: passing it on would be an end-to-end side
            # channel (e.g. every hop learning that some hop saw tampering); the next hop hears DESTROYED
            self._destroy(circ, DestroyReason.DESTROYED, skip=link)
            return
        if self._nat_cells is not None and is_nat_cell(cell):
            self._nat_cells(link, cell, self._now)
            return
        self.counters["drop_unknown_command"] += 1

    def relay_tier(self, link: Link) -> bool:
        """The link's peer is a relay in our own view.  Only such links get the relay CREATE budget and
        may end a circuit here; an IK link from an identity we do not know (just minted, or not yet in
        our view) is treated like a client link (docs/PROTOCOL.md §5.7)."""
        if link.kind is not PeerKind.RELAY:
            return False
        if self.known_relay is None:
            return True
        rid, pub = link.peer_relay_id, link.peer_link_pub
        return rid is not None and pub is not None and self.known_relay(rid, pub)

    def _allow_create(self, link: Link, relay_tier: bool, source: str) -> bool:
        if relay_tier:
            return self._relay_creates.allow(f"link {link.link_id}", self._now)
        return self._client_creates.allow(source, self._now)  # an IPv6 /64 is one source, however it rotates

    def _reject_create(self, link: Link, cid: int, reason: DestroyReason, counter: str) -> None:
        self.counters[counter] += 1
        self.link.send_cell(link, encode_cell(cid, CMD_DESTROY, bytes((reason,))), self._now)

    def _quota_refusal(self, link: Link, source: str, relay_tier: bool) -> str | None:
        """Per-source and per-link circuit quotas (docs/PROTOCOL.md §8.2), checked before any crypto."""
        cfg = self.config
        lid = link.link_id
        if relay_tier:
            if self._pending_link[lid] >= cfg.relay_max_pending_per_link:
                return "reject_create_pending_link"
            return None
        held = self._by_source.get(source)
        if held is not None and len(held) >= cfg.max_circuits_per_source:
            return "reject_create_source_circuits"
        if self._per_link[lid] >= cfg.max_circuits_per_link:
            return "reject_create_link_circuits"
        if self._pending_source[source] >= cfg.max_pending_per_source:
            return "reject_create_pending_source"
        if self._pending_link[lid] >= cfg.max_pending_per_link:
            return "reject_create_pending_link"
        return None

    def _load(self, source: str, extra: int = 0) -> float:
        held = self._by_source.get(source)
        n = (len(held) if held is not None else 0) + extra
        return n / self.config.relay_source_weight if source.startswith("relay ") else n

    def _make_room(self, source: str) -> bool:
        """The circuit table is full: evict the least recently active circuit of the heaviest source, if
        that source is heavier than the one asking would become; False if nothing may be evicted."""
        if self.open_circuits < self.config.max_circuits:
            return True
        heaviest = max(self._by_source, key=self._load, default=None)
        if heaviest is None or self._load(heaviest) <= self._load(source, 1):
            return False
        victim = min(self._by_source[heaviest], key=lambda c: c.last_active)
        self.counters["circuit_evicted"] += 1
        self._destroy(victim, DestroyReason.RESOURCE_LIMIT)
        return True

    def _handle_create(self, link: Link, cid: int, payload: bytes) -> None:
        if not peer_may_create(link, cid):
            self.counters["drop_create_bad_circuit_id"] += 1
            return
        relay_tier = self.relay_tier(link)
        source = f"relay {link.peer_relay_id.hex()}" if relay_tier and link.peer_relay_id else source_key(link.addr[0])
        refusal = self._quota_refusal(link, source, relay_tier)
        if refusal is not None:
            self._reject_create(link, cid, DestroyReason.RESOURCE_LIMIT, refusal)
            return
        if not self._allow_create(link, relay_tier, source):
            self._reject_create(link, cid, DestroyReason.RESOURCE_LIMIT, "reject_create_rate")
            return
        try:
            opened = ch.relay_open(create_slots(payload), self.ring.keys, rng=self._rng)
        except (DecodeError, AuthFailure):
            self._reject_create(link, cid, DestroyReason.HOP_REJECTED, "reject_create_bad_record")
            return
        if not ch.record_time_ok(opened.hour, self._wall):
            self._reject_create(link, cid, DestroyReason.HOP_REJECTED, "reject_create_clock_skew")
            return
        key_id = ch.onion_key_id(opened.onion_pub)
        tag = self._replay_tag(key_id, opened.x_pub)
        if self.replay.seen(key_id, tag):
            self._reject_create(link, cid, DestroyReason.HOP_REJECTED, "reject_create_replay")
            return
        cfg = self.config
        refusal = self.replay.admit(source, cfg.relay_replay_per_source if relay_tier else cfg.replay_per_source)
        if refusal is not None:
            self._reject_create(link, cid, DestroyReason.RESOURCE_LIMIT, refusal)
            return
        # recorded only when the circuit is accepted (_accept): a refused record fills nothing.  Kept until
        # the record's hour can no longer be accepted (+60 s for a wall clock that steps)
        keys, reply = ch.relay_reply(opened, self.own_hop, rng=self._rng, y_private=self.reply_keys.take())
        circ = RelayCircuit(prev_link=link, prev_cid=cid, created_at=self._now, last_active=self._now,
                            keys=keys, reply=reply, prev_prefix=cid.to_bytes(4, "big") + _RELAY, source=source,
                            forward_slots=opened.forward_slots,
                            replay_entry=(key_id, tag, ch.record_expiry(opened.hour) + 60))
        instruction = opened.instruction
        if isinstance(instruction, ch.Terminate):
            if not self.config.is_exit:
                self._reject_create(link, cid, DestroyReason.HOP_REJECTED, "reject_create_not_exit")
                return
            if not relay_tier:
                # a one-hop circuit would make the exit a plain proxy for whoever connects (Tor refuses
                # these too): the exit must never be the first hop of a client's circuit, and a freshly
                # minted identity dialing with IK is no relay (review M2)
                if link.kind is PeerKind.CLIENT:
                    self._reject_create(link, cid, DestroyReason.HOP_REJECTED, "reject_create_one_hop")
                else:
                    rid, pub = link.peer_relay_id, link.peer_link_pub
                    assert rid is not None and pub is not None  # a relay link always names its peer
                    if not self._park(link, cid, circ, instruction, rid, pub):
                        self._reject_create(link, cid, DestroyReason.HOP_REJECTED, "reject_create_unknown_relay")
                return
            self._terminate(link, cid, circ, instruction)
            return
        if instruction.relay_id == self.keys.relay_id or instruction.link_pub == self.keys.link_pub:
            self._reject_create(link, cid, DestroyReason.HOP_REJECTED, "reject_create_extend_to_self")
            return
        if not extend_target_allowed(self.own_host, instruction.host):
            self._reject_create(link, cid, DestroyReason.HOP_REJECTED, "reject_create_extend_address")
            return
        if self.known_target is not None and not self.known_target(
                instruction.relay_id, instruction.link_pub, (instruction.host, instruction.port)):
            # no handshake cannon: a relay dials only relays of its own view, at their published address
            if not self._park(link, cid, circ, instruction, instruction.relay_id, instruction.link_pub):
                self._reject_create(link, cid, DestroyReason.HOP_REJECTED, "reject_create_extend_unknown")
            return
        self._extend(link, cid, circ, instruction)

    def _may_accept(self, link: Link, cid: int, circ: RelayCircuit) -> bool:
        """The last checks before a circuit takes a table slot: the replay cache (again: a copy may have
        been accepted while this one waited for a lookup) and room in the table (evicting if need be)."""
        key_id, tag, _expiry = circ.replay_entry
        if self.replay.seen(key_id, tag):
            self._reject_create(link, cid, DestroyReason.HOP_REJECTED, "reject_create_replay")
            return False
        if not self._make_room(circ.source):
            self._reject_create(link, cid, DestroyReason.RESOURCE_LIMIT, "reject_create_max_circuits")
            return False
        return True

    def _record(self, circ: RelayCircuit) -> None:
        """The circuit is accepted: its record goes in the replay cache (and the journal saved to disk)."""
        key_id, tag, expiry = circ.replay_entry
        self.replay.add(key_id, tag, expiry, circ.source)
        if self.replay_journal is not None:
            self.replay_journal.append(circ.replay_entry)

    def _extend(self, link: Link, cid: int, circ: RelayCircuit, instruction: ch.ExtendTo) -> None:
        target = (instruction.host, instruction.port)
        existing = self.link.link_to(instruction.link_pub)
        if existing is None:
            refusal = self.dials.refusal(target, self._now)
            if refusal is not None:
                self._reject_create(link, cid, DestroyReason.CONNECT_FAILED, refusal)
                return
        if not self._may_accept(link, cid, circ):
            return
        try:
            nxt = self.link.open_link(target, instruction.link_pub, self._now, self._wall,
                                      peer_relay_id=instruction.relay_id)
        except LinkError:
            self._reject_create(link, cid, DestroyReason.CONNECT_FAILED, "reject_create_cannot_dial")
            return
        self._record(circ)
        if existing is None:
            self.dials.started(nxt.link_id, target)
        circ.next_link = nxt
        circ.next_cid = self._new_cid(nxt)
        circ.next_prefix = circ.next_cid.to_bytes(4, "big") + _RELAY
        assert circ.keys is not None
        circ.layer = RelayLayer(circ.keys)
        circ.pending = True
        self._register(circ)
        link.users += 1
        nxt.users += 1
        self.counters["circuit_extended"] += 1
        forward, circ.forward_slots = circ.forward_slots, b""
        self.link.send_cell(nxt, encode_cell(circ.next_cid, CMD_CREATE, forward), self._now)

    def _terminate(self, link: Link, cid: int, circ: RelayCircuit, instruction: ch.Terminate) -> None:
        """End the circuit here, in the service the record asks for."""
        name = ch.SERVICES[instruction.service]
        service = self.services.get(instruction.service)
        if service is None:
            self._reject_create(link, cid, DestroyReason.HOP_REJECTED, f"reject_create_no_{name}_service")
            return
        if not self._may_accept(link, cid, circ):
            return
        if not service.attach(circ):
            self._reject_create(link, cid, DestroyReason.RESOURCE_LIMIT, f"reject_create_{name}_full")
            return
        self._record(circ)
        assert circ.keys is not None
        circ.forward_slots = b""
        circ.service, circ.service_id = service, instruction.service
        circ.endpoint = EndpointLayer(circ.keys)
        circ.state = CircState.OPEN
        self._register(circ)
        link.users += 1
        self.counters["circuit_terminated_here"] += 1
        self.link.send_cell(link, encode_cell(cid, CMD_CREATED, ch.relay_created_first(circ.reply, rng=self._rng)),
                            self._now)

    def _park(self, link: Link, cid: int, circ: RelayCircuit, instruction: ch.Instruction, rid: bytes,
              pub: bytes) -> bool:
        """A CREATE that names a relay not (yet) in our view: a TERMINATE from it (relay ``rid`` is the
        previous hop) or an EXTEND to it.  Hold it while the caller looks the relay up (``lookup_relay``, a
        DHT lookup: it may have joined since our last crawl).  False if there is no lookup or too much is
        held already."""
        if self.lookup_relay is None or len(self._parked) >= MAX_PARKED:
            return False
        if sum(1 for p in self._parked.values() if p[5].source == circ.source) >= MAX_PARKED_PER_SOURCE:
            self.counters["lookup_refused_source"] += 1
            return False
        first = not any(p[1] == rid for p in self._parked.values())
        if first and not self._lookups.allow("", self._now):
            self.counters["lookup_refused_rate"] += 1
            return False
        self._parked[_key(link.link_id, cid)] = (self._now + PARK_TIMEOUT_S, rid, pub, link, cid, circ, instruction)
        self.counters["create_held_for_lookup"] += 1
        if first:
            self.lookup_relay(rid, pub)
        return True

    def relay_looked_up(self, relay_id: bytes, link_pub: bytes, found: bool, now: float) -> None:
        """The answer to ``lookup_relay``: finish or refuse the CREATEs held for that relay."""
        self._now = now
        for key, (_deadline, rid, pub, link, cid, circ, instruction) in list(self._parked.items()):
            if rid != relay_id:
                continue
            del self._parked[key]
            if link.state is LinkState.CLOSED:
                continue
            ok = found and pub == link_pub
            if isinstance(instruction, ch.Terminate):
                if ok:
                    self._terminate(link, cid, circ, instruction)
                else:
                    self._reject_create(link, cid, DestroyReason.HOP_REJECTED, "reject_create_unknown_relay")
            elif ok and self.known_target is not None and self.known_target(
                    rid, pub, (instruction.host, instruction.port)):
                self._extend(link, cid, circ, instruction)
            else:
                self._reject_create(link, cid, DestroyReason.HOP_REJECTED, "reject_create_extend_unknown")

    def _expire_parked(self, now: float) -> None:
        for key, (deadline, _rid, _pub, link, cid, _circ, ins) in list(self._parked.items()):
            if now >= deadline:
                del self._parked[key]
                if link.state is not LinkState.CLOSED:
                    counter = ("reject_create_unknown_relay" if isinstance(ins, ch.Terminate)
                               else "reject_create_extend_unknown")
                    self._reject_create(link, cid, DestroyReason.HOP_REJECTED, counter)

    def _handle_created(self, circ: RelayCircuit, payload: bytes) -> None:
        try:
            slots = ch.relay_created_wrap(circ.keys, circ.reply, created_slots(payload))  # type: ignore[arg-type]
        except DecodeError:
            self.counters["drop_created_malformed"] += 1
            self._destroy(circ, DestroyReason.PROTOCOL)
            return
        circ.state = CircState.OPEN
        circ.reply = b""
        circ.last_active = self._now
        self._not_pending(circ)
        layer = circ.layer
        assert layer is not None and circ.next_link is not None
        self._routes[_key(circ.prev_link.link_id, circ.prev_cid)] = (
            circ.next_link, circ.next_prefix, layer.forward, circ)
        self._routes[_key(circ.next_link.link_id, circ.next_cid)] = (
            circ.prev_link, circ.prev_prefix, layer.backward, circ)
        self.link.send_cell(circ.prev_link, encode_cell(circ.prev_cid, CMD_CREATED, slots), self._now)

    def _hop_check_failed(self, circ: RelayCircuit, exc: IntegrityError) -> None:
        """A forwarding hop's layer check failed: a neighbour changed, repeated, injected or held back a cell."""
        counter = "hop_sequence_failure" if isinstance(exc, SequenceError) else "hop_integrity_failure"
        self.counters[counter] += 1
        self._integrity_teardown(circ, counter)

    def _integrity_teardown(self, circ: RelayCircuit, counter: str) -> None:
        if self._now - self._last_integrity_log >= 10.0:  # tampering is rare: say so, but never let a
            self._last_integrity_log = self._now        # flood of it flood the log
            log.warning("a circuit failed an integrity check (%s) and was torn down (%d so far)",
                        counter, self.counters[counter])
        self._destroy(circ, DestroyReason.INTEGRITY)

    def _endpoint_cell(self, circ: RelayCircuit, region: memoryview) -> None:
        assert circ.endpoint is not None
        try:
            inner = circ.endpoint.open_forward(region)
            msg_type, data = decode_message(inner)
        except (IntegrityError, DecodeError) as exc:
            counter = "hop_sequence_failure" if isinstance(exc, SequenceError) else "circuit_integrity_failure"
            self.counters[counter] += 1
            self._integrity_teardown(circ, counter)
            return
        if msg_type == MSG_END:
            self._destroy(circ, DestroyReason.REQUESTED)
        elif msg_type == MSG_DROP:
            self.counters["e2e_padding_received"] += 1
        else:
            assert circ.service is not None
            replies = circ.service.on_message(circ, msg_type, data, self._now)
            if replies is None:
                self.counters["e2e_unexpected_message"] += 1
                return
            for inner in replies:
                self._endpoint_send(circ, inner)

    def send_backward(self, circ: RelayCircuit, inner: bytes, now: float) -> None:
        """An inner message a service at this exit sends on its own (an IP packet from the internet)."""
        self._now = now
        circ.last_active = now
        self._endpoint_send(circ, inner)

    def _endpoint_send(self, circ: RelayCircuit, inner: bytes) -> None:
        region = circ.endpoint.seal_backward(inner, self._rng(JUNK_LEN))  # type: ignore[union-attr]
        self.link.send_cell(circ.prev_link, circ.prev_prefix + region, self._now)

    # ------------------------------------------------------------------ bookkeeping
    def _new_cid(self, link: Link) -> int:
        return new_circuit_id(link, self._rng, lambda cid: _key(link.link_id, cid) in self.circuits)

    def _register(self, circ: RelayCircuit) -> None:
        self.circuits[_key(circ.prev_link.link_id, circ.prev_cid)] = (circ, True)
        self.open_circuits += 1
        if circ.next_link is not None:
            self.circuits[_key(circ.next_link.link_id, circ.next_cid)] = (circ, False)
        self._by_source.setdefault(circ.source, {})[circ] = None
        self._per_link[circ.prev_link.link_id] += 1
        if circ.pending:
            self._pending_source[circ.source] += 1
            self._pending_link[circ.prev_link.link_id] += 1

    def _not_pending(self, circ: RelayCircuit) -> None:
        if not circ.pending:
            return
        circ.pending = False
        _decrement(self._pending_source, circ.source)
        _decrement(self._pending_link, circ.prev_link.link_id)

    def _unregister(self, circ: RelayCircuit) -> None:
        self._not_pending(circ)
        held = self._by_source.get(circ.source)
        if held is not None:
            held.pop(circ, None)
            if not held:
                del self._by_source[circ.source]
        _decrement(self._per_link, circ.prev_link.link_id)

    def _destroy(self, circ: RelayCircuit, reason: DestroyReason, *, skip: Link | None = None) -> None:
        """Remove the circuit and tell each neighbour (except ``skip``, which told us)."""
        if self.circuits.pop(_key(circ.prev_link.link_id, circ.prev_cid), None) is None:
            return
        self._routes.pop(_key(circ.prev_link.link_id, circ.prev_cid), None)
        if circ.next_link is not None:
            self._routes.pop(_key(circ.next_link.link_id, circ.next_cid), None)
        self.open_circuits -= 1
        self._unregister(circ)
        if circ.service is not None:
            circ.service.detach(circ)  # e.g. the IP service's address is free again
        circ.prev_link.users -= 1
        if circ.prev_link is not skip:
            self.link.send_cell(circ.prev_link, encode_cell(circ.prev_cid, CMD_DESTROY, bytes((reason,))), self._now)
        if circ.next_link is not None:
            self.circuits.pop(_key(circ.next_link.link_id, circ.next_cid), None)
            circ.next_link.users -= 1
            if circ.next_link is not skip:
                self.link.send_cell(circ.next_link, encode_cell(circ.next_cid, CMD_DESTROY, bytes((reason,))),
                                    self._now)
        self.counters["circuit_destroyed"] += 1

    def _drain_link_events(self) -> None:
        while self.link.events:
            event = self.link.events.popleft()
            if isinstance(event, LinkUp):
                self.dials.up(event.link.link_id)
            elif isinstance(event, LinkDown):
                self.counters["link_down"] += 1
                dead = event.link
                if dead.initiator and self.dials.down(dead.link_id, dead.addr, self._now):
                    self.counters["dial_failed"] += 1
                for circ, from_prev in [e for e in self.circuits.values()
                                        if e[0].prev_link is dead or e[0].next_link is dead]:
                    if from_prev:
                        reason = (DestroyReason.CONNECT_FAILED if circ.state is CircState.BUILDING
                                  else DestroyReason.LINK_DOWN)
                        self._destroy(circ, reason, skip=dead)

    def neighbours_of(self, circ: RelayCircuit) -> tuple[Address, Address | None]:
        """For tests: the only addresses a relay knows about a circuit are its two neighbours."""
        return circ.prev_link.addr, circ.next_link.addr if circ.next_link else None


__all__ = ["CircState", "PeerKind", "RelayCircuit", "RelayConfig", "RelayNode"]
