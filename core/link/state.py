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
    handshake_rate: float = 20.0  # initiations per second per source IP
    handshake_burst: float = 40.0
    max_links: int = 4096
    max_queued_cells: int = 256
    max_seen_ephemerals: int = 1_000_000  # the initiation replay cache (§4.5): full means fail closed


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

    def __repr__(self) -> str:
        return f"Link({self.link_id}, {self.kind.value}, {self.state.value})"


CellHandOff = Callable[[Link, bytes, float], None]  # (link, cell, now): a cell its owner passes on, e.g. NAT control
