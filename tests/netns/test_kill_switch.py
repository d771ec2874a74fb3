"""Kill switch and recovery: the guard dies under a running `shallot connect`; while there is no
circuit, a capture on the client's uplink shows nothing but UDP to the relays; then traffic resumes
on a new circuit through the other guard, without anyone doing anything.

The application's traffic here goes into the TUN, where the engine drops it while there is no circuit:
this test shows recovery, not the firewall.  That the firewall stops what routing lets out is
tests/netns/test_kill_switch_proof.py, with its control."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from shallot.core.control.client import ControlClient
from shallot.crypto.descriptor import encode_directory
from shallot.relay import state as state_dir
from tests.netns.leakcheck import Capture
from tests.netns.test_circuit_through_nat import PORT, _wait_line
from tests.netns.test_ip_exit import ECHO_PORT, HERE, UDP_ASK
from tests.netns.testbed import StandardTopology

GUARD2 = "198.18.0.31"  # a fourth /16, so any one relay can die and a path remains


def add_guard2(topology: StandardTopology) -> str:
    """A fourth relay host on the testbed's internet wire, in its own /16 (GUARD2); its namespace."""
    tb = topology.tb
    g2 = tb.add_ns("guard2")
    tb.veth(g2, "eth0", topology.ns["inet"], "p9")
    tb.ip(topology.ns["inet"], "link", "set", "p9", "master", "br0")
    tb.address(g2, "eth0", f"{GUARD2}/24")
    for net in topology.internet:
        tb.exec(g2, "ip", "route", "replace", net, "dev", "eth0")
    for role in ("natgw", "guard", "middle", "exit", "web"):
        tb.exec(topology.ns[role], "ip", "route", "replace", "198.18.0.0/24", "dev", "eth0")
    return g2


def start_four_relays(topology: StandardTopology, tmp_path: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """guard, guard2 (add_guard2), middle and an IP exit, each in its namespace: (state dirs, processes)."""
    tb = topology.tb
    nss = {"guard": topology.ns["guard"], "guard2": add_guard2(topology), "middle": topology.ns["middle"],
           "exit": topology.ns["exit"]}
    addrs = {"guard": topology.addr["guard"], "guard2": GUARD2, "middle": topology.addr["middle"],
             "exit": topology.addr["exit"]}
    states, procs = {}, {}
    for role, addr in addrs.items():
        states[role] = tmp_path / role
        state_dir.keygen(states[role], (addr, PORT + 2), role, role == "exit")
        argv = [sys.executable, "-m", "shallot", "exit" if role == "exit" else "relay", "--state",
                str(states[role])] + (["--ip", "--uplink", "eth0"] if role == "exit" else [])
        procs[role] = tb.spawn(nss[role], argv)
        _wait_line(procs[role], "listening")
    return states, procs


def _status(sock: Path) -> dict:
    async def ask() -> dict:
        client = await ControlClient.connect(sock)
        try:
            return await client.call("status")
        finally:
            await client.close()
    return asyncio.run(ask())


def test_guard_dies_nothing_leaks_and_traffic_resumes(topology: StandardTopology, tmp_path: Path) -> None:
    tb = topology.tb
    states, procs = start_four_relays(topology, tmp_path)
    _wait_line(tb.spawn(topology.ns["web"], [sys.executable, str(HERE / "udp_echo_server.py"), str(ECHO_PORT)]),
               "listening")
    directory = tmp_path / "directory"
    directory.write_text(encode_directory([state_dir.read_descriptor(s) for s in states.values()]))
    sock = tmp_path / "engine.sock"
    client_ns = topology.ns["client"]
    connect = tb.spawn(client_ns, [sys.executable, "-m", "shallot", "connect", "--directory", str(directory),
                                   "--exit", "exit", "--socket", str(sock)])
    _wait_line(connect, "shallot: connected", timeout=30)
    ask = [sys.executable, "-c", UDP_ASK, topology.addr["web"], str(ECHO_PORT)]
    assert tb.exec(client_ns, *ask, check=False).returncode == 0
    first = _status(sock)
    guard = first["circuit"][0]["nickname"]
    assert guard != "exit"

    capture = Capture(topology, tmp_path / "uplink.pcap").start()  # known to be running (a canary came through)
    try:
        procs[guard].kill()  # the guard vanishes without a word
        procs[guard].wait()
        # the application keeps trying while the circuit is dead: nothing may leak
        for _ in range(6):
            tb.exec(client_ns, *ask, check=False, timeout=10)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the engine notices and builds a new circuit by itself
            snap = _status(sock)
            if snap["state"] == "connected" and snap["circuit"] and snap["circuit"][0]["nickname"] != guard:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no new circuit: {snap}")
        sent = [p for p in capture.packets() if p.src == topology.addr["client"]]  # what left the client
    finally:
        capture.stop()
    relay_udp = {state_dir.read_descriptor(s).address for s in states.values()}
    leaks = [p for p in sent if not (p.proto == 17 and (p.dst, p.dport) in relay_udp)]
    assert any(p.proto == 17 and (p.dst, p.dport) in relay_udp for p in sent), "no link traffic seen at all"
    assert not leaks, f"packets left outside the tunnel: {leaks[:5]}"
    res = tb.exec(client_ns, *ask, check=False)  # and traffic flows again, through the new guard
    assert res.returncode == 0 and res.stdout.strip().endswith("through the tunnel"), res.stderr
    connect.terminate()
    assert connect.wait(15) == 0
