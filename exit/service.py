"""The IP exit's part of an exit process (``shallot exit --ip``): the TUN device with its NAT table, the DNS
forwarder behind the tunnel gateway, and the watch over the exit's own addresses.  It plugs into the relay
process as a ``relay.service.RelayPart``; packets flow TUN -> IpExitService -> circuit and back."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from shallot.core.errors import ShallotError
from shallot.core.io.udp import NodeEndpoint
from shallot.core.vpn.netlink import flush_conntrack, session
from shallot.core.wire.ipconfig import GATEWAY
from shallot.exit.dns import DnsForwarder, host_names, system_resolver
from shallot.exit.ipservice import IpExitService
from shallot.exit.policy import ExitPolicy, PolicyError, parse_policy
from shallot.exit.tun import ExitTun, default_uplink, kernel_drops
from shallot.relay.forwarder import RelayNode

log = logging.getLogger("shallot.exit")
OWN_NETWORKS_REFRESH_S = 5.0  # a new address on the exit is off limits to clients within this


def load_policy(policy_file: Path | None) -> ExitPolicy:
    if policy_file is None:
        return ExitPolicy()
    try:
        return ExitPolicy(parse_policy(policy_file.read_text()))
    except OSError as exc:
        raise ShallotError(f"cannot read exit policy {policy_file}: {exc.strerror}") from None
    except PolicyError as exc:
        raise ShallotError(f"{policy_file}: {exc}") from None


class IpExit:
    def __init__(self, *, uplink: str | None = None, policy_file: Path | None = None,
                 resolver: str | None = None, public_ips: Sequence[str] = ()) -> None:
        """``public_ips``: the exit's public addresses that no interface holds (a 1:1 NAT, --public-ip); the
        relay adds the ones it learns (its descriptor's, the STUN-mapped one)."""
        self.uplink = uplink
        self.resolver = resolver
        self.public_ips = [ipaddress.ip_address(a) for a in public_ips]
        self._public_hosts: Callable[[], list[str]] = list
        self.counters: Counter[str] = Counter()
        self._flushing: asyncio.Task[None] | None = None
        self.ip_service = IpExitService(rng=secrets.token_bytes, policy=load_policy(policy_file))
        self.tun: ExitTun | None = None
        self.dns: DnsForwarder | None = None
        self.node: RelayNode | None = None
        self._watch: asyncio.Task[None] | None = None

    async def start(self, node: RelayNode, endpoint: NodeEndpoint,
                    public_hosts: Callable[[], list[str]] = list) -> None:
        self.node = node
        self._public_hosts = public_hosts
        resolver = self.resolver or system_resolver()
        self.tun = ExitTun(self.uplink or default_uplink(), self._from_tun, endpoint.flush)
        self.tun.open()
        self._refresh_own_networks()
        policy = self.ip_service.policy
        self.dns = DnsForwarder(str(GATEWAY), resolver, own_names=host_names(),
                                private=policy.off_limits)
        await self.dns.start()
        self._watch = asyncio.create_task(self._watch_own_networks())

    def after_datagrams(self) -> None:
        if self.tun is not None and self.ip_service.tun_outbox:
            self.tun.write(self.ip_service.tun_outbox)
        if self._flushing is None or self._flushing.done():
            freed = self.ip_service.take_freed()
            if freed:
                self._flushing = asyncio.get_running_loop().create_task(self._flush_conntrack(freed))

    async def _flush_conntrack(self, freed: list[ipaddress.IPv4Address]) -> None:
        """Forget the flows of freed tunnel addresses before they are given out again, so a new owner never
        receives the tail of the old owner's connections."""
        for address in freed:
            try:
                self.counters["conntrack_flushed"] += await asyncio.to_thread(flush_conntrack, str(address))
            except OSError:
                self.counters["conntrack_flush_errors"] += 1  # stays quarantined (bounded, exit/ipservice.py)
                continue
            self.ip_service.release(address)

    def status(self) -> dict[str, Any]:
        return {**self.ip_service.counters, **self.ip_service.policy.counters, **self.counters,
                **(self.dns.status() if self.dns else {}), **(kernel_drops() if self.tun else {}),
                "tun_read": self.tun.read_packets if self.tun else 0,
                "tun_written": self.tun.written_packets if self.tun else 0,
                "tun_write_errors": self.tun.write_errors if self.tun else 0}

    def close(self) -> None:
        for task in (self._watch, self._flushing):
            if task is not None:
                task.cancel()
        if self.dns is not None:
            self.dns.close()
        if self.tun is not None:
            self.tun.close()

    def _from_tun(self, packet: bytes) -> None:
        """A packet from the internet: to the circuit whose address it is for (sent by the endpoint's flush
        after the batch)."""
        routed = self.ip_service.route_back(packet)
        if routed is not None and self.node is not None:
            circ, inner = routed
            self.node.send_backward(circ, inner, time.monotonic())

    def _refresh_own_networks(self) -> None:
        """The exit never sends clients to its own addresses or networks, whatever interfaces it has now, nor
        to its public addresses (--public-ip, and those the relay learned: behind a 1:1 NAT no interface
        holds them, and a packet to one would hairpin back into the exit host's own services)."""
        public = {ipaddress.ip_network(a) for a in [*self.public_ips, *self._public_hosts()]}
        networks = session(lambda nl: nl.networks())
        self.ip_service.policy.set_own_networks([*networks, *sorted(public - set(networks), key=str)])

    async def _watch_own_networks(self) -> None:
        while True:
            await asyncio.sleep(OWN_NETWORKS_REFRESH_S)
            try:
                self._refresh_own_networks()
            except Exception:
                log.exception("could not refresh the exit's own networks")
