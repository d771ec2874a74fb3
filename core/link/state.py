"""What one link is: its peer, its state and its sessions (docs/PROTOCOL.md §4).  Owned by ``LinkLayer``."""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from shallot.core.link.session import Session
from shallot.crypto import link_handshake as lh
from shallot.crypto.codec import Address


class LinkError(Exception):
    """A link cannot be opened (bad peer key, too many links); the caller refuses what needed it."""


class PeerKind(enum.Enum):
    CLIENT = "client"  # anonymous (Noise NK); we are its guard
    RELAY = "relay"  # authenticated by identity key (Noise IK)


class LinkState(enum.Enum):
    CONNECTING = "connecting"
    UP = "up"
    CLOSED = "closed"


@dataclass
class LinkConfig:
    link_private: bytes
    link_pub: bytes
    accept_clients: bool = False
    accept_relays: bool = False
    # for IK initiations (relays only)
    identity_pub: bytes | None = None
    cert_expires: int = 0
    cert_sig: bytes = b""
    handshake_rate: float = 20.0  # initiations per second per source (IPv4 address, IPv6 /64)
    handshake_burst: float = 40.0
    # under load (§4.12) each source also spends from a slower bucket: DH work is shared out by source,
    # so many sources that can receive (which cookies do not stop) cannot take the CPU the data path needs
    loaded_handshake_rate: float = 4.0
    loaded_handshake_burst: float = 8.0
    max_links: int = 4096
    max_queued_cells: int = 256
    # the initiation replay cache (§4.5): when full its oldest time bucket goes, it never refuses
    max_seen_ephemerals: int = 262_144
    # per-source quotas of accepted links (§8.3): source = IPv4 address or IPv6 /64, aggregate = /24 or /48
    max_links_per_source: int = 64
    max_links_per_aggregate: int = 256
    # responder handshakes waiting for their first transport packet (§4.5)
    max_half_open: int = 4096
    max_half_open_per_source: int = 32
    max_half_open_per_aggregate: int = 128
    # under load (§4.12): initiations with a valid mac1 per second, or the half-open table this full
    cookie_load_rate: int = 100


@dataclass(eq=False)
class Link:
    link_id: int
    addr: Address
    kind: PeerKind
    initiator: bool
    peer_link_pub: bytes | None = None
    peer_relay_id: bytes | None = None
    state: LinkState = LinkState.CONNECTING
    session: Session | None = None
    previous: Session | None = None
    last_recv: float = 0.0
    last_send: float = 0.0
    users: int = 0  # circuits using this link (maintained by the owner)
    queued: deque[bytes] = field(default_factory=deque)
    # initiator handshake in flight
    pending: lh.InitiatorState | None = None
    attempts: int = 0
    retry_at: float | None = None
    last_rx_timestamp: int = 0
    next_session: Session | None = None  # responder side: a rekeyed session not yet used by the peer
    # accepted links: the source and aggregate (§8.3) counted for it, fixed when the link is made
    source: str | None = None
    aggregate: str | None = None
    # initiator side: the responder's cookie (§4.12) and when it came; mac2 is made with it for COOKIE_SECRET_S
    cookie: bytes | None = None
    cookie_at: float = 0.0
    owes_first: bool = False  # initiator: the responder waits for a first transport packet to make the link

    def __repr__(self) -> str:
        return f"Link({self.link_id}, {self.kind.value}, {self.state.value})"


@dataclass(eq=False)
class HalfOpen:
    """A handshake we answered for a new link: its session waits for the first authenticated transport
    packet before a link exists (§4.5).  Nothing else is kept."""

    session: Session
    addr: Address
    kind: PeerKind
    source: str
    aggregate: str
    expires: float
    peer_link_pub: bytes | None = None
    peer_relay_id: bytes | None = None
    timestamp_ns: int = 0


CellHandOff = Callable[[Link, bytes, float], None]  # (link, cell, now): a cell its owner passes on, e.g. NAT control
