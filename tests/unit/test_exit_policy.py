"""Exit policy and IP header parsing: the defaults protect private networks, rules apply in order,
and the parsers raise only their documented errors on any input."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shallot.core.wire.ippacket import PROTO_ICMP, PROTO_TCP, PROTO_UDP, PacketInfo, parse_packet
from shallot.crypto.codec import DecodeError
from shallot.exit.policy import ExitPolicy, PolicyError, parse_policy, parse_rule


def v4(dst: str, proto: int = PROTO_TCP, dport: int | None = 443, *, src: str = "100.64.0.2",
       frag_offset: int = 0) -> bytes:
    payload = struct.pack("!HH", 40000, dport) + bytes(16) if dport is not None else bytes(8)
    total = 20 + len(payload)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, frag_offset, 64, proto, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return header + payload


def v6(dst: str, proto: int = PROTO_TCP, dport: int = 443, *, ext: bytes = b"", first_next: int | None = None) -> bytes:
    payload = ext + struct.pack("!HH", 40000, dport) + bytes(16)
    header = struct.pack("!IHBB16s16s", 6 << 28, len(payload), first_next if first_next is not None else proto, 64,
                         ipaddress.IPv6Address("fd00::2").packed, ipaddress.IPv6Address(dst).packed)
    return header + payload


def allowed(policy: ExitPolicy, packet: bytes) -> bool:
    return policy.allows(parse_packet(packet))


@pytest.mark.parametrize("dst", ["127.0.0.1", "10.99.0.10", "172.16.5.5", "192.168.1.1", "169.254.169.254",
                                 "100.64.0.5", "224.0.0.251", "255.255.255.255", "0.0.0.0", "240.0.0.1"])
def test_default_rejects_private_and_special_ipv4(dst: str) -> None:
    policy = ExitPolicy()
    assert not allowed(policy, v4(dst))
    assert sum(policy.counters.values()) == 1


@pytest.mark.parametrize("dst", ["::1", "fd12::1", "fe80::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::"])
def test_default_rejects_private_and_special_ipv6(dst: str) -> None:
    assert not allowed(ExitPolicy(), v6(dst))


def test_public_destinations_pass_but_not_smtp() -> None:
    policy = ExitPolicy()
    assert allowed(policy, v4("203.0.113.80"))
    assert allowed(policy, v4("203.0.113.80", PROTO_UDP, 53))
    assert allowed(policy, v4("203.0.113.80", PROTO_ICMP, None))
    assert allowed(policy, v6("2606:4700::1111"))
    assert not allowed(policy, v4("203.0.113.80", PROTO_TCP, 25))
    assert allowed(policy, v4("203.0.113.80", PROTO_UDP, 25))  # the SMTP rule is TCP only
    assert policy.counters["reject_rule"] == 1


def test_the_exits_own_networks_are_rejected() -> None:
    policy = ExitPolicy(own_networks=[ipaddress.ip_network("203.0.113.0/24")])
    assert not allowed(policy, v4("203.0.113.23"))
    assert policy.counters["reject_exit-own-network"] == 1
    policy.set_own_networks([])
    assert allowed(policy, v4("203.0.113.23"))


def test_file_rules_apply_in_order_and_cannot_unblock_private_ranges() -> None:
    rules = parse_policy("""
        # web only
        accept tcp *:80
        accept tcp *:443
        accept udp *:53
        accept * 10.0.0.0/8   # ignored: built-in rejects come first
        reject *
    """)
    policy = ExitPolicy(rules)
    assert allowed(policy, v4("198.51.100.1", PROTO_TCP, 443))
    assert allowed(policy, v4("198.51.100.1", PROTO_UDP, 53))
    assert not allowed(policy, v4("198.51.100.1", PROTO_TCP, 22))
    assert not allowed(policy, v4("10.1.2.3", PROTO_TCP, 80))
    assert not allowed(policy, v4("198.51.100.1", PROTO_ICMP, None))


def test_port_rules_leave_non_first_fragments_to_address_rules() -> None:
    policy = ExitPolicy(parse_policy("reject * 198.51.100.0/24\n"))
    frag = v4("203.0.113.80", PROTO_TCP, None, frag_offset=100)
    info = parse_packet(frag)
    assert info.fragment and info.dst_port is None
    assert policy.allows(info)  # the first fragment (with the port) was judged
    assert not allowed(policy, v4("198.51.100.7", PROTO_TCP, None, frag_offset=100))


@pytest.mark.parametrize(("line", "parsed"), [
    ("reject tcp *:25", (False, PROTO_TCP, None, (25, 25))),
    ("accept * 192.0.2.0/24:*", (True, None, "192.0.2.0/24", None)),
    ("reject udp *:137-139", (False, PROTO_UDP, None, (137, 139))),
    ("accept [2001:db8::/32]:443", (True, None, "2001:db8::/32", (443, 443))),
    ("accept tcp [2001:db8::1]", (True, PROTO_TCP, "2001:db8::1/128", None)),
    ("reject 10.0.0.1", (False, None, "10.0.0.1/32", None)),
    ("reject 10.1.2.3/8:1-1024", (False, None, "10.0.0.0/8", (1, 1024))),
    ("accept icmp *", (True, PROTO_ICMP, None, None)),
])
def test_rule_syntax(line: str, parsed: tuple) -> None:
    """Every part of a rule is read: verdict, protocol, address (host bits dropped) and port range."""
    rule = parse_rule(line)
    accept, proto, network, ports = parsed
    assert (rule.accept, rule.proto, rule.network, rule.ports) == (
        accept, proto, ipaddress.ip_network(network) if network else None, ports)


@pytest.mark.parametrize("line", ["allow *", "reject tcp *:0", "reject tcp *:99999", "reject tcp *:80-20",
                                  "accept tcp 300.1.1.1:80", "accept sctp *", "reject", "reject tcp *:http"])
def test_bad_rules_name_the_line(line: str) -> None:
    with pytest.raises(PolicyError, match="line 2"):
        parse_policy(f"accept *\n{line}\n")


def test_ipv6_extension_headers_are_walked() -> None:
    hop_by_hop = bytes([PROTO_TCP, 0]) + bytes(6)  # next header TCP, length 0 (8 bytes)
    info = parse_packet(v6("2001:4860::1", ext=hop_by_hop, first_next=0))
    assert (info.proto, info.dst_port) == (PROTO_TCP, 443)


@settings(max_examples=10_000, deadline=None)
@given(st.binary(max_size=120))
def test_parse_packet_raises_only_decode_error(data: bytes) -> None:
    try:
        info = parse_packet(data)
    except DecodeError:
        return
    assert isinstance(info, PacketInfo) and info.version in (4, 6) and info.length <= len(data)


@settings(max_examples=2000, deadline=None)
@given(st.text(max_size=60))
def test_parse_policy_raises_only_policy_error(text: str) -> None:
    try:
        parse_policy(text)
    except PolicyError:
        pass


POLICY_FOR_CACHE = parse_policy("reject udp 198.51.100.0/24:5000-6000\naccept tcp 198.51.100.7:80\n"
                                "reject 198.51.100.0/25\n")


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from(["198.51.100.7", "198.51.100.200", "198.51.100.3", "203.0.113.9", "10.1.1.1",
                        "100.64.0.9", "192.0.2.1"]),
       st.sampled_from([PROTO_TCP, PROTO_UDP, PROTO_ICMP]), st.sampled_from([None, 25, 80, 443, 5000, 5500, 6001]),
       st.booleans())
def test_cached_verdicts_equal_fresh_judgements(dst: str, proto: int, dport: int | None, own: bool) -> None:
    """The exit caches decisions by (destination, protocol, port): a cached answer must be the one a fresh
    policy gives, also after the exit's own networks change."""
    dport = dport if proto != PROTO_ICMP else None  # ICMP has no ports
    cached = ExitPolicy(POLICY_FOR_CACHE, own_networks=[ipaddress.ip_network("192.0.2.0/24")])
    for _ in range(2):  # the second call answers from the cache
        got = cached.verdict(ipaddress.IPv4Address(dst).packed, proto, dport)
    nets = [ipaddress.ip_network("192.0.2.0/24")] + ([ipaddress.ip_network("203.0.113.0/24")] if own else [])
    cached.set_own_networks(nets)
    after = cached.verdict(ipaddress.IPv4Address(dst).packed, proto, dport)
    fresh_before = ExitPolicy(POLICY_FOR_CACHE, own_networks=nets[:1])
    fresh_after = ExitPolicy(POLICY_FOR_CACHE, own_networks=nets)
    packet = v4(dst, proto, dport)
    assert (got is None) == fresh_before.allows(parse_packet(packet))
    assert (after is None) == fresh_after.allows(parse_packet(packet))
