"""Thin asyncio adapter: one UDP socket driving one sans-I/O node.  No protocol logic lives here.

The node must offer ``receive_datagram(data, addr, now, wall)``, ``handle_timer(now, wall)``,
``outbox`` (a list of (datagram, address) it appends to) and ``timer()``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

SOCKET_BUFFER_BYTES = 4 * 1024 * 1024


class SansIoNode(Protocol):
    outbox: list[tuple[bytes, tuple[str, int]]]

    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float, wall: float) -> None: ...

    def handle_timer(self, now: float, wall: float) -> None: ...

    def timer(self) -> float | None: ...


class NodeEndpoint(asyncio.DatagramProtocol):
    """Feed datagrams in, flush the outbox, keep exactly one timer armed, call ``after`` for events."""

    def __init__(self, node: Any, *, after: Callable[[], None] | None = None) -> None:
        self.node = node
        self.after = after
        self.transport: asyncio.DatagramTransport | None = None
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at: float | None = None
        self.send_errors = 0
        self.datagrams_in = 0
        self.datagrams_out = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
                except OSError:
                    pass
        self.flush()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        node = self.node
        self.datagrams_in += 1
        node.receive_datagram(data, addr[:2], time.monotonic(), time.time())
        if node.outbox:
            self.flush()
        if self.after is not None:
            self.after()
        deadline = node.timer()
        if deadline is not None and (self._armed_at is None or deadline < self._armed_at):
            self._arm(deadline)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for UDP (port unreachable and the like): the link layer's timers handle the loss
        self.send_errors += 1

    def flush(self) -> None:
        transport = self.transport
        outbox = self.node.outbox
        if transport is None or not outbox:
            return
        sendto = transport.sendto
        self.datagrams_out += len(outbox)
        for data, addr in outbox:
            try:
                sendto(data, addr)
            except OSError:
                self.send_errors += 1
        outbox.clear()

    def poke(self) -> None:
        """Call after issuing a command to the node from outside a datagram callback."""
        self.flush()
        if self.after is not None:
            self.after()
        self._arm(self.node.timer())

    def _arm(self, deadline: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = deadline
        # node time is time.monotonic() (uvloop's loop.time() only has millisecond resolution)
        self._timer = None if deadline is None else self._loop.call_later(max(0.0, deadline - time.monotonic()),
                                                                          self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed_at = None
        self.node.handle_timer(time.monotonic(), time.time())
        self.poke()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()


async def open_endpoint(node: Any, local: tuple[str, int], *,
                        after: Callable[[], None] | None = None) -> NodeEndpoint:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
    _, protocol = await loop.create_datagram_endpoint(lambda: NodeEndpoint(node, after=after), local_addr=local,
                                                      family=family)
    ep = cast(NodeEndpoint, protocol)
    ep.poke()
    return ep


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where available (the data plane's loop), else the stock loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(coro: Any, *, use_uvloop: bool = True) -> Any:
    with asyncio.Runner(loop_factory=new_event_loop if use_uvloop else None) as runner:
        return runner.run(coro)
