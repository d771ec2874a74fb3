"""Relay-server and exit-node mode: the asyncio service around RelayNode (one UDP socket, one control socket)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import secrets
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from shallot.core.control.api import Circuits, Peers, PeersReply, Role, Status
from shallot.core.control.server import ControlServer
from shallot.core.discovery.directory import load_directory
from shallot.core.discovery.service import RelayDiscovery, Seed
from shallot.core.errors import ShallotError
from shallot.core.io.udp import NodeEndpoint, open_endpoint
from shallot.core.nat import NatClassified, NatPart, NodeStack, PublicAddressChanged
from shallot.core.nat.classify import ALT_PORT_OFFSET, NatProbe, NatType
from shallot.crypto.codec import Address
from shallot.crypto.descriptor import Descriptor, Reachability
from shallot.crypto.params import DESCRIPTOR_LIFETIME_S
from shallot.relay import state as state_dir
from shallot.relay.endpoints import EndpointService
from shallot.relay.forwarder import RelayConfig, RelayNode, relay_link_layer
from shallot.relay.replay_store import FLUSH_S, ReplayStore

log = logging.getLogger("shallot.relay")
ROTATE_CHECK_S = 3600.0
RESIGN_AFTER_S = DESCRIPTOR_LIFETIME_S / 2  # a descriptor is re-signed (and republished) well before it expires
MAX_REGISTRATIONS_KEPT = 2  # introducers a relay behind a NAT registers with
NAT_PROBE_TIMEOUT_S = 10.0
LOOKUP_TIMEOUT_S = 2.5  # a DHT lookup of a relay not in our view (the node holds its CREATE 3 s)


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


class RelayPart(Protocol):
    """Something an exit adds to the relay process (exit/service.py: the IP exit's TUN and DNS forwarder)."""

    async def start(self, node: RelayNode, endpoint: NodeEndpoint, public_hosts: Callable[[], list[str]]) -> None:
        """Start once the relay's socket is open; raise ShallotError if impossible.  ``public_hosts``: the
        addresses this relay is known by now (its descriptor's, the one STUN sees), which an exit keeps
        its clients away from even when no interface holds them (a 1:1 NAT)."""

    def after_datagrams(self) -> None:
        """After each batch of datagrams: write what the batch produced."""

    def status(self) -> dict[str, Any]:
        """This part's counters, under ``"ip"`` in ``status`` (docs/PROTOCOL.md §9.4)."""

    def close(self) -> None:
        """Undo everything ``start`` did; safe to call when it failed halfway."""


class RelayService:
    def __init__(self, state: Path, *, expect_exit: bool | None = None,
                 services: Mapping[int, EndpointService] | None = None, part: RelayPart | None = None,
                 bootstrap: Sequence[Seed | Address] | None = None, dht: bool = False,
                 introducers: list[Descriptor] | None = None, stun_alt_port: bool = False,
                 private_network: bool = False, directory: Path | None = None,
                 max_circuits: int = RelayConfig.max_circuits) -> None:
        """``services``: what circuits ending here may use (an exit's; exit/endpoints.py); ``part``: what an
        exit adds to the process (exit/service.py: the IP exit).  ``bootstrap``: DHT seeds (relay
        addresses); ``dht``: run the DHT node even without seeds (the first seed of a network).  Without
        either the relay runs without discovery.  ``introducers``: we are behind a NAT and reached through
        these public relays.  ``private_network``: the DHT accepts loopback and private relay addresses.
        ``directory``: a directory file, this relay's view of the network besides the DHT (who counts as a
        relay on a relay link, docs/PROTOCOL.md §5.7)."""
        self.directory = directory
        self.max_circuits = max_circuits
        self._directory_relays: dict[bytes, Descriptor] = {}
        self._directory_mtime: int | None = None
        self.state = state
        self.bootstrap = list(bootstrap or [])
        self.private_network = private_network
        self.dht_enabled = dht or bool(bootstrap)
        self.discovery: RelayDiscovery | None = None
        self.desc: Descriptor | None = None
        self.stun_alt_port = stun_alt_port
        self.introducers = introducers or []
        self.nat: NatPart | None = None
        self._classified: asyncio.Future[NatType] | None = None  # resolved on NatClassified (_after_datagrams)
        self.alt: _AltPort | None = None
        self._reachability: Reachability | None = None
        self.keys, self.settings = state_dir.load(state)
        if expect_exit and not self.settings.exit:
            raise ShallotError(f"{state} was not created with --exit; run it with 'shallot relay'")
        if part is not None and not self.settings.exit:
            raise ShallotError("--ip needs an exit (keygen --exit)")
        self.services = services
        self.part = part
        self.node: RelayNode | None = None
        self.endpoint: NodeEndpoint | None = None
        self.control: ControlServer | None = None
        self.started = time.time()
        self.replay = ReplayStore(state)
        self._stop = asyncio.Event()

    @property
    def role(self) -> str:
        return "exit" if self.settings.exit else "relay"

    async def run(self) -> None:
        wall = time.time()
        if self.keys.rotate_onion_keys(secrets.token_bytes, wall):
            state_dir.save_keys(self.state, self.keys)
        desc = self.desc = state_dir.publish_descriptor(self.state, self.keys, self.settings, wall)
        host, port = self.settings.address
        behind_nat = bool(self.introducers)
        # the node stack, built once (core/nat/stack.py): a public relay serves STUN and introductions
        link = relay_link_layer(self.keys, rng=secrets.token_bytes, wall=wall)
        self.nat = NatPart(link, rng=secrets.token_bytes, serve=not behind_nat, own_host=host)
        has_view = self.dht_enabled or self.directory is not None
        # a relay behind a NAT only publishes to the DHT (it crawls nothing, stores nothing): without a
        # directory file it has no view of extend targets and dials under the dial limits alone (§5.7)
        target_view = self.directory is not None or (self.dht_enabled and not behind_nat)
        if self.directory is not None:
            self._reload_directory(force=True)
        self.node = RelayNode(self.keys, rng=secrets.token_bytes, wall=wall,
                              config=RelayConfig(is_exit=self.settings.exit, max_circuits=self.max_circuits),
                              own_host=self.settings.address[0],
                              services=self.services, link=link, nat_cells=self.nat.control_cell,
                              known_relay=self._known_relay if has_view else None,
                              known_target=self._known_target if target_view else None)
        if self.dht_enabled:
            self.node.lookup_relay = self._lookup_relay
        self._lookups: set[bytes] = set()
        node_stack = NodeStack(self.node, self.nat)
        # the build replay cache survives restarts (docs/PROTOCOL.md §5.7): a CREATE recorded before a
        # restart is refused after it
        secret, entries = self.replay.load(self.node.replay_secret, wall)
        restored = self.node.restore_replay(secret, entries, wall)
        if restored:
            log.info("build replay cache: %d entries restored", restored)
        async with contextlib.AsyncExitStack() as stack:  # every part started is stopped, in reverse order
            stack.callback(self._close_replay)
            try:
                self.endpoint = await open_endpoint(node_stack, (host, port), after=self._after_datagrams)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ShallotError(f"cannot listen on {host}:{port}: the port is already in use") from None
                raise ShallotError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
            stack.callback(self.endpoint.close)
            if self.part is not None:
                stack.callback(self.part.close)
                await self.part.start(self.node, self.endpoint, self._public_hosts)
            if behind_nat:
                desc = self.desc = await self._join_through_nat(wall)
            elif self.stun_alt_port:
                await self._open_alt_port(host, port + ALT_PORT_OFFSET)
                stack.callback(self._close_alt_port)
            if self.dht_enabled:
                # behind a NAT the descriptor names the public address; the DHT socket is bound on ours
                self.discovery = RelayDiscovery(self.bootstrap, lambda: self.desc, sign=self.keys.sign,
                                                behind_nat=behind_nat, bind_host=host,
                                                private_network=self.private_network)
                await self.discovery.start()
                stack.push_async_callback(self.discovery.close)
            self.control = ControlServer(self.state / state_dir.CONTROL_SOCKET, Role(self.role),
                                         {Status: self._status, Circuits: self._circuits, Peers: self._peers})
            await self.control.start()
            stack.push_async_callback(self.control.close)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
                stack.callback(loop.remove_signal_handler, sig)
            if not has_view:  # said once the relay is surely running, so a start-up error stays one line
                (log.warning if self.settings.exit else log.info)(
                    "no network view (neither --bootstrap/--dht nor --directory): every relay link counts as a "
                    "relay, so one-hop circuits through a freshly minted identity cannot be refused")
            log.info("%s %s (%s) listening on %s:%d", self.role, desc.nickname, desc.id_hex, host, port)
            print(f"shallot {self.role} {desc.nickname} {desc.id_hex} listening on {host}:{port}", flush=True)
            if self.discovery is not None:
                self.discovery.launch(self._joined, self._published)
            rotate = asyncio.create_task(self._rotate_loop())
            stack.callback(rotate.cancel)
            flush = asyncio.create_task(self._replay_loop())
            stack.callback(flush.cancel)
            await self._stop.wait()
        log.info("%s stopped", self.role)

    def _public_hosts(self) -> list[str]:
        hosts = {host for host, _ in self.desc.addresses} if self.desc is not None else set()
        public = self.nat.public if self.nat is not None else None
        if public is not None:
            hosts.add(public[0])
        return sorted(hosts)

    def _known_relay(self, relay_id: bytes, link_pub: bytes) -> bool:
        """Is (relay id, link key) a live relay in our view: the directory file or the DHT (our crawl and
        the records we store)?  On a miss the view is refreshed (rate-limited), so a relay that joined
        since our last crawl is known a little later (docs/PROTOCOL.md §5.7)."""
        return self._view_descriptor(relay_id, link_pub) is not None

    def _known_target(self, relay_id: bytes, link_pub: bytes, addr: Address) -> bool:
        """An EXTEND target: a live relay in our view, named at one of its published addresses (no
        handshake cannon: a made-up relay, or a real one at a made-up address, is never dialed)."""
        desc = self._view_descriptor(relay_id, link_pub)
        return desc is not None and tuple(addr) in desc.addresses

    def _view_descriptor(self, relay_id: bytes, link_pub: bytes) -> Descriptor | None:
        wall = time.time()
        for _ in range(2):
            desc = self._directory_relays.get(relay_id)
            if desc is None and self.discovery is not None:
                desc = self.discovery.descriptor(relay_id)
            if desc is not None and desc.link_pub == link_pub and wall <= desc.expires:
                return desc
            if not self._reload_directory():
                break
        if self.discovery is not None:
            self.discovery.crawl_soon()
        return None

    def _lookup_relay(self, relay_id: bytes, link_pub: bytes) -> None:
        """The node holds a TERMINATE from a relay not in our view: ask the DHT for its descriptor."""
        if relay_id in self._lookups or self.discovery is None:
            return
        self._lookups.add(relay_id)
        asyncio.get_running_loop().create_task(self._lookup(relay_id, link_pub))

    async def _lookup(self, relay_id: bytes, link_pub: bytes) -> None:
        found = False
        try:
            assert self.discovery is not None
            desc = await asyncio.wait_for(self.discovery.lookup(relay_id), LOOKUP_TIMEOUT_S)
            found = desc is not None and desc.link_pub == link_pub and time.time() <= desc.expires
        except Exception:  # a failed lookup is "not found": the held CREATEs are refused
            log.debug("DHT lookup of a relay failed", exc_info=True)
        finally:
            self._lookups.discard(relay_id)
        if self.node is not None:
            self.node.relay_looked_up(relay_id, link_pub, found, time.monotonic())
            if self.endpoint is not None:
                self.endpoint.poke()

    def _reload_directory(self, *, force: bool = False) -> bool:
        """Re-read --directory if it changed since we read it (one stat per unknown relay: cheap, and
        CREATEs are rate-limited per source).  True if re-read."""
        if self.directory is None:
            return False
        try:
            mtime = self.directory.stat().st_mtime_ns
            if not force and mtime == self._directory_mtime:
                return False
            relays = load_directory(self.directory, private_network=self.private_network)
        except (OSError, ShallotError) as exc:
            if force:
                raise ShallotError(str(exc)) from None
            log.warning("cannot re-read the directory file: %s", exc)
            return False
        self._directory_mtime = mtime
        self._directory_relays = {d.relay_id: d for d in relays}
        return True

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

    async def _open_alt_port(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        proto = _AltPort(self)
        try:
            await loop.create_datagram_endpoint(lambda: proto, local_addr=(host, port))
        except OSError as exc:
            raise ShallotError(f"cannot open the alternate STUN port {host}:{port}: {exc.strerror}") from None
        self.alt = proto
        assert self.nat is not None and self.nat.stun_server is not None
        self.nat.stun_server.has_alt_port = True

    async def _join_through_nat(self, wall: float) -> Descriptor:
        """Behind a NAT: classify it with two introducers, register, publish a descriptor that says so."""
        assert self.nat is not None and self.endpoint is not None
        intro = self.introducers
        r1, r2 = intro[0].address, intro[1 % len(intro)].address
        local = self.settings.address if self.settings.address[0] not in ("0.0.0.0", "::") else None
        self._classified = asyncio.get_running_loop().create_future()
        self.nat.start_probe(NatProbe(r1, (r1[0], r1[1] + ALT_PORT_OFFSET), r2, (r2[0], r2[1] + ALT_PORT_OFFSET),
                                      secrets.token_bytes, local=local), time.monotonic())
        self.endpoint.poke()
        if self.nat.nat_type is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._classified, NAT_PROBE_TIMEOUT_S)
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

    def _close_alt_port(self) -> None:
        if self.alt is not None and self.alt.transport is not None:
            self.alt.transport.close()

    def _flush_alt(self) -> None:
        nat = self.nat
        if nat is None:
            return
        out = nat.alt_datagrams_to_send()
        transport = self.alt.transport if self.alt is not None else None
        for data, addr in out:
            if transport is not None:
                transport.sendto(data, addr)

    def _after_datagrams(self) -> None:
        self._flush_alt()
        nat = self.nat
        if nat is not None and nat.events:
            self._nat_events(nat)
        if self.part is not None:
            self.part.after_datagrams()

    def _nat_events(self, nat: NatPart) -> None:
        moved = False
        while nat.events:
            event = nat.events.popleft()
            if isinstance(event, NatClassified):
                if self._classified is not None and not self._classified.done():
                    self._classified.set_result(event.nat)
            elif isinstance(event, PublicAddressChanged):
                moved = True
        if moved and nat.public is not None and self.introducers:
            # re-sign with the new public address; links follow by roaming
            self.desc = state_dir.publish_descriptor(self.state, self.keys, self.settings, time.time(),
                                                     reachability=self._reachability, public=nat.public)
            if self.discovery is not None:
                self.discovery.publish_now()  # "republish on change": the new address reaches the DHT at once

    def _flush_replay(self) -> None:
        node = self.node
        if node is None or not node.replay_journal:
            return
        entries, node.replay_journal = node.replay_journal, []
        self.replay.append(entries)

    def _close_replay(self) -> None:
        try:
            self._flush_replay()
        finally:
            self.replay.close()

    async def _replay_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                self._flush_replay()
            except OSError as exc:  # a full disk: keep forwarding; the cache in memory still holds
                log.warning("cannot save the build replay cache: %s", exc.strerror)

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
        self._flush_replay()
        self.replay.rewrite(self.node.replay_secret, self.node.replay_entries())  # drop what expired
        if rotated or self.desc is None or wall - self.desc.published >= RESIGN_AFTER_S:
            reach = self._reachability
            self.desc = state_dir.publish_descriptor(self.state, self.keys, self.settings, wall, reachability=reach,
                                                     public=self.nat.public if self.nat is not None and reach else None)
            if self.discovery is not None:
                self.discovery.publish_now()
            log.info("descriptor re-signed (%s)", "onion key rotated" if rotated else "half its lifetime passed")

    async def _status(self, request: Status) -> dict[str, Any]:
        assert self.node is not None
        return {"role": self.role, "id": self.keys.relay_id.hex(), "nickname": self.settings.nickname,
                "address": list(self.settings.address), "uptime_s": round(time.time() - self.started, 1),
                **self.node.stats(), "io": self._io_stats(),
                "nat": self.nat.status() if self.nat is not None else None,
                "ip": self.part.status() if self.part is not None else None,
                "dht": self.discovery.status() if self.discovery is not None else None}

    async def _peers(self, request: Peers) -> PeersReply:
        return self.discovery.peers() if self.discovery is not None else PeersReply(dht=False)

    def _io_stats(self) -> dict[str, Any]:
        ep = self.endpoint
        if ep is None:
            return {}
        return {"datagrams_in": ep.datagrams_in, "datagrams_out": ep.datagrams_out, "gro": ep.gro, "gso": ep.gso,
                "batched_reads": ep.batched_reads, "batched_sends": ep.batched_sends,
                "send_errors": ep.send_errors, "recv_errors": ep.recv_errors}

    async def _circuits(self, request: Circuits) -> list[dict[str, Any]]:
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


async def run_relay(state: Path, *, expect_exit: bool | None = None,
                    services: Mapping[int, EndpointService] | None = None, part: RelayPart | None = None,
                    bootstrap: Sequence[Seed | Address] | None = None, dht: bool = False,
                    introducers: list[Descriptor] | None = None, stun_alt_port: bool = False,
                    private_network: bool = False, directory: Path | None = None,
                    max_circuits: int = RelayConfig.max_circuits) -> None:
    await RelayService(state, expect_exit=expect_exit, services=services, part=part, bootstrap=bootstrap, dht=dht,
                       introducers=introducers, stun_alt_port=stun_alt_port, private_network=private_network,
                       directory=directory, max_circuits=max_circuits).run()
