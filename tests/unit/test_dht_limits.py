"""The DHT's limits (core/discovery/dht.py, docs/DHT.md §4-5, PROTOCOL §12.4): the per-source request rate and
its bounded table, the routing table's per-address and per-/16 caps, outstanding requests, verifications
in flight, contacts that cannot prove the id they claim.  On loopback sockets where the adapter's socket
is the point, and straight into the routing table where it is not."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time

import pytest
from kademlia.node import Node

from shallot.core.discovery import dht, wire
from shallot.core.discovery.dht import (
    MAX_OUTSTANDING,
    RATE_PER_S,
    RATE_TABLE_MAX,
    DhtNode,
)
from shallot.core.discovery.storage import MAX_PER_HOST, MAX_PER_NET
from shallot.crypto.descriptor import Descriptor
from shallot.crypto.keys import RelayKeys

BURST = 2 * RATE_PER_S
SIGN = RelayKeys.generate(secrets.token_bytes, time.time()).sign  # for nodes whose answers nobody checks here


KEYS: dict[bytes, RelayKeys] = {}  # relay id -> keys of the descriptors made here (their nodes sign with them)


def _descriptor(port: int) -> Descriptor:
    keys = RelayKeys.generate(secrets.token_bytes, time.time())
    KEYS[keys.relay_id] = keys
    return Descriptor.create(keys, nickname="d", addresses=(("127.0.0.1", port),), exit_node=False,
                             published=int(time.time()), lifetime_s=3600)


def _raw(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


def _ping(nodeid: bytes | None = None) -> bytes:
    return wire.encode_request(os.urandom(wire.MSG_ID_LEN), "ping", (nodeid, None))


async def _until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def _serving(**kw) -> DhtNode:
    return DhtNode(node_id=os.urandom(20), serve=True, own_record=lambda: None, allow_loopback=True, sign=SIGN, **kw)


# ---------------------------------------------------------------------------------------------- request rate


@pytest.mark.asyncio
async def test_requests_are_rate_limited_per_source_address() -> None:
    relay = _serving()
    addr = await relay.start(("127.0.0.1", 0))
    flood, other = _raw(), _raw("127.0.0.2")
    c = relay.rpc.counters
    try:
        sent = 0
        started = time.monotonic()
        while not c.get("drop_rate") and sent < 20 * BURST:  # send until the first refusal
            for _ in range(50):
                flood.sendto(_ping(), addr)
            sent += 50
            await _until(lambda s=sent: c.get("rpc_in_ping", 0) + c.get("drop_rate", 0) == s)
        elapsed = time.monotonic() - started
        answered = c["rpc_in_ping"]
        assert c.get("drop_rate", 0) > 0, "a flood of requests from one address was never refused"
        # a full bucket, plus what it refilled while we sent: never more, never less
        assert BURST <= answered <= BURST + RATE_PER_S * elapsed + 1
        other.sendto(_ping(), addr)  # another source address has its own bucket
        await _until(lambda: c["rpc_in_ping"] == answered + 1)
    finally:
        flood.close()
        other.close()
        relay.stop()


class _FrozenClock:
    """The adapter's clock, stopped: buckets then refill by nothing, so every count below is exact."""

    time = staticmethod(time.time)

    @staticmethod
    def monotonic() -> float:
        return 1000.0


def test_the_rate_table_is_bounded_and_a_flood_of_sources_does_not_reset_an_active_flooder(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dht, "time", _FrozenClock)
    rpc = _serving()._create_protocol()  # no socket: answers are not sent, requests are still counted
    victim = ("198.51.100.1", 1)
    for _ in range(int(BURST)):
        rpc.datagram_received(_ping(), victim)
    assert "drop_rate" not in rpc.counters  # exactly the burst, then
    rpc.datagram_received(_ping(), victim)
    assert rpc.counters["drop_rate"] == 1
    # twice the table's size in other sources, the flooder sending between them: its bucket stays empty
    # (the table used to start over at the 4097th source and refill every bucket)
    for i in range(2 * RATE_TABLE_MAX):
        rpc.datagram_received(_ping(), (f"10.{i >> 8}.{i & 255}.1", 1))
        if i % 1000 == 0:
            rpc.datagram_received(_ping(), victim)
    rpc.datagram_received(_ping(), victim)
    drops = 2 + (2 * RATE_TABLE_MAX - 1) // 1000 + 1
    assert rpc.counters["drop_rate"] == drops and len(rpc._rates._buckets) == RATE_TABLE_MAX
    # a source idle for longer than the whole table is forgotten: it meets a full bucket, as a new one would
    rpc.datagram_received(_ping(), ("10.0.0.1", 1))
    assert rpc.counters["drop_rate"] == drops


