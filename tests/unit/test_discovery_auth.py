"""Authenticated discovery (issue 11, review C2 and M6): signed DHT answers bound to the request, pinned
seeds, no silence-based exclusion, an alarm when the network vanishes, and no private or loopback
relay addresses unless a private network is run on purpose (DHT and directory files alike).

Every test here fails when the check it names is removed (the closing note of the issue reports one
such deletion: ``ShallotRpc._authentic``)."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from pathlib import Path

import pytest

from shallot.core.discovery import wire
from shallot.core.discovery.addresses import dht_address, is_private_range, usable_address
from shallot.core.discovery.cache import save_view
from shallot.core.discovery.dht import DhtNode
from shallot.core.discovery.directory import load_directory
from shallot.core.discovery.records import RecordError, validate_record
from shallot.core.discovery.service import ClientDiscovery, RelayDiscovery, Seed, parse_seeds
from shallot.core.errors import ShallotError
from shallot.crypto.descriptor import Descriptor, encode_directory
from shallot.crypto.keys import RelayKeys

NOW = int(time.time())


def make(host: str = "198.51.100.7", port: int = 9000, keys: RelayKeys | None = None,
         nick: str = "r") -> tuple[RelayKeys, Descriptor]:
    keys = keys or RelayKeys.generate(secrets.token_bytes, NOW)
    return keys, Descriptor.create(keys, nickname=nick, addresses=((host, port),), exit_node=True,
                                   published=NOW, lifetime_s=3600)


def _signed(keys: RelayKeys, request: bytes, result: object, msg_id: bytes | None = None) -> bytes:
    msg_id = msg_id if msg_id is not None else wire.decode_datagram(request).msg_id
    return wire.encode_response(msg_id, result, responder_id=keys.relay_id, request=request, sign=keys.sign)


# ---------------------------------------------------------------------------------------------- the signature


def test_an_answer_verifies_only_for_its_request_its_bytes_and_its_relay() -> None:
    keys, _ = make()
    other, _ = make()
    request = wire.encode_request(os.urandom(20), "find_node", (None, os.urandom(20)))
    answer = wire.decode_datagram(_signed(keys, request, []))
    digest = wire.request_digest(request)
    assert wire.verify_answer(answer, identity_pub=keys.identity_pub, responder_id=keys.relay_id, digest=digest)
    # another request (a replay of this answer to a later question, or an altered request)
    later = wire.encode_request(answer.msg_id, "find_node", (None, os.urandom(20)))
    assert not wire.verify_answer(answer, identity_pub=keys.identity_pub, responder_id=keys.relay_id,
                                  digest=wire.request_digest(later))
    # another relay's key, or the right key under another relay id
    assert not wire.verify_answer(answer, identity_pub=other.identity_pub, responder_id=other.relay_id, digest=digest)
    assert not wire.verify_answer(answer, identity_pub=keys.identity_pub, responder_id=other.relay_id, digest=digest)
    # one flipped bit anywhere in the answer
    raw = bytearray(_signed(keys, request, [[os.urandom(20), "198.51.100.9", 9001]]))
    for at in (0, 5, 30, len(raw) - 70, len(raw) - 1):
        bad = bytearray(raw)
        bad[at] ^= 0x01
        try:
            dg = wire.decode_datagram(bytes(bad))
        except wire.WireError:
            continue
        assert not wire.verify_answer(dg, identity_pub=keys.identity_pub, responder_id=keys.relay_id, digest=digest)


def test_a_response_without_room_for_a_signature_is_short() -> None:
    with pytest.raises(wire.WireError, match="short"):
        wire.decode_datagram(bytes([wire.RESPONSE]) + os.urandom(20) + b"\xc0" + bytes(10))


# ---------------------------------------------------------------------------------------------- on loopback


class FakeRelay:
    """A socket we hold at a relay's DHT address: it answers only when the test says so, so that forged
    answers can be put in front of the real one from the very address the client asked."""

    def __init__(self, keys: RelayKeys | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.addr = self.sock.getsockname()
        self.keys, self.desc = make("127.0.0.1", self.addr[1] - 1, keys)

    def request(self) -> bytes:
        self.sock.settimeout(5)
        data, self.client = self.sock.recvfrom(4096)
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.client)


async def _client() -> DhtNode:
    client = DhtNode(node_id=None, serve=False, own_record=lambda: None, allow_loopback=True)
    await client.start(("127.0.0.1", 0))
    return client


async def _settle(client: DhtNode, counter: str, n: int = 1) -> None:
    deadline = time.monotonic() + 5
    while client.rpc.counters.get(counter, 0) < n:
        assert time.monotonic() < deadline, client.rpc.counters
        await asyncio.sleep(0.005)


@pytest.mark.asyncio
async def test_forged_and_replayed_answers_never_consume_the_request_and_the_real_one_still_counts() -> None:
    """Review C2: the first datagram with the right id used to consume the request and fail it, so one
    spoofed packet marked an honest relay failed.  Now only the relay's signed answer counts."""
    relay = FakeRelay()
    attacker, evil_desc = make("127.0.0.1", relay.addr[1] - 1, nick="evil")  # claims the relay's address
    client = await _client()
    loop = asyncio.get_running_loop()
    try:
        fut = client.rpc.ping(relay.addr, None, None, peer=relay.desc.relay_id)
        request = await loop.run_in_executor(None, relay.request)
        old = wire.encode_request(os.urandom(20), "ping", (None, None))  # an earlier question to the relay
        relay.send(bytes([wire.RESPONSE]) + wire.decode_datagram(request).msg_id + b"\xa7garbage" + bytes(64))
        await _settle(client, "drop_answer_unbound")
        relay.send(_signed(attacker, request, [evil_desc.relay_id, evil_desc.encode()]))  # another identity
        await _settle(client, "drop_answer_pin")
        replay = _signed(relay.keys, old, [relay.desc.relay_id, relay.desc.encode()],
                         msg_id=wire.decode_datagram(request).msg_id)  # a genuine old answer, new id
        relay.send(replay)
        await _settle(client, "drop_answer_signature")
        assert not fut.done()  # still waiting for the real one
        relay.send(_signed(relay.keys, request, [relay.desc.relay_id, relay.desc.encode()]))
        ok, result = await asyncio.wait_for(fut, 5)
        assert ok and result[0] == relay.desc.relay_id
        assert client.rpc.knows(relay.desc.relay_id)
    finally:
        client.stop()
        relay.sock.close()


