"""The kill switch fails closed when the engine dies (docs/PRIVILEGES.md, "When the engine dies").

Both configurations, with traffic bound to the client's uplink (tests/netns/leakcheck.py counts exactly the
probes on it):

* an unprivileged engine (uid nobody, or root without capabilities) and the privileged helper as root on a
  socketpair (started as pkexec would start it): ``kill -9`` of the engine keeps the block and the DNS
  change; a new engine taking over leaks nothing while it connects; its explicit ``disconnect`` opens
  (the control: traffic seen).  ``kill -9`` of the helper keeps the block too, and the engine reports the
  final error ``helper-failed``; a disconnect that cannot reach a helper leaves it; ``--cleanup`` opens.
  With the kill switch off there is nothing to keep: the helper restores everything.
* root in-process ``shallot connect``: ``kill -9`` keeps the block; ``--cleanup`` opens; a new engine
  takes over without a leak, and its SIGTERM (the control) opens.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shallot.core.control.client import ControlClient
from shallot.core.control.errors import ControlError, ErrorKind
from tests.netns.leakcheck import KINDS, REPORT, Capture, leaks, marker_file, probing, shown_in_the_log  # noqa: F401
from tests.netns.test_circuit_through_nat import _wait_line
from tests.netns.test_ip_exit import (
    ECHO_PORT,
    UDP_ASK,
    _effective_caps,
    _resolv_conf,
    _start_connect,
    _unprivileged_prefix,
    ip_network,  # noqa: F401  (the module's relays, guard -> middle -> exit with --ip)
    nft_chains,
)
from tests.netns.test_kill_switch_proof import wait_status
from tests.netns.testbed import StandardTopology
from tests.netns.testbed import TestbedError as SetupFailed

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("shown_in_the_log")]
TUNNEL_DNS = "nameserver 100.64.0.1"
OTHER_PATH = "middle,guard,exit"  # a new engine through another guard than the kept kill switch lets out


@pytest.fixture
def client(topology: StandardTopology, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The client namespace as it was, and put back whatever a failed test left (a kept kill switch too)."""
    ns = topology.ns["client"]
    before = {"routes": topology.tb.exec(ns, "ip", "route", "show").stdout, "resolv": _resolv_conf(topology)}
    try:
        yield before
    finally:
        topology.tb.exec(ns, sys.executable, "-m", "shallot", "connect", "--cleanup", check=False)
        marker_file(topology).unlink(missing_ok=True)


@dataclass
class Unprivileged:
    """An engine without privileges and its privileged helper."""

    engine: subprocess.Popen[str]
    helper: subprocess.Popen[str]
    sock: Path
    who: str


