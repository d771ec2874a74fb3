"""An IP exit that cannot set itself up says why in one line and leaves nothing behind: no default route
and no --uplink, or no right to create its TUN device (CAP_NET_ADMIN dropped)."""

from __future__ import annotations

import sys
from pathlib import Path

from shallot.relay import state as state_dir
from tests.netns.testbed import StandardTopology

PORT = 9300
DROP_CAPS = ("setpriv", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs")


def _exit_state(topology: StandardTopology, tmp_path: Path) -> Path:
    state = tmp_path / "exit"
    state_dir.keygen(state, (topology.addr["guard"], PORT), "exitsetup", True)
    return state


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shallot: error:") and "Traceback" not in stderr, stderr
    return lines[0]


def _nothing_left(topology: StandardTopology) -> None:
    ns = topology.ns["guard"]
    assert "shallot" not in topology.tb.exec(ns, "ip", "-o", "link").stdout
    assert "shallot" not in topology.tb.exec(ns, "nft", "list", "tables").stdout


def test_no_default_route_and_no_uplink_is_one_error(topology: StandardTopology, tmp_path: Path) -> None:
    ns = topology.ns["guard"]  # on-link routes only, no default route
    assert "default" not in topology.tb.exec(ns, "ip", "route", "show").stdout
    res = topology.tb.exec(ns, sys.executable, "-m", "shallot", "exit", "--state", str(_exit_state(topology, tmp_path)),
                           "--ip", check=False, timeout=30)
    assert res.returncode != 0
    assert "no IPv4 default route: pass --uplink IFACE" in _one_error_line(res.stderr)
    _nothing_left(topology)


def test_without_cap_net_admin_the_tun_device_is_one_error(topology: StandardTopology, tmp_path: Path) -> None:
    ns = topology.ns["guard"]
    res = topology.tb.exec(ns, *DROP_CAPS, sys.executable, "-m", "shallot", "exit", "--state",
                           str(_exit_state(topology, tmp_path)), "--ip", "--uplink", "eth0", check=False, timeout=30)
    assert res.returncode != 0
    assert "cannot create the exit's TUN device" in _one_error_line(res.stderr)
    _nothing_left(topology)
