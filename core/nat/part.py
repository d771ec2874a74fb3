"""The NAT part of a node stack (docs/NAT.md): what we know of our own NAT (own.py) and the roles that act on it.

It works on the node's link layer and needs nothing else of the node, so it is built first and handed to
the node: ``dialer`` (a client node's ``Dialer``) and ``control_cell`` (the node's hand-off for NAT
control cells).  ``NodeStack`` (stack.py) then puts both behind the socket's demux.  Roles:

* ``stun_server`` and ``introducer`` (public relays, ``serve=True``): STUN answers, registrations,
  introductions and relay sessions;
* ``registrant`` (a relay behind a NAT, after ``register``): registration links, introduced peers,
  the rebinding check;
* ``dialer`` (anyone): links to relays behind NATs through their introducers.

What happens that the owner acts on is in ``events`` (``NatClassified``, ``PublicAddressChanged``,
``LinkUpgraded``).  Every drop is counted under the names of PROTOCOL §13.6.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable

from shallot.core.link import Address, Link, LinkLayer, PeerKind
from shallot.core.nat.classify import NatProbe, NatType
from shallot.core.nat.demux import Handler, Kind
from shallot.core.nat.dialer import LinkMethod, NatDialer
from shallot.core.nat.events import NatEvent
from shallot.core.nat.introducer import Introducer
from shallot.core.nat.own import OwnNat
from shallot.core.nat.registrant import Registrant
from shallot.core.nat.stun_server import StunServer
from shallot.core.nat.virtual import RelayedPaths, is_virtual
from shallot.core.wire import nat_frames as nm
from shallot.core.wire import stun
from shallot.crypto.codec import DecodeError

STATUS_LINKS = 200  # links listed in the status (docs/PROTOCOL.md §9.4); links_total counts them all


class NatPart:
    def __init__(self, link: LinkLayer, *, rng: Callable[[int], bytes], serve: bool = False,
                 own_host: str = "0.0.0.0", has_alt_port: bool = False) -> None:
        self.link = link
        self._rng = rng
        self.counters: Counter[str] = Counter()
        self.events: deque[NatEvent] = deque()
        self.own = OwnNat(send=self._send, counters=self.counters, emit=self.events.append)
        self.paths = RelayedPaths()  # relay sessions we are an end of
        self._serve = serve
        self.stun_server = StunServer(send=self._send, counters=self.counters, own_host=own_host,
                                      has_alt_port=has_alt_port) if serve else None
        self.introducer = Introducer(link, rng=rng, send=self._send, counters=self.counters) if serve else None
        self.registrant: Registrant | None = None
        self.dialer = NatDialer(link, rng=rng, send=self._send, counters=self.counters, paths=self.paths,
                                mine=self.own.known, emit=self.events.append)

    @property
    def nat_type(self) -> NatType | None:
        return self.own.nat_type

    @property
    def public(self) -> Address | None:
        return self.own.public

    def _send(self, data: bytes, addr: Address) -> None:
        self.link.outbox.append((data, addr))  # the socket's one queue, in order with the link's own packets

    # ------------------------------------------------------------------ commands
    def start_probe(self, probe: NatProbe, now: float) -> None:
        """Classify our NAT (classify.py); ends with ``NatClassified``."""
        self.own.start_probe(probe, now)

    def register(self, introducers: list[tuple[bytes, Address, bytes]], now: float, wall: float) -> None:
        """Keep a registration with each introducer (relay id, address, link key); relays behind a NAT only."""
        if self.registrant is None:
            self.registrant = Registrant(self.link, rng=self._rng, send=self._send, counters=self.counters,
                                         paths=self.paths, mine=self.own.known, check_rebinding=not self._serve)
        self.registrant.register(introducers, now, wall)

    def alt_datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """STUN answers that leave from the alternate port, handed over."""
        return self.stun_server.alt_datagrams_to_send() if self.stun_server is not None else []

    # ------------------------------------------------------------------ queries
    def link_method(self, link: Link) -> LinkMethod:
        if is_virtual(link.addr):
            return LinkMethod.RELAYED
        if self.dialer.dialed(link) or link.addr in self.dialer.punched \
                or (self.registrant is not None and link.addr in self.registrant.punched):
            return LinkMethod.PUNCHED
        return LinkMethod.DIRECT

    def status(self) -> dict[str, object]:
        """The ``nat`` object of a relay's or engine's status (docs/PROTOCOL.md §9.4)."""
        # relay links first, and at most STATUS_LINKS: a full link table (4096) would not fit in one control line
        ordered = sorted(self.link.links.values(), key=lambda link: link.kind is not PeerKind.RELAY)
        links = [{"peer": link.peer_relay_id.hex() if link.peer_relay_id else "client", "kind": link.kind.value,
                  "state": link.state.value, "address": list(link.addr), "method": self.link_method(link).value}
                 for link in ordered[:STATUS_LINKS]]
        intro = self.introducer
        return {"public": list(self.public) if self.public else None,
                "nat": self.nat_type.as_json() if self.nat_type else None,
                "registered_with": self.registrant.registered_with() if self.registrant is not None else [],
                "registrations": len(intro.registrations) if intro is not None else 0,
                "relay_sessions": len(intro.sessions) if intro is not None else 0,
                "links": links, "links_total": len(self.link.links), "counters": dict(self.counters)}

    # ------------------------------------------------------------------ inputs (from the demux and the node)
    def handlers(self) -> dict[Kind, Handler]:
        """What the demux hands to this part (the stack adds LINK and RELAYED, which also need the node)."""
        return {Kind.STUN: self.on_stun,
                Kind.INTRO_REQUEST: self.introducer.on_intro_request if self.introducer is not None
                else self._intro_not_served,
                Kind.INTRO_ANSWER: self.dialer.on_intro_answer,
                Kind.PUNCH: self.on_punch}

    def control_cell(self, link: Link, cell: bytes, now: float) -> None:
        """A NAT control cell (``nat_frames.is_nat_cell``) the node received on ``link``."""
        cmd = cell[4]
        if cmd == nm.CMD_NAT_REGISTER and self.introducer is not None and link.kind is PeerKind.RELAY:
            self.introducer.on_register(link)
        elif cmd == nm.CMD_NAT_INTRODUCE and link.kind is PeerKind.RELAY and self.registrant is not None \
                and self.registrant.is_registration(link):
            self.registrant.on_introduce(cell, link, now)
        else:
            self.counters["nat_drop_unexpected_cell"] += 1

    def on_stun(self, data: bytes, addr: Address, now: float, wall: float) -> None:
        self._on_stun(data, addr, now, alt=False)

    def receive_alt(self, data: bytes, addr: Address, now: float) -> None:
        """A datagram on the alternate STUN port: only Binding requests are answered (from that port)."""
        if stun.is_stun(data):
            self._on_stun(data, addr, now, alt=True)
        else:
            self.counters["nat_drop_alt_not_stun"] += 1

    def on_punch(self, data: bytes, addr: Address, now: float, wall: float) -> None:
        try:
            kind, token = nm.decode_punch(data)
        except DecodeError:
            self.counters["nat_drop_bad_punch"] += 1
            return
        if self.registrant is not None and self.registrant.on_punch(kind, token, addr, now):
            return
        self.dialer.on_punch(token, addr, now, wall)

    def on_relayed(self, data: bytes, addr: Address, now: float) -> bytes | None:
        """A RELAYED datagram.  Returns its session if we are an end of it (the stack hands the inner link
        packet to the node under the session's virtual address); otherwise forwards it or drops it."""
        try:
            session = nm.relayed_session(data)
        except DecodeError:
            self.counters["nat_drop_bad_relayed"] += 1
            return None
        if self.paths.server_for(session) == addr:
            return session
        if self.introducer is None:
            self.counters["nat_drop_relayed_unknown_session"] += 1
            return None
        self.introducer.forward(data, session, addr, now)
        return None

    def relayed_delivered(self, session: bytes) -> None:
        if self.registrant is not None:
            self.registrant.relayed_arrived(session)

    def _intro_not_served(self, data: bytes, addr: Address, now: float, wall: float) -> None:
        self.counters["nat_drop_intro_not_served"] += 1

    def _on_stun(self, data: bytes, addr: Address, now: float, *, alt: bool) -> None:
        try:
            msg = stun.decode(data)
        except DecodeError:
            self.counters["nat_drop_bad_stun"] += 1
            return
        if msg.msg_type == stun.BINDING_SUCCESS:
            self._on_binding_response(msg, addr, now)
        elif msg.msg_type == stun.BINDING_REQUEST and self.stun_server is not None:
            self.stun_server.answer_binding(msg, data, addr, now, alt=alt)
        else:
            self.counters["nat_drop_stun_unexpected"] += 1

    def _on_binding_response(self, msg: stun.StunMessage, addr: Address, now: float) -> None:
        if self.own.on_probe_answer(msg, addr, now):
            return
        if self.registrant is not None and self.registrant.owns_rebind(msg.txid):
            try:
                mapped = stun.mapped_address(msg)
            except DecodeError:
                return
            self.own.mapped_address_seen(mapped)
            return
        self.counters["nat_drop_stun_unexpected"] += 1

    # ------------------------------------------------------------------ time
    def handle_timer(self, now: float, wall: float) -> None:
        self.own.handle_timer(now)
        self.dialer.handle_timer(now, wall)
        if self.registrant is not None:
            self.registrant.handle_timer(now, wall)
        if self.introducer is not None:
            self.introducer.expire(now)

    def timer(self) -> float | None:
        extra: list[float | None] = list(self.dialer.timers())
        if self.registrant is not None:
            extra += self.registrant.timers()
        extra.append(self.own.timer())
        return min((t for t in extra if t is not None), default=None)