def test_ipv6_sources_are_counted_per_64(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dht, "time", _FrozenClock)
    rpc = _serving()._create_protocol()
    for i in range(int(BURST) + 5):  # every request from another address of one /64
        rpc.datagram_received(_ping(), (f"2001:db8:1:2::{i + 1:x}", 1))
    assert rpc.counters["drop_rate"] == 5
    rpc.datagram_received(_ping(), ("2001:db8:1:3::1", 1))  # the next /64 has its own bucket
    assert rpc.counters["drop_rate"] == 5


# ---------------------------------------------------------------------------------------------- routing table


def _table(ksize: int = 64):
    rpc = DhtNode(node_id=bytes(20), serve=True, own_record=lambda: None, allow_loopback=True, sign=SIGN,
                  ksize=ksize)._create_protocol()
    return rpc, rpc.router


def test_the_routing_table_holds_at_most_max_per_host_contacts_of_one_address() -> None:
    rpc, table = _table()
    nodes = [Node(os.urandom(20), "198.51.100.7", 9001 + 2 * i) for i in range(MAX_PER_HOST + 2)]
    for node in nodes:
        table.add_contact(node)
    assert len(table.contacts()) == MAX_PER_HOST and rpc.counters["reject_contact_cap_host"] == 2
    table.add_contact(nodes[0])  # a contact already held is seen again, not added
    assert rpc.counters["reject_contact_cap_host"] == 2
    table.add_contact(Node(os.urandom(20), "198.51.100.8", 9001))  # the next address has room
    assert len(table.contacts()) == MAX_PER_HOST + 1


def test_the_routing_table_holds_at_most_max_per_net_contacts_of_one_16() -> None:
    rpc, table = _table()
    for i in range(MAX_PER_NET + 3):
        table.add_contact(Node(os.urandom(20), f"203.0.{i}.1", 9001))
    assert len(table.contacts()) == MAX_PER_NET and rpc.counters["reject_contact_cap_net"] == 3
    table.add_contact(Node(os.urandom(20), "203.1.0.1", 9001))  # another /16
    assert len(table.contacts()) == MAX_PER_NET + 1


def test_loopback_contacts_count_per_address_and_port() -> None:
    rpc, table = _table()
    for i in range(MAX_PER_HOST + 2):
        table.add_contact(Node(os.urandom(20), "127.0.0.1", 9001 + 2 * i))
    assert len(table.contacts()) == MAX_PER_HOST + 2 and not rpc.counters.get("reject_contact_cap_host")


# ---------------------------------------------------------------------------------------------- requests we make


@pytest.mark.asyncio
async def test_outstanding_requests_are_bounded() -> None:
    client = DhtNode(node_id=None, serve=False, own_record=lambda: None, allow_loopback=True)
    await client.start(("127.0.0.1", 0))
    silent = _raw()
    try:
        futures = [client.rpc.find_node(silent.getsockname(), None, os.urandom(20), peer=None)
                   for _ in range(MAX_OUTSTANDING)]
        assert not any(f.done() for f in futures) and client.rpc.counters["rpc_out_find_node"] == MAX_OUTSTANDING
        over = client.rpc.find_node(silent.getsockname(), None, os.urandom(20), peer=None)
        assert over.done() and over.result() == (False, None) and client.rpc.counters["rpc_not_sent"] == 1
        received = 0
        with pytest.raises(BlockingIOError):
            while True:
                silent.recv(4096)
                received += 1
        assert received <= MAX_OUTSTANDING  # the refused one never left
    finally:
        silent.close()
        client.stop()
    assert all(f.done() and f.result() == (False, None) for f in futures)  # stop() answers every waiter


