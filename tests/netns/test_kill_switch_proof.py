"""The kill switch, proven: traffic that *routing* lets out of the client is stopped by the firewall alone.

While `shallot connect` is connected, while it reconnects (its guard killed, and no other path left, so it
keeps trying) and after the TUN is deleted by hand (its split routes vanish with it), the client sends
probes that do not go into the TUN: UDP, TCP and ICMP from sockets bound to the uplink (SO_BINDTODEVICE),
UDP to the guard's address on a port the kill switch does not allow (the guard's /32 route goes via the
uplink) and, once the TUN is gone, plain UDP.  A capture on the client's uplink, known to be running,
counts exactly those probes (tests/netns/leakcheck.py).  With the kill switch it must see none; the same
test with ``--no-kill-switch`` is the control and must see every probe that routing lets out.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from shallot.crypto.descriptor import encode_directory
from shallot.relay import state as state_dir
from tests.netns.leakcheck import KINDS, REPORT, Capture, leaks, shown_in_the_log  # noqa: F401
from tests.netns.test_circuit_through_nat import PORT, _wait_line
from tests.netns.test_ip_exit import ECHO_PORT, HERE, UDP_ASK, _start_connect, nft_chains
from tests.netns.test_kill_switch import _status as status
from tests.netns.testbed import StandardTopology

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("shown_in_the_log")]


def wait_status(sock: Path, pred, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    snap: dict = {}
    while time.monotonic() < deadline:
        snap = status(sock)
        if pred(snap):
            return snap
        time.sleep(0.2)
    pytest.fail(f"waited {timeout} s for {what}: {snap}")


@pytest.fixture(scope="module")
def echo(topology: StandardTopology) -> None:
    _wait_line(topology.tb.spawn(topology.ns["web"], [sys.executable, str(HERE / "udp_echo_server.py"),
                                                      str(ECHO_PORT)]), "listening")


def start_relays(topology: StandardTopology, root: Path, port: int) -> tuple[Path, dict]:
    """Guard, middle and exit (--ip) of their own: this test kills the guard, and the others go at its end."""
    states, procs = {}, {}
    for role in ("guard", "middle", "exit"):
        states[role] = root / role
        state_dir.keygen(states[role], (topology.addr[role], port), role, role == "exit")
        argv = [sys.executable, "-m", "shallot", "exit" if role == "exit" else "relay", "--state",
                str(states[role])] + (["--ip", "--uplink", "eth0"] if role == "exit" else [])
        procs[role] = topology.tb.spawn(topology.ns[role], argv)
        _wait_line(procs[role], "listening")
    directory = root / "directory"
    directory.write_text(encode_directory([state_dir.read_descriptor(s) for s in states.values()]))
    return directory, procs


@pytest.mark.parametrize("kill_switch", [True, False], ids=["kill-switch", "control-no-kill-switch"])
def test_the_firewall_stops_what_routing_lets_out(topology: StandardTopology, tmp_path: Path, echo: None,
                                                  kill_switch: bool) -> None:
    tb, client_ns = topology.tb, topology.ns["client"]
    routes_before = tb.exec(client_ns, "ip", "route", "show").stdout
    directory, relays = start_relays(topology, tmp_path, PORT + (5 if kill_switch else 6))
    sock = tmp_path / "engine.sock"
    capture = Capture(topology, tmp_path / "uplink.pcap")
    connect = None
    try:
        connect = _start_connect(topology, directory, tmp_path, *([] if kill_switch else ["--no-kill-switch"]))
        res = tb.exec(client_ns, sys.executable, "-c", UDP_ASK, topology.addr["web"], str(ECHO_PORT), check=False)
        assert res.stdout.strip() == f"{topology.addr['exit']} through the tunnel", res.stderr
        policy = nft_chains(topology, client_ns, "inet", "shallot_client")["output"]["policy"]
        assert policy == ("drop" if kill_switch else "accept")
        capture.start()
        counts = {"connected": leaks(capture, topology, f"{'kill switch' if kill_switch else 'control'}: connected")}

        relays["guard"].kill()  # the guard vanishes without a word; middle and exit alone make no path
        relays["guard"].wait()
        wait_status(sock, lambda s: s["state"] in ("reconnecting", "error") and s["trying"], 60,
                    "the engine to notice and keep trying")
        counts["reconnecting"] = leaks(capture, topology,
                                       f"{'kill switch' if kill_switch else 'control'}: reconnecting")
        assert not status(sock)["circuit"]  # still reconnecting throughout: no path without the guard

        tb.exec(client_ns, "ip", "link", "del", "shallot0")
        routes = tb.exec(client_ns, "ip", "route", "show").stdout
        assert "0.0.0.0/1" not in routes and "128.0.0.0/1" not in routes  # the split routes went with it
        counts["tun-deleted"] = leaks(capture, topology,
                                      f"{'kill switch' if kill_switch else 'control'}: TUN deleted")
        snap = status(sock)
        assert snap["trying"] and not snap["circuit"]
    finally:
        capture.stop()
        for proc in relays.values():
            proc.terminate()
        for proc in relays.values():
            proc.wait(15)  # the exit takes its nftables table with it before the next test starts one
    total = sum(sum(c.values()) for c in counts.values())
    REPORT.append(f"{'KILL SWITCH' if kill_switch else 'CONTROL (--no-kill-switch)'}: {total} probe packets "
                  f"left the client in all")
    if kill_switch:
        assert total == 0, f"packets left outside the tunnel: {counts}"
    else:  # the control: everything routing lets out is seen, so the capture would see a leak
        routed_out = [k for k in KINDS if k != "udp-routed"]  # plain UDP goes into the TUN while it exists
        for phase in ("connected", "reconnecting"):
            assert all(counts[phase][k] > 0 for k in routed_out), (phase, counts[phase])
            assert counts[phase]["udp-routed"] == 0, (phase, counts[phase])
        assert all(counts["tun-deleted"][k] > 0 for k in KINDS), counts["tun-deleted"]
    assert connect is not None
    connect.terminate()  # an explicit stop: everything goes back
    _, err = connect.communicate(timeout=15)
    assert connect.returncode == 0, err
    # the engine noticed the device going (no busy loop on its dead fd) and said so once
    assert err.count("the TUN device shallot0 went away") == 1 and "TUN read failed" not in err, err
    assert tb.exec(client_ns, "ip", "route", "show").stdout == routes_before
    assert "shallot_client" not in tb.exec(client_ns, "nft", "list", "tables").stdout
