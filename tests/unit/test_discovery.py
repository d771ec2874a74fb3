"""Discovery: record validation, the record store, the network view, the cache, the hardened kademlia
protocol (allow-list, id binding, reply source) on loopback sockets."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from pathlib import Path

import pytest
import umsgpack
from kademlia.node import Node

from shallot.core.discovery import wire
from shallot.core.discovery.addresses import dht_address, host_group, net_group, usable_address
from shallot.core.discovery.cache import load_view, save_view
from shallot.core.discovery.dht import DhtNode, ShallotRpc
from shallot.core.discovery.records import RecordError, binds, newest_first, supersedes, validate_record
from shallot.core.discovery.service import ClientDiscovery, RelayDiscovery
from shallot.core.discovery.storage import RecordStorage
from shallot.core.discovery.view import NetworkView
from shallot.crypto.descriptor import Descriptor, Reachability
from shallot.crypto.keys import RelayKeys
from shallot.crypto.params import LABEL_DESCRIPTOR

NOW = 1_800_000_000


def make(keys: RelayKeys | None = None, *, host: str = "198.51.100.7", port: int = 9000, published: int = NOW,
         lifetime: int = 3600, nick: str = "r") -> tuple[RelayKeys, Descriptor]:
    keys = keys or RelayKeys.generate(secrets.token_bytes, NOW)
    return keys, Descriptor.create(keys, nickname=nick, addresses=((host, port),), exit_node=False,
                                   published=published, lifetime_s=lifetime)


def reason(key: object, value: object, wall: float = NOW, loopback: bool = False) -> str:
    with pytest.raises(RecordError) as info:
        validate_record(key, value, wall, allow_loopback=loopback)
    return info.value.reason


# ---------------------------------------------------------------------------------------------- records


def test_a_valid_record_validates_and_every_tampering_is_named() -> None:
    _, d = make()
    assert validate_record(d.relay_id, d.encode(), NOW, allow_loopback=False) == d
    raw = bytearray(d.encode())
    raw[-69] ^= 1  # the port: still well-formed, but the signature no longer matches
    assert reason(d.relay_id, bytes(raw)) == "signature"
    other, _ = make()
    unsigned = Descriptor(**{**d.__dict__, "signature": b""})
    forged = Descriptor(**{**d.__dict__, "signature": other.sign(LABEL_DESCRIPTOR + unsigned.body())})
    assert reason(d.relay_id, forged.encode()) == "signature"
    assert reason(os.urandom(20), d.encode()) == "key_mismatch"
    assert reason(d.relay_id, d.encode(), wall=NOW + 3601) == "expired"
    assert reason(d.relay_id, d.encode(), wall=NOW - 3601 - 1) == "future"
    assert reason(d.relay_id, b"garbage") == "malformed"
    assert reason(d.relay_id, b"x" * 5000) == "size"
    assert reason(d.relay_id, "text") == "type"
    assert reason(b"short", d.encode()) == "type"


def test_loopback_and_unroutable_addresses_are_refused_unless_a_local_test_network() -> None:
    _, d = make(host="127.0.0.1")
    assert reason(d.relay_id, d.encode()) == "address"
    assert validate_record(d.relay_id, d.encode(), NOW, allow_loopback=True) == d
    for host in ("0.0.0.0", "224.0.0.1", "169.254.1.1", "240.0.0.1", "::ffff:198.51.100.1", "ff02::1"):
        assert not usable_address(host, 9000, allow_loopback=True), host
    assert usable_address("203.0.113.5", 9000, allow_loopback=False)
    assert usable_address("2001:db8::1", 9000, allow_loopback=False)


def test_newer_wins_and_ties_break_the_same_way_everywhere() -> None:
    keys, old = make(published=NOW - 100)
    _, new = make(keys, published=NOW)
    assert supersedes(new, old) and not supersedes(old, new)
    _, twin = make(keys, published=NOW, port=9001)
    assert supersedes(twin, new) != supersedes(new, twin)
    assert newest_first([old.encode(), new.encode()]) == [new.encode(), old.encode()]


def test_binding_needs_the_exact_dht_address_of_the_signed_descriptor() -> None:
    _, d = make(port=9000)
    assert dht_address(d.address) == ("198.51.100.7", 9001)
    assert binds(d.relay_id, d.encode(), ("198.51.100.7", 9001), NOW, allow_loopback=False)
    assert not binds(d.relay_id, d.encode(), ("198.51.100.7", 9000), NOW, allow_loopback=False)
    assert not binds(d.relay_id, d.encode(), ("198.51.100.8", 9001), NOW, allow_loopback=False)
    assert not binds(os.urandom(20), d.encode(), ("198.51.100.7", 9001), NOW, allow_loopback=False)
    with pytest.raises(ValueError):
        dht_address(("198.51.100.7", 65535))


# ---------------------------------------------------------------------------------------------- storage


class Clock:
    def __init__(self) -> None:
        self.wall = float(NOW)

    def __call__(self) -> float:
        return self.wall


def test_storage_keeps_the_newest_and_refuses_rollback() -> None:
    clock = Clock()
    st = RecordStorage(clock, allow_loopback=False)
    keys, old = make(published=NOW - 100)
    _, new = make(keys, published=NOW)
    assert st.offer(new.relay_id, new.encode()) == "stored"
    assert st.offer(old.relay_id, old.encode()) == "stale"
    assert st.offer(new.relay_id, new.encode()) == "same"
    assert st.get(new.relay_id) == new.encode()
    st[old.relay_id] = old.encode()  # kademlia's entry point: counted, never raised
    assert st.get(new.relay_id) == new.encode()
    assert st.counters == {"stored": 1, "reject_stale": 2, "same": 1}


def test_storage_validates_again_on_read() -> None:
    clock = Clock()
    st = RecordStorage(clock, allow_loopback=False)
    _, d = make(lifetime=60)
    st[d.relay_id] = d.encode()
    assert st[d.relay_id] == d.encode()
    clock.wall += 61
    assert st.get(d.relay_id) is None
    with pytest.raises(KeyError):
        st[d.relay_id]
    assert len(st) == 0 and st.counters["expired_dropped"] == 1


def test_storage_caps_per_address_per_16_and_in_total() -> None:
    st = RecordStorage(Clock(), allow_loopback=False, max_records=6, max_per_host=2, max_per_net=3)
    outcomes = [st.offer(d.relay_id, d.encode()) for d in
                (make(host="198.51.100.7", port=p)[1] for p in (9000, 9002, 9004))]
    assert outcomes == ["stored", "stored", "cap_host"]
    assert st.offer(*(lambda d: (d.relay_id, d.encode()))(make(host="198.51.7.1")[1])) == "stored"
    assert st.offer(*(lambda d: (d.relay_id, d.encode()))(make(host="198.51.7.2")[1])) == "cap_net"
    for host in ("203.0.113.1", "192.0.2.1", "100.20.0.1"):
        d = make(host=host)[1]
        st.offer(d.relay_id, d.encode())
    d = make(host="100.21.0.1")[1]
    assert st.offer(d.relay_id, d.encode()) == "full"
    assert host_group("2001:db8::1", 1) == host_group("2001:db8::2", 2) != host_group("2001:db8:0:1::1", 1)
    assert net_group("198.51.100.7", 1) == net_group("198.51.7.7", 2)
    assert host_group("127.0.0.1", 1) != host_group("127.0.0.1", 2)  # a test network on one machine


def test_storage_pages_cover_everything_once_within_the_size_bound() -> None:
    st = RecordStorage(Clock(), allow_loopback=False)
    descs = [make(host=f"198.{i}.0.1")[1] for i in range(23)]
    for d in descs:
        st.offer(d.relay_id, d.encode())
    seen: list[bytes] = []
    cursor = None
    while True:
        page, cursor = st.page(cursor, max_bytes=1100, max_count=16)
        assert page and sum(map(len, page)) <= 1100
        seen += page
        if cursor is None:
            break
    assert sorted(seen) == sorted(d.encode() for d in descs)
    assert st.iter_older_than(0) and not st.iter_older_than(10)


# ---------------------------------------------------------------------------------------------- view + cache


def test_view_counts_every_outcome_and_never_holds_itself() -> None:
    keys, old = make(published=NOW - 100)
    _, new = make(keys, published=NOW)
    me = make()[1]
    view = NetworkView(allow_loopback=False, self_ids=[me.relay_id])
    assert view.offer(None, new.encode(), NOW) == "added"
    assert view.offer(None, old.encode(), NOW) == "stale"
    assert view.offer(None, me.encode(), NOW) == "self"
    assert view.offer(None, b"junk", NOW) == "malformed"
    assert view.offer(None, 7, NOW) == "type"  # type: ignore[arg-type]
    assert [d.relay_id for d in view.relays(NOW)] == [new.relay_id]
    assert view.relays(NOW + 7200) == []
    assert view.rejected() == {"reject_stale": 1, "reject_malformed": 1, "reject_type": 1}


def test_cache_is_private_and_checked_again_when_read(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "view"
    descs = [make(host=f"198.{i}.0.1", published=int(time.time()))[1] for i in range(3)]
    save_view(path, descs)
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(d.relay_id for d in load_view(path, time.time())) == sorted(d.relay_id for d in descs)
    lines = path.read_text().splitlines()
    raw = bytearray(Descriptor.decode(__import__("base64").b64decode(lines[1])).encode())
    raw[40] ^= 1
    lines[1] = __import__("base64").b64encode(bytes(raw)).decode()
    path.write_text("\n".join(lines) + "\n")
    assert len(load_view(path, time.time())) == 2  # the tampered entry is dropped, the rest kept
    path.write_text("garbage")
    assert load_view(path, time.time()) == []
    assert load_view(tmp_path / "missing", time.time()) == []


# ---------------------------------------------------------------------------------------------- wire


def test_only_allowed_rpcs_with_typed_arguments_parse() -> None:
    nid = os.urandom(20)
    assert wire.parse_request(["find_node", [nid, nid]]) == ("find_node", (nid, nid))
    assert wire.parse_request(["ping", [None, None]]) == ("ping", (None, None))
    for body in (["stun", []], ["__init__", []], ["connection_made", [None]], ["store", [nid, nid, "text"]],
                 ["find_node", [nid]], ["find_node", [nid, b"short"]], "ping", ["ping", [None, None], 1],
                 ["list_records", [nid, 5]], ["store", [nid, nid, b"x" * 3000]]):
        with pytest.raises(wire.WireError):
            wire.parse_request(body)
    with pytest.raises(ValueError):
        wire.encode_request(os.urandom(20), "stun", ())


def test_the_protocol_makes_no_implicit_remote_calls() -> None:
    node = DhtNode(node_id=None, serve=False, own_record=lambda: None, allow_loopback=True)
    rpc = node._create_protocol()
    assert isinstance(rpc, ShallotRpc)
    with pytest.raises(AttributeError):
        rpc.stun  # rpcudp would have returned a function that sends a datagram  # noqa: B018
    with pytest.raises(AttributeError):
        rpc.delete_everything  # noqa: B018


def test_bucket_for_an_id_is_the_bucket_whose_range_holds_it() -> None:
    rpc = DhtNode(node_id=bytes(20), serve=True, own_record=lambda: None, allow_loopback=True,
                  sign=RelayKeys.generate(secrets.token_bytes, NOW).sign)._create_protocol()
    table = rpc.router
    for _ in range(6):
        table.split_bucket(0)
    for bucket in list(table.buckets):
        for long_id in (bucket.range[0], bucket.range[1]):
            node = Node(long_id.to_bytes(20, "big") if long_id < 2 ** 160 else b"\xff" * 20)
            assert table.buckets[table.get_bucket_for(node)].has_in_range(node)


# ---------------------------------------------------------------------------------------------- on loopback


@pytest.mark.asyncio
async def test_hostile_datagrams_are_dropped_and_contacts_must_prove_their_id() -> None:
    keys, d = make(host="127.0.0.1", port=9, published=int(time.time()))
    relay = DhtNode(node_id=d.relay_id, serve=True, own_record=d.encode, allow_loopback=True, sign=keys.sign)
    host, port = await relay.start(("127.0.0.1", 0))
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind(("127.0.0.1", 0))
    raw.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        liar = os.urandom(20)
        def padded(request: bytes) -> bytes:
            return request + bytes(wire.REQUEST_MIN_LEN - len(request))

        for body in (["stun", []], ["__getattr__", ["x"]], ["ping", [liar]]):
            raw.sendto(padded(b"\x00" + os.urandom(20) + umsgpack.packb(body)), (host, port))
        raw.sendto(b"\x00" + os.urandom(20) + b"\xdd\xff\xff\xff\xff", (host, port))  # truncated msgpack
        raw.sendto(b"\x07" * 40, (host, port))
        raw.sendto(b"\x00" + os.urandom(20) + umsgpack.packb(["ping", [None, None]]), (host, port))  # unpadded
        # a ping that claims an id without a descriptor proving it is answered, but never admitted
        msg_id = os.urandom(20)
        raw.sendto(wire.encode_request(msg_id, "ping", (liar, None)), (host, port))
        reply = await asyncio.wait_for(loop.sock_recv(raw, 4096), 2)
        got = wire.decode_datagram(reply)
        assert got.msg_id == msg_id and wire.parse_ping_result(got.body)[0] == d.relay_id
        assert len(reply) <= wire.REQUEST_MIN_LEN  # never longer than the request
        # the relay does not ping the claimed id back (that would amplify): it is simply not admitted
        assert relay.peers() == []
        c = relay.rpc.counters
        assert c["drop_unknown_rpc"] == 2 and c["drop_bad_args"] == 1 and c["drop_unpadded"] == 2
        assert c["drop_kind"] == 1 and c["reject_unbound_caller"] == 1
        with pytest.raises(BlockingIOError):  # nothing but the one ping was answered
            raw.recv(4096)

        # a reply from the wrong address is ignored; the real one is taken
        client = DhtNode(node_id=None, serve=False, own_record=lambda: None, allow_loopback=True)
        await client.start(("127.0.0.1", 0))
        client.rpc._learn_key(d.relay_id, d.identity_pub)  # as a bound ping answer would have taught it
        fut = client.rpc.find_node((host, port), None, os.urandom(20), peer=d.relay_id)
        (msg_id,) = client.rpc._outstanding.keys()
        chost, cport = client.transport.get_extra_info("sockname")[:2]
        raw.sendto(wire.encode_response(msg_id, [[liar, "127.0.0.1", 1]], responder_id=d.relay_id, request=b"",
                                        sign=keys.sign), (chost, cport))
        ok, result = await asyncio.wait_for(fut, 3)
        assert ok and result == []  # the relay's real (empty) answer
        assert client.rpc.counters["drop_response_wrong_source"] == 1
        # clients answer nothing
        raw.sendto(wire.encode_request(os.urandom(20), "ping", (None, None)), (chost, cport))
        deadline = time.monotonic() + 5
        while not client.rpc.counters.get("drop_request_to_client") and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert client.rpc.counters["drop_request_to_client"] == 1
        client.stop()
    finally:
        raw.close()
        relay.stop()


@pytest.mark.asyncio
async def test_nodes_join_publish_and_a_client_crawls_everything() -> None:
    nodes = []
    try:
        for i in range(6):
            nodes.append(await _started_dht_node(f"n{i}"))
        seed = dht_address(nodes[0][1].address)
        for node, _ in nodes[1:]:
            assert await node.join([seed]) >= 1
        for node, d in nodes:
            assert await node.publish(d.relay_id, d.encode()) >= 1
        # every contact in every table proved its id
        for node, _ in nodes:
            for pid, addr in node.peers():
                assert any(d.relay_id == pid and dht_address(d.address) == addr for _, d in nodes)
        client = DhtNode(node_id=None, serve=False, own_record=lambda: None, allow_loopback=True)
        await client.start(("127.0.0.1", 0))
        result = await client.crawl([dht_address(nodes[3][1].address)])
        client.stop()
        assert set(result.nodes) == {d.relay_id for _, d in nodes}
        assert {Descriptor.decode(r).relay_id for r in result.records} == {d.relay_id for _, d in nodes}
        assert all(not n.rpc.router.contacts() or None not in {c.id for c in n.rpc.router.contacts()}
                   for n, _ in nodes)
    finally:
        for node, _ in nodes:
            node.stop()


async def _started_dht_node(nick: str) -> tuple[DhtNode, Descriptor]:
    """A serving node on a link port whose port + 1 was free when chosen; if someone takes it before the
    node binds it, another pair is chosen (never a skip: this is the only unit test of a whole crawl)."""
    for _ in range(20):
        keys, d = make(host="127.0.0.1", port=_free_link_port(), published=int(time.time()), nick=nick)
        node = DhtNode(node_id=d.relay_id, serve=True, own_record=d.encode, allow_loopback=True, sign=keys.sign)
        try:
            await node.start(dht_address(d.address))
        except OSError:
            continue
        return node, d
    pytest.fail("20 free port pairs were all taken before a DHT node could bind one")


# ---------------------------------------------------------------------------------------------- relays behind NATs


def _free_link_port() -> int:
    """A loopback port whose port + 1 (the DHT socket) is free right now."""
    for _ in range(50):
        a, b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port < 65535:
                b.bind(("127.0.0.1", port + 1))
                return port
        except OSError:
            continue
        finally:
            a.close()
            b.close()
    pytest.fail("no free pair of loopback ports in 50 tries")


def make_natted(keys: RelayKeys | None = None, *, host: str = "127.0.0.1", port: int = 9000,
                published: int = NOW, introducer: tuple[str, int] = ("127.0.0.1", 7000),
                nick: str = "natted") -> tuple[RelayKeys, Descriptor]:
    keys = keys or RelayKeys.generate(secrets.token_bytes, NOW)
    reach = Reachability(1, 3, ((bytes(20), introducer),))
    return keys, Descriptor.create(keys, nickname=nick, addresses=((host, port),), exit_node=False,
                                   published=published, lifetime_s=3600, reachability=reach)


def test_a_record_naming_an_introducer_we_would_never_contact_is_refused() -> None:
    _, good = make_natted(host="203.0.113.5", introducer=("192.0.2.1", 9000))
    assert validate_record(good.relay_id, good.encode(), NOW, allow_loopback=False) == good
    for intro in (("127.0.0.1", 9000), ("224.0.0.1", 9000), ("0.0.0.0", 9000), ("169.254.1.1", 9000)):
        _, bad = make_natted(host="203.0.113.5", introducer=intro)
        assert reason(bad.relay_id, bad.encode()) == "address", intro
    _, local = make_natted(host="127.0.0.1", introducer=("127.0.0.1", 9000))
    assert validate_record(local.relay_id, local.encode(), NOW, allow_loopback=True) == local


@pytest.mark.asyncio
async def test_a_relay_behind_a_nat_publishes_only_and_republishes_past_a_dead_seed() -> None:
    nodes: list[tuple[DhtNode, Descriptor]] = []
    disc = None
    try:
        for i in range(3):
            nkeys, d = make(host="127.0.0.1", port=_free_link_port(), published=int(time.time()), nick=f"n{i}")
            node = DhtNode(node_id=d.relay_id, serve=True, own_record=d.encode, allow_loopback=True, sign=nkeys.sign)
            await node.start(dht_address(d.address))
            nodes.append((node, d))
        for node, _ in nodes[1:]:
            assert await node.join([dht_address(nodes[0][1].address)]) >= 1
        keys, desc = make_natted(port=_free_link_port(), published=int(time.time()) - 10)
        current = {"desc": desc}
        disc = RelayDiscovery([nodes[0][1].address], lambda: current["desc"], sign=keys.sign, behind_nat=True,
                              bind_host="127.0.0.1")
        await disc.start()
        disc.launch()
        await asyncio.wait_for(disc.published.wait(), 10)
        assert disc.node.rpc.serve is False and disc.status()["publisher_only"] is True
        for node, _ in nodes:  # its record is everywhere, its id in no table (it serves nothing)
            assert node.storage.get(desc.relay_id) == desc.encode()
            assert desc.relay_id not in {pid for pid, _ in node.peers()}
        assert len(disc.contacts) == 3  # the seed and every node that took the record
        # the seed dies; the re-signed descriptor still reaches the others through those contacts
        nodes[0][0].stop()
        _, newer = make_natted(keys, port=desc.address[1], published=int(time.time()))
        current["desc"] = newer
        disc.publish_now()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(n.storage.get(desc.relay_id) != newer.encode()
                                                  for n, _ in nodes[1:]):
            await asyncio.sleep(0.05)
        assert all(n.storage.get(desc.relay_id) == newer.encode() for n, _ in nodes[1:])
    finally:
        if disc is not None:
            await disc.close()
        for node, _ in nodes:
            node.stop()


@pytest.mark.asyncio
async def test_a_relay_started_before_its_seed_keeps_trying_and_joins_once_the_seed_is_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Start order must not matter: the relay's first joins find nobody, it retries (JOIN_RETRY_S), joins
    when the seed comes up, says so once, and its descriptor reaches the seed."""
    import shallot.core.discovery.service as service
    monkeypatch.setattr(service, "JOIN_RETRY_S", 0.1)
    now = int(time.time())
    seed_keys, seed_desc = make(host="127.0.0.1", port=_free_link_port(), published=now, nick="seed")
    relay_keys, relay_desc = make(host="127.0.0.1", port=_free_link_port(), published=now, nick="early")
    seed = RelayDiscovery([], lambda: seed_desc, sign=seed_keys.sign)
    relay = RelayDiscovery([seed_desc.address], lambda: relay_desc, sign=relay_keys.sign)
    joined: list[int] = []
    try:
        await relay.start()
        relay.launch(on_joined=joined.append)
        deadline = time.monotonic() + 5
        while relay.node.rpc.counters.get("rpc_out_ping", 0) + relay.node.rpc.counters.get("rpc_out_find_node", 0) < 2:
            assert time.monotonic() < deadline, relay.node.rpc.counters
            await asyncio.sleep(0.02)
        assert not relay.joined.is_set() and joined == []  # tried, found nobody, still trying
        await seed.start()
        seed.launch()
        await asyncio.wait_for(relay.joined.wait(), 10)
        await asyncio.wait_for(relay.published.wait(), 10)
        assert len(joined) == 1 and joined[0] >= 1
        assert seed.node.storage.get(relay_desc.relay_id) == relay_desc.encode()
    finally:
        await relay.close()
        await seed.close()


@pytest.mark.asyncio
async def test_a_client_never_pings_natted_relays_and_silence_excludes_nobody(tmp_path: Path) -> None:
    now = int(time.time())
    _, public = make(host="127.0.0.1", port=_free_link_port(), published=now, nick="public")
    _, natted = make_natted(port=_free_link_port(), published=now)
    cache = tmp_path / "view"
    save_view(cache, [public, natted])
    dead_seed = ("127.0.0.1", _free_link_port())
    disc = ClientDiscovery([dead_seed], cache)
    assert disc.load_cache() == 2
    try:
        await disc.refresh(time_limit_s=5)
        # the seed and the public relay's DHT socket were tried (and stayed silent); the NATed relay's never
        assert disc.node is not None and disc.node.rpc.counters.get("rpc_out_ping") == 2
        assert disc.silent == {public.relay_id}
        # silence is shown, never held against a relay: an on-path attacker can silence anyone (review C2)
        assert {d.relay_id for d in disc.relays()} == {public.relay_id, natted.relay_id}
    finally:
        disc.close()
