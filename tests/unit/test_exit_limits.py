"""The exit's limits and drop paths: the IP service's per-circuit rate and its table of addresses
(exit/ipservice.py), the policy's rule syntax read back in full and its bounded verdict cache
(exit/policy.py).  The DNS forwarder's are in test_exit_dns.py."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from shallot.core.wire.cells import MSG_CONFIG, MSG_DATA, MSG_DROP, decode_message
from shallot.core.wire.ipconfig import GATEWAY, decode_config
from shallot.core.wire.ippacket import PROTO_ICMP, PROTO_TCP, PROTO_UDP, parse_packet
from shallot.crypto.params import MAX_DATA_LEN
from shallot.exit.ipservice import IpExitService
from shallot.exit.policy import ExitPolicy, PolicyError, Rule, parse_rule
from tests.simnet import det_rng
from tests.unit.test_exit_policy import v4


class Circ:
    """Stands for a relay circuit: the IP service only keys its tables by the object."""


def _attached(svc: IpExitService) -> tuple[Circ, str]:
    circ = Circ()
    assert svc.attach(circ)
    address = svc.address_of(circ)
    assert address is not None
    return circ, str(address)


# ---------------------------------------------------------------------------------------------- IP service


def test_each_circuit_has_its_own_packet_rate() -> None:
    svc = IpExitService(rng=det_rng(1), packets_per_second=1.0, burst=3.0)
    a, a_addr = _attached(svc)
    b, b_addr = _attached(svc)
    for _ in range(5):
        svc.on_message(a, MSG_DATA, v4("198.51.100.80", src=a_addr), 0.0)
    assert len(svc.tun_outbox) == 3 and svc.counters["ip_drop_rate_limited"] == 2
    svc.on_message(b, MSG_DATA, v4("198.51.100.80", src=b_addr), 0.0)
    assert len(svc.tun_outbox) == 4  # b's bucket is its own
    svc.on_message(a, MSG_DATA, v4("198.51.100.80", src=a_addr), 1.0)  # a second later: one more token
    svc.on_message(a, MSG_DATA, v4("198.51.100.80", src=a_addr), 1.0)
    assert len(svc.tun_outbox) == 5 and svc.counters["ip_drop_rate_limited"] == 3


def test_a_full_exit_refuses_circuits_until_one_leaves() -> None:
    svc = IpExitService(rng=det_rng(1), max_circuits=2)
    a, _ = _attached(svc)
    _attached(svc)
    late = Circ()
    assert not svc.attach(late) and svc.counters["ip_refused_full"] == 1 and svc.address_of(late) is None
    svc.detach(a)
    assert svc.attach(late) and svc.counters["ip_refused_full"] == 1


def test_addresses_are_never_handed_out_twice() -> None:
    draws = iter([bytes(4), bytes(4), (1).to_bytes(4, "big")])  # the second draw repeats the first
    svc = IpExitService(rng=lambda n: next(draws))
    first, second = Circ(), Circ()
    assert svc.attach(first) and svc.attach(second)
    assert svc.address_of(second) != svc.address_of(first)


def test_the_exit_itself_offers_only_its_dns_forwarder() -> None:
    svc = IpExitService(rng=det_rng(1))
    circ, addr = _attached(svc)
    gw = str(GATEWAY)
    svc.on_message(circ, MSG_DATA, v4(gw, PROTO_UDP, 53, src=addr), 0.0)
    assert len(svc.tun_outbox) == 1
    for packet in (v4(gw, PROTO_UDP, 54, src=addr), v4(gw, PROTO_TCP, 53, src=addr),
                   v4(gw, PROTO_ICMP, None, src=addr)):
        svc.on_message(circ, MSG_DATA, packet, 0.0)
    assert svc.counters["ip_drop_to_exit"] == 3 and len(svc.tun_outbox) == 1
    # DNS anywhere else is judged by the policy like any packet
    svc.on_message(circ, MSG_DATA, v4("10.0.0.53", PROTO_UDP, 53, src=addr), 0.0)
    assert svc.counters["ip_drop_policy"] == 1 and svc.policy.counters["reject_private"] == 1
    assert len(svc.tun_outbox) == 1


def test_messages_the_ip_service_does_not_take_are_counted() -> None:
    svc = IpExitService(rng=det_rng(1))
    stranger = Circ()
    assert svc.on_message(stranger, MSG_DATA, v4("198.51.100.80"), 0.0) == []
    assert svc.counters["ip_drop_not_attached"] == 1
    circ, addr = _attached(svc)
    assert svc.on_message(circ, MSG_DROP, b"", 0.0) == [] and svc.counters["ip_drop_unexpected_message"] == 1
    v6 = bytes([0x60]) + bytes(39)
    svc.on_message(circ, MSG_DATA, v6, 0.0)
    svc.on_message(circ, MSG_DATA, b"\x45junk", 0.0)
    assert svc.counters["ip_drop_ipv6_not_offered"] == 1 and svc.counters["ip_drop_malformed"] == 1
    (reply,) = svc.on_message(circ, MSG_CONFIG, b"", 0.0)
    msg_type, data = decode_message(reply)
    assert msg_type == MSG_CONFIG and str(decode_config(data)[0]) == addr
    assert svc.tun_outbox == []


def test_packets_from_the_tun_go_only_to_their_circuit_and_fit_a_cell() -> None:
    svc = IpExitService(rng=det_rng(1))
    circ, addr = _attached(svc)
    ok = v4(addr, PROTO_UDP, 4000, src="198.51.100.80")
    routed = svc.route_back(ok)
    assert routed is not None and routed[0] is circ and decode_message(routed[1]) == (MSG_DATA, ok)

    def sized(total: int) -> bytes:
        header = bytearray(ok[:20])
        struct.pack_into("!H", header, 2, total)
        return bytes(header) + bytes(total - 20)

    assert svc.route_back(sized(MAX_DATA_LEN + 1)) is None and svc.counters["ip_from_tun_too_big"] == 1
    assert svc.route_back(sized(MAX_DATA_LEN)) is not None  # exactly one cell's worth is fine
    assert svc.route_back(b"\x45") is None and svc.counters["ip_from_tun_malformed"] == 1


# ---------------------------------------------------------------------------------------------- policy


@pytest.mark.parametrize(("line", "rule"), [
    ("reject tcp *:25", Rule(False, PROTO_TCP, None, (25, 25))),
    ("accept * 192.0.2.0/24:*", Rule(True, None, ipaddress.ip_network("192.0.2.0/24"), None)),
    ("reject udp *:137-139", Rule(False, PROTO_UDP, None, (137, 139))),
    ("accept [2001:db8::/32]:443", Rule(True, None, ipaddress.ip_network("2001:db8::/32"), (443, 443))),
    ("accept [2001:db8::1]", Rule(True, None, ipaddress.ip_network("2001:db8::1/128"), None)),
    ("reject 10.0.0.1", Rule(False, None, ipaddress.ip_network("10.0.0.1/32"), None)),
    ("accept icmp *", Rule(True, PROTO_ICMP, None, None)),
    ("accept tcp 198.51.100.7/16:1-65535", Rule(True, PROTO_TCP, ipaddress.ip_network("198.51.0.0/16"), (1, 65535))),
])
def test_a_rule_is_read_in_full(line: str, rule: Rule) -> None:
    assert parse_rule(line) == rule


@pytest.mark.parametrize("line", ["[2001:db8::1]x", "accept [2001:db8::1]443", "accept tcp *:0-5", "reject *:65536",
                                  "deny *", "accept tcp udp *", "accept sctp *", "accept *:25 extra"])
def test_a_malformed_rule_is_refused(line: str) -> None:
    with pytest.raises(PolicyError):
        parse_rule(line)


def test_the_verdict_cache_is_bounded() -> None:
    policy = ExitPolicy(verdict_cache=3)
    for i in range(10):
        assert policy.allows(parse_packet(v4(f"198.51.100.{i}")))
        assert len(policy._verdicts) <= 3  # a memory bound, not a behaviour: read the table itself
    assert not policy.allows(parse_packet(v4("198.51.100.1", PROTO_TCP, 25)))  # verdicts stay right after a flush
    assert len(policy._verdicts) <= 3
