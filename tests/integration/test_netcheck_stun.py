"""A live relay answers STUN on its link socket (and on its alternate port with --stun-alt-port): aiostun's
``shallot netcheck`` gets the right public address from it over UDP and reports TCP/TLS as unreachable;
a silent port makes netcheck fail with exit status 1; the relay's status counts what it answered."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from pathlib import Path

from shallot.core.wire import stun
from shallot.relay import state as state_dir
from shallot.relay.localnet import free_udp_ports
from tests.integration.conftest import ProcGroup, relay_status, run_cli


def test_netcheck_against_a_relay_and_against_silence(tmp_path: Path, procs: ProcGroup) -> None:
    port = free_udp_ports(1)[0]
    state = tmp_path / "r"
    state_dir.keygen(state, ("127.0.0.1", port), "stunny", False)
    relay = procs.start("relay", "--state", state, "--stun-alt-port")
    relay.wait_line("listening")
    res = run_cli("netcheck", "--stun", f"127.0.0.1:{port}", "--json", "--timeout", "1")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["udp"]["ok"] and out["udp"]["public"][0] == "127.0.0.1" and out["udp_works"]
    assert not out["tcp"]["ok"] and not out["tls"]["ok"]
    # our own request on one socket: the main port answers plainly, CHANGE-REQUEST(port) from port + 2
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.bind(("127.0.0.1", 0))
        s.sendto(stun.binding_request(bytes(12)), ("127.0.0.1", port))
        data, src = s.recvfrom(100)
        assert src == ("127.0.0.1", port) and stun.mapped_address(stun.decode(data)) == s.getsockname()
        s.sendto(stun.binding_request(bytes(range(12)), change_port=True), ("127.0.0.1", port))
        data, src = s.recvfrom(100)
        assert src == ("127.0.0.1", port + 2) and stun.decode(data).txid == bytes(range(12))
    counters = asyncio.run(relay_status(state))["nat"]["counters"]
    assert counters["nat_stun_answered"] >= 3
    silent = free_udp_ports(1)[0]
    res = run_cli("netcheck", "--stun", f"127.0.0.1:{silent}", "--timeout", "0.5")
    assert res.returncode == 1 and "UDP does not get through" in res.stdout


def test_netcheck_with_two_servers_compares_the_mappings(tmp_path: Path, procs: ProcGroup) -> None:
    ports = free_udp_ports(2)
    for i, port in enumerate(ports):
        state = tmp_path / f"r{i}"
        state_dir.keygen(state, ("127.0.0.1", port), f"stun{i}", False)
        procs.start("relay", "--state", state).wait_line("listening")
    servers = ",".join(f"127.0.0.1:{p}" for p in ports)
    res = run_cli("netcheck", "--stun", servers, "--json", "--timeout", "1")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["second_server"] == f"127.0.0.1:{ports[1]}" and out["udp_second"]["ok"]
    assert out["udp_second"]["public"][0] == "127.0.0.1"
    text = run_cli("netcheck", "--stun", servers, "--timeout", "1")
    assert text.returncode == 0 and f"UDP to 127.0.0.1:{ports[1]}: public address 127.0.0.1:" in text.stdout


def test_netcheck_says_when_an_answer_has_no_mapped_address() -> None:
    """A server that answers a Binding request with a success that names no address (broken or hostile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(10)

        def answer_empty() -> None:
            try:
                data, src = server.recvfrom(2048)
                server.sendto(struct.pack("!HHI", 0x0101, 0, 0x2112A442) + data[8:20], src)  # no attributes
            except OSError:
                pass

        threading.Thread(target=answer_empty, daemon=True).start()
        port = server.getsockname()[1]
        res = run_cli("netcheck", "--stun", f"127.0.0.1:{port}", "--json", "--timeout", "1")
    out = json.loads(res.stdout)
    assert res.returncode == 1 and out["udp"] == {"ok": False, "error": "no mapped address in the answer"}, out