def spawn_unprivileged(topology: StandardTopology, directory: Path, workdir: Path, *extra: str,
                       path: str = "guard,middle,exit", connect: bool = True) -> Unprivileged:
    """``shallot connect --helper-fd`` (or ``shallot engine --vpn --helper-fd``, which waits for commands, as
    the app's engine does) as an ordinary user, the helper as root the way pkexec starts it (the socket as
    stdin, the user's uid in PKEXEC_UID).  Not waited for."""
    prefix, who = _unprivileged_prefix()
    os.chmod(workdir, 0o700)
    shutil.copy(directory, workdir / "directory")
    os.chmod(workdir / "directory", 0o644)
    if who == "nobody":
        os.chown(workdir, 65534, 65534)
    ns = topology.ns["client"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SHALLOT_HELPER": str(workdir / "no-such-helper")}
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        helper = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "shallot", "-v", "helper"],
                                  stdin=ours, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  env={**env, "PKEXEC_UID": "65534" if who == "nobody" else "0"})
        topology.tb.procs.append(helper)
        command = ["connect", "--path", path] if connect else ["engine", "--vpn"]
        engine = subprocess.Popen(["ip", "netns", "exec", ns, *prefix, sys.executable, "-m", "shallot", *command,
                                   "--directory", str(workdir / "directory"),
                                   "--socket", str(workdir / "engine.sock"), "--helper-fd", str(theirs.fileno()),
                                   *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  pass_fds=(theirs.fileno(),), env=env)
        topology.tb.procs.append(engine)
    finally:
        ours.close()
        theirs.close()
    return Unprivileged(engine, helper, workdir / "engine.sock", who)


def wait_connected(proc: subprocess.Popen[str], timeout: float = 30) -> None:
    try:
        _wait_line(proc, "shallot: connected", timeout=timeout)
    except SetupFailed:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
        raise AssertionError(f"the engine did not connect; its stderr:\n{err[-3000:]}") from None


def connected_while_probing(spawn: Callable[[], subprocess.Popen[str]], capture: Capture,
                            topology: StandardTopology, label: str, workdir: Path,
                            timeout: float = 45) -> dict[str, int]:
    """Probe rounds every 50 ms from before a new engine starts (``spawn``) until it says it is connected:
    it takes the kept kill switch over meanwhile.  The probes' packets on the uplink, over every round."""
    with probing(topology, workdir) as done:
        start = time.monotonic()
        proc = spawn()
        try:
            _wait_line(proc, "shallot: connected", timeout=timeout)
        except SetupFailed:
            proc.terminate()
            _, err = proc.communicate(timeout=15)
            raise AssertionError(f"the new engine did not connect: {err[-3000:]}") from None
        took = time.monotonic() - start
    counts = done[0].count(capture.packets(), capture.client)
    REPORT.append(f"[{label}] {done[0].rounds} probe rounds over the {took:.1f} s the new engine took to "
                  f"connect: {counts} probe packets on the uplink (sends: "
                  f"{ {k: ','.join(sorted(set(v))) for k, v in done[0].results.items()} })")
    assert done[0].rounds >= 3
    return counts


def control(sock: Path, cmd: str) -> dict:
    async def ask() -> dict:
        c = await ControlClient.connect(sock)
        try:
            return await c.call(cmd, timeout=60)
        finally:
            await c.close()
    return asyncio.run(ask())


def assert_blocked(topology: StandardTopology, capture: Capture, label: str, *, dns: bool = True) -> None:
    counts = leaks(capture, topology, label)
    assert sum(counts.values()) == 0, f"{label}: probes left the client: {counts}"
    ns = topology.ns["client"]
    output = nft_chains(topology, ns, "inet", "shallot_client")["output"]
    assert output["policy"] == "drop", output
    assert marker_file(topology).is_file(), "the kill switch's marker is gone"
    if dns:
        assert TUNNEL_DNS in _resolv_conf(topology), "DNS no longer points into the tunnel"


def assert_open(topology: StandardTopology, capture: Capture, label: str, before: dict[str, str]) -> None:
    counts = leaks(capture, topology, label)
    assert all(counts[k] > 0 for k in KINDS), f"{label}: the capture did not see the open path: {counts}"
    ns = topology.ns["client"]
    assert "shallot" not in topology.tb.exec(ns, "nft", "list", "tables").stdout
    assert not marker_file(topology).exists()
    assert _resolv_conf(topology) == before["resolv"]
    assert topology.tb.exec(ns, "ip", "route", "show").stdout == before["routes"]


def tunnel_works(topology: StandardTopology) -> None:
    res = topology.tb.exec(topology.ns["client"], sys.executable, "-c", UDP_ASK, topology.addr["web"],
                           str(ECHO_PORT), check=False)
    assert res.stdout.strip() == f"{topology.addr['exit']} through the tunnel", res.stderr


# ---------------------------------------------------------------------------------------------- with the helper


def test_helper_keeps_the_block_when_the_engine_is_killed_until_a_disconnect(
        topology: StandardTopology, ip_network: dict[str, Path], client: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    capture = Capture(topology, tmp_path / "uplink.pcap")
    workdirs = [Path(tempfile.mkdtemp(prefix="shallot-death-")) for _ in range(2)]
    try:
        first = spawn_unprivileged(topology, ip_network["directory"], workdirs[0])
        wait_connected(first.engine)
        assert _effective_caps(first.engine.pid) == 0
        tunnel_works(topology)
        capture.start()
        assert_blocked(topology, capture, f"helper, engine ({first.who}) connected")

        first.engine.kill()  # no chance to say goodbye
        first.engine.wait()
        assert first.helper.wait(15) == 0  # the helper noticed, kept the block and exited
        assert "shallot0" not in topology.tb.exec(topology.ns["client"], "ip", "link", "show").stdout
        assert_blocked(topology, capture, "helper, engine killed")

        # a new engine takes over: its hello keeps the block, and before its first build a route replaces the
        # table with one that lets its guard out (another guard than the kept table allows: the middle)
        new: list[Unprivileged] = []

        def spawn() -> subprocess.Popen[str]:
            new.append(spawn_unprivileged(topology, ip_network["directory"], workdirs[1], path=OTHER_PATH))
            return new[0].engine

        took_over = connected_while_probing(spawn, capture, topology, "helper, a new engine takes over", tmp_path)
        second = new[0]
        assert sum(took_over.values()) == 0, f"the takeover leaked: {took_over}"
        tunnel_works(topology)
        assert_blocked(topology, capture, "helper, the new engine connected")

        # the control: an explicit disconnect opens
        snap = control(second.sock, "disconnect")
        assert snap["state"] == "disconnected" and snap["blocked"] is False
        assert_open(topology, capture, "helper, after an explicit disconnect", client)
        second.engine.terminate()
        assert second.engine.wait(15) == 0
        assert second.helper.wait(15) == 0
    finally:
        capture.stop()
        for d in workdirs:
            shutil.rmtree(d, ignore_errors=True)


def test_unblock_a_fresh_engine_lifts_the_kept_block(
        topology: StandardTopology, ip_network: dict[str, Path], client: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """The app's Unblock after its engine died: it starts an engine (no connection of its own) and asks it
    to disconnect; the engine opens a helper session for it (hello keeps the block, restore lifts it)."""
    capture = Capture(topology, tmp_path / "uplink.pcap")
    workdirs = [Path(tempfile.mkdtemp(prefix="shallot-death-")) for _ in range(2)]
    try:
        first = spawn_unprivileged(topology, ip_network["directory"], workdirs[0])
        wait_connected(first.engine)
        capture.start()
        first.engine.kill()
        first.engine.wait()
        assert first.helper.wait(15) == 0
        fresh = spawn_unprivileged(topology, ip_network["directory"], workdirs[1], connect=False)
        _wait_line(fresh.engine, "listening")
        assert control(fresh.sock, "status")["blocked"] is True  # what the app reads to show "Blocked"
        assert_blocked(topology, capture, "helper, a fresh engine before Unblock")  # starting it changed nothing
        snap = control(fresh.sock, "disconnect")
        assert (snap["state"], snap["blocked"]) == ("disconnected", False)
        assert_open(topology, capture, "helper, after Unblock", client)
        fresh.engine.terminate()
        assert fresh.engine.wait(15) == 0 and fresh.helper.wait(15) == 0
    finally:
        capture.stop()
        for d in workdirs:
            shutil.rmtree(d, ignore_errors=True)


def test_a_killed_helper_keeps_the_block_and_the_engine_says_so(
        topology: StandardTopology, ip_network: dict[str, Path], client: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    capture = Capture(topology, tmp_path / "uplink.pcap")
    workdir = Path(tempfile.mkdtemp(prefix="shallot-death-"))
    try:
        session = spawn_unprivileged(topology, ip_network["directory"], workdir)
        wait_connected(session.engine)
        tunnel_works(topology)
        capture.start()
        session.helper.kill()
        session.helper.wait()
        snap = wait_status(session.sock, lambda s: s["state"] == "error", 15, "the engine to report the helper")
        assert (snap["error_code"], snap["trying"], snap["blocked"]) == ("helper-failed", False, True), snap
        assert_blocked(topology, capture, "helper killed")

        # a disconnect that cannot reach a helper (none can be started here) says so and opens nothing
        with pytest.raises(ControlError) as refused:
            control(session.sock, "disconnect")
        assert refused.value.kind is ErrorKind.HELPER_MISSING and "kill switch stays on" in str(refused.value)
        assert control(session.sock, "status")["blocked"] is True
        assert_blocked(topology, capture, "helper killed, disconnect without a helper")

        cleanup = topology.tb.exec(topology.ns["client"], sys.executable, "-m", "shallot", "connect", "--cleanup")
        assert "removed nftables table" in cleanup.stdout and "restored /etc/resolv.conf" in cleanup.stdout
        assert_open(topology, capture, "helper killed, after --cleanup", client)
        assert control(session.sock, "status")["blocked"] is False
        session.engine.terminate()
        assert session.engine.wait(15) == 0
    finally:
        capture.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_without_the_kill_switch_the_helper_restores_after_a_killed_engine(
        topology: StandardTopology, ip_network: dict[str, Path], client: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    workdir = Path(tempfile.mkdtemp(prefix="shallot-death-"))
    try:
        session = spawn_unprivileged(topology, ip_network["directory"], workdir, "--no-kill-switch")
        wait_connected(session.engine)
        assert TUNNEL_DNS in _resolv_conf(topology) and not marker_file(topology).exists()
        session.engine.kill()
        session.engine.wait()
        assert session.helper.wait(15) == 0
        ns = topology.ns["client"]
        assert "shallot" not in topology.tb.exec(ns, "nft", "list", "tables").stdout  # no block to keep
        assert _resolv_conf(topology) == client["resolv"]
        assert topology.tb.exec(ns, "ip", "route", "show").stdout == client["routes"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- root in-process


def test_root_engine_killed_keeps_the_block_until_cleanup(
        topology: StandardTopology, ip_network: dict[str, Path], client: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    capture = Capture(topology, tmp_path / "uplink.pcap")
    try:
        connect = _start_connect(topology, ip_network["directory"], tmp_path)
        capture.start()
        connect.kill()
        connect.wait()
        assert_blocked(topology, capture, "root engine killed")
        res = topology.tb.exec(topology.ns["client"], sys.executable, "-m", "shallot", "connect", "--cleanup")
        assert "removed nftables table" in res.stdout and "restored /etc/resolv.conf" in res.stdout
        assert_open(topology, capture, "root engine killed, after --cleanup", client)
    finally:
        capture.stop()


def test_a_new_root_engine_takes_over_without_a_leak_and_sigterm_opens(
        topology: StandardTopology, ip_network: dict[str, Path], client: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    capture = Capture(topology, tmp_path / "uplink.pcap")
    try:
        (tmp_path / "first").mkdir()
        first = _start_connect(topology, ip_network["directory"], tmp_path / "first")
        capture.start()
        first.kill()
        first.wait()
        assert_blocked(topology, capture, "root engine killed")
        new: list[subprocess.Popen[str]] = []

        def spawn() -> subprocess.Popen[str]:
            new.append(topology.tb.spawn(topology.ns["client"], [
                sys.executable, "-m", "shallot", "connect", "--directory", str(ip_network["directory"]), "--path",
                OTHER_PATH, "--socket", str(tmp_path / "second.sock")]))
            return new[0]

        took_over = connected_while_probing(spawn, capture, topology, "root, a new engine takes over", tmp_path)
        second = new[0]
        assert sum(took_over.values()) == 0, f"the takeover leaked: {took_over}"
        tunnel_works(topology)
        assert_blocked(topology, capture, "root, the new engine connected")
        second.terminate()  # the control: SIGTERM is explicit and opens
        assert second.wait(15) == 0
        assert_open(topology, capture, "root, after SIGTERM", client)
    finally:
        capture.stop()
