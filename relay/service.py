"""Relay-server and exit-node mode: the asyncio service around RelayNode (one UDP socket, one control socket)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from shallot.core import state as state_dir
from shallot.core.control import ControlServer
from shallot.core.discovery.addresses import Address
from shallot.core.discovery.service import RelayDiscovery
from shallot.core.errors import ShallotError
from shallot.core.nat import NatLayer
from shallot.core.natclass import ALT_PORT_OFFSET, NatProbe
from shallot.core.udp import NodeEndpoint, open_endpoint
from shallot.crypto.descriptor import Descriptor, Reachability
from shallot.crypto.params import DESCRIPTOR_LIFETIME_S
from shallot.exit.dns import DnsForwarder, system_resolver
from shallot.exit.ipservice import GATEWAY, IpExitService
from shallot.exit.policy import ExitPolicy, PolicyError, parse_policy
from shallot.exit.tun import ExitTun, default_uplink
from shallot.relay.forwarder import RelayConfig, RelayNode

log = logging.getLogger("shallot.relay")
ROTATE_CHECK_S = 3600.0
RESIGN_AFTER_S = DESCRIPTOR_LIFETIME_S / 2  # a descriptor is re-signed (and republished) well before it expires
OWN_NETWORKS_REFRESH_S = 5.0  # a new address on the exit is off limits to clients within this
MAX_REGISTRATIONS_KEPT = 2  # introducers a relay behind a NAT registers with
NAT_PROBE_TIMEOUT_S = 10.0


class _AltPort(asyncio.DatagramProtocol):
    """The alternate STUN port of a public relay: answers CHANGE-REQUEST(port) tests (RFC 5780)."""

    def __init__(self, service: RelayService) -> None:
        self.service = service
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        nat = self.service.nat
        if nat is not None:
            nat.receive_alt(data, addr[:2], time.monotonic())
            self.service._flush_alt()


class RelayService:
    def __init__(self, state: Path, *, expect_exit: bool | None = None, ip_exit: bool = False,
                 uplink: str | None = None, policy_file: Path | None = None, resolver: str | None = None,
                 bootstrap: list[Address] | None = None, dht: bool = False,
                 introducers: list[Descriptor] | None = None, stun_alt_port: bool = False) -> None:
        """``bootstrap``: DHT seeds (relay addresses); ``dht``: run the DHT node even without seeds (the
        first seed of a network).  Without either the relay runs without discovery, as before.
        ``introducers``: we are behind a NAT and reached through these public relays."""
        self.state = state
        self.bootstrap = bootstrap or []
        self.dht_enabled = dht or bool(bootstrap)
        self.discovery: RelayDiscovery | None = None
        self.desc: Descriptor | None = None
        self.stun_alt_port = stun_alt_port
        self.introducers = introducers or []
        self.nat: NatLayer | None = None
        self.alt: _AltPort | None = None
        self._reachability: Reachability | None = None
        self.resolver = resolver
        self.dns: DnsForwarder | None = None
        self.keys, self.settings = state_dir.load(state)
        if expect_exit and not self.settings.exit:
            raise ShallotError(f"{state} was not created with --exit; run it with 'shallot relay'")
        if ip_exit and not self.settings.exit:
            raise ShallotError("--ip needs an exit (keygen --exit)")
        self.ip_exit = ip_exit
        self.uplink = uplink
        self.policy_file = policy_file
        self.ip_service: IpExitService | None = None
        self.tun: ExitTun | None = None
        self.node: RelayNode | None = None
        self.endpoint: NodeEndpoint | None = None
        self.control: ControlServer | None = None
        self.started = time.time()
        self._stop = asyncio.Event()

    @property
    def role(self) -> str:
        return "exit" if self.settings.exit else "relay"

    async def run(self) -> None:
        wall = time.time()
        if self.keys.rotate_onion_keys(secrets.token_bytes, wall):
            state_dir.save_keys(self.state, self.keys)
        desc = self.desc = state_dir.publish_descriptor(self.state, self.keys, self.settings, wall)
        if self.ip_exit:
            self.ip_service = IpExitService(rng=secrets.token_bytes, policy=self._load_policy())
        self.node = RelayNode(self.keys, rng=secrets.token_bytes, wall=wall,
                              config=RelayConfig(is_exit=self.settings.exit), own_host=self.settings.address[0],
                              ip_service=self.ip_service)
        host, port = self.settings.address
        behind_nat = bool(self.introducers)
        self.nat = NatLayer(self.node, rng=secrets.token_bytes, serve=not behind_nat, own_host=host)
        try:
            self.endpoint = await open_endpoint(self.nat, (host, port), after=self._after_datagrams)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ShallotError(f"cannot listen on {host}:{port}: the port is already in use") from None
            raise ShallotError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        if self.ip_service is not None:
            self.tun = ExitTun(self.uplink or default_uplink(), self._from_tun, self.endpoint.flush)
            try:
                self.tun.open()
            except ShallotError:
                self.endpoint.close()
                self.tun.close()
                raise
            self._refresh_own_networks()
            self.dns = DnsForwarder(str(GATEWAY), self.resolver or system_resolver())
            try:
                await self.dns.start()
            except ShallotError:
                self.endpoint.close()
                self.tun.close()
                raise
        if behind_nat:
            desc = self.desc = await self._join_through_nat(wall)
        elif self.stun_alt_port:
            await self._open_alt_port(host, port + ALT_PORT_OFFSET)
        if self.dht_enabled:
            # behind a NAT the descriptor names the public address; the DHT socket is bound on ours
            self.discovery = RelayDiscovery(self.bootstrap, lambda: self.desc, behind_nat=behind_nat,
                                            bind_host=host)
            try:
                await self.discovery.start()
            except ShallotError:
                if self.dns is not None:
                    self.dns.close()
                self.endpoint.close()
                if self.tun is not None:
                    self.tun.close()
                raise
        self.control = ControlServer(self.state / state_dir.CONTROL_SOCKET, self.role,
                                     {"status": self._status, "circuits": self._circuits, "peers": self._peers})
        try:
            await self.control.start()
        except ShallotError:
            if self.discovery is not None:
                await self.discovery.close()
            raise
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        log.info("%s %s (%s) listening on %s:%d", self.role, desc.nickname, desc.id_hex, host, port)
        print(f"shallot {self.role} {desc.nickname} {desc.id_hex} listening on {host}:{port}", flush=True)
        if self.discovery is not None:
            self.discovery.launch(self._joined, self._published)
        rotate = asyncio.create_task(self._rotate_loop())
        watch = asyncio.create_task(self._watch_own_networks()) if self.tun is not None else None
        try:
            await self._stop.wait()
        finally:
            rotate.cancel()
            if watch is not None:
                watch.cancel()
            if self.dns is not None:
                self.dns.close()
            if self.tun is not None:
                self.tun.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.control.close()
            if self.discovery is not None:
                await self.discovery.close()
            self.endpoint.close()
            if self.alt is not None and self.alt.transport is not None:
                self.alt.transport.close()
            log.info("%s stopped", self.role)

    def _joined(self, peers: int) -> None:
        assert self.discovery is not None
        host, port = self.discovery.dht_address
        if self.discovery.behind_nat:
            what = f"publishing only (behind a NAT), through {peers} contacts"
        else:
            what = f"joined with {peers} peers" if self.bootstrap else "serving as a seed"
        print(f"shallot {self.role} dht on {host}:{port}: {what}", flush=True)

    def _published(self, nodes: int) -> None:
        print(f"shallot {self.role} descriptor published to {nodes} DHT nodes", flush=True)

    def _load_policy(self) -> ExitPolicy:
        if self.policy_file is None:
            return ExitPolicy()
        try:
            return ExitPolicy(parse_policy(self.policy_file.read_text()))
        except OSError as exc:
            raise ShallotError(f"cannot read exit policy {self.policy_file}: {exc.strerror}") from None
        except PolicyError as exc:
            raise ShallotError(f"{self.policy_file}: {exc}") from None

    async def _open_alt_port(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        proto = _AltPort(self)
        try:
            await loop.create_datagram_endpoint(lambda: proto, local_addr=(host, port))
        except OSError as exc:
            raise ShallotError(f"cannot open the alternate STUN port {host}:{port}: {exc.strerror}") from None
        self.alt = proto
        assert self.nat is not None
        self.nat.has_alt_port = True

    async def _join_through_nat(self, wall: float) -> Descriptor:
        """Behind a NAT: classify it with two introducers, register, publish a descriptor that says so."""
        assert self.nat is not None and self.endpoint is not None
        intro = self.introducers
        r1, r2 = intro[0].address, intro[1 % len(intro)].address
        local = self.settings.address if self.settings.address[0] not in ("0.0.0.0", "::") else None
        self.nat.start_probe(NatProbe(r1, (r1[0], r1[1] + ALT_PORT_OFFSET), r2, (r2[0], r2[1] + ALT_PORT_OFFSET),
                                      secrets.token_bytes, local=local), time.monotonic())
        self.endpoint.poke()
        deadline = time.monotonic() + NAT_PROBE_TIMEOUT_S
        while self.nat.nat_type is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        nat_type = self.nat.nat_type
        if nat_type is None or nat_type.udp_blocked or nat_type.public is None:
            raise ShallotError("no STUN answer from the introducers: is UDP blocked, or are they down?")
        chosen = intro[:MAX_REGISTRATIONS_KEPT]
        self.nat.register([(d.relay_id, d.address, d.link_pub) for d in chosen], time.monotonic(), time.time())
        self.endpoint.poke()
        reach = Reachability(int(nat_type.mapping), int(nat_type.filtering),
                             tuple((d.relay_id, d.address) for d in chosen))
        self._reachability = reach
        desc = state_dir.publish_descriptor(self.state, self.keys, self.settings, time.time(),
                                            reachability=reach, public=nat_type.public)
        print(f"shallot relay behind NAT ({nat_type.summary}), public {nat_type.public[0]}:{nat_type.public[1]}, "
              f"reachable via introducer {', '.join(d.nickname for d in chosen)}", flush=True)
        return desc

    def _flush_alt(self) -> None:
        nat = self.nat
        if nat is None or not nat.alt_outbox:
            return
        transport = self.alt.transport if self.alt is not None else None
        for data, addr in nat.alt_outbox:
            if transport is not None:
                transport.sendto(data, addr)
        nat.alt_outbox.clear()

    def _after_datagrams(self) -> None:
        self._flush_alt()
        nat = self.nat
        if nat is not None and nat.public_changed and nat.public is not None and self.introducers:
            nat.public_changed = False  # re-sign with the new public address; links follow by roaming
            self.desc = state_dir.publish_descriptor(self.state, self.keys, self.settings, time.time(),
                                                     reachability=self._reachability, public=nat.public)
            if self.discovery is not None:
                self.discovery.publish_now()  # "republish on change": the new address reaches the DHT at once
        if self.tun is not None and self.ip_service is not None and self.ip_service.tun_outbox:
            self.tun.write(self.ip_service.tun_outbox)

    def _from_tun(self, packet: bytes) -> None:
        assert self.node is not None and self.endpoint is not None
        self.node.receive_from_tun(packet, time.monotonic())  # sent by the endpoint's flush after the batch

    def _refresh_own_networks(self) -> None:
        """The exit never sends clients to its own addresses or networks, whatever interfaces it has now."""
        assert self.ip_service is not None
        out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True).stdout
        networks = []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) > 3 and parts[2] in ("inet", "inet6"):
                with contextlib.suppress(ValueError):
                    networks.append(ipaddress.ip_network(parts[3], strict=False))
        self.ip_service.policy.set_own_networks(networks)

    async def _watch_own_networks(self) -> None:
        while True:
            await asyncio.sleep(OWN_NETWORKS_REFRESH_S)
            try:
                self._refresh_own_networks()
            except Exception:
                log.exception("could not refresh the exit's own networks")

    async def _rotate_loop(self) -> None:
        while True:
            await asyncio.sleep(ROTATE_CHECK_S)
            try:
                self._rotate_once()
            except Exception:  # a full disk must not end key and certificate renewal for good
                log.exception("key rotation failed; trying again in %.0f s", ROTATE_CHECK_S)

    def _rotate_once(self) -> None:
        assert self.node is not None
        wall = time.time()
        if self.node.renew_link_cert(wall):
            log.info("link certificate renewed")
        rotated = self.node.rotate_onion_keys(wall)
        if rotated:
            state_dir.save_keys(self.state, self.keys)
        if rotated or self.desc is None or wall - self.desc.published >= RESIGN_AFTER_S:
            reach = self._reachability
            self.desc = state_dir.publish_descriptor(self.state, self.keys, self.settings, wall, reachability=reach,
                                                     public=self.nat.public if self.nat is not None and reach else None)
            if self.discovery is not None:
                self.discovery.publish_now()
            log.info("descriptor re-signed (%s)", "onion key rotated" if rotated else "half its lifetime passed")

    async def _status(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.node is not None
        return {"role": self.role, "id": self.keys.relay_id.hex(), "nickname": self.settings.nickname,
                "address": list(self.settings.address), "uptime_s": round(time.time() - self.started, 1),
                **self.node.stats(), "io": self._io_stats(),
                "nat": self.nat.status() if self.nat is not None else None,
                "ip": ({**self.ip_service.counters, **self.ip_service.policy.counters,
                        **(self.dns.counters if self.dns else {}),
                        "tun_read": self.tun.read_packets if self.tun else 0,
                        "tun_written": self.tun.written_packets if self.tun else 0,
                        "tun_write_errors": self.tun.write_errors if self.tun else 0}
                       if self.ip_service is not None else None),
                "dht": self.discovery.status() if self.discovery is not None else None}

    async def _peers(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.discovery is None:
            return {"dht_peers": [], "relays": [], "dht": False}
        return {**self.discovery.peers(), "dht": True}

    def _io_stats(self) -> dict[str, Any]:
        ep = self.endpoint
        if ep is None:
            return {}
        return {"datagrams_in": ep.datagrams_in, "datagrams_out": ep.datagrams_out, "gro": ep.gro, "gso": ep.gso,
                "batched_reads": ep.batched_reads, "batched_sends": ep.batched_sends,
                "send_errors": ep.send_errors, "recv_errors": ep.recv_errors}

    async def _circuits(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        """What this relay knows about each circuit: its neighbours' addresses and nothing else."""
        assert self.node is not None
        out = []
        for circ, from_prev in self.node.circuits.values():
            if not from_prev:
                continue
            prev, nxt = self.node.neighbours_of(circ)
            out.append({"state": circ.state.value, "previous": list(prev), "next": list(nxt) if nxt else None,
                        "terminal": circ.endpoint is not None})
        return out


async def run_relay(state: Path, *, expect_exit: bool | None = None, ip_exit: bool = False,
                    uplink: str | None = None, policy_file: Path | None = None, resolver: str | None = None,
                    bootstrap: list[Address] | None = None, dht: bool = False,
                    introducers: list[Descriptor] | None = None, stun_alt_port: bool = False) -> None:
    await RelayService(state, expect_exit=expect_exit, ip_exit=ip_exit, uplink=uplink, policy_file=policy_file,
                       resolver=resolver, bootstrap=bootstrap, dht=dht, introducers=introducers,
                       stun_alt_port=stun_alt_port).run()
