"""The flood test (issue 12, docs/PROTOCOL.md §5.7, §8.2, §8.3): real relay processes on loopback, ONE
attacker process (tests/flood_attacker.py) sending from 120 loopback source addresses as fast as it can,
while a legitimate client builds guard -> middle -> exit circuits.

Phases, each its own test so that a report can say which hold: ``circuits`` (fill the circuit table),
``extends`` (CREATEs naming made-up relays at an address a socket of this test listens on), ``links``
(valid handshakes: fill the link table, flood initiations) and ``all`` at once.  Each asserts that
>= 95 % of the client's builds succeed, that every relay's RSS stays under RSS_BOUND_MB, and that the
made-up target received at most MADE_UP_TARGET_BOUND datagrams; the numbers are printed past pytest's
capture (CI log).

Each phase runs on a fresh guard, middle and exit (``--directory``: each relay's view holds the three).
They run with ``--max-circuits 2000`` (the default 20 000 takes the one attacker process longer than this
test may run to fill; the rule is the same at any size).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shallot.core.discovery.directory import load_directory
from shallot.core.errors import ShallotError
from shallot.core.io.circuit_client import CircuitClient
from shallot.crypto.descriptor import Descriptor, encode_directory
from shallot.relay import state as state_dir
from shallot.relay.localnet import free_udp_ports
from tests.integration.conftest import Proc, ProcGroup, counter, relay_status

ATTACKER = Path(__file__).resolve().parents[1] / "flood_attacker.py"
SOURCES = 120
MAX_CIRCUITS = 2000
LEGIT_BUILDS = 20
BUILD_TIMEOUT_S = 5.0  # a build under these attacks takes milliseconds (median printed)
LEGIT_PACE_S = 0.25
# when an attack is at full strength (what the attacker reports having sent; for circuits: the table is full)
RAMP = {"extends": {"extends_sent": 1000}, "links": {"link_initiations": 6000},
        "all": {"link_initiations": 6000, "circuit_builds_sent": 1000, "extends_sent": 500}}
RSS_BOUND_MB = 300
# docs/PROTOCOL.md §5.7: a relay with a view never dials a made-up target (0); without a view, at most
# MAX_PENDING_DIALS_PER_HOST (2) dials in flight per target host, each HANDSHAKE_ATTEMPTS (6) initiations
# over 31.5 s: at most 24 per minute
MADE_UP_TARGET_BOUND = 24

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="binds 127.77.x.y (Linux lo)")


class Counting:
    """A UDP socket at the made-up relay's address: counts what arrives (handshake initiations)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.addr = self.sock.getsockname()
        self.count = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                self.sock.recvfrom(4096)
            except OSError:
                continue
            self.count += 1

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@dataclass
class FloodNet:
    directory: Path
    guard: Descriptor
    middle: Descriptor
    exit: Descriptor
    states: dict[str, Path]
    procs: dict[str, Proc]
    target: Counting


@pytest.fixture
def flood_net(tmp_path: Path) -> Iterator[FloodNet]:
    """A fresh guard, middle and exit for each phase: what one phase leaves (links, circuits) would
    otherwise be the next phase's starting point."""
    names = ["guard", "middle", "exit"]
    states = {name: tmp_path / name for name in names}
    for (name, state), port in zip(states.items(), free_udp_ports(3)):
        state_dir.keygen(state, ("127.0.0.1", port), name, name == "exit")
    directory = tmp_path / "directory"
    directory.write_text(encode_directory([state_dir.read_descriptor(s) for s in states.values()]))
    group = ProcGroup()
    target = Counting()
    try:
        procs = {name: group.start("relay", "--state", state, "--directory", directory,
                                   "--max-circuits", MAX_CIRCUITS) for name, state in states.items()}
        for proc in procs.values():
            proc.wait_line("listening")
        # the descriptors re-signed at start
        directory.write_text(encode_directory([state_dir.read_descriptor(s) for s in states.values()]))
        by_name = {d.nickname: d for d in load_directory(directory)}
        yield FloodNet(directory, by_name["guard"], by_name["middle"], by_name["exit"], states, procs, target)
    finally:
        group.cleanup()
        target.close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def legit_builds(net: FloodNet) -> tuple[int, list[float], list[str]]:
    client = CircuitClient()
    await client.start()
    ok, times, errors = 0, [], []
    try:
        for _ in range(LEGIT_BUILDS):
            started = time.monotonic()
            try:
                circ = await client.build([net.guard, net.middle, net.exit], BUILD_TIMEOUT_S)
            except ShallotError as exc:
                errors.append(str(exc))
                if len(errors) > LEGIT_BUILDS * 0.05:
                    break
                continue
            if circ.state.value != "open":
                errors.append(circ.close_reason or "closed")
            if len(errors) > LEGIT_BUILDS * 0.05:  # failed already: do not wait out the rest
                break
            if circ.state.value != "open":
                continue
            ok += 1
            times.append(time.monotonic() - started)
            client.close_circuit(circ)
            await asyncio.sleep(LEGIT_PACE_S)  # spread over the attack, which keeps going meanwhile
    finally:
        client.close()
    return ok, times, errors


