"""Discovery on loopback with real processes: 20 relays and 1 exit started only with seeds.

One network (module scope) serves the tests in order: a client that knows one seed discovers the whole
network and probes through it; a malicious DHT node poisons every record it can and nobody uses what
it stored; the seed dies and discovery goes on through the nodes that joined; with every seed dead the
client still starts from its cached view.  Only 127.0.0.1 is used; every process is stopped by PID.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shallot.core.discovery.directory import load_directory
from shallot.relay import state as state_dir
from tests.integration.conftest import Proc, ProcGroup, assert_one_line_error, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

N_RELAYS = 20  # plus one exit
EVIL = Path(__file__).with_name("evil_dht.py")


def free_port_pairs(n: int) -> list[int]:
    """n link ports p whose DHT port p + 1 is free too (both bound at once while choosing)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            socks.append(a)
            if port >= 65535:
                continue
            b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                b.close()
                continue
            socks.append(b)
            ports.append(port)
        return ports
    finally:
        for s in socks:
            s.close()


@dataclass
class DhtNet:
    root: Path
    states: list[Path]
    ports: list[int]
    procs: dict[Path, Proc]
    group: ProcGroup

    @property
    def seed(self) -> str:
        return f"127.0.0.1:{self.ports[0]}"

    def addr(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i]}"

    def ids(self) -> set[str]:
        return {state_dir.read_descriptor(s).id_hex for s in self.states}

    def live_ids(self) -> set[str]:
        return {state_dir.read_descriptor(s).id_hex for s, p in self.procs.items() if p.popen.poll() is None}


def probe(net: DhtNet, bootstrap: str, cache: Path, count: int = 3) -> dict[str, object]:
    res = run_cli("probe", "--bootstrap", bootstrap, "--cache", cache, "--count", count, "--json", timeout=60)
    assert res.returncode == 0, f"probe failed: stdout={res.stdout!r} stderr={res.stderr!r}"
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def dht_net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DhtNet]:
    root = tmp_path_factory.mktemp("dhtnet")
    ports = free_port_pairs(N_RELAYS + 1)
    states = []
    for i, port in enumerate(ports):
        is_exit = i == N_RELAYS
        state = root / f"r{i}"
        state_dir.keygen(state, ("127.0.0.1", port), f"exit{i}" if is_exit else f"relay{i}", is_exit)
        states.append(state)
    group = ProcGroup()
    procs: dict[Path, Proc] = {}
    try:
        started = time.monotonic()
        procs[states[0]] = group.start("relay", "--state", states[0], "--dht")
        procs[states[0]].wait_line("serving as a seed")
        seed = f"127.0.0.1:{ports[0]}"
        for state in states[1:]:  # all at once: their start-up (imports, keys) runs in parallel
            procs[state] = group.start("relay", "--state", state, "--bootstrap", seed)
        for state in states[1:]:
            procs[state].wait_line("dht on", timeout=60)
        joined = time.monotonic() - started
        for state in states[1:]:  # the seed stores its own record and has nobody to publish to yet
            procs[state].wait_line("descriptor published", timeout=60)
        print(f"\n{len(states)} relays started and joined in {joined:.1f} s, all published after "
              f"{time.monotonic() - started:.1f} s")
        yield DhtNet(root, states, ports, procs, group)
    finally:
        group.cleanup()


