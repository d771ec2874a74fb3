"""Circuit ids on a link (docs/PROTOCOL.md §6.2): each end picks from its own half of the id space."""

from __future__ import annotations

from collections.abc import Callable

from shallot.core.link.state import Link
from shallot.crypto.primitives import RandomBytes

INITIATOR_ID_BIT = 0x80000000


def new_circuit_id(link: Link, rng: RandomBytes, taken: Callable[[int], bool]) -> int:
    """A fresh circuit id for a CREATE we send on ``link``.  The side that dialed the link sets the top
    bit and the other side clears it, so both ends of a shared link never pick the same id."""
    role = INITIATOR_ID_BIT if link.initiator else 0
    while True:
        cid = (int.from_bytes(rng(4), "big") & 0x7FFFFFFF) | role
        if cid and not taken(cid):
            return cid


def peer_may_create(link: Link, cid: int) -> bool:
    """True if ``cid`` is in the id space of the peer (the side that did not choose ours) and nonzero."""
    return cid != 0 and bool(cid & INITIATOR_ID_BIT) == (not link.initiator)
