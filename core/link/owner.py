"""The machine shape of every node that owns a LinkLayer (the client's ClientNode, the relay's RelayNode):
datagrams and timer ticks go to the link layer first, its events come back through ``_drain_link_events``,
and its output is the link layer's.  ``on_cell`` carries no time, so the owner keeps the time of the
input being handled (``_now``, ``_wall``) for the cells the link layer hands it."""

from __future__ import annotations

from shallot.core.link.layer import LinkLayer
from shallot.crypto.codec import Address


class LinkOwner:
    link: LinkLayer
    _now: float
    _wall: float

    @property
    def outbox(self) -> list[tuple[bytes, Address]]:
        return self.link.outbox

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        return self.link.datagrams_to_send()

    def timer(self) -> float | None:
        return self.link.timer()

    def receive_datagram(self, data: bytes, addr: Address, now: float, wall: float) -> None:
        self._now, self._wall = now, wall
        self.link.receive_datagram(data, addr, now, wall)
        if self.link.events:
            self._drain_link_events()

    def _tick_link(self, now: float, wall: float) -> None:
        """The link layer's part of ``handle_timer``: its housekeeping, then its events."""
        self._now, self._wall = now, wall
        self.link.handle_timer(now, wall)
        self._drain_link_events()

    def _drain_link_events(self) -> None:
        raise NotImplementedError
