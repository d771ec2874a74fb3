"""The IP exit in the testbed: a client behind NAT sends IPv4 packets through guard -> middle -> exit;
the exit (TUN + nftables masquerade) puts them on the "internet", the web host sees the exit's
address, replies come back through the circuit, and the exit's private network stays unreachable."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shallot.core import state as state_dir
from shallot.core.control import ControlClient
from shallot.crypto.descriptor import encode_directory
from tests.netns.test_circuit_through_nat import PORT, _wait_line
from tests.netns.testbed import StandardTopology

HERE = Path(__file__).resolve().parent
ECHO_PORT = 7777


@pytest.fixture(scope="module")
def ip_network(topology: StandardTopology, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("netns-ip")
    states = {}
    for role in ("guard", "middle", "exit"):
        states[role] = root / role
        state_dir.keygen(states[role], (topology.addr[role], PORT + 1), role, role == "exit")
    tb = topology.tb
    for role in ("guard", "middle"):
        _wait_line(tb.spawn(topology.ns[role], [sys.executable, "-m", "shallot.core", "relay", "--state",
                                                 str(states[role])]), "listening")
    _wait_line(tb.spawn(topology.ns["web"], [sys.executable, str(HERE / "dns_server.py"),
                                              f"web.shallot.test={topology.addr['web']}"]), "listening")
    _wait_line(tb.spawn(topology.ns["exit"], [sys.executable, "-m", "shallot.core", "exit", "--state",
                                               str(states["exit"]), "--ip", "--uplink", "eth0",
                                               "--resolver", topology.addr["web"]]), "listening")
    for role in ("web", "lan"):  # lan is the exit's private network: its server must never hear from us
        _wait_line(tb.spawn(topology.ns[role], [sys.executable, str(HERE / "udp_echo_server.py"), str(ECHO_PORT)]),
                   "listening")
    directory = root / "directory"
    directory.write_text(encode_directory([state_dir.read_descriptor(states[r]) for r in ("guard", "middle", "exit")]))
    states["directory"] = directory
    return states


def test_ip_packets_through_the_exit(topology: StandardTopology, ip_network: dict[str, Path]) -> None:
    web = f"{topology.addr['web']}:{ECHO_PORT}"
    lan = f"{topology.addr['lan']}:{ECHO_PORT}"
    res = topology.tb.exec(topology.ns["client"], sys.executable, str(HERE / "ip_client.py"),
                           str(ip_network["directory"]), web, lan, "dns:web.shallot.test", "dns:nothing.test",
                           check=False, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["address"].startswith("100.") and out["mtu"] == 1360
    reply = out["replies"][web]
    assert reply is not None, "no reply from the web host through the exit"
    assert reply["src"] == topology.addr["web"] and reply["dst"] == out["address"]
    # the web host saw the exit's public address, not the client's, not its tunnel address
    assert reply["data"] == f"{topology.addr['exit']} hello {web}"
    assert out["replies"][lan] is None  # the exit's private network is off limits
    # names resolve through the exit's forwarder (the testbed's resolver sits in the web namespace)
    assert out["replies"]["dns:web.shallot.test"] == topology.addr["web"]
    assert out["replies"]["dns:nothing.test"] == "no answer"

    async def exit_status() -> dict:
        client = await ControlClient.connect(ip_network["exit"] / state_dir.CONTROL_SOCKET)
        try:
            return await client.call("status")
        finally:
            await client.close()

    status = asyncio.run(exit_status())
    assert status["ip"]["ip_drop_policy"] >= 1 and status["ip"]["reject_private"] >= 1
    assert status["ip"]["tun_written"] >= 1 and status["ip"]["ip_from_tun"] >= 1
    assert status["ip"]["dns_queries"] == 2 and status["ip"]["dns_answers"] == 2


def _wait_for_tcp_port(topology: StandardTopology, port: int, timeout: float = 10) -> None:
    """Wait until something listens on TCP ``port`` in the web namespace."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f":{port}" in topology.tb.exec(topology.ns["web"], "ss", "-ltn").stdout:
            return
        time.sleep(0.1)
    pytest.fail(f"nothing listens on {port} in the web namespace")


