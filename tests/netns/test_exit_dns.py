"""The exit's DNS forwarder and perimeter in the testbed, with real processes (an IP exit as in
test_ip_exit.py, clients behind NAT building SERVICE_IP circuits through guard -> middle -> exit):

* an off-path spoofer in a namespace of its own sprays forged answers for every transaction id, from the
  resolver's address, at the exit's uplink address: at the port the previous query left from (where a
  fixed-port forwarder would still listen) with the right question, and at the live query's own port
  with another name (the id alone is no longer enough): no forged answer is accepted;
* one client floods the forwarder, another's query is still answered;
* names about the exit's own host are refused;
* nothing reaches a client unasked from the exit's LAN or the internet (forwarding into the TUN), a packet
  with IPv4 options is dropped, and new connections and conntrack entries per circuit are capped."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

from shallot.core.control.client import ControlClient
from shallot.crypto.descriptor import encode_directory
from shallot.exit.dns import PER_CLIENT_PENDING
from shallot.exit.tun import MAX_FLOWS_PER_CIRCUIT, NEW_FLOWS_BURST
from shallot.relay import state as state_dir
from tests.netns.testbed import StandardTopology
from tests.netns.testbed import wait_for_line as _wait_line

HERE = Path(__file__).resolve().parent
PORT = 9100
ECHO_PORT = 7777
SLOW_S = 4.0  # the resolver's delay for "slow" names (under the 5 s query timeout): the spoofer's window
SPOOF = "192.0.2.66"
FORGED = "6.6.6.6"


@pytest.fixture(scope="module")
def exit_net(topology: StandardTopology, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("netns-exit-dns")
    tb, addr = topology.tb, topology.addr
    states = {}
    for role in ("guard", "middle", "exit"):
        states[role] = root / role
        state_dir.keygen(states[role], (addr[role], PORT), role, role == "exit")
    for role in ("guard", "middle"):
        _wait_line(tb.spawn(topology.ns[role], [sys.executable, "-m", "shallot", "relay", "--state",
                                                 str(states[role])]), "listening")
    web = addr["web"]
    _wait_line(tb.spawn(topology.ns["web"], [sys.executable, str(HERE / "dns_server.py"), f"--slow={SLOW_S}",
                                              f"web.shallot.test={web}", f"slow1.shallot.test={web}",
                                              f"slow2.shallot.test={web}"]), "listening")
    _wait_line(tb.spawn(topology.ns["exit"], [sys.executable, "-m", "shallot", "exit", "--state", str(states["exit"]),
                                               "--ip", "--uplink", "eth0", "--resolver", web]), "listening")
    for role in ("web", "lan"):
        _wait_line(tb.spawn(topology.ns[role], [sys.executable, str(HERE / "udp_echo_server.py"), str(ECHO_PORT)]),
                   "listening")
    # the spoofer: one more host on the "internet", off the path between exit and resolver
    spoof = topology.ns["spoof"] = tb.add_ns("spoof")
    tb.veth(spoof, "eth0", topology.ns["inet"], "p9")
    tb.ip(topology.ns["inet"], "link", "set", "p9", "master", "br0")
    tb.address(spoof, "eth0", f"{SPOOF}/24")
    for net in topology.internet:
        tb.exec(spoof, "ip", "route", "replace", net, "dev", "eth0")
    tb.exec(spoof, "ip", "route", "add", "100.64.0.0/10", "via", addr["exit"])  # it tries the tunnel pool too
    directory = root / "directory"
    directory.write_text(encode_directory([state_dir.read_descriptor(states[r]) for r in ("guard", "middle", "exit")]))
    states["directory"] = directory
    return states


def exit_status(exit_net: dict[str, Path]) -> dict:
    async def ask() -> dict:
        client = await ControlClient.connect(exit_net["exit"] / state_dir.CONTROL_SOCKET)
        try:
            return await client.call("status")
        finally:
            await client.close()

    return asyncio.run(ask())["ip"]


def client(topology: StandardTopology, exit_net: dict[str, Path], *args: str):
    proc = topology.tb.spawn(topology.ns["client"], [sys.executable, str(HERE / "exit_client.py"),
                                                      str(exit_net["directory"]), *args])
    address = _wait_line(proc, "address", timeout=30).split()[1]
    return proc, address


def result(proc, timeout: float = 60) -> dict:
    line = _wait_line(proc, "{", timeout=timeout)
    return json.loads(line)


def upstream_ports(topology: StandardTopology) -> set[int]:
    """The exit's sockets connected to the resolver: the source ports of its pending upstream queries."""
    out = topology.tb.exec(topology.ns["exit"], "ss", "-Huan").stdout
    ports = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[4] == f"{topology.addr['web']}:53":
            ports.add(int(fields[3].rsplit(":", 1)[1]))
    return ports


def wait_ports(topology: StandardTopology, check, timeout: float = 20) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ports = upstream_ports(topology)
        if check(ports):
            return ports
        time.sleep(0.05)
    pytest.fail(f"the exit's upstream sockets never looked as expected: {ports}")


