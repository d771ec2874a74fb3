"""The kademlia package, wrapped hard (docs/DHT.md): the asyncio adapter of discovery.

What the wrapping changes in kademlia 2.2 / rpcudp 5 (read their source: it is small):

* **No implicit remote calls.**  rpcudp's ``__getattr__`` turns any unknown attribute into an RPC and
  dispatches whatever name arrives to ``rpc_<name>``.  ``ShallotRpc`` raises AttributeError for unknown
  attributes, sends only the names in ``wire.RPCS`` and checks every request and result with wire.py.
* **Datagrams are parsed where they arrive**, not in fire-and-forget tasks: bad input is counted and
  dropped, never an exception lost in a task.  Replies must come from the address the request went to,
  message ids are os.urandom, outstanding requests and per-source request rates are bounded.
* **Answers are signed** by the answering relay's identity key over the request's digest (wire.py) and
  verified *before* they consume the request: a forged or replayed answer is counted and dropped and
  the request keeps waiting for the real one (rpcudp took the first datagram with the right id, so one
  spoofed packet failed an honest relay: review C2).  Every request names the relay it expects to
  answer; a ping may leave it open (the answer then proves some id bound to the address) or pin it.
* **Node ids are relay ids** (a hash of the identity key) and a contact enters the routing table only
  after it proved the binding: it handed over its signed descriptor, whose first address puts its DHT
  socket exactly where the datagram came from (``records.binds``).  Routing-table caps per address and
  per /16.  Clients send a nil id, are never added to a table, and answer nothing.
* **Values are signed records** (storage.py validates them on store and again on read, newest wins);
  kademlia's majority vote over values (``ValueSpiderCrawl``) is never used: ``DhtNode`` exposes only
  publish, a whole-network crawl and, for relays, a one-round ``find_records`` of one relay id.
* kademlia's pickle state files, its one-hour timers and its 0.0.0.0 default are not used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from kademlia.crawling import NodeSpiderCrawl
from kademlia.network import Server
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable
from rpcudp.protocol import RPCProtocol

from shallot.core.discovery import wire
from shallot.core.discovery.addresses import Address, dht_address, host_group, net_group, same_address
from shallot.core.discovery.records import RecordError, binds, validate_record
from shallot.core.discovery.storage import MAX_PER_HOST, MAX_PER_NET, PAGE_BYTES, RecordStorage
from shallot.core.ratelimit import TokenBuckets
from shallot.core.wire.addresses import source_key

log = logging.getLogger("shallot.dht")

KSIZE = 20
ALPHA = 3
RPC_TIMEOUT_S = 2.0  # kademlia waits 5 s per dead contact; our peers answer within a round trip
MAX_OUTSTANDING = 512
RATE_PER_S = 200.0  # requests per second and source (IPv4 address, IPv6 /64; burst twice that)
RATE_TABLE_MAX = 4096  # sources remembered; the least recently active is forgotten first
# a page's bytes besides its records: header 21, signature 64, msgpack arrays and the 22-byte cursor, and
# 3 bytes of length per record (16 at most)
PAGE_OVERHEAD = 21 + 64 + 2 + 3 + 22 + 3 * 16
CRAWL_TARGETS = 8  # find_node targets spread over the key space, asked of every node, plus its own id
CRAWL_CONCURRENCY = 16
MAX_CRAWL_NODES = 4096
MAX_PAGES_PER_NODE = 256
NODE_SHARE_OF_CRAWL = 0.25  # one node's pages may take at most this share of a crawl's time
PINS_PER_ADDRESS = 4  # distinct ids the crawl tries at one address (one may be a liar's claim)
MAX_KEYS = 8192  # identity keys remembered (relay id -> Ed25519 public key) to verify answers


def _count(counters: dict[str, int], name: str, n: int = 1) -> None:
    counters[name] = counters.get(name, 0) + n


class BoundRoutingTable(RoutingTable):
    """kademlia's table with caps per address group and /16, tracked tasks, and its bucket-boundary bug
    fixed (``get_bucket_for`` compared ``<`` against an inclusive upper bound)."""

    def __init__(self, protocol: ShallotRpc, ksize: int, node: Node) -> None:
        super().__init__(protocol, ksize, node)
        self.shallot = protocol

    def get_bucket_for(self, node: Node) -> int:
        for index, bucket in enumerate(self.buckets):
            if node.long_id <= bucket.range[1]:
                return index
        return len(self.buckets) - 1

    def contacts(self) -> list[Node]:
        return [n for b in self.buckets for n in b.get_nodes()]

    def add_contact(self, node: Node) -> None:
        index = self.get_bucket_for(node)
        bucket = self.buckets[index]
        if bucket.is_new_node(node):
            host, net = host_group(node.ip, node.port), net_group(node.ip, node.port)
            peers = self.contacts()
            if sum(host_group(n.ip, n.port) == host for n in peers) >= MAX_PER_HOST:
                _count(self.shallot.counters, "reject_contact_cap_host")
                return
            if sum(net_group(n.ip, n.port) == net for n in peers) >= MAX_PER_NET:
                _count(self.shallot.counters, "reject_contact_cap_net")
                return
        if bucket.add_node(node):
            return
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            self.add_contact(node)
        else:  # full bucket: ping the least recently seen; it is replaced only if it does not answer
            self.shallot.spawn(self.shallot.call_ping(bucket.head()))


class ShallotRpc(KademliaProtocol):
    def __init__(self, source_node: Node, storage: RecordStorage, ksize: int, *, serve: bool,
                 own_record: Callable[[], bytes | None], allow_loopback: bool, allow_private: bool = False,
                 sign: Callable[[bytes], bytes] | None = None, wait_timeout: float = RPC_TIMEOUT_S) -> None:
        """``sign``: the relay identity's Ed25519 signing function; a node that serves must have one
        (every answer is signed, docs/PROTOCOL.md §12.3)."""
        if serve and sign is None:
            raise ValueError("a DHT node that answers must sign its answers (give the identity's sign)")
        KademliaProtocol.__init__(self, source_node, storage, ksize)
        RPCProtocol.__init__(self, wait_timeout)
        self.router = BoundRoutingTable(self, ksize, source_node)
        self.storage: RecordStorage = storage
        self.serve = serve
        self.own_record = own_record
        self.allow_loopback = allow_loopback
        self.allow_private = allow_private
        self.sign = sign
        self._keys: dict[bytes, bytes] = {}  # relay id -> identity key, from descriptors that validated
        self.counters: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._verified: dict[bytes, Address] = {}  # relay id -> the address its binding proved (bounded)
        # per source, a bounded table that forgets the least recently active first (it used to start
        # over once 4096 other sources had appeared, refilling every flooder's bucket)
        self._rates = TokenBuckets(RATE_PER_S, 2 * RATE_PER_S, max_keys=RATE_TABLE_MAX)
        self._room = wire.REQUEST_MIN_LEN  # the request being answered: its length bounds the answer

    def __getattr__(self, name: str) -> Any:  # rpcudp's version makes every typo a remote call
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r} (no implicit remote calls)")

    # ------------------------------------------------------------------ tasks
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("DHT background task failed: %r", task.exception())

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for fut, timer, *_rest in list(self._outstanding.values()):
            timer.cancel()
            if not fut.done():
                fut.set_result((False, None))
        self._outstanding.clear()

    # ------------------------------------------------------------------ receive
    def datagram_received(self, data: bytes, addr: Any) -> None:
        addr = (str(addr[0]), int(addr[1]))
        try:
            dg = wire.decode_datagram(data)
        except wire.WireError as exc:
            _count(self.counters, f"drop_{exc.reason}")
            return
        if dg.kind == wire.RESPONSE:
            self._accept_response(dg, addr)
            return
        if not self.serve:
            _count(self.counters, "drop_request_to_client")  # clients answer nothing
            return
        if not self._rate_ok(addr[0]):
            _count(self.counters, "drop_rate")
            return
        try:
            name, args = wire.parse_request(dg.body)
        except wire.WireError as exc:
            _count(self.counters, f"drop_{exc.reason}")
            return
        _count(self.counters, f"rpc_in_{name}")
        handler = {"ping": self.rpc_ping, "store": self.rpc_store, "find_node": self.rpc_find_node,
                   "find_value": self.rpc_find_value, "list_records": self.rpc_list_records}[name]
        self._room = len(data)
        try:
            result = handler(addr, *args)
        except Exception:  # a bug of ours must not take the node down
            log.exception("DHT handler %s failed", name)
            _count(self.counters, "handler_error")
            return
        # no amplification: the signed answer is never longer than the (padded) request
        unsigned = wire.encode_result_within(dg.msg_id, result, len(data))
        if unsigned is None:
            _count(self.counters, "drop_answer_too_big")
            return
        if self.transport is not None and self.sign is not None:
            self.transport.sendto(wire.sign_response(unsigned, responder_id=self.source_node.id, request=data,
                                                     sign=self.sign), addr)

    def _accept_response(self, dg: wire.Datagram, address: Address) -> None:
        entry = self._outstanding.get(dg.msg_id)
        if entry is None:
            _count(self.counters, "drop_unknown_response")
            return
        fut, timer, expected, name, digest, peer = entry
        if address != expected:
            _count(self.counters, "drop_response_wrong_source")  # keep waiting for the real one
            return
        if not self._authentic(dg, name, digest, peer, address):
            return  # counted; a forged, replayed or misdirected answer never consumes the request
        timer.cancel()
        del self._outstanding[dg.msg_id]
        if not fut.done():
            fut.set_result((True, dg.body))

    def _authentic(self, dg: wire.Datagram, name: str, digest: bytes, peer: bytes | None, address: Address) -> bool:
        """Is this answer signed, for this very request, by the relay we asked (``peer``; for a ping
        without a pin: by the relay whose descriptor in the answer binds its id to ``address``)?"""
        if name == "ping":
            try:
                node_id, record = wire.parse_ping_result(dg.body)
                desc = validate_record(node_id, record, time.time(), allow_loopback=self.allow_loopback,
                                       allow_private=self.allow_private)
            except (wire.WireError, RecordError):
                _count(self.counters, "drop_answer_unbound")
                return False
            if peer is not None and node_id != peer:
                _count(self.counters, "drop_answer_pin")  # another identity at a pinned address
                return False
            if not same_address(dht_address(desc.address), address):
                _count(self.counters, "drop_answer_unbound")
                return False
            identity = desc.identity_pub
        else:
            key = self._keys.get(peer) if peer is not None else None
            if key is None:
                _count(self.counters, "drop_answer_unverifiable")  # we never proved who lives there
                return False
            node_id, identity = peer, key
        if not wire.verify_answer(dg, identity_pub=identity, responder_id=node_id, digest=digest):
            _count(self.counters, "drop_answer_signature")
            return False
        self._learn_key(node_id, identity)
        return True

    def _learn_key(self, relay_id: bytes, identity_pub: bytes) -> None:
        """Remember a relay's identity key (relay id = hash of it, so it never changes for an id)."""
        if relay_id not in self._keys and len(self._keys) >= MAX_KEYS:
            self._keys.pop(next(iter(self._keys)))  # the oldest: bounded memory
        self._keys[relay_id] = identity_pub

    def knows(self, relay_id: bytes) -> bool:
        """True if answers from ``relay_id`` can be verified (its key came with a bound ping answer)."""
        return relay_id in self._keys

    def _timeout(self, msg_id: bytes) -> None:
        entry = self._outstanding.pop(msg_id, None)
        if entry is not None:
            _count(self.counters, "rpc_timeouts")
            if not entry[0].done():
                entry[0].set_result((False, None))

    def _rate_ok(self, ip: str) -> bool:
        return self._rates.allow(source_key(ip), time.monotonic())

    def _bind(self, relay_id: bytes, address: Address) -> None:
        """Remember that ``relay_id`` proved ``address`` (bounded: the oldest binding is forgotten)."""
        self._verified.pop(relay_id, None)
        self._verified[relay_id] = address
        if len(self._verified) > MAX_KEYS:
            del self._verified[next(iter(self._verified))]

    # ------------------------------------------------------------------ handlers (sync: no lost tasks)
    def _caller(self, sender: Address, nodeid: bytes | None) -> None:
        if nodeid is not None:
            self.welcome_if_new(Node(nodeid, sender[0], sender[1]))

    def rpc_ping(self, sender: Address, nodeid: bytes | None, record: bytes | None) -> list[bytes] | None:
        if nodeid is not None and record is not None:
            if binds(nodeid, record, sender, time.time(), allow_loopback=self.allow_loopback,
                     allow_private=self.allow_private):
                self._bind(nodeid, sender)
            else:
                _count(self.counters, "reject_binding")
        self._caller(sender, nodeid)
        own = self.own_record()
        return [self.source_node.id, own] if own is not None else None

    def rpc_store(self, sender: Address, nodeid: bytes | None, key: bytes, value: bytes) -> bool:
        self._caller(sender, nodeid)
        return self.storage.offer(key, value) in ("stored", "same")

    def rpc_find_node(self, sender: Address, nodeid: bytes | None, key: bytes) -> list[list[Any]]:
        self._caller(sender, nodeid)
        exclude = Node(nodeid or bytes(20), sender[0], sender[1])
        return [[n.id, n.ip, n.port] for n in self.router.find_neighbors(Node(key), exclude=exclude)]

    def rpc_find_value(self, sender: Address, nodeid: bytes | None, key: bytes) -> Any:
        value = self.storage.get(key)
        if value is None:
            return self.rpc_find_node(sender, nodeid, key)
        self._caller(sender, nodeid)
        return {"value": value}

    def rpc_list_records(self, sender: Address, nodeid: bytes | None, after: bytes | None) -> list[Any]:
        self._caller(sender, nodeid)
        # the page fits the request: its records leave room for the framing (header, cursor, signature)
        records, cursor = self.storage.page(after, max_bytes=min(PAGE_BYTES, self._room - PAGE_OVERHEAD),
                                            max_count=wire.MAX_PAGE_RECORDS)
        return [records, cursor]

    # ------------------------------------------------------------------ send
    def _my_id(self) -> bytes | None:
        return self.source_node.id if self.serve else None

    def _call(self, address: Address, name: str, *args: Any, peer: bytes | None) -> asyncio.Future[tuple[bool, Any]]:
        """Send one request; ``peer``: the relay id whose signed answer we accept (a ping may leave it
        None, any other request without a known ``peer`` key can get no acceptable answer)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        if self.transport is None or len(self._outstanding) >= MAX_OUTSTANDING:
            _count(self.counters, "rpc_not_sent")
            fut.set_result((False, None))
            return fut
        msg_id = os.urandom(wire.MSG_ID_LEN)
        address = (str(address[0]), int(address[1]))
        request = wire.encode_request(msg_id, name, args)
        self.transport.sendto(request, address)
        _count(self.counters, f"rpc_out_{name}")
        timer = loop.call_later(self._wait_timeout, self._timeout, msg_id)
        self._outstanding[msg_id] = (fut, timer, address, name, wire.request_digest(request), peer)
        return fut

    def ping(self, address: Address, nodeid: bytes | None, record: bytes | None, *,
             peer: bytes | None = None) -> asyncio.Future[Any]:
        return self._call(address, "ping", nodeid, record, peer=peer)

    def store(self, address: Address, nodeid: bytes | None, key: bytes, value: bytes, *,
              peer: bytes | None) -> asyncio.Future[Any]:
        return self._call(address, "store", nodeid, key, value, peer=peer)

    def find_node(self, address: Address, nodeid: bytes | None, key: bytes, *,
                  peer: bytes | None) -> asyncio.Future[Any]:
        return self._call(address, "find_node", nodeid, key, peer=peer)

    def find_value(self, address: Address, nodeid: bytes | None, key: bytes, *,
                   peer: bytes | None) -> asyncio.Future[Any]:
        return self._call(address, "find_value", nodeid, key, peer=peer)

    def list_records(self, address: Address, nodeid: bytes | None, after: bytes | None, *,
                     peer: bytes | None) -> asyncio.Future[Any]:
        return self._call(address, "list_records", nodeid, after, peer=peer)

    async def ping_address(self, address: Address, pin: bytes | None = None) -> Node | None:
        """Ping; the Node whose signed answer bound its id to this address (``pin``: only that id), or
        None if no such answer came in time."""
        own = self.own_record() if self.serve else None
        ok, result = await self.ping(address, self._my_id(), own, peer=pin)
        if not ok:
            return None
        try:  # checked (and its signature verified) in _authentic already
            node_id, _record = wire.parse_ping_result(result)
        except wire.WireError:
            _count(self.counters, "reject_bad_result")
            return None
        address = (str(address[0]), int(address[1]))
        self._bind(node_id, address)
        return Node(node_id, address[0], address[1])

    async def _proven(self, node: Node) -> bool:
        """True once ``node``'s id is bound to its address and its key known (pinging it if need be):
        a contact some node named is only asked anything once it proved who it is."""
        if self.knows(node.id) and self._verified.get(node.id) == (node.ip, node.port):
            return True
        proven = await self.ping_address((node.ip, node.port), pin=node.id)
        return proven is not None

    # kademlia's call_* helpers, with every result checked before kademlia's crawlers see it
    async def call_ping(self, node_to_ask: Node) -> tuple[bool, Any]:
        node = await self.ping_address((node_to_ask.ip, node_to_ask.port), pin=node_to_ask.id)
        result = (node is not None, None)
        return self.handle_call_response(result, node_to_ask)

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        if not await self._proven(node_to_ask):
            return self.handle_call_response((False, None), node_to_ask)
        ok, data = await self.find_node((node_to_ask.ip, node_to_ask.port), self._my_id(), node_to_find.id,
                                        peer=node_to_ask.id)
        result: tuple[bool, Any] = (False, None)
        if ok:
            try:
                result = (True, [list(c) for c in wire.parse_contacts(data)])
            except wire.WireError:
                _count(self.counters, "reject_bad_result")
        return self.handle_call_response(result, node_to_ask)

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        if not await self._proven(node_to_ask):
            return self.handle_call_response((False, None), node_to_ask)
        ok, data = await self.find_value((node_to_ask.ip, node_to_ask.port), self._my_id(), node_to_find.id,
                                         peer=node_to_ask.id)
        result: tuple[bool, Any] = (False, None)
        if ok:
            try:
                found = wire.parse_find_value_result(data)
                if isinstance(found, bytes):
                    # kademlia would vote among the values; we only pass on one that validates
                    try:
                        validate_record(node_to_find.id, found, time.time(), allow_loopback=self.allow_loopback,
                                        allow_private=self.allow_private)
                        result = (True, {"value": found})
                    except RecordError as exc:
                        _count(self.counters, f"reject_{exc.reason}")
                        result = (True, [])
                else:
                    result = (True, [list(c) for c in found])
            except wire.WireError:
                _count(self.counters, "reject_bad_result")
        return self.handle_call_response(result, node_to_ask)

    async def call_store(self, node_to_ask: Node, key: bytes, value: bytes) -> tuple[bool, Any]:
        if not await self._proven(node_to_ask):
            return self.handle_call_response((False, None), node_to_ask)
        ok, data = await self.store((node_to_ask.ip, node_to_ask.port), self._my_id(), key, value,
                                    peer=node_to_ask.id)
        result: tuple[bool, Any] = (False, None)
        if ok:
            try:
                result = (True, wire.parse_store_result(data))
            except wire.WireError:
                _count(self.counters, "reject_bad_result")
        return self.handle_call_response(result, node_to_ask)

    def handle_call_response(self, result: tuple[bool, Any], node: Node) -> tuple[bool, Any]:
        if not result[0]:
            if not self.router.is_new_node(node):
                self.router.remove_contact(node)
            return result
        self.welcome_if_new(node)
        return result

    # ------------------------------------------------------------------ admission
    def welcome_if_new(self, node: Node) -> None:
        """Admit a contact only once it proved its id (a client never keeps a table)."""
        if not self.serve or node.id == self.source_node.id:
            return
        addr = (node.ip, node.port)
        if self._verified.get(node.id) != addr:
            # no ping back: it would send a spoofed source more than it sent us (amplification).  A relay
            # proves itself by the descriptor in its own ping, which it sends before asking anything
            _count(self.counters, "reject_unbound_caller")
            return
        if not self.router.is_new_node(node):
            return
        # kademlia §2.5: hand the newcomer the records it is now closer to than we are
        for key, value in self.storage:
            keynode = Node(key)
            neighbors = self.router.find_neighbors(keynode)
            if neighbors:
                new_node_close = node.distance_to(keynode) < neighbors[-1].distance_to(keynode)
                this_closest = self.source_node.distance_to(keynode) < neighbors[0].distance_to(keynode)
            if not neighbors or (new_node_close and this_closest):
                self.spawn(self.call_store(node, key, value))
        self.router.add_contact(node)


# -------------------------------------------------------------------------------------------------- the node


@dataclass
class CrawlResult:
    nodes: dict[bytes, Address] = field(default_factory=dict)  # DHT nodes that proved their id and answered
    records: set[bytes] = field(default_factory=set)  # raw, not yet validated: the view checks each
    unreachable: int = 0
    failed: set[Address] = field(default_factory=set)  # addresses where no (pinned) id answered
    pin_failed: set[tuple[Address, bytes]] = field(default_factory=set)  # (address, id) tried in vain
    elapsed_s: float = 0.0


class DhtNode(Server):
    """One DHT endpoint: a relay (serve=True: answers, keeps a routing table, publishes) or a client
    (serve=False: crawls only).  The narrow interface: start, publish, crawl, peers, counters, stop."""

    def __init__(self, *, node_id: bytes | None, serve: bool, own_record: Callable[[], bytes | None],
                 allow_loopback: bool, allow_private: bool = False, sign: Callable[[bytes], bytes] | None = None,
                 ksize: int = KSIZE, alpha: int = ALPHA) -> None:
        """``sign``: the relay identity's signing function (required when ``serve``)."""
        if serve and sign is None:
            raise ValueError("a DHT node that answers must sign its answers (give the identity's sign)")
        storage = RecordStorage(time.time, allow_loopback=allow_loopback, allow_private=allow_private)
        # a client's id is never sent; it only orders its own (unused) table
        super().__init__(ksize, alpha, node_id or secrets.token_bytes(20), storage)
        self.storage: RecordStorage = storage  # kademlia's ``storage or ForgetfulStorage()`` drops an empty one
        self.serve = serve
        self.own_record = own_record
        self.allow_loopback = allow_loopback
        self.allow_private = allow_private
        self.sign = sign
        self.protocol: ShallotRpc | None = None

    def _create_protocol(self) -> ShallotRpc:
        return ShallotRpc(self.node, self.storage, self.ksize, serve=self.serve, own_record=self.own_record,
                          allow_loopback=self.allow_loopback, allow_private=self.allow_private, sign=self.sign)

    async def start(self, local: Address) -> Address:
        """Bind the DHT socket (an explicit address, never kademlia's 0.0.0.0 default); our address."""
        loop = asyncio.get_running_loop()
        # bound here, not by the loop: uvloop's bind errors carry no errno to tell "port in use" apart
        sock = socket.socket(socket.AF_INET6 if ":" in local[0] else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind(local)
        except OSError:
            sock.close()
            raise
        self.transport, self.protocol = await loop.create_datagram_endpoint(self._create_protocol, sock=sock)
        return self.transport.get_extra_info("sockname")[:2]

    def stop(self) -> None:
        if self.protocol is not None:
            self.protocol.close()
        super().stop()

    @property
    def rpc(self) -> ShallotRpc:
        if self.protocol is None:
            raise RuntimeError("DhtNode.start() first")
        return self.protocol

    async def bootstrap_node(self, addr: Address) -> Node | None:
        return await self.rpc.ping_address(addr)

    async def join(self, seeds: list[Address], pins: dict[Address, bytes] | None = None) -> int:
        """Ping the seeds (``pins``: the id expected at a seed's address), then look up our own id (fills
        the table); the number of contacts."""
        if seeds:
            pins = pins or {}
            found = await asyncio.gather(*(self.rpc.ping_address(a, pins.get(a)) for a in seeds))
            nodes = [n for n in found if n is not None]
            await NodeSpiderCrawl(self.rpc, self.node, nodes, self.ksize, self.alpha).find()
        return len(self.rpc.router.contacts())

    async def refresh(self) -> None:
        """Look up our own id and one random id: keeps buckets fresh without kademlia's hour timers."""
        for target in (self.node.id, secrets.token_bytes(20)):
            node = Node(target)
            nearest = self.rpc.router.find_neighbors(node, self.alpha)
            if nearest:
                await NodeSpiderCrawl(self.rpc, node, nearest, self.ksize, self.alpha).find()

    async def publish(self, key: bytes, record: bytes) -> int:
        """Store the record here and on the k nodes closest to its key; how many remote nodes took it."""
        self.storage.offer(key, record)
        node = Node(key)
        nearest = self.rpc.router.find_neighbors(node)
        if not nearest:
            return 0
        closest = await NodeSpiderCrawl(self.rpc, node, nearest, self.ksize, self.alpha).find()
        results = await asyncio.gather(*(self.rpc.call_store(n, key, record) for n in closest))
        return sum(1 for ok, took in results if ok and took is True)

    async def publish_from(self, contacts: list[Address], key: bytes, record: bytes,
                           pins: dict[Address, bytes] | None = None) -> list[Address]:
        """Publish without a routing table (a node that serves nothing, such as a relay behind a NAT):
        prove the given contacts (``pins``: the id expected at an address), look up the k nodes closest to
        the key through them and store there.  The addresses that took the record (the contacts for the
        next time)."""
        pins = pins or {}
        found = await asyncio.gather(*(self.rpc.ping_address(a, pins.get(a)) for a in dict.fromkeys(contacts)))
        proven = [n for n in found if n is not None]
        if not proven:
            return []
        closest = await NodeSpiderCrawl(self.rpc, Node(key), proven, self.ksize, self.alpha).find()
        results = await asyncio.gather(*(self.rpc.call_store(n, key, record) for n in closest))
        return [(n.ip, n.port) for n, (ok, took) in zip(closest, results, strict=True) if ok and took is True]

    async def find_records(self, key: bytes) -> list[bytes]:
        """The records for one key (a relay id): ours, else what the nodes of our table closest to it answer,
        one round, every answer validated (a relay checking a relay it met on a link; no vote, no spider)."""
        local = self.storage.get(key)
        if local is not None:
            return [local]
        node = Node(key)
        nearest = self.rpc.router.find_neighbors(node, self.ksize)
        results = await asyncio.gather(*(self.rpc.call_find_value(n, node) for n in nearest))
        return [data["value"] for ok, data in results if ok and isinstance(data, dict)]

    async def store_at(self, addr: Address, key: bytes, record: bytes, pin: bytes | None = None) -> bool:
        """Store directly at one address (a publisher-only relay, e.g. behind a NAT, keeps no table)."""
        node = await self.rpc.ping_address(addr, pin)
        if node is None:
            return False
        ok, data = await self.rpc.store(addr, self.rpc._my_id(), key, record, peer=node.id)
        return bool(ok and data is True)

    def replicate_old(self, older_than_s: float) -> list[Coroutine[Any, Any, int]]:
        return [self.publish(k, v) for k, v in self.storage.iter_older_than(older_than_s)]

    def peers(self) -> list[tuple[bytes, Address]]:
        if self.protocol is None:
            return []
        return [(n.id, (n.ip, n.port)) for n in self.protocol.router.contacts()]

    async def crawl(self, seeds: list[Address], *, pins: dict[Address, bytes] | None = None,
                    max_nodes: int = MAX_CRAWL_NODES, concurrency: int = CRAWL_CONCURRENCY,
                    time_limit_s: float = 30.0) -> CrawlResult:
        """Enumerate the whole DHT: every node reached through find_node over the key space, and every
        record each of them stores, page by page.  Everyone who crawls asks every node the same
        questions, so the crawl says nothing about which relays the crawler will use.

        ``pins``: the relay id expected at a seed's address (``ID@HOST:PORT``, or a cached relay): only a
        signed answer from that id counts there.  A contact some node named is pinned to the id it was
        named with; an address is tried under up to PINS_PER_ADDRESS ids, so a liar naming an honest
        address under a wrong id cannot keep the crawl from the honest node."""
        rpc = self.rpc
        started = time.monotonic()
        out = CrawlResult()
        # round robin (review M6): a step is one visit (ping, find_node) or one page of one node; a node's
        # next page goes to the back of the queue, so no node holds a slot for more than one step, and a
        # node's pages stop at MAX_PAGES_PER_NODE or when its answers have taken its share of the crawl
        queue: deque[tuple[bool, Address, bytes | None, bytes | None, int]] = deque()  # (page?, addr, id, cursor, n)
        spent: dict[Address, float] = {}  # seconds a node's pages have taken
        budget = NODE_SHARE_OF_CRAWL * time_limit_s
        seen: set[tuple[Address, bytes | None]] = set()
        tries: dict[Address, int] = {}
        answered: set[Address] = set()
        hosts: dict[str, int] = {}
        targets = [(i << (160 - 3)).to_bytes(20, "big") for i in range(CRAWL_TARGETS)]
        pins = pins or {}

        def enqueue(addr: Address, pin: bytes | None) -> None:
            addr = (str(addr[0]), int(addr[1]))
            if (addr, pin) in seen or len(seen) >= max_nodes:
                return
            if addr not in tries:
                try:
                    group = host_group(*addr)
                except ValueError:
                    return
                if hosts.get(group, 0) >= MAX_PER_HOST:
                    _count(rpc.counters, "crawl_cap_host")
                    return
                hosts[group] = hosts.get(group, 0) + 1
            elif tries[addr] >= PINS_PER_ADDRESS:
                _count(rpc.counters, "crawl_cap_pins")
                return
            tries[addr] = tries.get(addr, 0) + 1
            seen.add((addr, pin))
            queue.append((False, addr, pin, None, 0))

        async def visit(addr: Address, pin: bytes | None) -> None:
            if pin is not None and pin in out.nodes:
                return  # that relay already answered (at another address, or under no pin)
            node = await rpc.ping_address(addr, pin)
            if node is None:
                if pin is not None:
                    out.pin_failed.add((addr, pin))
                return
            answered.add(addr)
            if node.id in out.nodes:
                return
            out.nodes[node.id] = addr
            answers = await asyncio.gather(*(rpc.find_node(addr, rpc._my_id(), t, peer=node.id)
                                             for t in [node.id, *targets]))
            for ok, data in answers:
                if ok:
                    try:
                        for cid, ip, port in wire.parse_contacts(data):
                            enqueue((ip, port), cid)
                    except wire.WireError:
                        _count(rpc.counters, "reject_bad_result")
            queue.append((True, addr, node.id, None, 0))

        async def page(addr: Address, node_id: bytes, cursor: bytes | None, n: int) -> None:
            t0 = time.monotonic()
            try:
                ok, data = await rpc.list_records(addr, rpc._my_id(), cursor, peer=node_id)
            finally:
                spent[addr] = spent.get(addr, 0.0) + time.monotonic() - t0
            if not ok:
                return
            try:
                records, nxt = wire.parse_page_result(data)
            except wire.WireError:
                _count(rpc.counters, "reject_bad_result")
                return
            out.records.update(records)
            if nxt is None or (cursor is not None and nxt <= cursor):
                return  # done, or a node paging backwards to keep us busy
            if n + 1 >= MAX_PAGES_PER_NODE or spent[addr] >= budget:
                _count(rpc.counters, "crawl_node_budget")  # what it sent so far is kept
                return
            queue.append((True, addr, node_id, nxt, n + 1))  # behind every other node's next step

        async def bounded_step(is_page: bool, addr: Address, ident: bytes | None, cursor: bytes | None,
                               n: int) -> None:
            # one step holds a slot for at most two RPC timeouts (a visit: a ping, then find_nodes at once)
            with contextlib.suppress(TimeoutError):
                if is_page:
                    assert ident is not None
                    await asyncio.wait_for(page(addr, ident, cursor, n), 2 * RPC_TIMEOUT_S)
                else:
                    await asyncio.wait_for(visit(addr, ident), 2 * RPC_TIMEOUT_S)

        for seed in seeds:
            seed = (str(seed[0]), int(seed[1]))
            enqueue(seed, pins.get(seed))
        running: set[asyncio.Task[None]] = set()
        try:
            while queue or running:
                while queue and len(running) < concurrency:
                    running.add(asyncio.ensure_future(bounded_step(*queue.popleft())))
                left = started + time_limit_s - time.monotonic()
                if left <= 0:
                    _count(rpc.counters, "crawl_time_limit")
                    break  # keep what we have; the rest is cancelled below
                done, running = await asyncio.wait(running, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.exception() is not None:
                        log.warning("crawl step failed: %r", task.exception())
        finally:
            for task in running:
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*running, return_exceptions=True)
        out.failed = set(tries) - answered
        out.unreachable = len(out.failed)
        out.elapsed_s = time.monotonic() - started
        return out
