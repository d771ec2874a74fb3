"""The exit's perimeter in its sans-I/O service and process part: IPv4 options dropped both ways, a freed
tunnel address kept out of the pool until its conntrack entries are flushed (exit/ipservice.py), and the
exit's public addresses (given or learned) off limits like its interfaces' (exit/service.py)."""

from __future__ import annotations

import ipaddress

import pytest

from shallot.core.wire.cells import MSG_DATA
from shallot.core.wire.ippacket import PROTO_UDP
from shallot.exit import service as exit_service
from shallot.exit.ipservice import IpExitService
from shallot.exit.service import IpExit
from tests.unit.test_exit_policy import v4


class Circ:
    """Stands for a relay circuit."""


def with_options(packet: bytes) -> bytes:
    """``packet`` with a 4-byte IPv4 option (NOP NOP NOP EOL): IHL 6."""
    total = int.from_bytes(packet[2:4], "big") + 4
    return bytes([0x46, packet[1]]) + total.to_bytes(2, "big") + packet[4:20] + b"\x01\x01\x01\x00" + packet[20:]


def test_ipv4_options_are_dropped_both_ways() -> None:
    svc = IpExitService(rng=lambda n: bytes(n))
    circ = Circ()
    assert svc.attach(circ)
    addr = str(svc.address_of(circ))
    svc.on_message(circ, MSG_DATA, with_options(v4("198.51.100.80", PROTO_UDP, 53, src=addr)), 0.0)
    assert svc.counters["ip_drop_options"] == 1 and svc.tun_outbox == []
    svc.on_message(circ, MSG_DATA, v4("198.51.100.80", PROTO_UDP, 53, src=addr), 0.0)
    assert len(svc.tun_outbox) == 1  # the same packet without options passes
    back = v4(addr, PROTO_UDP, 40000, src="198.51.100.80")
    assert svc.route_back(with_options(back)) is None and svc.counters["ip_from_tun_options"] == 1
    assert svc.route_back(back) is not None


def test_a_freed_address_waits_for_its_conntrack_flush() -> None:
    draws = iter([bytes(4)] * 3 + [(1).to_bytes(4, "big")])  # every draw names the same address until the last
    svc = IpExitService(rng=lambda n: next(draws))
    first = Circ()
    assert svc.attach(first)
    address = svc.address_of(first)
    svc.detach(first)
    second = Circ()
    assert svc.attach(second)  # the old address is in quarantine: the second draw is taken
    assert svc.address_of(second) != address
    assert svc.take_freed() == [address] and svc.take_freed() == []
    svc.release(address)  # flushed: back in the pool
    draws = iter([bytes(4)])
    svc._rng = lambda n: next(draws)
    third = Circ()
    assert svc.attach(third) and svc.address_of(third) == address


def test_the_quarantine_is_bounded() -> None:
    svc = IpExitService(rng=lambda n: bytes(n), max_quarantine=2)
    for i in range(4):
        circ = Circ()
        svc._rng = lambda n, i=i: i.to_bytes(n, "big")
        assert svc.attach(circ)
        svc.detach(circ)
    assert len(svc._quarantine) == 2 and svc.counters["ip_quarantine_overflow"] == 2
    assert len(svc.take_freed()) == 4  # every freed address is still offered to the flush


def test_the_exits_public_addresses_are_off_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exit_service, "session", lambda fn: [ipaddress.ip_network("10.0.0.0/24")])
    ip_exit = IpExit(public_ips=["192.0.2.7"])
    ip_exit._public_hosts = lambda: ["198.51.100.9", "10.0.0.5"]  # descriptor / STUN (1:1 NAT); one on an iface
    ip_exit._refresh_own_networks()
    policy = ip_exit.ip_service.policy
    for public in ("192.0.2.7", "198.51.100.9"):
        assert policy.verdict(ipaddress.ip_address(public).packed, PROTO_UDP, 80) == "reject_exit-own-network"
    assert policy.verdict(ipaddress.ip_address("198.51.100.10").packed, PROTO_UDP, 80) is None
    assert ipaddress.ip_network("198.51.100.9/32") in policy.off_limits()


@pytest.mark.asyncio
async def test_freed_addresses_are_flushed_then_released(monkeypatch: pytest.MonkeyPatch) -> None:
    flushed: list[str] = []

    def flush(address: str) -> int:
        flushed.append(address)
        if len(flushed) == 2:
            raise OSError(1, "no permission")
        return 3

    monkeypatch.setattr(exit_service, "flush_conntrack", flush)
    ip_exit = IpExit()
    svc = ip_exit.ip_service
    circs = [Circ(), Circ()]
    for circ in circs:
        assert svc.attach(circ)
    addresses = [svc.address_of(c) for c in circs]
    for circ in circs:
        svc.detach(circ)
    ip_exit.after_datagrams()
    assert ip_exit._flushing is not None
    await ip_exit._flushing
    assert flushed == [str(a) for a in addresses]
    assert ip_exit.counters["conntrack_flushed"] == 3 and ip_exit.counters["conntrack_flush_errors"] == 1
    assert addresses[0].packed not in svc._quarantine  # flushed: free again
    assert addresses[1].packed in svc._quarantine  # the flush failed: never handed out again (bounded)