def _start_connect(topology: StandardTopology, directory: Path, tmp_path: Path) -> subprocess.Popen[str]:
    """`shallot connect` in the client namespace, waited for until it says it is connected."""
    connect = topology.tb.spawn(topology.ns["client"], [
        sys.executable, "-m", "shallot.core", "connect", "--directory", str(directory), "--path",
        "guard,middle,exit", "--socket", str(tmp_path / "engine.sock")])
    _wait_line(connect, "shallot: connected", timeout=30)
    return connect


UDP_ASK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(b"through the tunnel", (sys.argv[1], int(sys.argv[2])))
print(s.recvfrom(2048)[0].decode())
"""


def test_connect_routes_the_client_namespace_through_the_circuit(topology: StandardTopology,
                                                                 ip_network: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    tb, client_ns = topology.tb, topology.ns["client"]
    routes_before = tb.exec(client_ns, "ip", "route", "show").stdout
    connect = _start_connect(topology, ip_network["directory"], tmp_path)
    # an ordinary program in the client namespace now reaches the web host as the exit
    res = tb.exec(client_ns, sys.executable, "-c", UDP_ASK, topology.addr["web"], str(ECHO_PORT), check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{topology.addr['exit']} through the tunnel"
    assert tb.exec(client_ns, "ping", "-c", "1", "-W", "3", topology.addr["web"], check=False).returncode == 0
    assert "shallot_client" in tb.exec(client_ns, "nft", "list", "tables").stdout  # the kill switch is on
    # TCP: a 100 MB download over HTTP arrives whole
    site = tmp_path / "site"
    site.mkdir()
    blob = os.urandom(100 * 1024 * 1024)
    (site / "big").write_bytes(blob)
    web = tb.spawn(topology.ns["web"], [sys.executable, "-m", "http.server", "8080", "--bind", "0.0.0.0",
                                        "--directory", str(site)])
    _wait_for_tcp_port(topology, 8080)
    started = time.monotonic()
    got = tb.exec(client_ns, "curl", "-sS", "--max-time", "150", "-o", str(tmp_path / "got"),
                  f"http://{topology.addr['web']}:8080/big", check=False, timeout=160)
    seconds = time.monotonic() - started
    assert got.returncode == 0, got.stderr
    assert hashlib.sha256((tmp_path / "got").read_bytes()).hexdigest() == hashlib.sha256(blob).hexdigest()
    print(f"100 MB through the circuit in {seconds:.1f} s ({800 / seconds:.0f} Mbit/s)")
    web.terminate()
    routes = tb.exec(client_ns, "ip", "route", "show").stdout
    assert "0.0.0.0/1 dev shallot0" in routes and "128.0.0.0/1 dev shallot0" in routes
    assert f"{topology.addr['guard']} via" in routes  # the encrypted UDP to the guard still goes out directly
    connect.terminate()
    assert connect.wait(15) == 0
    # everything is put back
    assert tb.exec(client_ns, "ip", "route", "show").stdout == routes_before
    assert "shallot" not in tb.exec(client_ns, "nft", "list", "tables").stdout
    assert "shallot0" not in tb.exec(client_ns, "ip", "link", "show").stdout


def test_cleanup_after_a_crashed_connect_leaves_nothing(topology: StandardTopology, ip_network: dict[str, Path],
                                                        tmp_path: Path) -> None:
    tb, client_ns = topology.tb, topology.ns["client"]
    routes_before = tb.exec(client_ns, "ip", "route", "show").stdout
    connect = _start_connect(topology, ip_network["directory"], tmp_path)
    connect.kill()  # no chance to clean up
    connect.wait()
    assert "shallot_client" in tb.exec(client_ns, "nft", "list", "tables").stdout  # the kill switch stays
    res = tb.exec(client_ns, sys.executable, "-m", "shallot.core", "connect", "--cleanup")
    assert "removed nftables table" in res.stdout
    assert tb.exec(client_ns, "ip", "route", "show").stdout == routes_before
    assert "shallot" not in tb.exec(client_ns, "nft", "list", "tables").stdout
    assert "shallot0" not in tb.exec(client_ns, "ip", "link", "show").stdout
    again = tb.exec(client_ns, sys.executable, "-m", "shallot.core", "connect", "--cleanup")
    assert again.stdout.strip() == "nothing to clean up"
