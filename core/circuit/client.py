"""Sans-I/O client side of circuits: build in one round trip, send and receive datagrams, tear down.

``ClientNode`` owns the client's LinkLayer (anonymous Noise NK links to guards) and its circuits.
Inputs: ``receive_datagram``, ``handle_timer``, commands ``build``, ``send``, ``close``.
Outputs: ``datagrams_to_send()``, ``events`` (CircuitBuilt, CircuitFailed, CircuitClosed, DatagramReceived),
``timer()``.
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Protocol

from shallot.core.link import (
    CellHandOff,
    Link,
    LinkConfig,
    LinkDown,
    LinkLayer,
    LinkState,
    LinkUp,
    new_circuit_id,
)
from shallot.core.link.owner import LinkOwner
from shallot.core.wire.cells import (
    CMD_CREATE,
    CMD_CREATED,
    CMD_DESTROY,
    CMD_RELAY,
    MSG_CONFIG,
    MSG_DATA,
    MSG_DROP,
    MSG_END,
    DestroyReason,
    created_slots,
    decode_message,
    destroy_reason,
    encode_cell,
    encode_message,
)
from shallot.core.wire.nat_frames import is_nat_cell
from shallot.crypto import circuit_handshake as ch
from shallot.crypto.codec import DecodeError
from shallot.crypto.descriptor import Descriptor
from shallot.crypto.onion import ClientLayers, IntegrityError
from shallot.crypto.params import CELL_HEADER_LEN, CREATE_TIMEOUT_S
from shallot.crypto.primitives import AuthFailure, KeyPool, RandomBytes, x25519_keypair

_RELAY = bytes((CMD_RELAY,))


class CircuitState(enum.Enum):
    WAITING_LINK = "waiting-link"
    BUILDING = "building"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(eq=False)
class ClientCircuit:
    circuit_id: int  # local handle, never on the wire
    path: tuple[Descriptor, ...]
    service: int
    started_at: float
    state: CircuitState = CircuitState.WAITING_LINK
    link: Link | None = None
    cid: int = 0
    prefix: bytes = b""
    pending: list[ch.PendingHop] = field(default_factory=list)
    layers: ClientLayers | None = None
    create_sent_at: float = 0.0
    built_at: float = 0.0
    sent: int = 0
    received: int = 0
    close_reason: str = ""

    @property
    def build_s(self) -> float:
        return self.built_at - self.create_sent_at


@dataclass(frozen=True)
class CircuitBuilt:
    circuit: ClientCircuit


@dataclass(frozen=True)
class CircuitFailed:
    circuit: ClientCircuit
    reason: str


@dataclass(frozen=True)
class CircuitClosed:
    circuit: ClientCircuit
    reason: str


@dataclass(frozen=True)
class DatagramReceived:
    circuit: ClientCircuit
    data: bytes


@dataclass(frozen=True)
class ConfigReceived:
    """The exit's answer on a SERVICE_IP circuit: our tunnel address, resolver and MTU (raw payload,
    decoded by shallot.exit.ipservice.decode_config)."""

    circuit: ClientCircuit
    data: bytes


ClientEvent = CircuitBuilt | CircuitFailed | CircuitClosed | DatagramReceived | ConfigReceived

_DESTROY_TEXT = {
    DestroyReason.REQUESTED: "closed by the exit",
    DestroyReason.PROTOCOL: "a relay reported a protocol error",
    DestroyReason.INTERNAL: "a relay had an internal error",
    DestroyReason.RESOURCE_LIMIT: "a relay is overloaded (circuit limit or rate limit)",
    DestroyReason.CONNECT_FAILED: "a relay could not reach the next hop",
    DestroyReason.LINK_DOWN: "a link of the circuit went down",
    DestroyReason.INTEGRITY: "the guard saw an integrity check fail (cells were tampered with)",
    DestroyReason.TIMEOUT: "the circuit timed out",
    DestroyReason.HOP_REJECTED: "a relay rejected its build record (stale directory or clock skew)",
    DestroyReason.DESTROYED: "a relay further along the circuit ended it",
    DestroyReason.UNKNOWN: "destroyed for an unknown reason",
}


def destroy_text(reason: DestroyReason) -> str:
    return _DESTROY_TEXT[reason]


class Dialer(Protocol):
    """How the node reaches a guard: ``DirectDialer``, or NAT traversal (core.nat.NatDialer) that goes through
    the introducers of a guard behind a NAT.  Given to the node when it is built."""

    def dial(self, desc: Descriptor, now: float, wall: float) -> Link: ...


@dataclass
class DirectDialer:
    link: LinkLayer

    def dial(self, desc: Descriptor, now: float, wall: float) -> Link:
        return self.link.open_link(desc.address, desc.link_pub, now, wall)


def client_link_layer(rng: RandomBytes) -> LinkLayer:
    """A client's link layer: anonymous (Noise NK) links to guards."""
    priv, pub = x25519_keypair(rng)  # unused static: clients are anonymous
    return LinkLayer(LinkConfig(link_private=priv, link_pub=pub), rng=rng)


