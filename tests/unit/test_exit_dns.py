"""The exit's DNS forwarder (exit/dns.py on loopback, exit/dnsquery.py pure): a socket and random port per
upstream query, answers matched on (resolver address, port, id, question), a quota of pending queries per
client and eviction of the heaviest client's oldest when the table is full, names about the exit's own
host refused, and the default resolver never a local stub."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import time
from pathlib import Path

import pytest
import pytest_asyncio

from shallot.core.errors import ShallotError
from shallot.crypto.codec import DecodeError
from shallot.exit.dns import DnsForwarder, host_names, system_resolver
from shallot.exit.dnsquery import (
    MAX_DNS_LEN,
    PendingTable,
    answer_matches,
    parse_query,
    parse_question,
    refusal,
    refused_response,
)
from shallot.exit.policy import ExitPolicy


def encode_name(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".") if label) + b"\x00"


def query(txid: int, name: str = "example.com", qtype: int = 1, qclass: int = 1, flags: int = 0x0100) -> bytes:
    return struct.pack("!HHHHHH", txid, flags, 1, 0, 0, 0) + encode_name(name) + struct.pack("!HH", qtype, qclass)


def answer_to(q: bytes, body: bytes = b"answer") -> bytes:
    """The resolver's response to ``q``: same id and question, QR set, something after the question."""
    return q[:2] + bytes([q[2] | 0x80]) + q[3:] + body


async def _until(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


class Resolver(asyncio.DatagramProtocol):
    """A resolver on loopback that records every query and answers when told."""

    def __init__(self) -> None:
        self.queries: list[tuple[bytes, tuple[str, int]]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queries.append((data, addr))

    def answer(self, q: bytes, addr: tuple[str, int], body: bytes = b"answer") -> None:
        assert self.transport is not None
        self.transport.sendto(answer_to(q, body), addr)


class Client:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)

    def received(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096))
            except BlockingIOError:
                return out


