"""No amplification in the DHT (core/discovery/dht.py, wire.py, PROTOCOL §12.3): an answer is never longer than the
(padded) request it answers — contact lists are cut, record pages sized to fit — and records too long to be
answered within a minimum-size request are not stored."""

from __future__ import annotations

import os
import secrets
import time
from typing import Any

import pytest
from kademlia.node import Node

from shallot.core.discovery import storage as storage_mod
from shallot.core.discovery import wire
from shallot.core.discovery.dht import DhtNode
from shallot.crypto.descriptor import Descriptor
from shallot.crypto.keys import RelayKeys

KEYS = RelayKeys.generate(secrets.token_bytes, time.time())


class _Transport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))


def _serving() -> tuple[Any, _Transport]:
    rpc = DhtNode(node_id=os.urandom(20), serve=True, own_record=lambda: None, allow_loopback=True,
                  sign=KEYS.sign, ksize=20)._create_protocol()
    transport = _Transport()
    rpc.transport = transport
    return rpc, transport


def _ipv6_contacts(rpc: Any) -> None:
    for i in range(20):  # the longest contacts there are: full-length IPv6 addresses, one /64 each
        rpc.router.add_contact(Node(os.urandom(20), f"2001:db8:{i:x}:ffff:ffff:ffff:ffff:ffff", 65000 + i))
    assert len(rpc.router.contacts()) == 20


def test_a_find_node_answer_is_cut_to_its_request() -> None:
    rpc, transport = _serving()
    _ipv6_contacts(rpc)
    request = wire.encode_request(os.urandom(20), "find_node", (None, os.urandom(20)))
    assert len(request) == wire.REQUEST_MIN_LEN
    rpc.datagram_received(request, ("198.51.100.1", 9))
    (answer, _), = transport.sent
    contacts = wire.parse_contacts(wire.decode_datagram(answer).body)
    assert len(answer) <= len(request) and 10 <= len(contacts) < 20  # all 20 would be ~1410 bytes
    # a requester that pads more gets more: the budget is the request's own length
    longer = request + bytes(400)
    rpc.datagram_received(longer, ("198.51.100.1", 9))
    answer = transport.sent[-1][0]
    assert len(answer) <= len(longer) and len(wire.parse_contacts(wire.decode_datagram(answer).body)) == 20


def test_an_unpadded_request_and_an_answer_that_cannot_fit_are_not_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    rpc, transport = _serving()
    d = Descriptor.create(KEYS, nickname="r", addresses=(("127.0.0.1", 9000),), exit_node=False,
                          published=int(time.time()), lifetime_s=3600)
    rpc.own_record = d.encode  # a ping answer carries our descriptor: it cannot be cut
    request = wire.encode_request(os.urandom(20), "ping", (None, None))
    rpc.datagram_received(request[:-1], ("198.51.100.1", 9))
    assert not transport.sent and rpc.counters["drop_unpadded"] == 1
    # a node with a smaller minimum (as if the constant were lowered): the ping answer no longer fits
    monkeypatch.setattr(wire, "REQUEST_MIN_LEN", 100)
    small = wire.encode_request(os.urandom(20), "ping", (None, None))
    assert len(small) == 100
    rpc.datagram_received(small, ("198.51.100.1", 9))
    assert not transport.sent and rpc.counters["drop_answer_too_big"] == 1
    rpc.datagram_received(request, ("198.51.100.1", 9))
    assert len(transport.sent[0][0]) <= len(request)


def test_a_record_page_fits_its_request() -> None:
    rpc, transport = _serving()
    for i in range(16):
        keys = RelayKeys.generate(secrets.token_bytes, time.time())
        d = Descriptor.create(keys, nickname=f"r{i}", addresses=(("127.0.0.1", 20000 + 2 * i),), exit_node=False,
                              published=int(time.time()), lifetime_s=3600,
                              family=tuple(os.urandom(20) for _ in range(8)))
        assert rpc.storage.offer(d.relay_id, d.encode()) == "stored"
    request = wire.encode_request(os.urandom(20), "list_records", (None, None))
    rpc.datagram_received(request, ("198.51.100.1", 9))
    (answer, _), = transport.sent
    records, cursor = wire.parse_page_result(wire.decode_datagram(answer).body)
    assert len(answer) <= len(request) and records and cursor is not None


def test_records_too_long_for_a_minimum_request_are_not_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    rpc, _ = _serving()
    d = Descriptor.create(KEYS, nickname="r", addresses=(("127.0.0.1", 9000),), exit_node=False,
                          published=int(time.time()), lifetime_s=3600)
    monkeypatch.setattr(storage_mod, "MAX_STORED_LEN", len(d.encode()) - 1)
    assert rpc.storage.offer(d.relay_id, d.encode()) == "too_long"
    monkeypatch.setattr(storage_mod, "MAX_STORED_LEN", len(d.encode()))
    assert rpc.storage.offer(d.relay_id, d.encode()) == "stored"


def test_the_longest_descriptor_create_makes_fits_the_stored_bound() -> None:
    from shallot.crypto.descriptor import ExitPolicySummary, Reachability
    d = Descriptor.create(KEYS, nickname="x" * 32, exit_node=True, published=int(time.time()), lifetime_s=3600,
                          addresses=tuple((f"2001:db8::{i + 1}", 9000) for i in range(4)),
                          family=tuple(os.urandom(20) for _ in range(16)),
                          exit_policy=ExitPolicySummary(True, tuple((i, i) for i in range(32))),
                          reachability=Reachability(1, 1, tuple((os.urandom(20), (f"2001:db8::{i + 9}", 9000))
                                                                for i in range(4))))
    assert len(d.encode()) <= storage_mod.MAX_STORED_LEN
    # and its ping answer fits a minimum-size request
    assert 21 + len(wire.umsgpack.packb([d.relay_id, d.encode()])) + 64 <= wire.REQUEST_MIN_LEN


def test_an_answer_exactly_as_long_as_its_request_is_sent() -> None:
    result = [[os.urandom(20), "198.51.100.1", 9000]] * 3
    exact = len(wire.encode_result_within(bytes(20), result, 10_000) or b"") + wire.SIG_LEN
    whole = wire.encode_result_within(bytes(20), result, exact)
    assert whole is not None and len(wire.umsgpack.unpackb(whole[21:])) == 3  # exactly fits: nothing cut
    cut = wire.encode_result_within(bytes(20), result, exact - 1)
    assert cut is not None and len(wire.umsgpack.unpackb(cut[21:])) == 2  # one contact less


def test_a_node_does_not_admit_itself() -> None:
    rpc, _ = _serving()
    own = Descriptor.create(KEYS, nickname="me", addresses=(("127.0.0.1", 9000),), exit_node=False,
                            published=int(time.time()), lifetime_s=3600)
    rpc.source_node = Node(own.relay_id, "127.0.0.1", 9001)
    # its own ping, with its own descriptor, from its own DHT address (a seed list naming itself)
    rpc.datagram_received(wire.encode_request(os.urandom(20), "ping", (own.relay_id, own.encode())),
                          ("127.0.0.1", 9001))
    assert rpc.router.contacts() == []
