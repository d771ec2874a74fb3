"""The exit's DNS forwarder: clients ask 100.64.0.1:53 (the exit's tunnel address), the exit asks the
resolver its operator chose (docs/PROTOCOL.md §8.6; what it forwards: exit/dnsquery.py).

Every upstream query leaves from a socket of its own, connected to the resolver, so from a fresh random
source port (the kernel's ephemeral port choice), with a fresh random transaction id; an answer is taken
only on that socket, from the resolver's address and port, with that id and the question asked (anything
else is dropped and counted): an off-path spoofer must guess port and id together, about 2^31 tries per
query.  Pending queries (one socket each) are bounded in total and per client; nothing is cached, so
one client cannot poison another's answers."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from shallot.core.errors import ShallotError
from shallot.crypto.codec import DecodeError
from shallot.exit.dnsquery import (
    DNS_HEADER_LEN,
    MAX_DNS_LEN,
    Labels,
    Network,
    PendingTable,
    Question,
    answer_matches,
    parse_query,
    refusal,
    refused_response,
)

__all__ = ["DNS_HEADER_LEN", "MAX_DNS_LEN", "DnsForwarder", "host_names", "system_resolver"]
log = logging.getLogger("shallot.exit.dns")
MAX_PENDING = 512  # one socket (file descriptor) each
PER_CLIENT_PENDING = 32  # a browser opening a page asks for a few dozen names at once
QUERY_TIMEOUT_S = 5.0
MAX_ANSWER_LEN = 65535
SWEEP_S = 1.0


def system_resolver(resolv_conf: Path = Path("/etc/resolv.conf")) -> str:
    """The first ``nameserver`` of resolv.conf that is not on this host.  A loopback resolver (systemd's
    127.0.0.53 stub, dnsmasq) answers names about the host itself (``_gateway``, LLMNR, the LAN's zones), so
    it is never the default: the operator must name it with --resolver to use it."""
    skipped = []
    try:
        for line in resolv_conf.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                try:
                    address = ipaddress.ip_address(parts[1].split("%")[0])
                except ValueError:
                    continue
                if address.is_loopback or address.is_link_local or address.is_unspecified:
                    skipped.append(parts[1])
                    continue
                return str(address)
    except OSError:
        pass
    local = f" (only the local resolver {', '.join(skipped)}, which answers names about this host)" if skipped else ""
    raise ShallotError(f"no resolver for the exit's DNS forwarder{local}: pass --resolver ADDRESS")


def host_names(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[Labels]:
    """This host's name (and its FQDN) and the search domains of resolv.conf: names under them are the
    exit's own (split-horizon zones), never forwarded."""
    names = {socket.gethostname()}
    with contextlib.suppress(OSError):
        for line in resolv_conf.read_text().splitlines():
            parts = line.split()
            if parts and parts[0] in ("search", "domain"):
                names.update(parts[1:])
    return [tuple(n.lower().encode(errors="replace").rstrip(b".").split(b".")) for n in names if n.strip(".")]


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, owner: DnsForwarder) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.owner.query(data, addr)


@dataclass(eq=False)
class _Pending:
    client: tuple[str, int]
    client_txid: bytes
    sent: Question  # with our transaction id
    sock: socket.socket = field(repr=False)


