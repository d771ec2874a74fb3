"""The IP exit in the testbed: a client behind NAT sends IPv4 packets through guard -> middle -> exit;
the exit (TUN + nftables masquerade) puts them on the "internet", the web host sees the exit's
address, replies come back through the circuit, and the exit's private network stays unreachable."""

from __future__ import annotations

import asyncio
import json
import sys
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