def test_an_off_path_spoofer_gets_no_forged_answer_accepted(topology: StandardTopology,
                                                            exit_net: dict[str, Path]) -> None:
    before = exit_status(exit_net)
    proc, _ = client(topology, exit_net, "ask", "slow1.shallot.test", "slow2.shallot.test")
    (first,) = wait_ports(topology, lambda p: len(p) == 1)
    (second,) = wait_ports(topology, lambda p: len(p) == 1 and first not in p)
    assert second != first  # a fresh source port per query
    spoof, exit_ip = topology.ns["spoof"], topology.addr["exit"]
    web = topology.addr["web"]
    sprays = [  # both while the second query waits for its (slow) answer
        # the port the first query used, with the right question: what a fixed-port forwarder would still hold
        topology.tb.spawn(spoof, [sys.executable, str(HERE / "dns_spoofer.py"), web, exit_ip, str(first),
                                  "slow2.shallot.test", FORGED]),
        # the live query's own port (an oracle an off-path attacker does not have), every id, another name
        topology.tb.spawn(spoof, [sys.executable, str(HERE / "dns_spoofer.py"), web, exit_ip, str(second),
                                  "evil.shallot.test", FORGED]),
    ]
    for spray in sprays:
        assert _wait_line(spray, "sprayed", timeout=60).split()[1] == "65536"
    assert upstream_ports(topology) == {second}, "the spray ended after the answer: no window was tested"
    out = result(proc)
    assert out["answers"] == {"slow1.shallot.test": web, "slow2.shallot.test": web}
    after = exit_status(exit_net)
    unmatched = after.get("dns_drop_unmatched_answer", 0) - before.get("dns_drop_unmatched_answer", 0)
    print(f"forged answers that reached the live socket and were dropped: {unmatched}")
    assert unmatched >= 1  # they did arrive (the rest died at a closed port or a full socket buffer)
    assert after["dns_answers"] - before.get("dns_answers", 0) == 2


def test_one_client_cannot_starve_another(topology: StandardTopology, exit_net: dict[str, Path]) -> None:
    before = exit_status(exit_net)
    flood, flood_addr = client(topology, exit_net, "flood", "3000", "15")
    _wait_line(flood, "flooded", timeout=30)
    honest, honest_addr = client(topology, exit_net, "ask", "web.shallot.test")
    assert honest_addr != flood_addr
    assert result(honest)["answers"] == {"web.shallot.test": topology.addr["web"]}
    after = exit_status(exit_net)
    refused = after.get("dns_drop_client_quota", 0) - before.get("dns_drop_client_quota", 0)
    print(f"flooding circuit: {refused} queries over its quota dropped, {after['dns_pending']} pending")
    assert refused >= 500 and after["dns_pending"] <= PER_CLIENT_PENDING  # the flood holds only its own quota
    flood.terminate()


def test_names_about_the_exit_host_are_refused(topology: StandardTopology, exit_net: dict[str, Path]) -> None:
    names = ["_gateway", "_outbound", "localhost", "printer.local", "1.0.99.10.in-addr.arpa",
             "23.113.0.203.in-addr.arpa"]
    proc, _ = client(topology, exit_net, "ask", *names)
    assert result(proc)["answers"] == dict.fromkeys(names, "rcode 5")  # REFUSED, never asked upstream
    status = exit_status(exit_net)
    assert status["dns_refused_single_label"] >= 3 and status["dns_refused_local_suffix"] >= 1
    assert status["dns_refused_private_reverse"] >= 2


def test_nothing_reaches_a_client_unasked(topology: StandardTopology, exit_net: dict[str, Path]) -> None:
    before = exit_status(exit_net).get("kernel_drop_into_tun", 0)
    proc, address = client(topology, exit_net, "listen", "4")
    for ns in ("lan", "spoof"):  # the exit's LAN, and a host on the internet routing the pool to the exit
        topology.tb.exec(topology.ns[ns], sys.executable, "-c",
                         "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                         "for p in range(5): s.sendto(b'probe',(sys.argv[1],40000+p))", address)
    assert result(proc)["unasked"] == 0
    assert exit_status(exit_net)["kernel_drop_into_tun"] - before >= 10


def test_ipv4_options_are_dropped(topology: StandardTopology, exit_net: dict[str, Path]) -> None:
    proc, _ = client(topology, exit_net, "options", f"{topology.addr['web']}:{ECHO_PORT}")
    replies = result(proc)["replies"]
    assert replies["options"] is None and replies["plain"] is not None and replies["plain"].endswith("plain")
    assert exit_status(exit_net)["ip_drop_options"] >= 1


def test_new_connections_and_flows_per_circuit_are_capped(topology: StandardTopology,
                                                          exit_net: dict[str, Path]) -> None:
    web = f"{topology.addr['web']}:{ECHO_PORT}"
    before = exit_status(exit_net)
    burst, _ = client(topology, exit_net, "flows", web, "500", "2000")  # far above 100 new flows a second
    got = result(burst)["replies"]
    mid = exit_status(exit_net)
    rate_drops = mid["kernel_drop_new_flow_rate"] - before.get("kernel_drop_new_flow_rate", 0)
    print(f"500 new flows in ~0.3 s: {got} answered, {rate_drops} dropped by the new-connection rate")
    assert rate_drops >= 100 and got <= NEW_FLOWS_BURST + 100
    many, _ = client(topology, exit_net, "flows", web, str(MAX_FLOWS_PER_CIRCUIT + 100), "90")  # under the rate
    got = result(many, timeout=120)["replies"]
    after = exit_status(exit_net)
    cap_drops = after["kernel_drop_flow_cap"] - mid.get("kernel_drop_flow_cap", 0)
    print(f"{MAX_FLOWS_PER_CIRCUIT + 100} flows at 90/s: {got} answered, {cap_drops} dropped by the flow cap")
    assert cap_drops >= 50 and got <= MAX_FLOWS_PER_CIRCUIT