def test_client_knowing_one_seed_discovers_the_network_and_builds_a_circuit(dht_net: DhtNet, tmp_path: Path) -> None:
    started = time.monotonic()
    result = probe(dht_net, dht_net.seed, tmp_path / "view")
    wall_s = time.monotonic() - started
    total = len(dht_net.states)
    print(f"\ndiscovered {result['relays_known']}/{total} relays from one seed: crawl {result['discovery_ms']} ms "
          f"({result['dht_nodes']} DHT nodes), whole probe command {wall_s:.2f} s")
    assert result["relays_known"] >= 0.95 * total
    assert result["discovery_ms"] < 10_000
    assert result["echoed"] == result["sent"] == 3
    assert set(result["path"]) <= dht_net.ids()
    # a machine that also runs a relay never puts it in its own circuit
    own = state_dir.read_descriptor(dht_net.states[-1])  # the only exit: no path is possible without it
    res = run_cli("probe", "--bootstrap", dht_net.seed, "--cache", tmp_path / "view2", "--own-relay",
                  dht_net.states[-1], "--count", "1", "--json", timeout=60)
    assert res.returncode != 0 and "no exit" in res.stderr, (own.nickname, res.stderr)
    cache = tmp_path / "view"
    assert cache.stat().st_mode & 0o777 == 0o600
    assert {d.id_hex for d in load_directory(cache)} <= dht_net.ids()


