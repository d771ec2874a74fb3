"""Relays, a client engine and a probe in separate network namespaces, the client behind a NAT: the
circuit works across real routing and NAT, and the guard sees only the NAT's public address."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

from shallot.core import state as state_dir
from shallot.core.control import ControlClient
from shallot.crypto.descriptor import encode_directory
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
        proc = topology.tb.spawn(topology.ns[role], [sys.executable, "-m", "shallot.core", "relay", "--state",
                                                     str(state)])
        _wait_line(proc, "listening")
    directory = root / "directory"
    directory.write_text(encode_directory([state_dir.read_descriptor(s) for s in states.values()]))
    states["directory"] = directory
    return states


def test_probe_from_behind_nat(topology: StandardTopology, relays: dict[str, Path]) -> None:
    res = topology.tb.exec(topology.ns["client"], sys.executable, "-m", "shallot.core", "probe", "--directory",
                           str(relays["directory"]), "--path", "guard,middle,exit", "--count", "20", "--json",
                           check=False, timeout=60)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["echoed"] == result["sent"] == 20
    assert result["build_round_trips"] == 1


def test_engine_behind_nat_and_the_guard_sees_only_the_nat(topology: StandardTopology, relays: dict[str, Path],
                                                           tmp_path: Path) -> None:
    sock = tmp_path / "engine.sock"
    engine = topology.tb.spawn(topology.ns["client"], [sys.executable, "-m", "shallot.core", "engine", "--socket",
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