@pytest.mark.asyncio
async def test_an_answer_from_a_relay_whose_key_we_never_proved_is_not_taken() -> None:
    relay = FakeRelay()
    client = await _client()
    loop = asyncio.get_running_loop()
    try:
        fut = client.rpc.find_node(relay.addr, None, os.urandom(20), peer=relay.desc.relay_id)
        request = await loop.run_in_executor(None, relay.request)
        relay.send(_signed(relay.keys, request, []))  # genuinely signed, but no bound ping taught us the key
        await _settle(client, "drop_answer_unverifiable")
        assert not fut.done()
        client.rpc._learn_key(relay.desc.relay_id, relay.desc.identity_pub)
        relay.send(_signed(relay.keys, request, []))
        assert await asyncio.wait_for(fut, 5) == (True, [])
    finally:
        client.stop()
        relay.sock.close()


@pytest.mark.asyncio
async def test_an_unpinned_ping_takes_any_identity_bound_to_the_address_but_a_pinned_one_only_its_own() -> None:
    relay = FakeRelay()
    attacker, evil_desc = make("127.0.0.1", relay.addr[1] - 1, nick="evil")
    client = await _client()
    loop = asyncio.get_running_loop()
    try:
        # unpinned: whoever proves an id at the address (the documented risk of a HOST:PORT seed)
        task = asyncio.ensure_future(client.rpc.ping_address(relay.addr))
        request = await loop.run_in_executor(None, relay.request)
        relay.send(_signed(attacker, request, [evil_desc.relay_id, evil_desc.encode()]))
        assert (await asyncio.wait_for(task, 5)).id == evil_desc.relay_id
        # pinned: the impersonation is dropped and the relay's own answer wins
        task = asyncio.ensure_future(client.rpc.ping_address(relay.addr, relay.desc.relay_id))
        request = await loop.run_in_executor(None, relay.request)
        relay.send(_signed(attacker, request, [evil_desc.relay_id, evil_desc.encode()]))
        await _settle(client, "drop_answer_pin")
        relay.send(_signed(relay.keys, request, [relay.desc.relay_id, relay.desc.encode()]))
        assert (await asyncio.wait_for(task, 5)).id == relay.desc.relay_id
    finally:
        client.stop()
        relay.sock.close()


