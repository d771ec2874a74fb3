"""Relays, a client engine and a probe in separate network namespaces, the client behind a NAT: the
circuit works across real routing and NAT, and the guard sees only the NAT's public address."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from shallot.core.control.client import ControlClient
from shallot.crypto.descriptor import encode_directory
from shallot.relay import state as state_dir
from tests.netns.testbed import StandardTopology
from tests.netns.testbed import wait_for_line as _wait_line

PORT = 9000


@pytest.fixture(scope="module")
def relays(topology: StandardTopology, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("netns-relays")
    states: dict[str, Path] = {}
    for role in ("guard", "middle", "exit"):
        states[role] = root / role
        state_dir.keygen(states[role], (topology.addr[role], PORT), role, role == "exit")
    for role, state in states.items():
        proc = topology.tb.spawn(topology.ns[role], [sys.executable, "-m", "shallot", "relay", "--state",
                                                     str(state)])
        _wait_line(proc, "listening")
    directory = root / "directory"
    directory.write_text(encode_directory([state_dir.read_descriptor(s) for s in states.values()]))
    states["directory"] = directory
    return states


def test_probe_from_behind_nat(topology: StandardTopology, relays: dict[str, Path]) -> None:
    res = topology.tb.exec(topology.ns["client"], sys.executable, "-m", "shallot", "probe", "--directory",
                           str(relays["directory"]), "--path", "guard,middle,exit", "--count", "20", "--json",
                           check=False, timeout=60)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["echoed"] == result["sent"] == 20
    assert result["build_round_trips"] == 1


def test_engine_behind_nat_and_the_guard_sees_only_the_nat(topology: StandardTopology, relays: dict[str, Path],
                                                           tmp_path: Path) -> None:
    sock = tmp_path / "engine.sock"
    engine = topology.tb.spawn(topology.ns["client"], [sys.executable, "-m", "shallot", "engine", "--socket",
                                                        str(sock), "--directory", str(relays["directory"])])
    _wait_line(engine, "listening")

    async def scenario() -> tuple[dict, list]:
        client = await ControlClient.connect(sock)
        try:
            await client.call("connect", path="guard,middle,exit")
            deadline = time.monotonic() + 20
            while True:
                snap = await client.call("status")
                if snap["state"] == "connected" and snap["rtt_ms"]:
                    break
                assert time.monotonic() < deadline, f"engine did not connect: {snap}"
                await asyncio.sleep(0.1)
            guard = await ControlClient.connect(relays["guard"] / state_dir.CONTROL_SOCKET)
            try:
                circuits = await guard.call("circuits")
            finally:
                await guard.close()
            await client.call("disconnect")
            return snap, circuits
        finally:
            await client.close()

    snap, circuits = asyncio.run(scenario())
    assert [hop["nickname"] for hop in snap["circuit"]] == ["guard", "middle", "exit"]
    assert len(circuits) == 1
    previous, nxt = circuits[0]["previous"], circuits[0]["next"]
    assert previous[0] == topology.addr["natgw"]  # the NAT's public address, never 10.10.0.2
    assert nxt == [topology.addr["middle"], PORT]
    engine.terminate()
    assert engine.wait(10) == 0


def test_nat_rebinding_moves_the_link_and_keeps_the_circuit(topology: StandardTopology, relays: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """The client's NAT forgets its mapping and maps it anew on another public address (a NAT reboot, a
    carrier-grade NAT moving the flow): the guard follows the authenticated packets to the new address
    (link roaming), and the engine keeps the same circuit, with no rebuild."""
    tb, natgw = topology.tb, topology.ns["natgw"]
    new_public = "203.0.113.11"
    sock = tmp_path / "engine.sock"
    engine = tb.spawn(topology.ns["client"], [sys.executable, "-m", "shallot", "engine", "--socket", str(sock),
                                              "--directory", str(relays["directory"])])
    _wait_line(engine, "listening")

    async def status(path: Path, cmd: str = "status") -> Any:
        client = await ControlClient.connect(path)
        try:
            return await client.call(cmd)
        finally:
            await client.close()

    async def wait_connected(deadline_s: float, *, after_rtt_of: float | None = None) -> dict:
        deadline = time.monotonic() + deadline_s
        while True:
            snap = await status(sock)
            fresh = after_rtt_of is None or snap["rtt_ms"] != after_rtt_of
            if snap["state"] == "connected" and snap["rtt_ms"] and fresh:
                return snap
            assert time.monotonic() < deadline, f"not connected: {snap}"
            await asyncio.sleep(0.2)

    def engine_ports() -> set[str]:
        sockets = tb.exec(topology.ns["client"], "ss", "-Hunap").stdout.splitlines()
        return {line.split()[3].rsplit(":", 1)[1] for line in sockets if f"pid={engine.pid}," in line}

    async def old_mappings_expired(deadline_s: float) -> None:
        """Poll natgw's conntrack table until none of the engine's UDP flows maps to the old public address
        (the engine's own traffic keeps refreshing its entry: it lived ~6 s after the 1 s timeout was set).
        Flows of earlier tests' clients may linger with their old timeouts: they are not the engine's."""
        old_public, deadline = topology.addr["natgw"], time.monotonic() + deadline_s
        ports = engine_ports()
        assert ports, "the engine has no UDP socket"
        while True:
            table = tb.exec(natgw, "cat", "/proc/net/nf_conntrack", check=False)
            if table.returncode != 0:  # a kernel without the procfs view: wait out the timeout instead
                await asyncio.sleep(3)
                return
            if not [e for e in table.stdout.splitlines() if e.split()[2:3] == ["udp"] and f"={old_public} " in e
                    and any(f" sport={port} " in e for port in ports)]:
                return
            assert time.monotonic() < deadline, f"conntrack still maps to {old_public}:\n{table.stdout}"
            await asyncio.sleep(0.1)

    async def scenario() -> tuple[dict, dict, list, dict]:
        client = await ControlClient.connect(sock)
        try:
            await client.call("connect", path="guard,middle,exit")
        finally:
            await client.close()
        before = await wait_connected(20)
        # the NAT reboots: its mappings expire at once and new ones go out from another address
        tb.exec(natgw, "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_udp_timeout=1",
                "net.netfilter.nf_conntrack_udp_timeout_stream=1")
        tb.exec(natgw, "ip", "addr", "add", f"{new_public}/24", "dev", "eth0")
        tb.exec(natgw, "nft", "flush", "table", "ip", "testbed_nat")
        tb.exec(natgw, "nft", "add", "rule", "ip", "testbed_nat", "wan_out", "oifname", "eth0", "snat", "to",
                new_public)
        await old_mappings_expired(20)  # the engine's next ping goes out anew, from the new address
        rtt_before = (await status(sock))["rtt_ms"]
        deadline = time.monotonic() + 20
        while True:  # two fresh ping rounds through the same circuit
            after = await wait_connected(20, after_rtt_of=rtt_before)
            circuits = await status(relays["guard"] / state_dir.CONTROL_SOCKET, "circuits")
            if circuits and circuits[0]["previous"][0] == new_public:
                break
            assert time.monotonic() < deadline, f"the guard did not follow: {circuits}"
            await asyncio.sleep(0.5)
        guard = await status(relays["guard"] / state_dir.CONTROL_SOCKET)
        return before, after, circuits, guard

    try:
        before, after, circuits, guard = asyncio.run(scenario())
    finally:
        engine.terminate()
        engine.wait(10)
    assert after["circuits_built"] == before["circuits_built"] == 1  # the same circuit carries on
    assert after["circuit_since"] == before["circuit_since"]
    assert [h["id"] for h in after["circuit"]] == [h["id"] for h in before["circuit"]]
    assert len(circuits) == 1 and circuits[0]["previous"][0] == new_public
    assert guard["counters"].get("link_link_roamed", 0) >= 1, guard["counters"]
    print(f"rebinding: {topology.addr['natgw']} -> {new_public}; circuit kept, rtt {after['rtt_ms']} ms")
