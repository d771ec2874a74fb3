"""Asyncio client around ClientNode: build circuits, send datagrams, await echoes and events.

``sink(circ)`` hands out one circuit as a ``CircuitPipe`` (send a packet, flush the batch): what the VPN
tunnel writes to (core/vpn/tunnel.py ``CircuitSink``), so that it never reaches into the node or the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shallot.core.circuit import (
    CircuitBuilt,
    CircuitClosed,
    CircuitFailed,
    ClientCircuit,
    ClientNode,
    DatagramReceived,
    client_link_layer,
)
from shallot.core.errors import ShallotError
from shallot.core.io.udp import NodeEndpoint, open_endpoint
from shallot.core.nat import NatClassified, NatPart, NodeStack
from shallot.core.nat.classify import ALT_PORT_OFFSET, NatProbe, NatType
from shallot.crypto.circuit_handshake import SERVICE_ECHO
from shallot.crypto.descriptor import Descriptor


class CircuitClient:
    def __init__(self) -> None:
        # the node stack, built once (core/nat/stack.py): NAT traversal reaches guards behind NATs through
        # their introducers, so the node dials through the NAT part and hands it NAT control cells
        rng = secrets.token_bytes
        link = client_link_layer(rng)
        self.nat = NatPart(link, rng=rng)
        self.node = ClientNode(rng=rng, link=link, dialer=self.nat.dialer, nat_cells=self.nat.control_cell)
        self.stack = NodeStack(self.node, self.nat)
        self.endpoint: NodeEndpoint | None = None
        self._classified: asyncio.Future[NatType] | None = None
        self._waiters: dict[int, asyncio.Future[ClientCircuit]] = {}
        self.inbox: dict[int, asyncio.Queue[bytes]] = {}
        self.on_event: Callable[[Any], None] | None = None
        # set to take every received datagram directly (the VPN's TUN pump) instead of the inboxes
        self.on_datagram: Callable[[ClientCircuit, bytes], None] | None = None
        self.build_datagrams: dict[int, tuple[int, int]] = {}  # circuit -> (sent, received) during build
        self._marks: dict[int, tuple[int, int]] = {}

    async def start(self, family_of: str = "127.0.0.1") -> None:
        local = ("::", 0) if ":" in family_of else ("0.0.0.0", 0)
        self.endpoint = await open_endpoint(self.stack, local, after=self._dispatch)

    async def classify_nat(self, relay1: tuple[str, int], relay2: tuple[str, int], *, alt_offset: int = ALT_PORT_OFFSET,
                           timeout: float = 10.0) -> NatType | None:
        """Learn our NAT's behaviour from two public relays (main and alternate STUN ports), on our link socket."""
        assert self.endpoint is not None
        alt1, alt2 = (relay1[0], relay1[1] + alt_offset), (relay2[0], relay2[1] + alt_offset)
        self._classified = asyncio.get_running_loop().create_future()  # resolved by _dispatch on NatClassified
        self.nat.start_probe(NatProbe(relay1, alt1, relay2, alt2, secrets.token_bytes), time.monotonic())
        self.endpoint.poke()
        if self.nat.nat_type is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._classified, timeout)
        return self.nat.nat_type

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()

    async def build(self, path: list[Descriptor], timeout: float = 15.0, *,
                    service: int = SERVICE_ECHO) -> ClientCircuit:
        assert self.endpoint is not None
        loop = asyncio.get_running_loop()
        circ = self.node.build(path, time.monotonic(), time.time(), service=service)
        fut: asyncio.Future[ClientCircuit] = loop.create_future()
        self._waiters[circ.circuit_id] = fut
        self.inbox[circ.circuit_id] = asyncio.Queue()
        self._mark(circ)
        self.endpoint.poke()
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self.node.close(circ, time.monotonic(), "build timed out")
            self.endpoint.poke()
            raise ShallotError(f"circuit build timed out after {timeout:.0f} s (is the guard "
                               f"{path[0].nickname} at {path[0].address[0]}:{path[0].address[1]} running?)") from None
        finally:
            self._waiters.pop(circ.circuit_id, None)

    def send(self, circ: ClientCircuit, data: bytes) -> None:
        assert self.endpoint is not None
        self.node.send(circ, data, time.monotonic())
        self.endpoint.flush()

    def request_config(self, circ: ClientCircuit) -> None:
        """Ask the exit of an IP circuit for its CONFIG (the answer comes as a ConfigReceived event)."""
        assert self.endpoint is not None
        self.node.request_config(circ, time.monotonic())
        self.endpoint.poke()

    def close_circuit(self, circ: ClientCircuit) -> None:
        assert self.endpoint is not None
        self.node.close(circ, time.monotonic())
        self.endpoint.poke()

    def sink(self, circ: ClientCircuit) -> CircuitPipe:
        return CircuitPipe(self, circ)

    def _mark(self, circ: ClientCircuit) -> None:
        # the CREATE goes out once the guard link is up; start counting there
        self._marks[circ.circuit_id] = (-1, -1)

    def _dispatch(self) -> None:
        events = self.node.events
        ep = self.endpoint
        if ep is None:  # still starting
            return
        nat_events = self.nat.events
        while nat_events:
            nat_event = nat_events.popleft()
            classified = self._classified
            if isinstance(nat_event, NatClassified) and classified is not None and not classified.done():
                classified.set_result(nat_event.nat)
        sent = ep.datagrams_out + len(self.node.outbox)  # including what is about to be flushed
        for circ in self.node.circuits.values():
            mark = self._marks.get(circ.circuit_id)
            if mark == (-1, -1) and circ.create_sent_at:
                # the CREATE was just queued (the last datagram): count from just before it
                self._marks[circ.circuit_id] = (sent - 1, ep.datagrams_in)
        while events:
            event = events.popleft()
            if isinstance(event, DatagramReceived):
                if self.on_datagram is not None:
                    self.on_datagram(event.circuit, event.data)
                    continue
                queue = self.inbox.get(event.circuit.circuit_id)
                if queue is not None and queue.qsize() < 10000:
                    queue.put_nowait(event.data)
                continue
            circ = event.circuit
            if isinstance(event, CircuitBuilt):
                mark = self._marks.pop(circ.circuit_id, (0, 0))
                self.build_datagrams[circ.circuit_id] = (sent - mark[0], ep.datagrams_in - mark[1])
                fut = self._waiters.get(circ.circuit_id)
                if fut is not None and not fut.done():
                    fut.set_result(circ)
            elif isinstance(event, CircuitFailed | CircuitClosed):
                self._marks.pop(circ.circuit_id, None)
                self.build_datagrams.pop(circ.circuit_id, None)
                self.inbox.pop(circ.circuit_id, None)  # whoever still reads it holds its own reference
                fut = self._waiters.get(circ.circuit_id)
                if fut is not None and not fut.done():
                    fut.set_exception(ShallotError(f"circuit failed: {event.reason}"))
            if self.on_event is not None:
                self.on_event(event)


@dataclass(frozen=True)
class CircuitPipe:
    """One circuit of a CircuitClient as a packet sink: ``send`` encrypts into the node's outbox (ValueError:
    too big for a cell, or the circuit closed), ``flush`` puts the batch on the wire (GSO)."""

    client: CircuitClient
    circuit: ClientCircuit

    def send(self, packet: bytes) -> None:
        self.client.node.send(self.circuit, packet, time.monotonic())

    def flush(self) -> None:
        if self.client.endpoint is not None:
            self.client.endpoint.flush()
