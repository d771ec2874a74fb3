"""The link layer (docs/PROTOCOL.md §4), sans-I/O: authenticated, encrypted UDP sessions between
neighbours.  ``LinkLayer`` owns every link of a node; the rest of the package is what it is made of.

    state.py        Link, LinkState, PeerKind, LinkConfig, LinkError, CellHandOff
    session.py      Session: transport keys, sealing, the replay window
    events.py       LinkUp, LinkDown
    circuit_ids.py  which half of the circuit-id space each end of a link uses
    limits.py       EphemeralCache (the initiation replay cache that ages out), address_bytes (what a cookie binds)
    layer.py        LinkLayer: handshakes, cookies, half-open handshakes, per-source quotas, rekey, keepalive,
                    roaming, every drop counted
    owner.py        LinkOwner: the machine shape of the nodes that own a LinkLayer (client, relay)
"""

from shallot.core.link.circuit_ids import INITIATOR_ID_BIT, new_circuit_id, peer_may_create
from shallot.core.link.events import LinkDown, LinkUp
from shallot.core.link.layer import PADDING_CELL, LinkLayer
from shallot.core.link.owner import LinkOwner
from shallot.core.link.session import Session
from shallot.core.link.state import CellHandOff, Link, LinkConfig, LinkError, LinkState, PeerKind
from shallot.crypto.codec import Address

__all__ = ["INITIATOR_ID_BIT", "PADDING_CELL", "Address", "CellHandOff", "Link", "LinkConfig", "LinkDown", "LinkError",
           "LinkLayer", "LinkOwner", "LinkState", "LinkUp", "PeerKind", "Session", "new_circuit_id", "peer_may_create"]
