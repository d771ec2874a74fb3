"""The crawler's bounds against DHT nodes that answer what they like (core/discovery/dht.py ``DhtNode.crawl``,
docs/DHT.md §3, §5): a cap on nodes and per address, one visit per identity, paging that cannot be
turned backwards, a failed page that ends the paging, and a time limit.  The nodes are real DhtNodes on
loopback whose answers a script decides."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio

from shallot.core.discovery import dht, wire
from shallot.core.discovery.addresses import Address
from shallot.core.discovery.dht import CRAWL_TARGETS, DhtNode, ShallotRpc
from shallot.core.discovery.storage import MAX_PER_HOST
from shallot.crypto.descriptor import Descriptor
from shallot.crypto.keys import RelayKeys


@dataclass
class Script:
    contacts: list[list[Any]] = field(default_factory=list)  # what find_node answers
    pages: dict[bytes | None, list[Any]] = field(default_factory=dict)  # list_records(after) -> [records, cursor]
    silent: set[str] = field(default_factory=set)  # requests never answered
    value: bytes | None = None  # what find_value answers, whatever key is asked for
    asked: Counter[str] = field(default_factory=Counter)
    log: list[tuple[int, str]] = field(default_factory=list)  # (id of the script, request name), in arrival order


class ScriptedRpc(ShallotRpc):
    script: Script

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            name, _ = wire.parse_request(wire.decode_datagram(data).body)
        except wire.WireError:
            name = ""
        self.script.asked[name] += 1
        self.script.log.append((id(self.script), name))
        if name not in self.script.silent:
            super().datagram_received(data, addr)

    def rpc_find_node(self, sender: Address, nodeid: bytes | None, key: bytes) -> list[list[Any]]:
        return self.script.contacts

    def rpc_list_records(self, sender: Address, nodeid: bytes | None, after: bytes | None) -> list[Any]:
        return self.script.pages.get(after, [[], None])

    def rpc_find_value(self, sender: Address, nodeid: bytes | None, key: bytes) -> Any:
        return {"value": self.script.value} if self.script.value is not None else []


class ScriptedNode(DhtNode):
    """A DHT node with its own identity, bound on loopback, that answers as its script says."""

    def __init__(self, script: Script, keys: RelayKeys | None = None) -> None:
        self.keys = keys or RelayKeys.generate(secrets.token_bytes, time.time())
        self.record = b""
        super().__init__(node_id=self.keys.relay_id, serve=True, own_record=lambda: self.record, allow_loopback=True,
                         sign=self.keys.sign)
        self.script = script

    def _create_protocol(self) -> ShallotRpc:
        rpc = ScriptedRpc(self.node, self.storage, self.ksize, serve=True, own_record=self.own_record,
                          allow_loopback=True, sign=self.sign)
        rpc.script = self.script
        return rpc

    async def listen(self) -> Address:
        host, port = await self.start(("127.0.0.1", 0))
        self.desc = Descriptor.create(self.keys, nickname="s", addresses=((host, port - 1),), exit_node=False,
                                      published=int(time.time()), lifetime_s=3600)
        self.record = self.desc.encode()
        return (host, port)


@pytest_asyncio.fixture
async def nodes():
    made: list[DhtNode] = []
    yield made
    for node in made:
        node.stop()


async def _client(made: list[DhtNode]) -> DhtNode:
    client = DhtNode(node_id=None, serve=False, own_record=lambda: None, allow_loopback=True)
    await client.start(("127.0.0.1", 0))
    made.append(client)
    return client


async def _scripted(made: list[DhtNode], script: Script, keys: RelayKeys | None = None) -> tuple[ScriptedNode, Address]:
    node = ScriptedNode(script, keys)
    addr = await node.listen()
    made.append(node)
    return node, addr


def _silent_ports(n: int) -> list[int]:
    """Loopback ports nobody listens on (a crawler's pings there go unanswered)."""
    import socket

    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.asyncio
async def test_the_crawl_visits_at_most_max_nodes(nodes) -> None:
    script = Script(contacts=[[secrets.token_bytes(20), "127.0.0.1", p] for p in _silent_ports(8)])
    _seed, seed_addr = await _scripted(nodes, script)
    client = await _client(nodes)
    result = await client.crawl([seed_addr], max_nodes=4, time_limit_s=10)
    assert len(result.nodes) + len(result.failed) == 4  # the seed and three of its eight contacts
    assert client.rpc.counters["rpc_out_ping"] == 4


@pytest.mark.asyncio
async def test_the_crawl_takes_at_most_max_per_host_addresses_of_one_host(nodes,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # on loopback an address group is an address and a port; here it is the address alone, as for a public IPv4
    monkeypatch.setattr(dht, "host_group", lambda ip, port: ip)
    script = Script(contacts=[[secrets.token_bytes(20), "127.0.0.1", p] for p in _silent_ports(6)])
    _seed, seed_addr = await _scripted(nodes, script)
    client = await _client(nodes)
    result = await client.crawl([seed_addr], time_limit_s=10)
    assert len(result.nodes) + len(result.failed) == MAX_PER_HOST  # the seed counts
    # the three left out are offered again in each of the seed's 1 + CRAWL_TARGETS find_node answers
    assert client.rpc.counters["crawl_cap_host"] == (6 - (MAX_PER_HOST - 1)) * (1 + CRAWL_TARGETS)


@pytest.mark.asyncio
async def test_one_identity_at_two_addresses_is_visited_once(nodes) -> None:
    keys = RelayKeys.generate(secrets.token_bytes, time.time())
    a, a_addr = await _scripted(nodes, Script(), keys)
    b, b_addr = await _scripted(nodes, Script(), keys)  # both bind the same id, each to its own address
    client = await _client(nodes)
    result = await client.crawl([a_addr, b_addr], time_limit_s=10)
    assert list(result.nodes) == [keys.relay_id]
    asked = a.script.asked + b.script.asked
    assert asked["ping"] == 2 and asked["find_node"] == 1 + CRAWL_TARGETS and asked["list_records"] == 1


@pytest.mark.asyncio
async def test_paging_stops_at_the_end_and_when_a_node_pages_backwards(nodes, caplog: pytest.LogCaptureFixture) -> None:
    rec = [_record() for _ in range(3)]
    forward = Script(pages={None: [[rec[0]], b"\x50" * 20], b"\x50" * 20: [[rec[1]], None]})
    backwards = Script(pages={None: [[rec[2]], b"\x50" * 20], b"\x50" * 20: [[], b"\x10" * 20],
                              b"\x10" * 20: [[], b"\x10" * 20]})
    f, f_addr = await _scripted(nodes, forward)
    k, k_addr = await _scripted(nodes, backwards)
    client = await _client(nodes)
    with caplog.at_level(logging.WARNING, logger="shallot.dht"):
        result = await client.crawl([f_addr, k_addr], time_limit_s=10)
    assert set(rec) <= result.records
    assert f.script.asked["list_records"] == 2 and k.script.asked["list_records"] == 2
    assert not caplog.records  # no crawl step failed on the way


@pytest.mark.asyncio
async def test_a_page_that_never_comes_ends_that_nodes_paging(nodes) -> None:
    node, addr = await _scripted(nodes, Script(silent={"list_records"}))
    client = await _client(nodes)
    result = await client.crawl([addr], time_limit_s=10)
    assert list(result.nodes) == [node.keys.relay_id] and node.script.asked["list_records"] == 1
    assert client.rpc.counters["rpc_timeouts"] == 1 and "reject_bad_result" not in client.rpc.counters


@pytest.mark.asyncio
async def test_the_crawl_ends_at_its_time_limit(nodes) -> None:
    _node, addr = await _scripted(nodes, Script(silent={"find_node"}))  # answers pings, then nothing
    client = await _client(nodes)
    started = time.monotonic()
    await client.crawl([addr], time_limit_s=0.3)
    elapsed = time.monotonic() - started
    assert client.rpc.counters["crawl_time_limit"] == 1
    assert elapsed < dht.RPC_TIMEOUT_S  # it did not wait for the unanswered requests


@pytest.mark.asyncio
async def test_a_client_keeps_no_routing_table(nodes) -> None:
    node, addr = await _scripted(nodes, Script())
    client = await _client(nodes)
    result = await client.crawl([addr], time_limit_s=10)
    assert len(result.nodes) == 1
    await asyncio.sleep(0.1)  # a verification, if one were started, would have left by now
    assert client.peers() == [] and client.rpc.counters["rpc_out_ping"] == 1
    # kademlia's own helpers answer through handle_call_response: a proven, answering node is still not kept
    from kademlia.node import Node

    assert (await client.rpc.call_ping(Node(node.keys.relay_id, *addr)))[0]
    await asyncio.sleep(0.1)
    assert client.peers() == []


def _record() -> bytes:
    keys = RelayKeys.generate(secrets.token_bytes, time.time())
    return Descriptor.create(keys, nickname="r", addresses=(("127.0.0.1", 9000),), exit_node=False,
                             published=int(time.time()), lifetime_s=3600).encode()


@pytest.mark.asyncio
async def test_a_value_lookup_passes_on_only_a_record_that_validates_under_its_key(nodes) -> None:
    from kademlia.node import Node

    good = Descriptor.decode(_record())
    forged = bytearray(good.encode())
    forged[-1] ^= 1  # the signature's last byte
    node, addr = await _scripted(nodes, Script())
    client = await _client(nodes)
    asked = Node(node.keys.relay_id, *addr)
    node.script.value = bytes(forged)
    assert await client.rpc.call_find_value(asked, Node(good.relay_id)) == (True, [])
    assert client.rpc.counters["reject_signature"] == 1
    node.script.value = good.encode()
    assert await client.rpc.call_find_value(asked, Node(good.relay_id)) == (True, {"value": good.encode()})
    node.script.value = good.encode()  # a valid record, but filed under another key
    assert await client.rpc.call_find_value(asked, Node(secrets.token_bytes(20))) == (True, [])
    assert client.rpc.counters["reject_key_mismatch"] == 1
    node.script.silent = {"find_value"}
    ok, _ = await client.rpc.call_find_value(asked, Node(good.relay_id))
    assert not ok and "reject_bad_result" not in client.rpc.counters


def _endless_pages(n: int) -> dict[bytes | None, list[Any]]:
    cursor = [None, *((i + 1).to_bytes(20, "big") for i in range(n))]
    return {cursor[i]: [[], cursor[i + 1]] for i in range(n)}


@pytest.mark.asyncio
async def test_pages_go_round_robin_and_a_node_gets_at_most_its_page_budget(nodes, monkeypatch) -> None:
    monkeypatch.setattr(dht, "MAX_PAGES_PER_NODE", 6)
    log: list[tuple[int, str]] = []
    endless = Script(pages=_endless_pages(50), log=log)  # never says "the end"
    short = Script(pages={None: [[_record()], b"\x50" * 20], b"\x50" * 20: [[_record()], None]}, log=log)
    _e, e_addr = await _scripted(nodes, endless)
    _s, s_addr = await _scripted(nodes, short)
    client = await _client(nodes)
    result = await client.crawl([e_addr, s_addr], concurrency=1, time_limit_s=20)
    assert len(result.records) == 2 and endless.asked["list_records"] == 6  # the page budget
    assert client.rpc.counters["crawl_node_budget"] == 1
    pages = [who for who, name in log if name == "list_records"]
    # one slot, two nodes: the short node's two pages come before the endless node's third (round robin)
    assert pages[:4] == [id(endless), id(short)] * 2


@pytest.mark.asyncio
async def test_a_nodes_pages_stop_when_they_took_its_share_of_the_crawl(nodes, monkeypatch) -> None:
    monkeypatch.setattr(dht, "NODE_SHARE_OF_CRAWL", 0.0)  # no time at all: one page, then the budget is spent
    node, addr = await _scripted(nodes, Script(pages=_endless_pages(50)))
    client = await _client(nodes)
    await client.crawl([addr], time_limit_s=20)
    assert node.script.asked["list_records"] == 1 and client.rpc.counters["crawl_node_budget"] == 1
