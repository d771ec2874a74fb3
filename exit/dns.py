"""The exit's DNS forwarder: clients ask 100.64.0.1:53 (the exit's tunnel address), the exit asks its
own resolver.  Transaction ids are rewritten to fresh random ones so clients cannot collide or guess
each other's; pending queries are bounded and expire.  Answers are not cached (no shared state that
one client could poison for another)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections import Counter, OrderedDict
from pathlib import Path

from shallot.core.errors import ShallotError

log = logging.getLogger("shallot.exit.dns")
MAX_PENDING = 4096
QUERY_TIMEOUT_S = 5.0
DNS_HEADER_LEN = 12
MAX_DNS_LEN = 1232  # EDNS-safe UDP size


def system_resolver(resolv_conf: Path = Path("/etc/resolv.conf")) -> str:
    try:
        for line in resolv_conf.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                return parts[1]
    except OSError:
        pass
    raise ShallotError("no resolver for the exit's DNS forwarder: pass --resolver ADDRESS")


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, owner: DnsForwarder) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.owner.answer(data, addr)


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, owner: DnsForwarder) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.owner.query(data, addr)


class DnsForwarder:
    def __init__(self, listen: str, resolver: str, *, port: int = 53, resolver_port: int = 53,
                 max_pending: int = MAX_PENDING, timeout_s: float = QUERY_TIMEOUT_S) -> None:
        """The ports and bounds are parameters so that a unit test can run it on loopback, unprivileged."""
        self.listen, self.port = listen, port
        self.resolver = (resolver, resolver_port)
        self.max_pending, self.timeout_s = max_pending, timeout_s
        self.counters: Counter[str] = Counter()
        self._pending: OrderedDict[bytes, tuple[tuple[str, int], bytes, float]] = OrderedDict()
        self._down: asyncio.DatagramTransport | None = None
        self._up: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._down, _ = await loop.create_datagram_endpoint(lambda: _Listener(self),
                                                                local_addr=(self.listen, self.port))
            family = socket.AF_INET6 if ":" in self.resolver[0] else socket.AF_INET
            self._up, _ = await loop.create_datagram_endpoint(lambda: _Upstream(self), family=family)
        except OSError as exc:
            raise ShallotError(f"cannot start the exit's DNS forwarder: {exc.strerror}") from None
        log.info("DNS forwarder on %s:%d -> %s", self.listen, self.port, self.resolver[0])

    def query(self, data: bytes, addr: tuple[str, int]) -> None:
        if not DNS_HEADER_LEN <= len(data) <= MAX_DNS_LEN or data[2] & 0x80:  # too short/long, or a response
            self.counters["dns_drop_malformed"] += 1
            return
        self._expire()
        if len(self._pending) >= self.max_pending:
            self.counters["dns_drop_busy"] += 1
            return
        while True:
            txid = secrets.token_bytes(2)
            if txid not in self._pending:
                break
        self._pending[txid] = (addr, data[:2], time.monotonic() + self.timeout_s)
        assert self._up is not None
        self._up.sendto(txid + data[2:], self.resolver)
        self.counters["dns_queries"] += 1

    def answer(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr[:2] != self.resolver or len(data) < DNS_HEADER_LEN:
            self.counters["dns_drop_unexpected_answer"] += 1
            return
        entry = self._pending.pop(data[:2], None)
        if entry is None:
            self.counters["dns_drop_unexpected_answer"] += 1
            return
        client, txid, _ = entry
        assert self._down is not None
        self._down.sendto(txid + data[2:], client)
        self.counters["dns_answers"] += 1

    def _expire(self) -> None:
        now = time.monotonic()
        while self._pending:
            txid, (_, _, deadline) = next(iter(self._pending.items()))
            if deadline > now:
                break
            del self._pending[txid]
            self.counters["dns_timeouts"] += 1

    def address(self) -> tuple[str, int]:
        """Where the forwarder listens for clients."""
        assert self._down is not None, "start() first"
        return self._down.get_extra_info("sockname")[:2]

    def close(self) -> None:
        for transport in (self._down, self._up):
            if transport is not None:
                transport.close()