async def _serving_node(nick: str) -> tuple[DhtNode, Descriptor]:
    for _ in range(20):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        keys, d = make("127.0.0.1", port - 1, nick=nick)
        node = DhtNode(node_id=d.relay_id, serve=True, own_record=d.encode, allow_loopback=True, sign=keys.sign)
        try:
            await node.start(("127.0.0.1", port))
        except OSError:
            continue
        node.storage.offer(d.relay_id, d.encode())
        return node, d
    pytest.fail("no free port for a DHT node")


@pytest.mark.asyncio
async def test_a_seed_pinned_to_another_id_is_not_believed_and_a_right_pin_is() -> None:
    node, d = await _serving_node("seed")
    try:
        wrong = ClientDiscovery([Seed(d.address, secrets.token_bytes(20))], None)
        right = ClientDiscovery([Seed(d.address, d.relay_id)], None)
        try:
            await wrong.refresh(time_limit_s=3)
            assert wrong.last_crawl["nodes"] == 0 and wrong.relays() == []
            assert wrong.node is not None and wrong.node.rpc.counters["drop_answer_pin"] >= 1
            await right.refresh(time_limit_s=3)
            assert [r.relay_id for r in right.relays()] == [d.relay_id]
        finally:
            wrong.close()
            right.close()
    finally:
        node.stop()


def test_a_serving_node_cannot_be_made_without_a_signing_key() -> None:
    with pytest.raises(ValueError, match="sign"):
        DhtNode(node_id=os.urandom(20), serve=True, own_record=lambda: None, allow_loopback=True)


# ---------------------------------------------------------------------------------------------- silence


@pytest.mark.asyncio
async def test_silence_leaves_every_relay_in_the_view_and_mass_silence_raises_the_alarm(tmp_path: Path) -> None:
    relays = [make("127.0.0.1", 20000 + 2 * i, nick=f"r{i}")[1] for i in range(6)]
    cache = tmp_path / "view"
    save_view(cache, relays)
    disc = ClientDiscovery([("127.0.0.1", 1)], cache)
    assert disc.load_cache() == 6
    try:
        disc.answered = {d.relay_id for d in relays[:2]}  # two answered last time: two vanishing is no alarm
        await disc.refresh(time_limit_s=3)
        assert disc.alarm is None and len(disc.relays()) == 6
        disc.answered = {d.relay_id for d in relays}  # all six answered last time; now none does
        await disc.refresh(time_limit_s=3)
        assert disc.alarm is not None and "manipulated" in disc.alarm and disc.status()["alarm"] == disc.alarm
        assert len(disc.relays()) == 6  # the last good view is kept, nobody is excluded
        assert disc.answered == {d.relay_id for d in relays}  # the baseline stays the last good crawl
    finally:
        disc.close()


# ---------------------------------------------------------------------------------------------- addresses


@pytest.mark.parametrize("host", ["10.1.2.3", "172.16.0.1", "172.31.255.254", "192.168.1.1", "100.64.0.1",
                                  "100.127.255.254", "fd00::1", "fc00::1", "fec0::1"])
def test_private_addresses_are_refused_unless_a_private_network(host: str) -> None:
    assert is_private_range(host)
    assert not usable_address(host, 9000, allow_loopback=True)
    assert usable_address(host, 9000, allow_loopback=False, allow_private=True)
    _, d = make(host)
    with pytest.raises(RecordError) as err:
        validate_record(d.relay_id, d.encode(), NOW, allow_loopback=True)
    assert err.value.reason == "address"
    assert validate_record(d.relay_id, d.encode(), NOW, allow_loopback=False, allow_private=True) == d


