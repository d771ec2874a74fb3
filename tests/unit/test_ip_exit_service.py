"""The IP exit service in memory: address assignment, policy and anti-spoofing on the way out,
routing by address on the way back, and the address freed with the circuit."""

from __future__ import annotations

from shallot.core.circuit import CircuitState, ConfigReceived, DatagramReceived
from shallot.core.wire.ipconfig import POOL, TUNNEL_MTU, decode_config
from shallot.core.wire.ippacket import PROTO_TCP
from shallot.crypto.circuit_handshake import SERVICE_IP
from shallot.exit.ipservice import IpExitService
from tests.simnet import SimNet, det_rng, make_client, make_relays
from tests.unit.test_exit_policy import v4


def _network():
    net = SimNet()
    relays = make_relays(net, 3, exits={2})
    exit_node = relays[2][0]
    exit_node.services[SERVICE_IP] = IpExitService(rng=det_rng(77))
    client = make_client(net)
    return net, relays, exit_node, client


def from_tun(exit_node, packet, now):
    """What the exit's TUN reader does with a packet from the internet (exit/service.py IpExit._from_tun)."""
    routed = exit_node.services[SERVICE_IP].route_back(packet)
    if routed is not None:
        exit_node.send_backward(*routed, now)


def _ip_circuit(net, relays, client):
    circ = client.build([r[1] for r in relays], net.now, net.wall, service=SERVICE_IP)
    net.run()
    assert circ.state is CircuitState.OPEN
    client.events.clear()
    client.request_config(circ, net.now)
    net.run()
    configs = [e for e in client.events if isinstance(e, ConfigReceived)]
    assert len(configs) == 1
    client.events.clear()
    return circ, decode_config(configs[0].data)


def test_address_policy_and_routing_both_ways() -> None:
    net, relays, exit_node, client = _network()
    circ, (address, resolver, mtu) = _ip_circuit(net, relays, client)
    svc = exit_node.services[SERVICE_IP]
    assert address in POOL and address != resolver and mtu == TUNNEL_MTU
    ip_circ = next(c for c, fp in exit_node.circuits.values() if fp and c.service_id == SERVICE_IP)
    assert svc.address_of(ip_circ) == address

    out = v4("198.51.100.80", PROTO_TCP, 80, src=str(address))
    client.send(circ, out, net.now)
    net.run()
    assert svc.tun_outbox == [out]

    for bad, counter in ((v4("198.51.100.80", src="100.64.9.9"), "ip_drop_spoofed_source"),
                         (v4("10.99.0.10", src=str(address)), "ip_drop_policy"),
                         (v4("169.254.169.254", src=str(address)), "ip_drop_policy"),
                         (b"\x45garbage", "ip_drop_malformed")):
        client.send(circ, bad, net.now)
        net.run()
        assert svc.counters[counter] >= 1, counter
    assert svc.tun_outbox == [out]  # nothing else reached the TUN

    reply = v4(str(address), PROTO_TCP, 40000, src="198.51.100.80")
    from_tun(exit_node, reply, net.now)
    from_tun(exit_node, v4("100.64.1.1", src="198.51.100.80"), net.now)  # nobody's address
    net.run()
    got = [e.data for e in client.events if isinstance(e, DatagramReceived)]
    assert got == [reply]
    assert svc.counters["ip_from_tun_no_circuit"] == 1


def test_clients_cannot_reach_each_other_and_addresses_are_freed() -> None:
    net, relays, exit_node, client = _network()
    a, (addr_a, _, _) = _ip_circuit(net, relays, client)
    b, (addr_b, _, _) = _ip_circuit(net, relays, client)
    assert addr_a != addr_b
    svc = exit_node.services[SERVICE_IP]
    client.send(b, v4(str(addr_a), src=str(addr_b)), net.now)
    net.run()
    assert svc.tun_outbox == [] and svc.counters["ip_drop_policy"] == 1  # 100.64/10 is never an exit target
    client.close(a, net.now)
    net.run()
    assert svc.address_of(a) is None
    from_tun(exit_node, v4(str(addr_a), src="198.51.100.80"), net.now)
    assert svc.counters["ip_from_tun_no_circuit"] == 1


def test_an_exit_without_ip_service_refuses_ip_circuits() -> None:
    net = SimNet()
    relays = make_relays(net, 3, exits={2})
    client = make_client(net)
    circ = client.build([r[1] for r in relays], net.now, net.wall, service=SERVICE_IP)
    net.run()
    assert circ.state is CircuitState.CLOSED
    assert relays[2][0].counters["reject_create_no_ip_service"] == 1
