"""What relays and clients run for discovery (asyncio): the only user of DhtNode.

* ``RelayDiscovery``: a relay's DHT node on its link port + 1.  Joins through the seeds (retrying while
  it has no peer), publishes its descriptor, republishes it every REPUBLISH_S and at once when it
  changes (``publish_now``), keeps its table fresh, passes on old records, and crawls now and then so
  that ``status`` can say how many relays it knows.  A relay behind a NAT is a *publisher only*: its
  NAT would filter whoever tried to reach its DHT socket, so it serves nothing, joins no table, and
  publishes by a lookup from its seeds and the nodes that took its record last time.
* ``ClientDiscovery``: a client's view of the whole network.  Starts from the disk cache, crawls the
  DHT from the seeds and from every cached relay, merges what validates, saves the result (0600).
  Silence never removes a relay from path selection (review C2: an on-path adversary can make any
  relay silent); when many DHT nodes that answered before go silent at once, the client warns and
  keeps its view.

Seeds are pinned by relay id (``ID@HOST:PORT``): only a signed answer from that identity counts at
that address.  A plain ``HOST:PORT`` still works, with a warning: whoever answers there is believed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shallot.core.control.messages import DhtPeer, PeersReply, RelayEntry
from shallot.core.discovery.addresses import Address, dht_address, is_private_range, usable_address
from shallot.core.discovery.cache import load_seen, load_view, save_seen, save_view
from shallot.core.discovery.dht import DhtNode
from shallot.core.discovery.records import newest_first
from shallot.core.discovery.view import NetworkView
from shallot.core.errors import ShallotError
from shallot.core.wire.addresses import parse_hostport
from shallot.crypto.descriptor import Descriptor

log = logging.getLogger("shallot.discovery")

JOIN_RETRY_S = 3.0
MAINTAIN_S = 60.0
REPUBLISH_S = 900.0
SECOND_PUBLISH_S = 10.0
REPLICATE_S = 3600.0
RELAY_FIRST_CRAWL_S = (20.0, 40.0)  # random, so that a network started at once does not crawl at once
RELAY_CRAWL_S = 600.0
CLIENT_CRAWL_LIMIT_S = 8.0
VIEW_REFRESH_S = 300.0
VANISH_ALARM_SHARE = 0.5  # this share of the DHT nodes that answered last time silent at once: warn
VANISH_ALARM_MIN = 3
DEMAND_CRAWL_S = 30.0  # a relay that meets an unknown relay on a link crawls at most this often for it


@dataclass(frozen=True)
class Seed:
    """A seed: a relay (link) address, and the relay id pinned to it (None: unpinned)."""

    address: Address
    relay_id: bytes | None = None


def _as_seed(seed: Seed | Address) -> Seed:
    return seed if isinstance(seed, Seed) else Seed((str(seed[0]), int(seed[1])))


def parse_seeds(text: str) -> list[Seed]:
    """``[ID@]HOST:PORT[,...]``: seeds named by their relay (link) address, each pinned by its relay id
    (40 hex digits, as ``shallot keygen`` and the relay's first line print it).  A seed without an id
    is accepted with a warning: an on-path attacker could answer in its name."""
    seeds = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        relay_id: bytes | None = None
        if "@" in part:
            ident, part = part.split("@", 1)
            try:
                relay_id = bytes.fromhex(ident)
            except ValueError:
                relay_id = None
            if relay_id is None or len(relay_id) != 20:
                raise ShallotError(f"bad seed {ident}@{part}: the relay id is 40 hex digits") from None
        host, port = parse_hostport(part)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ShallotError(f"bad seed {part!r}: give an IP address, not a name") from None
        if port >= 65535:
            raise ShallotError(f"bad seed {part!r}: its DHT port would be {port + 1}")
        seeds.append(Seed((host, port), relay_id))
    if not seeds:
        raise ShallotError("--bootstrap needs at least one [ID@]HOST:PORT")
    # loopback seeds are a network on one machine: nobody on a network path could answer in their name
    unpinned = [f"{h}:{p}" for (h, p), rid in ((s.address, s.relay_id) for s in seeds)
                if rid is None and not ipaddress.ip_address(h).is_loopback]
    if unpinned:
        log.warning("seed %s is not pinned by relay id: whoever answers at that address is believed; "
                    "give ID@HOST:PORT (the relay id the seed prints)", ", ".join(unpinned))
    return seeds


def seed_pins(seeds: Sequence[Seed]) -> dict[Address, bytes]:
    """DHT address -> pinned relay id, for the seeds that have one."""
    return {dht_address(s.address): s.relay_id for s in seeds if s.relay_id is not None}


def loopback_only(addresses: list[Address]) -> bool:
    """A network on one machine: every address we were given is loopback (then loopback records are
    accepted; otherwise a record pointing at 127.0.0.1 is refused)."""
    return bool(addresses) and all(ipaddress.ip_address(h).is_loopback for h, _ in addresses)


def _bind_error(addr: Address, exc: OSError) -> ShallotError:
    if exc.errno == errno.EADDRINUSE:
        return ShallotError(f"cannot open the DHT socket on {addr[0]}:{addr[1]} (link port + 1): port in use")
    return ShallotError(f"cannot open the DHT socket on {addr[0]}:{addr[1]}: {exc.strerror}")


class RelayDiscovery:
    def __init__(self, seeds: Sequence[Seed | Address], current: Callable[[], Descriptor], *,
                 sign: Callable[[bytes], bytes], behind_nat: bool = False, bind_host: str | None = None,
                 private_network: bool = False) -> None:
        """``sign``: the identity's signing function (DHT answers are signed); ``behind_nat``: publish
        only (docs/DHT.md §6); ``bind_host``: the address to bind the DHT socket on when it is not the
        descriptor's (behind a NAT the descriptor names the public one); ``private_network``: accept
        loopback and private addresses in records (also implied when our own address is private)."""
        self.current = current
        desc = current()
        self.link_address: Address = desc.address
        self.behind_nat = behind_nat
        self.dht_address = dht_address((bind_host or self.link_address[0], self.link_address[1]))
        given = [_as_seed(s) for s in seeds]
        self.seeds = [dht_address(s.address) for s in given if s.address != self.link_address]
        self.pins = seed_pins([s for s in given if s.address != self.link_address])
        self.allow_loopback = private_network or loopback_only([self.link_address, *(s.address for s in given)])
        # a relay whose own address is private is in a private network: nobody outside could reach it
        self.allow_private = private_network or is_private_range(self.link_address[0])
        self.node = DhtNode(node_id=desc.relay_id, serve=not behind_nat,
                            own_record=(lambda: None) if behind_nat else lambda: self.current().encode(),
                            allow_loopback=self.allow_loopback, allow_private=self.allow_private,
                            sign=None if behind_nat else sign)
        self.contacts: list[Address] = list(self.seeds)  # a publisher's way in: seeds, then who took its record
        self.view = NetworkView(allow_loopback=self.allow_loopback, allow_private=self.allow_private)
        self.joined = asyncio.Event()
        self.last_publish: dict[str, Any] = {}
        self.last_crawl: dict[str, Any] = {}
        self._publish_wanted = asyncio.Event()  # wakes the loop: a publish (or a crawl) is wanted now
        self._publish_requested = False
        self._crawl_requested = False
        self._last_demand_crawl = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._on_joined: list[Callable[[int], None]] = []
        self.published = asyncio.Event()  # set once some other node took our descriptor
        self._on_published: list[Callable[[int], None]] = []

    async def start(self) -> None:
        """Open the DHT socket (errors now, as one line for the user); ``launch`` starts the work."""
        try:
            await self.node.start(self.dht_address)
        except OSError as exc:
            raise _bind_error(self.dht_address, exc) from None

    def launch(self, on_joined: Callable[[int], None] | None = None,
               on_published: Callable[[int], None] | None = None) -> None:
        if on_joined is not None:
            self._on_joined.append(on_joined)
        if on_published is not None:
            self._on_published.append(on_published)
        self._task = asyncio.create_task(self._run())

    def publish_now(self) -> None:
        """The descriptor changed (new address, rotated onion key, renewed before expiry)."""
        self._publish_requested = True
        self._publish_wanted.set()

    def crawl_soon(self) -> None:
        """A relay link from a relay we do not know: crawl now, unless we did for this less than
        DEMAND_CRAWL_S ago (it may have joined since our last crawl)."""
        now = time.monotonic()
        if now - self._last_demand_crawl < DEMAND_CRAWL_S:
            return
        self._last_demand_crawl = now
        self._crawl_requested = True
        self._publish_wanted.set()

    async def lookup(self, relay_id: bytes) -> Descriptor | None:
        """Ask the DHT for one relay's record (a relay met a relay it did not know); valid ones join the view."""
        for raw in await self.node.find_records(relay_id):
            self.view.offer(relay_id, raw, time.time())
        return self.descriptor(relay_id)

    def descriptor(self, relay_id: bytes) -> Descriptor | None:
        """The relay's descriptor if we know it: from our last crawl or among the records we store."""
        return self.view.get(relay_id) or self.node.storage.descriptor(relay_id)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self.node.stop()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        if self.behind_nat:
            await self._run_publisher()
            return
        await self._join()
        await self._publish()
        # once more when the table has settled: the first store went only to the nodes known at join
        next_publish = loop.time() + SECOND_PUBLISH_S
        next_maintain = loop.time() + MAINTAIN_S
        next_replicate = loop.time() + REPLICATE_S
        next_crawl = loop.time() + random.uniform(*RELAY_FIRST_CRAWL_S)
        while True:
            wait = max(0.0, min(next_publish, next_maintain, next_crawl, next_replicate) - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._publish_wanted.wait(), wait)
            self._publish_wanted.clear()
            try:
                now = loop.time()
                if self._crawl_requested:
                    self._crawl_requested = False
                    next_crawl = now
                if self._publish_requested or now >= next_publish:
                    self._publish_requested = False
                    await self._publish()
                    next_publish = loop.time() + REPUBLISH_S
                if now >= next_maintain:
                    if not self.node.peers():
                        await self._join(once=True)
                    await self.node.refresh()
                    next_maintain = loop.time() + MAINTAIN_S
                if now >= next_replicate:
                    await asyncio.gather(*self.node.replicate_old(REPLICATE_S))
                    next_replicate = loop.time() + REPLICATE_S
                if now >= next_crawl:
                    await self._crawl()
                    next_crawl = loop.time() + RELAY_CRAWL_S
            except Exception:  # one failed round must not end discovery for good
                log.exception("DHT maintenance failed; trying again later")
                next_maintain = loop.time() + MAINTAIN_S

    async def _run_publisher(self) -> None:
        """Behind a NAT: publish until some node takes the record, again once the network has settled,
        then every REPUBLISH_S and on change; crawl now and then for ``relays_known``."""
        loop = asyncio.get_running_loop()
        while not await self._publish() and self.seeds:
            await asyncio.sleep(JOIN_RETRY_S)
        if not self.joined.is_set():
            self.joined.set()
            for cb in self._on_joined:
                cb(len(self.contacts))
        next_publish = loop.time() + SECOND_PUBLISH_S
        next_crawl = loop.time() + random.uniform(*RELAY_FIRST_CRAWL_S)
        while True:
            wait = max(0.0, min(next_publish, next_crawl) - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._publish_wanted.wait(), wait)
            self._publish_wanted.clear()
            try:
                now = loop.time()
                if self._crawl_requested:
                    self._crawl_requested = False
                    next_crawl = now
                if self._publish_requested or now >= next_publish:
                    self._publish_requested = False
                    # nobody took it (the network was unreachable for a while): try again soon
                    next_publish = loop.time() + (REPUBLISH_S if await self._publish() else JOIN_RETRY_S)
                if now >= next_crawl:
                    await self._crawl()
                    next_crawl = loop.time() + RELAY_CRAWL_S
            except Exception:  # one failed round must not end discovery for good
                log.exception("DHT publishing failed; trying again later")
                next_publish = loop.time() + JOIN_RETRY_S

    async def _join(self, *, once: bool = False) -> None:
        if not self.seeds:
            self.joined.set()
            for cb in self._on_joined:
                cb(0)
            return
        while True:
            peers = await self.node.join(self.seeds, self.pins)
            if peers:
                log.info("joined the DHT with %d peers", peers)
                if not self.joined.is_set():
                    self.joined.set()
                    for cb in self._on_joined:
                        cb(peers)
                return
            if once:
                return
            await asyncio.sleep(JOIN_RETRY_S)

    async def _publish(self) -> int:
        """Store our descriptor in the DHT; the number of nodes that took it."""
        desc = self.current()
        if self.behind_nat:
            took = await self.node.publish_from(self.contacts, desc.relay_id, desc.encode(), self.pins)
            if took:  # the seeds stay first: they are the ones the operator vouched for
                self.contacts = list(dict.fromkeys([*self.seeds, *took]))
            return self._published(desc, len(took))
        stored = await self.node.publish(desc.relay_id, desc.encode())
        if stored == 0:  # no table (a publisher-only relay, or alone so far): hand it to the seeds directly
            results = await asyncio.gather(*(self.node.store_at(s, desc.relay_id, desc.encode(), self.pins.get(s))
                                             for s in self.seeds))
            stored = sum(results)
        return self._published(desc, stored)

    def _published(self, desc: Descriptor, stored: int) -> int:
        self.last_publish = {"published": desc.published, "stored_at_nodes": stored, "wall": round(time.time())}
        log.info("descriptor published to %d DHT nodes", stored)
        if stored and not self.published.is_set():
            self.published.set()
            for cb in self._on_published:
                cb(stored)
        return stored

    async def _crawl(self) -> None:
        result = await self.node.crawl([*self.contacts, *(a for _, a in self.node.peers())],
                                       pins={**{a: i for i, a in self.node.peers()}, **self.pins})
        wall = time.time()
        for raw in newest_first(result.records):
            self.view.offer(None, raw, wall)
        for desc in self.node.storage.descriptors():
            self.view.offer_descriptor(desc, wall)
        self.last_crawl = {"nodes": len(result.nodes), "seconds": round(result.elapsed_s, 3), "wall": round(wall)}

    def relays_known(self) -> int:
        wall = time.time()
        for desc in self.node.storage.descriptors():
            self.view.offer_descriptor(desc, wall)
        return len(self.view.relays(wall))

    def status(self) -> dict[str, Any]:
        rpc_counters = self.node.protocol.counters if self.node.protocol else {}
        return {"dht_address": f"{self.dht_address[0]}:{self.dht_address[1]}",
                "seeds": [f"{h}:{p}" for h, p in self.seeds], "joined": self.joined.is_set(),
                "publisher_only": self.behind_nat, "contacts": len(self.contacts),
                "peers": len(self.node.peers()), "records_stored": len(self.node.storage),
                "relays_known": self.relays_known(), "last_publish": self.last_publish, "last_crawl": self.last_crawl,
                "counters": {**rpc_counters, **{f"store_{k}": v for k, v in self.node.storage.counters.items()},
                             **{f"view_{k}": v for k, v in self.view.counters.items()}}}

    def peers(self) -> PeersReply:
        wall = time.time()
        self.relays_known()
        return _peers_reply(self.node.peers(), self.view.relays(wall))


def _peers_reply(peers: list[tuple[bytes, Address]], relays: list[Descriptor]) -> PeersReply:
    return PeersReply(True, tuple(DhtPeer(pid.hex(), f"{a[0]}:{a[1]}") for pid, a in peers),
                      tuple(RelayEntry.of(d) for d in relays))


class ClientDiscovery:
    """A client's network view: DHT client only (never in a routing table, answers nothing)."""

    def __init__(self, seeds: Sequence[Seed | Address], cache_path: Path | None, *, self_ids: tuple[bytes, ...] = (),
                 private_network: bool = False) -> None:
        """``private_network``: accept loopback and private (RFC 1918, CGNAT, ULA) relay addresses, for a
        test or private network; off, loopback is accepted only when every seed is loopback (a network
        on one machine) and private addresses never."""
        given = [_as_seed(s) for s in seeds]
        self.seeds = [dht_address(s.address) for s in given]
        self.pins = seed_pins(given)
        self.cache_path = cache_path
        self.allow_loopback = private_network or loopback_only([s.address for s in given])
        self.allow_private = private_network
        self.view = NetworkView(allow_loopback=self.allow_loopback, allow_private=self.allow_private,
                                self_ids=self_ids)
        self.node: DhtNode | None = None
        self.dht_peers: list[tuple[bytes, Address]] = []
        self.silent: set[bytes] = set()  # relays whose DHT node did not answer the last crawl: shown, never excluded
        self.answered: set[bytes] = set()  # the last good crawl's answering DHT nodes (the alarm's baseline)
        self.alarm: str | None = None
        self.last_crawl: dict[str, Any] = {}
        self.from_cache = 0

    def load_cache(self) -> int:
        if self.cache_path is None:
            return 0
        wall = time.time()
        self.view.remember(load_seen(self.cache_path), wall)  # first: cached relays keep their age
        for desc in load_view(self.cache_path, wall):
            if self.view.offer_descriptor(desc, wall) == "added":
                self.from_cache += 1
        return self.from_cache

    async def refresh(self, time_limit_s: float = CLIENT_CRAWL_LIMIT_S) -> dict[str, Any]:
        """Crawl the whole DHT once and merge it into the view; the cache is rewritten if anything is known."""
        if self.node is None:
            node = DhtNode(node_id=None, serve=False, own_record=lambda: None, allow_loopback=self.allow_loopback,
                           allow_private=self.allow_private)
            host = "127.0.0.1" if loopback_only([link_address_of(a) for a in self.seeds]) else (
                "::" if any(":" in h for h, _ in self.seeds) else "0.0.0.0")
            await node.start((host, 0))
            self.node = node
        wall = time.time()
        # every cached relay is a contact too, pinned to its id: discovery survives dead (or lying) seeds;
        # not those behind a NAT, which publish only (their NAT would drop our ping: docs/DHT.md §6)
        cached = {dht_address(d.address): d.relay_id for d in self.view.relays(wall)
                  if d.reachability is None and d.address[1] < 65535
                  and usable_address(*d.address, allow_loopback=self.allow_loopback,
                                     allow_private=self.allow_private)}
        result = await self.node.crawl([*self.seeds, *cached], pins={**cached, **self.pins},
                                       time_limit_s=time_limit_s)
        answered = set(result.nodes)
        # silence is no evidence (an on-path attacker can drop any answer): it is reported, never used to
        # leave a relay out.  A mass disappearance against the last good crawl raises an alarm.
        self.silent = {rid for rid in cached.values() if rid not in answered}
        vanished = self.answered - answered
        if self.answered and len(vanished) >= max(VANISH_ALARM_MIN, VANISH_ALARM_SHARE * len(self.answered)):
            self.alarm = (f"{len(vanished)} of the {len(self.answered)} DHT nodes that answered before are "
                          "silent: the network view may be manipulated (or the network is down); keeping the "
                          "last good view")
            log.warning("%s", self.alarm)
        else:
            self.alarm = None
            self.answered = answered
        wall = time.time()
        outcomes: dict[str, int] = {}
        for raw in newest_first(result.records):
            outcome = self.view.offer(None, raw, wall)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        self.dht_peers = list(result.nodes.items())
        self.last_crawl = {"nodes": len(result.nodes), "unreachable": result.unreachable, "silent": len(self.silent),
                           "records_seen": len(result.records), "seconds": round(result.elapsed_s, 3),
                           "alarm": self.alarm}
        relays = self.view.relays(wall)
        if self.cache_path is not None and relays:
            try:
                save_view(self.cache_path, relays)
                save_seen(self.cache_path, self.view.seen(wall))
            except OSError as exc:
                log.warning("cannot write the network view cache %s: %s", self.cache_path, exc.strerror)
        log.info("crawled %d DHT nodes in %.2f s: %d relays known (%s)", len(result.nodes), result.elapsed_s,
                 len(relays), outcomes)
        return self.last_crawl

    def relays(self) -> list[Descriptor]:
        """Relays to choose paths from: the whole live view.  A relay leaves it only on evidence bound to
        its key (a newer descriptor of its own, or expiry), never because its DHT node was silent: an
        on-path attacker can silence any node (review C2).  Dead relays show up at dial time, where the
        engine's guard and retry logic handle them."""
        return self.view.relays(time.time())

    def known_s(self) -> dict[bytes, float]:
        """Seconds this client has known each relay (path selection weights by it)."""
        return self.view.known_s(time.time())

    def status(self) -> dict[str, Any]:
        return {"relays_known": len(self.view), "relays_silent": len(self.silent), "dht_peers": len(self.dht_peers),
                "from_cache": self.from_cache, "alarm": self.alarm,
                "last_crawl": self.last_crawl, "rejected": self.view.rejected(),
                "counters": {**self.view.counters, **(self.node.rpc.counters if self.node else {})}}

    def peers(self) -> PeersReply:
        return _peers_reply(self.dht_peers, self.relays())

    def close(self) -> None:
        if self.node is not None:
            self.node.stop()
            self.node = None


def link_address_of(dht: Address) -> Address:
    return dht[0], dht[1] - 1


async def discover(seeds: Sequence[Seed | Address], cache_path: Path | None, *,
                   time_limit_s: float = CLIENT_CRAWL_LIMIT_S, self_ids: tuple[bytes, ...] = (),
                   private_network: bool = False) -> tuple[list[Descriptor], ClientDiscovery]:
    """One-shot discovery for ``probe``: the relays, and the ClientDiscovery (closed) for its status."""
    disc = ClientDiscovery(seeds, cache_path, self_ids=self_ids, private_network=private_network)
    disc.load_cache()
    try:
        await disc.refresh(time_limit_s)
    finally:
        disc.close()
    relays = disc.relays()
    if not relays:
        raise ShallotError("discovery found no relay: the seeds did not answer and there is no cached view")
    return relays, disc