@pytest_asyncio.fixture
async def dns():
    loop = asyncio.get_running_loop()
    transport, resolver = await loop.create_datagram_endpoint(Resolver, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    made: list[DnsForwarder] = []
    clients: list[Client] = []

    async def forwarder(**kw) -> DnsForwarder:
        kw.setdefault("own_names", [(b"exithost",), (b"corp", b"example")])
        kw.setdefault("private", ExitPolicy().off_limits)
        fwd = DnsForwarder("127.0.0.1", "127.0.0.1", port=0, resolver_port=port, **kw)
        await fwd.start()
        made.append(fwd)
        return fwd

    def client(host: str = "127.0.0.1") -> Client:
        clients.append(Client(host))
        return clients[-1]

    yield resolver, forwarder, client
    for fwd in made:
        fwd.close()
    for c in clients:
        c.sock.close()
    transport.close()


# ------------------------------------------------------------------------------------ forwarding, matching


@pytest.mark.asyncio
async def test_transaction_ids_are_rewritten_and_restored(dns) -> None:
    resolver, forwarder, client = dns
    fwd = await forwarder()
    a, b = client(), client()
    for c in (a, b):  # two clients pick the same id: the resolver must see two different ones
        c.sock.sendto(query(0x1234), fwd.address())
    await _until(lambda: len(resolver.queries) == 2)
    (qa, _), (qb, _) = resolver.queries
    assert qa[:2] != qb[:2] and qa[2:] == qb[2:] == query(0x1234)[2:]
    for q, addr in resolver.queries:
        resolver.answer(q, addr)
    await _until(lambda: fwd.counters["dns_answers"] == 2)
    for c in (a, b):
        await _until(lambda c=c: _ready(c))
        (got,) = c.received()
        assert got == answer_to(query(0x1234))


def _ready(c: Client) -> bool:
    try:
        c.sock.recv(1, socket.MSG_PEEK)
        return True
    except BlockingIOError:
        return False


@pytest.mark.asyncio
async def test_every_upstream_query_has_its_own_socket_and_source_port(dns) -> None:
    resolver, forwarder, client = dns
    fwd = await forwarder()
    c = client()
    for i in range(8):
        c.sock.sendto(query(i, f"n{i}.example.com"), fwd.address())
    await _until(lambda: len(resolver.queries) == 8)
    ports = {addr for _, addr in resolver.queries}
    assert len(ports) == 8  # a fixed source port would leave only the 16-bit id to guess
    for q, addr in resolver.queries:
        resolver.answer(q, addr)
    await _until(lambda: fwd.counters["dns_answers"] == 8)
    assert fwd.status()["dns_pending"] == 0 and not fwd._pending  # each socket closed with its answer


@pytest.mark.asyncio
async def test_an_answer_must_carry_the_id_and_the_question_sent(dns) -> None:
    resolver, forwarder, client = dns
    fwd = await forwarder()
    c = client()
    c.sock.sendto(query(7, "bank.example"), fwd.address())
    await _until(lambda: len(resolver.queries) == 1)
    q, addr = resolver.queries[0]
    other = query(int.from_bytes(q[:2], "big"), "evil.example")  # the right id, another name
    resolver.transport.sendto(answer_to(other, b"forged"), addr)
    wrong_id = bytes([q[0] ^ 1]) + q[1:]
    resolver.transport.sendto(answer_to(wrong_id, b"forged"), addr)
    resolver.transport.sendto(q, addr)  # the query itself echoed: no QR bit
    resolver.transport.sendto(q[:12], addr)  # a bare header: no question
    await _until(lambda: fwd.counters["dns_drop_unmatched_answer"] == 4)
    assert _ready(c) is False  # nothing delivered, and the query still waits for its answer
    upper = q[:12] + encode_name("BANK.Example") + q[-4:]  # resolvers may echo another case (0x20)
    resolver.transport.sendto(answer_to(upper), addr)
    await _until(lambda: fwd.counters["dns_answers"] == 1)
    await _until(lambda: _ready(c))
    (got,) = c.received()
    assert got[:2] == b"\x00\x07" and got.endswith(b"answer")


@pytest.mark.asyncio
async def test_answers_from_anywhere_but_the_resolver_never_arrive(dns) -> None:
    resolver, forwarder, client = dns
    fwd = await forwarder()
    c = client()
    c.sock.sendto(query(9), fwd.address())
    await _until(lambda: len(resolver.queries) == 1)
    q, addr = resolver.queries[0]
    spoofer = client("127.0.0.2")  # knows the port, the id and the question: still not the resolver's address
    spoofer.sock.sendto(answer_to(q, b"forged"), addr)
    spoofer2 = client("127.0.0.1")  # the resolver's address, another port
    spoofer2.sock.sendto(answer_to(q, b"forged"), addr)
    await asyncio.sleep(0.1)  # the kernel drops them (connected socket); a late delivery would show below
    resolver.answer(q, addr)
    await _until(lambda: fwd.counters["dns_answers"] == 1)
    await _until(lambda: _ready(c))
    assert c.received() == [answer_to(query(9))]


# --------------------------------------------------------------------------------------------- quotas


@pytest.mark.asyncio
async def test_one_client_cannot_starve_another(dns) -> None:
    resolver, forwarder, client = dns
    fwd = await forwarder(max_pending=8, per_client=4)
    flood, honest = client(), client("127.0.0.3")
    for i in range(200):
        flood.sock.sendto(query(i, f"f{i}.example.com"), fwd.address())
    await _until(lambda: fwd.counters["dns_queries"] + fwd.table.counters["dns_drop_client_quota"] == 200)
    assert fwd.counters["dns_queries"] == 4 and fwd.table.counters["dns_drop_client_quota"] == 196
    honest.sock.sendto(query(1, "mine.example.com"), fwd.address())
    await _until(lambda: any(b"mine" in q for q, _ in resolver.queries))
    q, addr = next((q, a) for q, a in resolver.queries if b"mine" in q)
    resolver.answer(q, addr)
    await _until(lambda: _ready(honest))
    assert honest.received() == [answer_to(query(1, "mine.example.com"))]


@pytest.mark.asyncio
async def test_a_wakeup_for_an_evicted_query_is_ignored(dns) -> None:
    _, forwarder, _ = dns
    fwd = await forwarder()
    fwd._readable(12345)  # its socket was closed by an eviction earlier in the same turn of the loop
    assert fwd.counters == {}


@pytest.mark.asyncio
async def test_a_full_table_evicts_the_heaviest_clients_oldest(dns) -> None:
    resolver, forwarder, client = dns
    fwd = await forwarder(max_pending=6, per_client=4)
    heavy, light, late = client(), client("127.0.0.3"), client("127.0.0.4")
    for i in range(4):
        heavy.sock.sendto(query(i, f"h{i}.example.com"), fwd.address())
    await _until(lambda: len(resolver.queries) == 4)
    for i in range(2):
        light.sock.sendto(query(i, f"l{i}.example.com"), fwd.address())
    await _until(lambda: len(resolver.queries) == 6)
    late.sock.sendto(query(1, "late.example.com"), fwd.address())  # the table is full: heavy's oldest goes
    await _until(lambda: len(resolver.queries) == 7)
    assert fwd.table.counters["dns_evicted"] == 1 and fwd.table.count("127.0.0.1") == 3
    assert fwd.table.count("127.0.0.3") == 2 and fwd.table.count("127.0.0.4") == 1
    for q, addr in resolver.queries:
        resolver.answer(q, addr)
    await _until(lambda: fwd.counters["dns_answers"] == 6)  # all but the evicted one
    await _until(lambda: _ready(late) and _ready(light))
    names = b"".join(heavy.received())
    assert b"h0" not in names and all(f"h{i}".encode() in names for i in (1, 2, 3))


@pytest.mark.asyncio
async def test_pending_queries_expire_and_late_answers_are_dropped(dns) -> None:
    resolver, forwarder, client = dns
    fwd = await forwarder(timeout_s=0.2)
    c = client()
    c.sock.sendto(query(1), fwd.address())
    await _until(lambda: len(resolver.queries) == 1)
    await _until(lambda: fwd.counters["dns_timeouts"] == 1, timeout=3.0)  # the forwarder's own sweep
    assert fwd.status()["dns_pending"] == 0 and not fwd._pending
    late, addr = resolver.queries[0]
    resolver.answer(late, addr)  # its socket is closed: nothing can take it
    await asyncio.sleep(0.1)
    assert fwd.counters["dns_answers"] == 0 and c.received() == []


# ----------------------------------------------------------------------------------- what is forwarded


@pytest.mark.asyncio
@pytest.mark.parametrize("name, qclass, why", [
    ("_gateway", 1, "single_label"), ("_outbound", 1, "single_label"), ("localhost", 1, "single_label"),
    ("wpad", 1, "single_label"), ("printer.local", 1, "local_suffix"), ("nas.lan", 1, "local_suffix"),
    ("a.localhost", 1, "local_suffix"), ("router.home.arpa", 1, "local_suffix"),
    ("exithost", 1, "single_label"), ("wiki.corp.example", 1, "own_name"),
    ("1.0.168.192.in-addr.arpa", 1, "private_reverse"), ("10.in-addr.arpa", 1, "private_reverse"),
    ("5.0.64.100.in-addr.arpa", 1, "private_reverse"), ("1.0.0.127.in-addr.arpa", 1, "private_reverse"),
    ("in-addr.arpa", 1, "private_reverse"), ("d.f.ip6.arpa", 1, "private_reverse"),
    ("version.bind", 3, "class"), ("hostname.bind", 3, "class"),
])
async def test_names_about_the_exit_host_are_refused(dns, name: str, qclass: int, why: str) -> None:
    resolver, forwarder, client = dns
    fwd = await forwarder()
    c = client()
    q = query(0x4242, name, qclass=qclass)
    c.sock.sendto(q, fwd.address())
    await _until(lambda: _ready(c))
    (got,) = c.received()
    assert got[:2] == q[:2] and got[3] & 0x0F == 5 and got[2] & 0x80  # REFUSED, our id
    assert got[12:] == q[12:] and len(got) <= len(q)
    assert fwd.counters[f"dns_refused_{why}"] == 1 and resolver.queries == []


@pytest.mark.asyncio
@pytest.mark.parametrize("name", ["example.com", "8.8.8.8.in-addr.arpa", "1.113.0.203.in-addr.arpa.x.com",
                                  "corp.example.org", "local.example.com"])
async def test_public_names_are_forwarded(dns, name: str) -> None:
    resolver, forwarder, client = dns
    fwd = await forwarder()
    client().sock.sendto(query(1, name), fwd.address())
    await _until(lambda: len(resolver.queries) == 1)
    assert fwd.counters["dns_queries"] == 1


@pytest.mark.asyncio
async def test_malformed_queries_are_dropped(dns) -> None:
    resolver, forwarder, client = dns
    fwd = await forwarder()
    c = client()
    good = query(5)
    bad = [good[:11], good + bytes(MAX_DNS_LEN), answer_to(good, b""), good[:4] + b"\x00\x00" + good[6:],
           good[:4] + b"\x00\x02" + good[6:], good[:6] + b"\x00\x01" + good[8:],  # QDCOUNT 0, 2; an answer record
           good[:12] + b"\xc0\x0c" + good[-4:], good[:-1], query(5, flags=0x2900)]  # compressed, short, UPDATE
    for data in bad:
        c.sock.sendto(data, fwd.address())
    await _until(lambda: fwd.counters["dns_drop_malformed"] == len(bad))
    assert resolver.queries == [] and fwd.counters["dns_queries"] == 0


# ----------------------------------------------------------------------------------------------- pure


def test_the_pending_table_quota_eviction_and_expiry() -> None:
    table = PendingTable(max_pending=4, per_client=3, timeout_s=1.0)
    assert table.admit("a", 1, 0.0) == (True, [])
    assert table.admit("a", 2, 0.1) == (True, [])
    assert table.admit("a", 3, 0.2) == (True, [])
    assert table.admit("a", 4, 0.3) == (False, []) and table.counters["dns_drop_client_quota"] == 1
    assert table.admit("b", 5, 0.4) == (True, [])
    assert table.admit("c", 6, 0.5) == (True, [1])  # full: a (3 pending) loses its oldest, not c
    assert table.admit("b", 7, 0.6) == (True, [2])  # a is still the heaviest (2 vs 1 vs 1)
    assert len(table) == 4 and table.count("a") == 1
    assert table.expired(1.35) == [3]
    assert table.expired(1.45) == [5] and table.count("b") == 1
    assert table.remove(7) and not table.remove(7) and table.count("b") == 0


def test_an_answer_matches_only_its_query() -> None:
    sent = parse_query(query(0xBEEF, "a.example"))
    assert answer_matches(answer_to(query(0xBEEF, "A.EXAMPLE")), sent)
    assert not answer_matches(query(0xBEEF, "a.example"), sent)  # no QR
    assert not answer_matches(answer_to(query(0xBEEE, "a.example")), sent)
    assert not answer_matches(answer_to(query(0xBEEF, "b.example")), sent)
    assert not answer_matches(answer_to(query(0xBEEF, "a.example", qtype=28)), sent)
    assert not answer_matches(answer_to(query(0xBEEF, "a.example", qclass=3)), sent)
    assert not answer_matches(b"\xbe\xef", sent)


def test_refusal_of_reverse_names_follows_the_policy_and_own_networks() -> None:
    own = [ipaddress.ip_network("203.0.113.23/32")]
    private = [*ExitPolicy().off_limits(), *own]
    labels = lambda name: tuple(name.encode().split(b"."))  # noqa: E731
    assert refusal(labels("23.113.0.203.in-addr.arpa"), own_names=[], private=private) == "private_reverse"
    assert refusal(labels("24.113.0.203.in-addr.arpa"), own_names=[], private=private) is None
    assert refusal(labels("113.0.203.in-addr.arpa"), own_names=[], private=private) == "private_reverse"
    assert refusal(labels("300.1.1.1.in-addr.arpa"), own_names=[], private=private) is None  # not a reverse name
    mapped = ".".join(reversed("00000000000000000000ffff7f000001")) + ".ip6.arpa"  # ::ffff:127.0.0.1
    assert refusal(labels(mapped), own_names=[], private=private) == "private_reverse"
    public6 = ".".join(reversed("20010db9000000000000000000000001")) + ".ip6.arpa"
    assert refusal(labels(public6), own_names=[], private=private) is None


def test_refused_answers_are_never_longer_than_the_query() -> None:
    q = query(1, "_gateway") + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"  # with an EDNS OPT record
    q = q[:10] + b"\x00\x01" + q[12:]
    got = refused_response(q, parse_query(q))
    assert len(got) < len(q) and got[:2] == q[:2] and got[3] == 0x85 and got[2] & 0x81 == 0x81  # QR, RD kept
    with pytest.raises(DecodeError):
        parse_query(got)  # a response is never a query


# ------------------------------------------------------------------------------------------- resolver


def test_the_default_resolver_is_never_a_local_stub(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch example\nnameserver\nnameserver 127.0.0.53\nnameserver ::1\n"
                    "nameserver 0.0.0.0\n"  # glibc reads 0.0.0.0 as this host
                    "nameserver fe80::1%eth0\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n")
    assert system_resolver(conf) == "192.0.2.53"
    conf.write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lan\n")
    with pytest.raises(ShallotError, match=r"127\.0\.0\.53.*--resolver"):
        system_resolver(conf)
    conf.write_text("search example\n")
    with pytest.raises(ShallotError, match="--resolver"):
        system_resolver(conf)
    with pytest.raises(ShallotError):
        system_resolver(tmp_path / "missing")


def test_host_names_are_the_hostname_and_the_search_domains(tmp_path: Path, monkeypatch) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("search corp.example. lan\ndomain office.example\nnameserver 192.0.2.1\n")
    monkeypatch.setattr(socket, "gethostname", lambda: "Exit1.Example.NET")
    assert sorted(host_names(conf)) == sorted([(b"exit1", b"example", b"net"), (b"corp", b"example"), (b"lan",),
                                               (b"office", b"example")])


def test_the_query_parsers_limits_are_exact() -> None:
    longest = "." .join(["a" * 63] * 3 + ["b" * 61])  # 3 * 64 + 62 + the root = 255 bytes on the wire
    assert len(encode_name(longest)) == 255 and parse_query(query(1, longest)).labels[-1] == b"b" * 61
    with pytest.raises(DecodeError, match="too long"):
        parse_query(query(1, longest + "b"))
    with pytest.raises(DecodeError):  # a 64-byte label: its length byte has a flag bit (0x40)
        parse_query(query(1, "a" * 64 + ".example"))
    full = query(1) + bytes(MAX_DNS_LEN - len(query(1)))  # what follows the question is not parsed
    full = full[:10] + b"\x00\x01" + full[12:]
    assert parse_query(full).labels == (b"example", b"com")
    with pytest.raises(DecodeError, match="too long"):
        parse_query(full + b"\x00")
    two_additional = full[:10] + b"\x00\x02" + full[12:]
    with pytest.raises(DecodeError, match="records"):
        parse_query(two_additional)
    for short in (b"", b"\x00\x01\x00\x00\x00\x01", query(1)[:12]):
        with pytest.raises(DecodeError):
            parse_question(short)
    nibbles = (*(b"a" for _ in range(33)), b"ip6", b"arpa")  # one nibble too many: not an address
    assert refusal(nibbles, own_names=[], private=ExitPolicy().off_limits()) is None
