"""The IP exit's part of an exit process (``shallot exit --ip``): the TUN device with its NAT table, the DNS
forwarder behind the tunnel gateway, and the watch over the exit's own addresses.  It plugs into the relay
process as a ``relay.service.RelayPart``; packets flow TUN -> IpExitService -> circuit and back."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path
from typing import Any

from shallot.core.errors import ShallotError
from shallot.core.io.udp import NodeEndpoint
from shallot.core.vpn.netlink import session
from shallot.core.wire.ipconfig import GATEWAY
from shallot.exit.dns import DnsForwarder, system_resolver
from shallot.exit.ipservice import IpExitService
from shallot.exit.policy import ExitPolicy, PolicyError, parse_policy
from shallot.exit.tun import ExitTun, default_uplink
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
                 resolver: str | None = None) -> None:
        self.uplink = uplink
        self.resolver = resolver
        self.ip_service = IpExitService(rng=secrets.token_bytes, policy=load_policy(policy_file))
        self.tun: ExitTun | None = None
        self.dns: DnsForwarder | None = None
        self.node: RelayNode | None = None
        self._watch: asyncio.Task[None] | None = None

    async def start(self, node: RelayNode, endpoint: NodeEndpoint) -> None:
        self.node = node
        self.tun = ExitTun(self.uplink or default_uplink(), self._from_tun, endpoint.flush)
        self.tun.open()
        self._refresh_own_networks()
        self.dns = DnsForwarder(str(GATEWAY), self.resolver or system_resolver())
        await self.dns.start()
        self._watch = asyncio.create_task(self._watch_own_networks())

    def after_datagrams(self) -> None:
        if self.tun is not None and self.ip_service.tun_outbox:
            self.tun.write(self.ip_service.tun_outbox)

    def status(self) -> dict[str, Any]:
        return {**self.ip_service.counters, **self.ip_service.policy.counters,
                **(self.dns.counters if self.dns else {}),
                "tun_read": self.tun.read_packets if self.tun else 0,
                "tun_written": self.tun.written_packets if self.tun else 0,
                "tun_write_errors": self.tun.write_errors if self.tun else 0}

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
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
        """The exit never sends clients to its own addresses or networks, whatever interfaces it has now."""
        self.ip_service.policy.set_own_networks(session(lambda nl: nl.networks()))

    async def _watch_own_networks(self) -> None:
        while True:
            await asyncio.sleep(OWN_NETWORKS_REFRESH_S)
            try:
                self._refresh_own_networks()
            except Exception:
                log.exception("could not refresh the exit's own networks")