@pytest.mark.parametrize("host", ["172.15.255.255", "172.32.0.1", "100.63.255.255", "100.128.0.1", "192.0.2.1",
                                  "198.18.0.1", "203.0.113.5", "2001:db8::1", "8.8.8.8"])
def test_public_and_documentation_addresses_are_not_private(host: str) -> None:
    assert not is_private_range(host)
    assert usable_address(host, 9000, allow_loopback=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "224.0.0.1", "239.1.2.3", "255.255.255.255", "169.254.1.1", "::",
                                  "ff02::1", "fe80::1", "240.0.0.1"])
def test_never_contacted_addresses_are_refused_even_in_a_private_network(host: str) -> None:
    assert not usable_address(host, 9000, allow_loopback=True, allow_private=True)


def _write(path: Path, descs: list[Descriptor]) -> Path:
    path.write_text(encode_directory(descs))
    return path


def test_a_directory_file_cannot_send_the_client_to_0_0_0_0_its_lan_or_its_own_machine(tmp_path: Path) -> None:
    public = make("198.51.100.7")[1]
    unspecified, lan, local = make("0.0.0.0")[1], make("192.168.1.10")[1], make("127.0.0.1")[1]
    mixed = _write(tmp_path / "mixed", [public, unspecified, lan, local])
    assert [d.relay_id for d in load_directory(mixed)] == [public.relay_id]
    # a private network on purpose: LAN and loopback are taken, 0.0.0.0 never
    assert {d.relay_id for d in load_directory(mixed, private_network=True)} == {
        public.relay_id, lan.relay_id, local.relay_id}
    with pytest.raises(ShallotError, match="no usable relay"):
        load_directory(_write(tmp_path / "unspecified", [unspecified]))
    with pytest.raises(ShallotError, match="private-network"):
        load_directory(_write(tmp_path / "lan", [lan]))
    # a network on one machine (every relay loopback: shallot demo, the integration tests) loads as before
    assert len(load_directory(_write(tmp_path / "local", [local, make("127.0.0.1", 9002)[1]]))) == 2


def test_a_relay_in_a_private_network_accepts_private_records_and_a_public_one_does_not() -> None:
    keys, lan = make("10.0.0.5")
    assert RelayDiscovery([], lambda: lan, sign=keys.sign).allow_private
    keys, pub = make("198.51.100.7")
    assert not RelayDiscovery([], lambda: pub, sign=keys.sign).allow_private
    assert RelayDiscovery([], lambda: pub, sign=keys.sign, private_network=True).allow_private


def test_a_client_accepts_private_records_only_when_told() -> None:
    assert not ClientDiscovery([("10.0.0.1", 9000)], None).view.allow_private
    assert not ClientDiscovery([("10.0.0.1", 9000)], None).view.allow_loopback
    assert ClientDiscovery([("10.0.0.1", 9000)], None, private_network=True).view.allow_private


# ---------------------------------------------------------------------------------------------- seeds


def test_seeds_are_pinned_by_relay_id_and_a_bad_id_is_one_error(caplog: pytest.LogCaptureFixture) -> None:
    rid = secrets.token_bytes(20)
    seeds = parse_seeds(f"{rid.hex()}@192.0.2.1:9000,{rid.hex().upper()}@[2001:db8::1]:9000")
    assert seeds == [Seed(("192.0.2.1", 9000), rid), Seed(("2001:db8::1", 9000), rid)]
    assert not caplog.records  # pinned: no warning
    for bad in ("abcd@192.0.2.1:9000", f"{rid.hex()}00@192.0.2.1:9000", "zz" * 20 + "@192.0.2.1:9000",
                "@192.0.2.1:9000"):
        with pytest.raises(ShallotError, match="40 hex digits"):
            parse_seeds(bad)
    parse_seeds("192.0.2.1:9000")
    assert "not pinned" in caplog.text
    caplog.clear()
    parse_seeds("127.0.0.1:9000")  # a network on one machine: no path to attack, no warning
    assert not caplog.records