class ClientNode(LinkOwner):
    def __init__(self, *, rng: RandomBytes, link: LinkLayer | None = None, dialer: Dialer | None = None,
                 nat_cells: CellHandOff | None = None) -> None:
        """``link``: from ``client_link_layer`` when the caller builds more on it (a NAT part, core/nat/stack.py);
        ``dialer``: how to reach guards (default: directly); ``nat_cells``: who takes NAT control cells
        (circuit id 0, ``nat_frames.is_nat_cell``); without it they are dropped as of no circuit."""
        self._rng = rng
        self.link = link if link is not None else client_link_layer(rng)
        self.link.on_cell = self._on_cell
        self.dialer: Dialer = dialer if dialer is not None else DirectDialer(self.link)
        self._nat_cells = nat_cells
        self.keys = KeyPool(rng, size=6)  # two builds' worth of ephemerals, made while idle
        self.events: deque[ClientEvent] = deque()
        self.counters: Counter[str] = Counter()
        self.circuits: dict[int, ClientCircuit] = {}
        self._by_wire: dict[int, ClientCircuit] = {}
        self._guard_links: dict[bytes, Link] = {}
        self._next_id = 1
        self._now = 0.0
        self._wall = 0.0

    # ------------------------------------------------------------------ commands
    def build(self, path: list[Descriptor], now: float, wall: float, *,
              service: int = ch.SERVICE_ECHO) -> ClientCircuit:
        if len(path) < 1:
            raise ValueError("empty path")
        self._now, self._wall = now, wall
        circ = ClientCircuit(self._next_id, tuple(path), service, started_at=now)
        self._next_id += 1
        self.circuits[circ.circuit_id] = circ
        guard = path[0]
        link = self._guard_links.get(guard.relay_id)
        if link is None or link.state is LinkState.CLOSED:
            link = self.dialer.dial(guard, now, wall)
            self._guard_links[guard.relay_id] = link
        circ.link = link
        link.users += 1
        if link.state is LinkState.UP:
            self._send_create(circ)
        return circ

    def guard_link(self, relay_id: bytes) -> Link | None:
        """The link to this guard, if one was dialed (what it last heard tells whether the guard is alive)."""
        return self._guard_links.get(relay_id)

    def send(self, circ: ClientCircuit, data: bytes, now: float) -> None:
        if circ.state is not CircuitState.OPEN:
            raise ValueError("circuit is not open")
        assert circ.layers is not None and circ.link is not None
        region = circ.layers.wrap(encode_message(MSG_DATA, data))
        circ.sent += 1
        self.link.send_cell(circ.link, circ.prefix + region, now)

    def request_config(self, circ: ClientCircuit, now: float) -> None:
        """Ask the exit of a SERVICE_IP circuit for our tunnel address (answered with ConfigReceived)."""
        if circ.state is not CircuitState.OPEN:
            raise ValueError("circuit is not open")
        assert circ.layers is not None and circ.link is not None
        region = circ.layers.wrap(encode_message(MSG_CONFIG))
        self.link.send_cell(circ.link, circ.prefix + region, now)

    def close(self, circ: ClientCircuit, now: float, reason: str = "closed by you",
              code: DestroyReason = DestroyReason.REQUESTED) -> None:
        if circ.state is CircuitState.CLOSED:
            return
        if circ.link is not None and circ.cid:
            self.link.send_cell(circ.link, encode_cell(circ.cid, CMD_DESTROY, bytes((code,))), now)
        self._finish(circ, reason, failed=circ.state is not CircuitState.OPEN)

    # ------------------------------------------------------------------ inputs
    def handle_timer(self, now: float, wall: float) -> None:
        self._tick_link(now, wall)
        self.keys.refill()
        for circ in list(self.circuits.values()):
            if circ.state in (CircuitState.WAITING_LINK, CircuitState.BUILDING) and \
                    now - circ.started_at > CREATE_TIMEOUT_S:
                self.close(circ, now, reason="circuit build timed out", code=DestroyReason.TIMEOUT)

    # ------------------------------------------------------------------ internals
    def _send_create(self, circ: ClientCircuit) -> None:
        assert circ.link is not None
        targets: list[ch.HopTarget] = []
        for i, hop in enumerate(circ.path):
            if i + 1 < len(circ.path):
                nxt = circ.path[i + 1]
                instruction: ch.Instruction = ch.ExtendTo(nxt.address[0], nxt.address[1], nxt.link_pub,
                                                          nxt.relay_id)
            else:
                instruction = ch.Terminate(circ.service)
            targets.append(ch.HopTarget(hop.onion_pub, instruction, ch.HopIdentity(hop.relay_id, hop.link_pub)))
        # the hour, not the minute: the only clock reading a client puts on the wire (docs/PROTOCOL.md §5.3)
        circ.pending, slots = ch.client_create(targets, hour=ch.record_hour(self._wall), rng=self._rng,
                                               ephemerals=[self.keys.take() for _ in targets])
        link_id = circ.link.link_id
        cid = new_circuit_id(circ.link, self._rng, lambda c: ((link_id << 32) | c) in self._by_wire)
        key = (link_id << 32) | cid
        circ.cid = cid
        circ.prefix = cid.to_bytes(4, "big") + _RELAY
        self._by_wire[key] = circ
        circ.state = CircuitState.BUILDING
        circ.create_sent_at = self._now
        self.counters["create_sent"] += 1
        self.link.send_cell(circ.link, encode_cell(cid, CMD_CREATE, slots), self._now)

    def _on_cell(self, link: Link, cell: bytes) -> None:
        circ = self._by_wire.get((link.link_id << 32) | int.from_bytes(cell[:4], "big"))
        if circ is None:
            if self._nat_cells is not None and is_nat_cell(cell):
                self._nat_cells(link, cell, self._now)
                return
            self.counters["drop_unknown_circuit"] += 1
            return
        cmd = cell[4]
        if cmd == CMD_RELAY:
            if circ.state is not CircuitState.OPEN:
                self.counters["drop_relay_not_open"] += 1
                return
            try:
                inner = circ.layers.unwrap(memoryview(cell)[CELL_HEADER_LEN:])  # type: ignore[union-attr]
                msg_type, data = decode_message(inner)
            except (IntegrityError, DecodeError):
                self.counters["circuit_integrity_failure"] += 1
                self._tear_down(circ, DestroyReason.INTEGRITY,
                                "integrity check failed: a relay tampered with the circuit")
                return
            if msg_type == MSG_DATA:
                circ.received += 1
                self.events.append(DatagramReceived(circ, data))
            elif msg_type == MSG_END:
                self._tear_down(circ, DestroyReason.REQUESTED, "closed by the exit")
            elif msg_type == MSG_DROP:
                self.counters["e2e_padding_received"] += 1
            elif msg_type == MSG_CONFIG:
                self.events.append(ConfigReceived(circ, data))
        elif cmd == CMD_CREATED:
            if circ.state is not CircuitState.BUILDING:
                self.counters["drop_created_unexpected"] += 1
                return
            try:
                hop_keys = ch.client_created(circ.pending, created_slots(cell[CELL_HEADER_LEN:]))
            except (AuthFailure, DecodeError):
                self.counters["created_auth_failure"] += 1
                self._tear_down(circ, DestroyReason.PROTOCOL, "the circuit reply did not authenticate")
                return
            circ.pending = []
            circ.layers = ClientLayers(hop_keys)
            circ.state = CircuitState.OPEN
            circ.built_at = self._now
            self.counters["circuit_built"] += 1
            self.events.append(CircuitBuilt(circ))
        elif cmd == CMD_DESTROY:
            reason = destroy_reason(cell[CELL_HEADER_LEN:])
            self.counters[f"destroy_received_{reason.name.lower()}"] += 1
            self._finish(circ, destroy_text(reason), failed=circ.state is not CircuitState.OPEN)
        else:
            self.counters["drop_unexpected_command"] += 1
            self._tear_down(circ, DestroyReason.PROTOCOL, "a relay sent an unexpected cell")

    def _tear_down(self, circ: ClientCircuit, reason: DestroyReason, text: str) -> None:
        if circ.link is not None and circ.cid:
            self.link.send_cell(circ.link, encode_cell(circ.cid, CMD_DESTROY, bytes((reason,))), self._now)
        self._finish(circ, text, failed=circ.state is not CircuitState.OPEN)

    def _finish(self, circ: ClientCircuit, reason: str, *, failed: bool) -> None:
        if circ.state is CircuitState.CLOSED:
            return
        circ.state = CircuitState.CLOSED
        circ.close_reason = reason
        self.circuits.pop(circ.circuit_id, None)
        if circ.link is not None:
            self._by_wire.pop((circ.link.link_id << 32) | circ.cid, None)
            circ.link.users -= 1
        self.events.append(CircuitFailed(circ, reason) if failed else CircuitClosed(circ, reason))

    def _drain_link_events(self) -> None:
        while self.link.events:
            event = self.link.events.popleft()
            if isinstance(event, LinkUp):
                for circ in list(self.circuits.values()):
                    if circ.link is event.link and circ.state is CircuitState.WAITING_LINK:
                        self._send_create(circ)
            elif isinstance(event, LinkDown):
                for circ in list(self.circuits.values()):
                    if circ.link is event.link:
                        text = ("could not reach the guard: " + event.reason
                                if circ.state is CircuitState.WAITING_LINK else "link to the guard went down")
                        self._finish(circ, text, failed=circ.state is not CircuitState.OPEN)
