"""NAT traversal (docs/NAT.md, docs/PROTOCOL.md §13), sans-I/O, one module per role:

    demux.py        what a datagram on the link socket is, by its first byte (one table lookup)
    stack.py        NodeStack: the demux in front of a node and its NAT part; what the socket adapter drives
    part.py         NatPart: the roles around our own NAT's state, counters, events, status
    own.py          OwnNat: what we know of our own NAT (type, public address) and the probe that finds out
    stun_server.py  StunServer: Binding answers and CHANGE-REQUEST forwarding, bounded (public relays)
    introducer.py   Introducer: registrations, introductions, relay sessions (public relays)
    registrant.py   Registrant: a relay behind a NAT: registration links, introduced peers, rebinding check
    dialer.py       NatDialer: ask, punch, fall back, upgrade (a DialState table); LinkMethod
    virtual.py      the virtual address of a relayed link, RelayedPaths, the step off the relay
    classify.py     NatProbe (RFC 5780 tests from two relays), NatType, plan_link
    events.py       NatClassified, PublicAddressChanged, LinkUpgraded
    limits.py       timers and limits (PROTOCOL §13.5)
"""

from shallot.core.nat.dialer import LinkMethod, NatDialer
from shallot.core.nat.events import LinkUpgraded, NatClassified, NatEvent, PublicAddressChanged
from shallot.core.nat.part import NatPart
from shallot.core.nat.stack import NodeStack

__all__ = ["LinkMethod", "LinkUpgraded", "NatClassified", "NatDialer", "NatEvent", "NatPart", "NodeStack",
           "PublicAddressChanged"]
