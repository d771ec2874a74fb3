"""Thin asyncio adapter: one UDP socket driving one sans-I/O node.  No protocol logic lives here.

The node must offer ``receive_datagram(data, addr, now, wall)``, ``handle_timer(now, wall)``,
``datagrams_to_send()`` (the (datagram, address) pairs queued since the last call, handed over) and ``timer()``.

I/O is batched where Linux allows it: the socket reads with UDP_GRO (the kernel hands over a train of
same-size datagrams in one read) and sends runs of same-size datagrams to one peer with UDP_SEGMENT
(GSO, one syscall for up to 64 datagrams).  A node sees single datagrams either way.  Without
GRO/GSO (other kernels, other systems) the endpoint falls back to one syscall per datagram.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
MAX_GSO_SEGMENTS = 64
MAX_GSO_BYTES = 65000
READ_BUDGET = 64  # reads per readiness event before we let the loop breathe
FLUSH_EVERY = 16  # datagrams processed between flushes: batches amortise syscalls, small ones keep the
# next hop busy (a relay that held 64 cells back would turn a pipeline of processes into stop-and-wait)
RECV_BUFFER = 65536
_CMSG_SPACE = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0
log = logging.getLogger(__name__)


class SansIoNode(Protocol):
    def datagrams_to_send(self) -> list[tuple[bytes, tuple[str, int]]]: ...

    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float, wall: float) -> None: ...

    def handle_timer(self, now: float, wall: float) -> None: ...

    def timer(self) -> float | None: ...


class NodeEndpoint:
    """Feed datagrams in, flush the outbox, keep exactly one timer armed, call ``after`` for events."""

    def __init__(self, node: Any, sock: socket.socket, *, after: Callable[[], None] | None = None) -> None:
        self.node = node
        self.sock = sock
        self.after = after
        self.tap: Callable[[bytes, tuple[str, int]], None] | None = None  # tests: sees every datagram sent
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at: float | None = None
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self.gro = self.gso = False
        self.send_errors = 0
        self.recv_errors = 0
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.batched_reads = 0
        self.batched_sends = 0
        self._closed = False
        if sys.platform.startswith("linux"):
            try:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                pass
            self.gso = True  # tried on first use; disabled if the kernel refuses
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def local_address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    # ------------------------------------------------------------------ receive
    def _on_readable(self) -> None:
        node = self.node
        sock = self.sock
        buf = self._buf
        view = self._view
        now = time.monotonic()
        wall = time.time()
        pending = 0
        for _ in range(READ_BUDGET):
            try:
                if self.gro:
                    n, anc, _flags, addr = sock.recvmsg_into([buf], _CMSG_SPACE)
                else:
                    n, addr = sock.recvfrom_into(buf)
                    anc = ()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.recv_errors += 1  # e.g. ICMP errors queued on the socket
                continue
            addr = addr[:2]
            seg = 0
            for level, kind, value in anc:
                if level == SOL_UDP and kind == UDP_GRO:
                    seg = int.from_bytes(value[:4], sys.byteorder)
            if seg and n > seg:
                self.batched_reads += 1
                for off in range(0, n, seg):
                    node.receive_datagram(bytes(view[off:min(off + seg, n)]), addr, now, wall)
                    pending += 1
                    if pending >= FLUSH_EVERY:
                        self.datagrams_in += pending
                        pending = 0
                        self._after_and_flush()
            else:
                node.receive_datagram(bytes(view[:n]), addr, now, wall)
                pending += 1
                if pending >= FLUSH_EVERY:
                    self.datagrams_in += pending
                    pending = 0
                    self._after_and_flush()
        self.datagrams_in += pending
        self._after_and_flush()
        deadline = node.timer()
        if deadline is not None and (self._armed_at is None or deadline < self._armed_at):
            self._arm(deadline)

    def _after_and_flush(self) -> None:
        if self.after is not None:
            self.after()  # may queue more datagrams (replies to what just arrived): flush after it
        self.flush()

    # ------------------------------------------------------------------ send
    def flush(self) -> None:
        if self._closed:
            return
        outbox = self.node.datagrams_to_send()
        if not outbox:
            return
        self.datagrams_out += len(outbox)
        tap = self.tap
        if tap is not None:
            for data, addr in outbox:
                tap(data, addr)
        if len(outbox) == 1 or not self.gso:
            for data, addr in outbox:
                self._sendto(data, addr)
            return
        # group per destination, keeping order within each; GSO runs of equal-size datagrams
        groups: dict[tuple[str, int], list[bytes]] = {}
        for data, addr in outbox:
            groups.setdefault(addr, []).append(data)
        for addr, datas in groups.items():
            i, n = 0, len(datas)
            while i < n:
                size = len(datas[i])
                j = i + 1
                limit = min(MAX_GSO_SEGMENTS, MAX_GSO_BYTES // max(size, 1))
                while j < n and j - i < limit and len(datas[j]) == size:
                    j += 1
                if j - i == 1 or not self.gso:
                    for k in range(i, j):
                        self._sendto(datas[k], addr)
                else:
                    self._send_gso(datas[i:j], size, addr)
                i = j

    def _sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError:
            self.send_errors += 1  # full buffer or unreachable: UDP semantics, the protocol copes

    def _send_gso(self, datas: list[bytes], size: int, addr: tuple[str, int]) -> None:
        try:
            # the datagrams go as one scatter list: the kernel cuts the train at ``size``, no join copy
            self.sock.sendmsg(datas, [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0, addr)
            self.batched_sends += 1
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                log.info("UDP GSO unavailable (%s); sending one datagram per syscall", exc.strerror)
                self.gso = False
                for data in datas:
                    self._sendto(data, addr)
            else:
                self.send_errors += len(datas)

    # ------------------------------------------------------------------ timers
    def poke(self) -> None:
        """Call after issuing a command to the node from outside a datagram callback."""
        if self.after is not None:
            self.after()
        self.flush()
        self._arm(self.node.timer())

    def _arm(self, deadline: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = deadline
        if deadline is None or self._closed:
            self._timer = None
            return
        # node time is time.monotonic() (uvloop's loop.time() only has millisecond resolution)
        self._timer = self._loop.call_later(max(0.0, deadline - time.monotonic()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed_at = None
        self.node.handle_timer(time.monotonic(), time.time())
        self.poke()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


async def open_endpoint(node: Any, local: tuple[str, int], *,
                        after: Callable[[], None] | None = None) -> NodeEndpoint:
    family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(local)
    except OSError:
        sock.close()
        raise
    ep = NodeEndpoint(node, sock, after=after)
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
