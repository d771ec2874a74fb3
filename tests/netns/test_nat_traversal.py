"""NAT traversal across real Linux NATs (nftables) of the four RFC 4787 kinds (docs/NAT.md, docs/TESTBED.md).

One testbed for the whole module: an introducer relay and an exit on the "internet", and for every NAT
kind a relay behind one NAT of that kind and a dialer host behind another.  The relays classify their
NATs with our STUN probe on their link socket; the test checks that each emulated NAT is classified as
what it claims to be.  Then every dialer builds a circuit through every NATed relay as its guard (the
4 x 4 matrix, including a kind with itself): hole-punched where the pair allows it, relayed through the
introducer otherwise, with traffic through the circuit and the time to link printed per pair.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shallot.crypto.descriptor import encode_directory
from shallot.relay import state as state_dir
from tests.netns.testbed import NAT_KINDS, NatTopology, Testbed, require_testbed, wait_for_line

PORT = 9000
# (mapping, filtering) each emulation must be classified as
EXPECTED = {
    "apdf": ("endpoint-independent", "address-and-port-dependent"),
    "adf": ("endpoint-independent", "address-dependent"),
    "eif": ("endpoint-independent", "endpoint-independent"),
    "edm": ("address-and-port-dependent", "address-and-port-dependent"),
}
# (dialer's NAT, relay's NAT) pairs where no punch can work: both map per destination, or one does and the
# other filters by address and port
RELAYED = {("edm", "edm"), ("edm", "apdf"), ("apdf", "edm")}


@pytest.fixture(scope="module")
def natnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatTopology, dict[str, Path]]]:
    require_testbed()
    tb = Testbed()
    try:
        topo = NatTopology(tb).build()
        root = tmp_path_factory.mktemp("nat")
        states: dict[str, Path] = {}
        for role, is_exit in (("intro", False), ("intro2", False), ("mid", False), ("exit", True)):
            states[role] = root / role
            state_dir.keygen(states[role], (topo.addr[role], PORT), f"{role}1", is_exit)
            proc = tb.spawn(topo.ns[role], [sys.executable, "-m", "shallot", "relay", "--state",
                                            str(states[role]), "--stun-alt-port"])
            wait_for_line(proc, "listening")
        # the introducers (two, to classify NATs) are neither the middle nor the exit of any path here: an
        # introducer sits in the entry position (core/circuit/entry.py)
        intro_dir = root / "introducers"
        intro_dir.write_text(encode_directory([state_dir.read_descriptor(states[r]) for r in ("intro", "intro2")]))
        procs = {}
        for kind in NAT_KINDS:
            role = f"{kind}s"
            states[kind] = root / kind
            state_dir.keygen(states[kind], (topo.addr[role], PORT), f"nat{kind}", False)
            procs[kind] = tb.spawn(topo.ns[role], [sys.executable, "-m", "shallot", "relay", "--state",
                                                   str(states[kind]), "--introducers", str(intro_dir)])
        for proc in procs.values():
            print(wait_for_line(proc, "reachable via", timeout=30).strip())
        directory = root / "directory"
        directory.write_text(encode_directory([state_dir.read_descriptor(s) for s in states.values()]))
        states["directory"] = directory
        yield topo, states
    finally:
        tb.close()


def _status(state: Path) -> dict:
    res = subprocess.run([sys.executable, "-m", "shallot", "status", "--state", str(state), "--json"],
                         capture_output=True, text=True, timeout=20)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.parametrize("kind", NAT_KINDS)
def test_each_emulated_nat_is_classified_as_claimed(natnet: tuple[NatTopology, dict[str, Path]],
                                                   kind: str) -> None:
    topo, states = natnet
    nat = _status(states[kind])["nat"]
    assert (nat["nat"]["mapping"], nat["nat"]["filtering"]) == EXPECTED[kind], nat["nat"]
    # the public address is the NAT router's, and the descriptor advertises it with the introducer
    assert nat["public"][0] == topo.addr[f"{kind}sgw"]
    desc = state_dir.read_descriptor(states[kind])
    assert desc.address[0] == topo.addr[f"{kind}sgw"]
    assert desc.reachability is not None
    assert desc.reachability.introducers[0][0] == state_dir.read_descriptor(states["intro"]).relay_id
    assert nat["registered_with"], "no live registration with the introducer"


def _probe(topo: NatTopology, states: dict[str, Path], dialer: str, target: str) -> dict:
    ns = topo.ns[f"{dialer}c"]
    t0 = time.monotonic()
    res = topo.tb.exec(ns, sys.executable, "-m", "shallot", "probe", "--directory", str(states["directory"]),
                       "--path", f"nat{target},mid1,exit1", "--count", "5", "--json", check=False, timeout=60)
    assert res.returncode == 0, f"{dialer} -> {target}: {res.stderr or res.stdout}"
    out = json.loads(res.stdout)
    out["wall_s"] = time.monotonic() - t0
    return out


def test_matrix_every_pair_of_nat_kinds_gets_a_link(natnet: tuple[NatTopology, dict[str, Path]]) -> None:
    topo, states = natnet
    results: dict[tuple[str, str], dict] = {}
    n = len(NAT_KINDS)
    # four rounds; in each, every dialer reaches a different relay, all at once
    for shift in range(n):
        pairs = [(NAT_KINDS[i], NAT_KINDS[(i + shift) % n]) for i in range(n)]
        with ThreadPoolExecutor(n) as pool:
            for pair, out in zip(pairs, pool.map(lambda p: _probe(topo, states, *p), pairs)):
                results[pair] = out
    print("\ndialer NAT -> relay NAT : method        link_ms  build_ms  echoed")
    for (a, b), out in sorted(results.items()):
        print(f"  {a:>5} -> {b:<5}         : {out['guard_link']:<12} {out['link_ms']:8.1f} {out['build_ms']:8.1f}"
              f"  {out['echoed']}/{out['sent']}")
    for (a, b), out in results.items():
        assert out["echoed"] == out["sent"] == 5, (a, b, out)
        assert (out["nat"]["mapping"], out["nat"]["filtering"]) == EXPECTED[a], (a, out["nat"])
        # every relay here is behind a NAT, so a link to it comes through its introducer: punched where the
        # pair allows it, relayed otherwise, never "direct" (a dial that skipped the introduction)
        assert out["guard_link"] == ("relayed" if (a, b) in RELAYED else "hole-punched"), (a, b, out)
    # the introducer relayed exactly the relayed pairs' links, and the relays say how each link was made
    intro = _status(states["intro"])["nat"]
    assert intro["counters"].get("nat_relayed", 0) > 0
    assert intro["registrations"] == len(NAT_KINDS)
    methods = {link["method"] for kind in NAT_KINDS for link in _status(states[kind])["nat"]["links"]}
    assert {"relayed", "hole-punched", "direct"} <= methods
