"""What a datagram on the link socket is, by its first byte (docs/PROTOCOL.md §2.4): a table, one lookup.

    0x00 .. 0x3f   STUN, if it is STUN at all (top two bits zero and the magic cookie, ``stun.is_stun``)
    0x51 .. 0x54   link packets: INIT_CLIENT, INIT_RELAY, RESPONSE, TRANSPORT (crypto/params.py)
    0x55 .. 0x58   NAT frames: INTRO_REQUEST, INTRO_ANSWER, PUNCH, RELAYED (core/wire/nat_frames.py)
    anything else  the link layer: a COOKIE_REPLY (0x59), or an unknown type it counts and drops

The table maps every byte value to the handler of its kind, so a link packet costs one index and goes
straight to the node, as the data path needs.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping

from shallot.core.link import Address
from shallot.core.wire import nat_frames as nm
from shallot.core.wire import stun
from shallot.crypto.params import MSG_INIT_CLIENT, MSG_TRANSPORT

Handler = Callable[[bytes, Address, float, float], None]  # (datagram, source, now, wall)


class Kind(enum.Enum):
    LINK = "link"
    STUN = "stun"
    INTRO_REQUEST = "intro-request"
    INTRO_ANSWER = "intro-answer"
    PUNCH = "punch"
    RELAYED = "relayed"


LINK_TYPES = range(MSG_INIT_CLIENT, MSG_TRANSPORT + 1)
NAT_FRAMES = {nm.MSG_INTRO_REQUEST: Kind.INTRO_REQUEST, nm.MSG_INTRO_ANSWER: Kind.INTRO_ANSWER,
              nm.MSG_PUNCH: Kind.PUNCH, nm.MSG_RELAYED: Kind.RELAYED}


def kind_of(first: int) -> Kind:
    """The kind of a datagram whose first byte is ``first`` (an empty datagram counts as 0)."""
    if first in LINK_TYPES:
        return Kind.LINK
    if first < stun.FIRST_BYTE_LIMIT:
        return Kind.STUN
    return NAT_FRAMES.get(first, Kind.LINK)


def route_table(handlers: Mapping[Kind, Handler]) -> list[Handler]:
    """One handler per first byte.  A datagram in the STUN range that is not STUN goes to the link layer."""
    to_link = handlers[Kind.LINK]
    to_stun = handlers[Kind.STUN]

    def stun_or_link(data: bytes, addr: Address, now: float, wall: float) -> None:
        (to_stun if stun.is_stun(data) else to_link)(data, addr, now, wall)

    return [stun_or_link if kind_of(first) is Kind.STUN else handlers[kind_of(first)] for first in range(256)]