def _ramp(net: FloodNet, attacker: Proc, phase: str, deadline: float) -> None:
    """Return once the attack is at full strength (RAMP), so that the legitimate client meets all of it."""
    if phase == "circuits":  # the table is full: the attacker's own builds are refused or evict
        while True:
            status = asyncio.run(relay_status(net.states["guard"]))
            full = counter(status, "reject_create_max_circuits") + counter(status, "circuit_evicted")
            if status["circuits"] >= MAX_CIRCUITS - 10 and full > 0:
                return
            assert time.monotonic() < deadline, f"the circuit table never filled ({status['circuits']})"
            time.sleep(0.2)
    while True:
        line = attacker.wait_line("flood: progress", timeout=max(0.1, deadline - time.monotonic()))
        sent = json.loads(line.split("flood: progress ", 1)[1])
        if all(sent.get(k, 0) >= v for k, v in RAMP[phase].items()):
            return


@pytest.mark.parametrize("phase", ["circuits", "extends", "links", "all"])
def test_flood(phase: str, flood_net: FloodNet, capsys: pytest.CaptureFixture[str]) -> None:
    net = flood_net
    target_before = net.target.count
    group = ProcGroup()
    try:
        attacker = group.start("--directory", net.directory, "--guard", "guard", "--middle", "middle",
                               "--exit", "exit", "--ghost", f"{net.target.addr[0]}:{net.target.addr[1]}",
                               "--sources", SOURCES, "--phase", phase, "--seconds", 40, script=ATTACKER)
        attacker.wait_line("flood: attacking", timeout=30)
        started = time.monotonic()
        _ramp(net, attacker, phase, started + 25)
        ramp_s = time.monotonic() - started
        ok, times, errors = asyncio.run(legit_builds(net))
        attacker.signal(15)
        line = attacker.wait_line("flood: {", timeout=20)
        attack = json.loads(line.split("flood: ", 1)[1])
    finally:
        group.cleanup()
    rss = {name: rss_mb(proc.pid) for name, proc in net.procs.items()}
    try:
        guard = asyncio.run(relay_status(net.states["guard"]))
    except ShallotError:
        pytest.fail(f"guard status failed; alive={net.procs['guard'].popen.poll() is None}; "
                    f"stderr={net.procs['guard'].stderr()[-3000:]}")
    target_hits = net.target.count - target_before
    interesting = {k: v for k, v in guard["counters"].items()
                   if k.startswith(("reject_", "circuit_evicted", "dial_", "link_drop_", "link_handshake_",
                                    "link_cookie", "link_evicted", "link_half_open"))}
    with capsys.disabled():
        print(f"\n    flood[{phase}]: {SOURCES} sources, attack ramp {ramp_s:.1f} s; legitimate builds "
              f"{ok}/{LEGIT_BUILDS} ok, median {sorted(times)[len(times) // 2] * 1000 if times else 0:.0f} ms; "
              f"made-up target received {target_hits} datagrams; RSS MB "
              + ", ".join(f"{k} {v:.0f}" for k, v in rss.items())
              + f"\n    flood[{phase}] attacker: {json.dumps(attack, sort_keys=True)}"
              + f"\n    flood[{phase}] guard: circuits {guard['circuits']}, links {guard['links']}, "
              + json.dumps(interesting, sort_keys=True)
              + (f"\n    flood[{phase}] failures: {errors}" if errors else ""))
    assert ok >= 0.95 * LEGIT_BUILDS, errors
    assert max(rss.values()) <= RSS_BOUND_MB, rss
    assert target_hits <= MADE_UP_TARGET_BOUND
    for proc in net.procs.values():
        assert proc.popen.poll() is None, proc.stderr()