def test_engine_status_and_peers_show_discovery(dht_net: DhtNet, short_tmp: Path) -> None:
    sock = short_tmp / "engine.sock"
    engine = dht_net.group.start("engine", "--socket", sock, "--bootstrap", dht_net.addr(4),
                                 "--cache", short_tmp / "view")
    engine.wait_line("listening", timeout=20)
    enough = 0.95 * len(dht_net.states)

    def peers_now() -> dict[str, list[object]]:
        res = run_cli("peers", "--socket", sock, "--json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    # poll until the view is complete, not just until it is not empty: it can fill in more than one step
    deadline = time.monotonic() + 30
    peers = peers_now()
    while not (len(peers["relays"]) >= enough and len(peers["dht_peers"]) >= enough) and time.monotonic() < deadline:
        time.sleep(0.2)
        peers = peers_now()
    assert len(peers["relays"]) >= enough and len(peers["dht_peers"]) >= enough, peers
    status = json.loads(run_cli("status", "--socket", sock, "--json").stdout)
    assert status["relays_known"] == len(peers["relays"]) and status["dht_peers"] == len(peers["dht_peers"])
    relay = json.loads(run_cli("status", "--state", dht_net.states[6], "--json").stdout)["dht"]
    assert relay["joined"] and relay["peers"] >= 1 and relay["records_stored"] >= 1
    text = run_cli("peers", "--state", dht_net.states[6])
    assert text.returncode == 0 and "DHT peers (" in text.stdout and "relays known (" in text.stdout
    engine.signal(signal.SIGTERM)
    assert engine.wait() == 0


def test_bad_discovery_input_is_one_line(dht_net: DhtNet, tmp_path: Path) -> None:
    assert_one_line_error(run_cli("probe", "--bootstrap", "seed.example:80", "--json"), "IP address")
    assert_one_line_error(run_cli("probe", "--bootstrap", "127.0.0.1:1", "--cache", tmp_path / "none"),
                          "discovery found no relay")
    assert_one_line_error(run_cli("peers", "--state", tmp_path), "nothing is running")
    taken = dht_net.root / "taken"
    state_dir.keygen(taken, ("127.0.0.1", dht_net.ports[6] - 1), "taken", False)  # its DHT port is relay 6's
    assert_one_line_error(run_cli("relay", "--state", taken, "--dht"), "DHT socket", "in use")


def test_malicious_dht_node_poisons_nothing(dht_net: DhtNet, tmp_path: Path) -> None:
    victims = [*dht_net.states[1:4], dht_net.states[-1]]  # three relays and the exit
    evil_port = free_port_pairs(1)[0] + 1
    evil = dht_net.group.start("--port", evil_port, "--bootstrap", dht_net.addr(5),
                               "--victims", ",".join(map(str, victims)), script=EVIL)
    line = evil.wait_line("evil: stored", timeout=30)
    evil.wait_line("evil: ready", timeout=10)
    assert int(line.split()[2]) > 0, line
    accepted = json.loads(line.split("accepted ", 1)[1])
    # nothing forged, altered, expired or misfiled was taken by any honest node; a replayed older
    # descriptor can only sit where no newer one is held yet, and never reaches a client (below)
    assert {k: v for k, v in accepted.items() if k != "replayed"} == \
        {"forged": 0, "altered": 0, "expired": 0, "misfiled": 0}, line

    # the evil node is one of the client's seeds: whether an honest node's routing table lists it depends on
    # its id and on timing (a CI run under load once crawled without meeting it), and the claim here is about
    # what the client does with the poison it is served, so it must be served for sure
    result = probe(dht_net, f"{dht_net.addr(7)},127.0.0.1:{evil_port - 1}", tmp_path / "view")
    rejected = result["records_rejected"]
    assert isinstance(rejected, dict)
    print(f"\nclient rejected {rejected}; evil: {line.strip()}")
    # the client crawled the evil node too and threw away every kind of poison it served
    assert rejected.get("reject_signature", 0) >= 2 * len(victims)  # forged + altered
    assert rejected.get("reject_expired", 0) >= 1
    assert rejected.get("reject_stale", 0) >= len(victims)  # the replayed older descriptors
    assert result["echoed"] == result["sent"]
    # what the client keeps for each victim is exactly the victim's own current descriptor
    view = {d.id_hex: d for d in load_directory(tmp_path / "view")}
    for state in victims:
        real = state_dir.read_descriptor(state)
        assert view[real.id_hex].encode() == real.encode()
    assert all(d.address[1] != evil_port - 1 for d in view.values())

    # the honest nodes counted the rejected stores by reason
    totals: dict[str, int] = {}
    for state in dht_net.states[1:]:
        status = json.loads(run_cli("status", "--state", state, "--json").stdout)
        for key, value in status["dht"]["counters"].items():
            if key.startswith("store_reject_"):
                totals[key] = totals.get(key, 0) + value
    print(f"relays rejected stores: {totals}")
    for reason in ("signature", "expired", "stale", "key_mismatch"):
        assert totals.get(f"store_reject_{reason}", 0) > 0, totals
    evil.signal(signal.SIGTERM)
    evil.wait()


def test_killing_the_seed_does_not_stop_discovery(dht_net: DhtNet, tmp_path: Path) -> None:
    seed_proc = dht_net.procs[dht_net.states[0]]
    seed_proc.kill()  # SIGKILL: no goodbye
    # a relay that starts after the seed died joins through a node that had joined, and is discovered
    port = free_port_pairs(1)[0]
    late = dht_net.root / "late"
    desc = state_dir.keygen(late, ("127.0.0.1", port), "latecomer", False)
    proc = dht_net.group.start("relay", "--state", late, "--bootstrap", f"{dht_net.seed},{dht_net.addr(3)}")
    dht_net.procs[late] = proc
    dht_net.states.append(late)
    proc.wait_line("dht on", timeout=30)
    proc.wait_line("descriptor published", timeout=30)  # its record is on other nodes: a crawl can find it
    result = probe(dht_net, f"{dht_net.seed},{dht_net.addr(9)}", tmp_path / "view")
    view_ids = {d.id_hex for d in load_directory(tmp_path / "view")}
    assert desc.id_hex in view_ids, "the relay that joined after the seed died was not discovered"
    assert len(view_ids & dht_net.live_ids()) >= 0.95 * len(dht_net.live_ids())
    assert result["echoed"] == result["sent"]


def test_cached_view_works_when_every_seed_is_down(dht_net: DhtNet, tmp_path: Path) -> None:
    cache = tmp_path / "view"
    first = probe(dht_net, dht_net.addr(2), cache)
    assert first["relays_known"] >= 0.95 * len(dht_net.live_ids())
    # the seed (states[0]) is dead (killed here too, so the premise holds when this test runs alone): the
    # client has only its cache to go on, and it crawls again from the relays the cache names
    seed = dht_net.procs[dht_net.states[0]]
    seed.kill()
    assert seed.popen.poll() is not None
    again = probe(dht_net, dht_net.seed, cache)
    assert again["relays_known"] >= first["relays_known"] - 1
    assert again["dht_nodes"] >= 0.9 * len(dht_net.live_ids())
    assert again["echoed"] == again["sent"]