@pytest.mark.asyncio
async def test_a_caller_without_a_binding_is_never_pinged_back() -> None:
    relay = _serving()
    addr = await relay.start(("127.0.0.1", 0))
    liar = _raw()  # claims a new id with every ping (a spoofer would name a victim's address)
    try:
        for _ in range(70):
            liar.sendto(_ping(os.urandom(20)), addr)
        c = relay.rpc.counters
        await _until(lambda: c.get("reject_unbound_caller", 0) == 70)
        # a ping back would send the claimed address more than it sent us: none is sent, nobody admitted
        assert "rpc_out_ping" not in c and relay.peers() == []
    finally:
        liar.close()
        relay.stop()


@pytest.mark.asyncio
async def test_a_contact_whose_address_answers_with_another_id_is_not_admitted() -> None:
    nodes: list[tuple[DhtNode, Descriptor]] = []
    try:
        for _ in range(2):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1] - 1  # the descriptor's link port; its DHT socket is port + 1
            sock.close()
            d = _descriptor(port)
            node = DhtNode(node_id=d.relay_id, serve=True, own_record=d.encode, allow_loopback=True,
                           sign=KEYS[d.relay_id].sign)
            await node.start(("127.0.0.1", port + 1))
            nodes.append((node, d))
        (a, _), (b, b_desc) = nodes
        claimed = os.urandom(20)  # b claims an id that is not its own, from its real address
        b.transport.sendto(_ping(claimed), a.transport.get_extra_info("sockname")[:2])
        c = a.rpc.counters
        await _until(lambda: c.get("reject_unbound_caller", 0) == 1)
        assert a.peers() == []
        # control: the same node with its own id and the record that binds it is admitted, at once
        ok, _ = await b.rpc.ping(a.transport.get_extra_info("sockname")[:2], b_desc.relay_id, b_desc.encode())
        assert ok and [pid for pid, _ in a.peers()] == [b_desc.relay_id]
        assert c["reject_unbound_caller"] == 1 and "rpc_out_ping" not in c  # no ping back, ever
        # and forgotten once it stops answering
        b_addr = b.transport.get_extra_info("sockname")[:2]
        b.stop()
        assert await a.rpc.call_ping(Node(b_desc.relay_id, *b_addr)) == (False, None)
        assert a.peers() == []
    finally:
        for node, _ in nodes:
            node.stop()


@pytest.mark.asyncio
async def test_a_record_that_does_not_bind_the_sender_admits_nobody() -> None:
    relay = _serving()
    addr = await relay.start(("127.0.0.1", 0))
    elsewhere = _descriptor(9000)  # a valid record, but its DHT address is 127.0.0.1:9001, not the sender's
    raw = _raw()
    c = relay.rpc.counters
    try:
        raw.sendto(wire.encode_request(os.urandom(wire.MSG_ID_LEN), "ping", (elsewhere.relay_id, elsewhere.encode())),
                   addr)
        await _until(lambda: c.get("reject_binding") == 1 and c.get("reject_unbound_caller") == 1)
        assert relay.peers() == [] and "rpc_out_ping" not in c  # not asked back: that would amplify
    finally:
        raw.close()
        relay.stop()


@pytest.mark.asyncio
async def test_answers_nobody_asked_for_and_requests_in_our_own_name_are_dropped() -> None:
    relay = _serving()
    addr = await relay.start(("127.0.0.1", 0))
    raw = _raw()
    c = relay.rpc.counters
    try:
        raw.sendto(wire.encode_response(os.urandom(wire.MSG_ID_LEN), [relay.node.id, None], responder_id=relay.node.id,
                                        request=b"", sign=SIGN), addr)
        await _until(lambda: c.get("drop_unknown_response") == 1)
        raw.sendto(_ping(relay.node.id), addr)  # someone claims to be us: not a contact to verify
        await _until(lambda: c.get("rpc_in_ping") == 1)
        await asyncio.sleep(0.1)
        assert "rpc_out_ping" not in c and relay.peers() == []
    finally:
        raw.close()
        relay.stop()


@pytest.mark.asyncio
async def test_a_request_without_a_socket_is_refused_not_raised() -> None:
    rpc = _serving()._create_protocol()
    fut = rpc.find_node(("127.0.0.1", 9), None, os.urandom(20), peer=None)
    assert fut.done() and fut.result() == (False, None) and rpc.counters["rpc_not_sent"] == 1