def test_the_client_pins_seeds_and_cached_relays_to_their_ids(tmp_path: Path) -> None:
    rid = secrets.token_bytes(20)
    disc = ClientDiscovery([Seed(("192.0.2.1", 9000), rid), ("198.51.100.1", 9000)], None)
    assert disc.pins == {dht_address(("192.0.2.1", 9000)): rid}


# ---------------------------------------------------------------------------------------------- the spec's example


def test_the_worked_example_of_protocol_md_12_3_is_what_the_code_sends() -> None:
    """docs/PROTOCOL.md §12.3 prints a signed answer byte by byte (the §11.2 identity key): the code must
    produce exactly those bytes, and verify them."""
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text()
    block = text[text.index("Worked example (the §11.2 identity key"):]
    block = block[block.index("```") + 3:]
    block = block[:block.index("```")]
    fields: dict[str, str] = {}
    name = ""
    for line in block.strip().splitlines():
        m = re.match(r"^(\w+)(?: \(\d+\))?\s+([0-9a-f]+)$", line)
        zeros = re.match(r"^\s+\+ (\d+) zero bytes$", line)
        if m:
            name = m.group(1)
            fields[name] = m.group(2)
        elif zeros:
            fields[name] += "00" * int(zeros.group(1))
        else:
            fields[name] += line.strip()
    seed = bytes(range(32))
    keys = RelayKeys(identity_seed=seed, link_private=bytes(32), onion_keys=[])
    msg_id = bytes(range(0xA0, 0xB4))
    request = wire.encode_request(msg_id, "find_node", (None, b"\x42" * 20))
    assert request.hex() == fields["request"]
    assert wire.request_digest(request).hex() == fields["request_digest"]
    response = wire.encode_response(msg_id, [], responder_id=keys.relay_id, request=request, sign=keys.sign)
    assert response.hex() == fields["response"]
    assert wire.verify_answer(wire.decode_datagram(response), identity_pub=keys.identity_pub,
                              responder_id=keys.relay_id, digest=wire.request_digest(request))


def test_datagrams_over_the_bound_are_dropped_and_a_signature_must_be_64_bytes() -> None:
    keys, _ = make()
    request = wire.encode_request(os.urandom(20), "find_node", (None, os.urandom(20)))
    body = b"x" * (wire.MAX_DATAGRAM - 21 - 64 - 3)  # msgpack bin 16: 3 bytes of header
    at_bound = wire.encode_response(os.urandom(20), body, responder_id=keys.relay_id, request=request, sign=keys.sign)
    assert len(at_bound) == wire.MAX_DATAGRAM
    assert wire.decode_datagram(at_bound).body == body
    with pytest.raises(wire.WireError, match="long"):
        wire.decode_datagram(at_bound + b"\x00")
    with pytest.raises(ValueError, match="64 bytes"):
        wire.encode_response(os.urandom(20), [], responder_id=keys.relay_id, request=request,
                             sign=lambda m: keys.sign(m)[:63])
    # a request, or a response whose signature was cut, never verifies
    req = wire.decode_datagram(request)
    assert not wire.verify_answer(req, identity_pub=keys.identity_pub, responder_id=keys.relay_id,
                                  digest=wire.request_digest(request))


def test_a_request_is_padded_to_the_minimum_and_anything_shorter_is_unpadded() -> None:
    msg_id = os.urandom(20)
    shortest = bytes([wire.REQUEST]) + msg_id + b"\xc0"  # a one-byte body (nil), then zeros
    with pytest.raises(wire.WireError, match="unpadded"):  # long enough to be a request, too short to answer
        wire.decode_datagram(shortest)
    assert wire.decode_datagram(shortest + bytes(wire.REQUEST_MIN_LEN - 22)).body is None
    with pytest.raises(wire.WireError, match="unpadded"):
        wire.decode_datagram(shortest + bytes(wire.REQUEST_MIN_LEN - 23))
    with pytest.raises(wire.WireError, match="padding"):
        wire.decode_datagram(shortest + bytes(wire.REQUEST_MIN_LEN - 23) + b"\x01")
    with pytest.raises(wire.WireError, match="short"):
        wire.decode_datagram(bytes([wire.REQUEST]) + msg_id)


