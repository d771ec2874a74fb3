"""Baseline for bench/circuit_bench.py: one hop of a plain-UDP forwarding chain without crypto.

    python bench/plain_chain.py LISTEN_PORT NEXT_PORT|echo|sink

A hop forwards datagrams from its previous hop to the next and back; the last hop echoes, or (sink)
counts and drops them and answers a b"STATS" datagram with its count as JSON.  Runs on
the same event loop implementation (uvloop) as the relays so the ratio compares protocol cost only.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys

from shallot.core.io.udp import SOCKET_BUFFER_BYTES, run


class Hop(asyncio.DatagramProtocol):
    def __init__(self, next_addr: tuple[str, int] | None, sink: bool) -> None:
        self.next_addr = next_addr
        self.sink = sink
        self.count = 0
        self.bytes = 0
        self.prev_addr: tuple[str, int] | None = None
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):  # the same buffers as shallot's endpoints
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        if self.next_addr is None:
            if not self.sink:
                self.transport.sendto(data, addr)
            elif data == b"STATS":
                self.transport.sendto(f'{{"count": {self.count}, "bytes": {self.bytes}}}'.encode(), addr)
            else:
                self.count += 1
                self.bytes += len(data)
        elif addr == self.next_addr:
            if self.prev_addr is not None:
                self.transport.sendto(data, self.prev_addr)
        else:
            self.prev_addr = addr
            self.transport.sendto(data, self.next_addr)


async def main(port: int, nxt: str) -> None:
    loop = asyncio.get_running_loop()
    next_addr = None if nxt in ("echo", "sink") else ("127.0.0.1", int(nxt))
    transport, _ = await loop.create_datagram_endpoint(lambda: Hop(next_addr, nxt == "sink"),
                                                       local_addr=("127.0.0.1", port))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("listening", flush=True)
    await stop.wait()
    transport.close()


if __name__ == "__main__":
    run(main(int(sys.argv[1]), sys.argv[2]))
