"""Relayed links: their virtual address, the relay-server behind it, and the step off it (PROTOCOL §13.4).

A link through a relay-server has the address ``("via-<session hex>", 0)``.  Port 0 is never a real
destination, so the port alone tells a virtual address from a real one.  The link layer treats it like
any address: it queues datagrams for it, and it moves the link away from it the moment an authenticated
packet comes from a real address (roaming), which is how a relayed link upgrades to a direct path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from shallot.core.link import PADDING_CELL, Address, Link
from shallot.core.nat.limits import MAX_PATHS
from shallot.core.wire.nat_frames import MSG_RELAYED

VIRTUAL_PREFIX = "via-"
_RELAYED = bytes((MSG_RELAYED,))

Send = Callable[[bytes, Address], None]


def virtual_address(session: bytes) -> Address:
    return (VIRTUAL_PREFIX + session.hex(), 0)


def is_virtual(addr: Address) -> bool:
    return addr[1] == 0


def session_of(addr: Address) -> bytes:
    return bytes.fromhex(addr[0][len(VIRTUAL_PREFIX):])


class RelayedPaths:
    """The relay sessions this node is an end of, and the relay-server that carries each."""

    def __init__(self, limit: int = MAX_PATHS) -> None:
        self.limit = limit
        # least recently used first: every introduction adds one (spoofed INTRO_REQUESTs too, rate limited
        # per registered relay at the introducer), a live relayed link touches its own at every datagram
        self._servers: dict[bytes, Address] = {}

    def __bool__(self) -> bool:
        return bool(self._servers)

    def __len__(self) -> int:
        return len(self._servers)

    def add(self, session: bytes, server: Address) -> None:
        self._servers.pop(session, None)
        self._servers[session] = server
        if len(self._servers) > self.limit:
            del self._servers[next(iter(self._servers))]

    def server_for(self, session: bytes) -> Address | None:
        server = self._servers.pop(session, None)
        if server is not None:
            self._servers[session] = server  # used: most recent
        return server

    def frame(self, datagrams: list[tuple[bytes, Address]]) -> None:
        """Turn the datagrams for a virtual address into RELAYED datagrams to its relay-server, in place (the
        list is the caller's, just taken from the queue); a session we do not know stays as it is."""
        for i, (data, addr) in enumerate(datagrams):
            if addr[1] == 0:  # is_virtual, inlined: this runs for every datagram while a relayed link exists
                session = session_of(addr)
                server = self._servers.pop(session, None)
                if server is not None:
                    self._servers[session] = server  # used: most recent
                    datagrams[i] = (_RELAYED + session + data, server)


def probe_direct(link: Link, addr: Address, now: float, send: Send, counters: Counter[str]) -> None:
    """One authenticated keepalive from a relayed link straight to ``addr`` (where a PUNCH came from).  The
    peer's link layer moves the link to where it came from (roaming, §4.8); both ends do this, so the link
    upgrades whichever end gets through first."""
    assert link.session is not None
    counters["nat_upgrade_probe"] += 1
    link.last_send = now
    send(link.session.seal(PADDING_CELL), addr)