@pytest.mark.asyncio
async def test_a_ping_answer_whose_descriptor_names_another_address_is_not_taken() -> None:
    relay = FakeRelay()
    elsewhere_keys, elsewhere = make("127.0.0.1", relay.addr[1] + 40, nick="far")  # validly signed, wrong place
    client = await _client()
    loop = asyncio.get_running_loop()
    try:
        fut = client.rpc.ping(relay.addr, None, None)
        request = await loop.run_in_executor(None, relay.request)
        relay.send(_signed(elsewhere_keys, request, [elsewhere.relay_id, elsewhere.encode()]))
        await _settle(client, "drop_answer_unbound")
        assert not fut.done()
        relay.send(_signed(relay.keys, request, [relay.desc.relay_id, relay.desc.encode()]))
        ok, result = await asyncio.wait_for(fut, 5)
        assert ok and result[0] == relay.desc.relay_id
    finally:
        client.stop()
        relay.sock.close()


# ---------------------------------------------------------------------------------------------- kademlia's calls


@pytest.mark.asyncio
async def test_a_contact_is_asked_only_once_proven_and_proven_only_once() -> None:
    from kademlia.node import Node

    node, d = await _serving_node("target")
    client = await _client()
    try:
        contact = Node(d.relay_id, *dht_address(d.address))
        # store at a contact some node named: a pinned ping proves it first, then the store is answered
        assert await client.rpc.call_store(contact, d.relay_id, d.encode()) == (True, True)
        c = client.rpc.counters
        assert c["rpc_out_ping"] == 1
        assert (await client.rpc.call_find_node(contact, Node(os.urandom(20))))[0]
        assert c["rpc_out_ping"] == 1  # proven once: not pinged again
    finally:
        client.stop()
        node.stop()


# ---------------------------------------------------------------------------------------------- the crawl's pins


class Silent:
    """An address that never answers; counts the pings it got."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.addr = self.sock.getsockname()

    def pings(self) -> int:
        n = 0
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return n
            n += wire.parse_request(wire.decode_datagram(data).body)[0] == "ping"


async def _crawl_from_script(contacts: list[list[object]]) -> tuple[object, DhtNode, object]:
    from tests.unit.test_dht_crawl import Script, ScriptedNode

    node = ScriptedNode(Script(contacts=contacts))
    addr = await node.listen()
    client = await _client()
    try:
        result = await client.crawl([addr], time_limit_s=6)
    finally:
        client.stop()
        node.stop()
    return node, client, result


@pytest.mark.asyncio
async def test_an_address_named_under_many_ids_is_tried_under_at_most_four_and_one_id_once() -> None:
    from shallot.core.discovery import dht

    once, many = Silent(), Silent()
    try:
        same = os.urandom(20)  # named under one id in all nine find_node answers: pinged once
        _, client, _ = await _crawl_from_script([[same, *once.addr]])
        assert once.pings() == 1
        ids = [os.urandom(20) for _ in range(10)]  # named under ten ids: tried under PINS_PER_ADDRESS of them
        _, client, _ = await _crawl_from_script([[i, *many.addr] for i in ids])
        assert many.pings() == dht.PINS_PER_ADDRESS == 4
        assert client.rpc.counters["crawl_cap_pins"] >= 1
    finally:
        once.sock.close()
        many.sock.close()


@pytest.mark.asyncio
async def test_a_relay_that_answered_is_not_pinged_again_when_named_under_its_own_id() -> None:
    from tests.unit.test_dht_crawl import Script, ScriptedNode

    node = ScriptedNode(Script())
    addr = await node.listen()
    node.script.contacts = [[node.keys.relay_id, *addr]]  # it names itself, under its real id
    client = await _client()
    try:
        result = await client.crawl([addr], time_limit_s=6)
        assert list(result.nodes) == [node.keys.relay_id]
        assert node.script.asked["ping"] == 1
    finally:
        client.stop()
        node.stop()