class DnsForwarder:
    def __init__(self, listen: str, resolver: str, *, port: int = 53, resolver_port: int = 53,
                 max_pending: int = MAX_PENDING, per_client: int = PER_CLIENT_PENDING,
                 timeout_s: float = QUERY_TIMEOUT_S, own_names: Iterable[Labels] = (),
                 private: Callable[[], Iterable[Network]] = lambda: ()) -> None:
        """The ports and bounds are parameters so that a unit test can run it on loopback, unprivileged.
        ``own_names`` and ``private``: what dnsquery.refusal keeps from the resolver."""
        self.listen, self.port = listen, port
        self.resolver = (resolver, resolver_port)
        self.own_names = list(own_names)
        self.private = private
        self.counters: Counter[str] = Counter()
        self.table = PendingTable(max_pending, per_client, timeout_s)
        self._pending: dict[int, _Pending] = {}  # table token -> query
        self._tokens = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._family = socket.AF_INET6 if ":" in resolver else socket.AF_INET
        self._down: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._down, _ = await loop.create_datagram_endpoint(lambda: _Listener(self),
                                                                local_addr=(self.listen, self.port))
        except OSError as exc:
            raise ShallotError(f"cannot start the exit's DNS forwarder: {exc.strerror}") from None
        self._timer = loop.call_later(SWEEP_S, self._tick)
        log.info("DNS forwarder on %s:%d -> %s", self.listen, self.port, self.resolver[0])

    def status(self) -> dict[str, int]:
        return {**self.counters, **self.table.counters, "dns_pending": len(self.table)}

    def query(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            q = parse_query(data)
        except DecodeError:
            self.counters["dns_drop_malformed"] += 1
            return
        assert self._down is not None
        why = "class" if q.qclass != 1 else refusal(q.labels, own_names=self.own_names, private=self.private())
        if why is not None:  # about the exit's own host or network (or CHAOS: the resolver's own identity)
            self.counters[f"dns_refused_{why}"] += 1
            self._down.sendto(refused_response(data, q), addr)
            return
        now = time.monotonic()
        self._expire(now)
        token = next(self._tokens)
        admitted, evicted = self.table.admit(addr[0], token, now)
        for old in evicted:
            self._close(old)
        if not admitted:
            return
        try:
            sock = socket.socket(self._family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        except OSError:
            self.table.remove(token)
            self.counters["dns_drop_no_socket"] += 1
            return
        try:
            sock.connect(self.resolver)  # binds a fresh random ephemeral port; the kernel drops other sources
        except OSError:
            sock.close()
            self.table.remove(token)
            self.counters["dns_drop_no_socket"] += 1
            return
        txid = secrets.token_bytes(2)
        pending = _Pending(addr, q.txid, Question(txid, q.flags, q.labels, q.qtype, q.qclass, q.end), sock)
        self._pending[token] = pending
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, token)
        try:
            sock.send(txid + data[2:])
        except OSError:
            self.counters["dns_upstream_errors"] += 1
            self.table.remove(token)
            self._close(token)
            return
        self.counters["dns_queries"] += 1

    def _readable(self, token: int) -> None:
        pending = self._pending.get(token)
        if pending is None:  # closed by an eviction earlier in the same turn of the loop
            return
        for _ in range(16):  # a spoofer's burst: bounded work per wakeup
            try:
                data = pending.sock.recv(MAX_ANSWER_LEN)  # connected: only the resolver's address and port
            except BlockingIOError:
                return
            except OSError:  # e.g. ICMP port unreachable from the resolver: the client times out
                self.counters["dns_upstream_errors"] += 1
                continue
            if not answer_matches(data, pending.sent):
                self.counters["dns_drop_unmatched_answer"] += 1
                continue
            self.table.remove(token)
            self._close(token)
            assert self._down is not None
            self._down.sendto(pending.client_txid + data[2:], pending.client)
            self.counters["dns_answers"] += 1
            return

    def _expire(self, now: float) -> None:
        for token in self.table.expired(now):
            self._close(token)
            self.counters["dns_timeouts"] += 1

    def _tick(self) -> None:
        """Expire pending queries (and close their sockets) even when no new query arrives."""
        self._expire(time.monotonic())
        self._timer = asyncio.get_running_loop().call_later(SWEEP_S, self._tick)

    def _close(self, token: int) -> None:
        pending = self._pending.pop(token, None)
        if pending is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(pending.sock.fileno())
            pending.sock.close()

    def address(self) -> tuple[str, int]:
        """Where the forwarder listens for clients."""
        assert self._down is not None, "start() first"
        return self._down.get_extra_info("sockname")[:2]

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for token in list(self._pending):
            self.table.remove(token)
            self._close(token)
        if self._down is not None:
            self._down.close()
