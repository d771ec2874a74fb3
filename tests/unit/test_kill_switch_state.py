"""The kill switch fails closed (docs/PRIVILEGES.md, "When the engine dies"), piece by piece and without
root: the marker (core/vpn/killmark.py), NetConfig's decisions with stand-ins for netlink and nft (what
it would change is recorded, nothing is), the Tunnel's part (route before the device, a helper that quits,
a device that goes away, a crash), the circuit manager's ``PrivilegesLost`` and the engine's
``disconnect``/``close``/``abandon``.  The netns tier shows the same with real traffic
(tests/netns/test_engine_death.py, tests/netns/test_kill_switch_proof.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shallot.core.circuit import manager as m
from shallot.core.control.api import ControlError, EngineState, ErrorKind
from shallot.core.vpn import killmark, netconfig, nftables
from shallot.core.vpn import tunnel as tunnel_mod
from shallot.core.vpn.helper_client import HelperNetConfig, PrivilegeError
from shallot.core.vpn.netconfig import NetConfig
from shallot.core.vpn.netlink import Egress
from shallot.core.vpn.tunnel import Tunnel
from tests.unit.test_circuit_manager import Drive


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The marker lives here for the test, never in the host's /run/shallot."""
    monkeypatch.setattr(killmark, "RUN_DIR", tmp_path / "run-shallot")
    return tmp_path / "run-shallot"


# ---------------------------------------------------------------------------------------------- the marker


def test_the_marker_is_readable_by_everyone_and_names_the_network_namespace(run_dir: Path) -> None:
    run_dir.mkdir(mode=0o700)  # as an older version made it
    assert not killmark.is_marked() and not killmark.clear_mark()
    killmark.set_mark()
    path = killmark.marker_path()
    assert path == run_dir / f"kill-switch.{os.stat('/proc/self/ns/net').st_ino}"
    assert killmark.is_marked()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and stat.S_IMODE(run_dir.stat().st_mode) == 0o755
    assert "shallot connect --cleanup" in path.read_text()
    assert killmark.clear_mark() and not killmark.is_marked()


# ---------------------------------------------------------------------------------------------- NetConfig


class FakeNetlink:
    def __init__(self, *, tun: bool) -> None:
        self.tun = tun
        self.calls: list[tuple[Any, ...]] = []

    def index(self, name: str) -> int | None:
        return 7 if self.tun and name == netconfig.TUN_NAME else None

    def egress(self, host: str, *, ignore_proto: int, ignore_oif: int | None = None) -> Egress:
        return Egress(oif=2, gateway="10.10.0.1")

    def replace_route(self, dst: Any, *, oif: int, proto: int, gateway: str | None = None) -> None:
        self.calls.append(("route", str(dst), oif))

    def delete_route(self, dst: Any, *, proto: int) -> bool:
        self.calls.append(("delete route", str(dst)))
        return True

    def delete_link(self, name: str) -> bool:
        self.calls.append(("delete link", name))
        return True

    def routes(self, *, proto: int | None = None) -> list[Any]:
        return []

    def names(self) -> dict[int, str]:
        return {}


class Recorder:
    """Stand-ins for netlink, nft and the resolv.conf restore: what NetConfig would change."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, tun: bool = True) -> None:
        self.nl = FakeNetlink(tun=tun)
        self.nft: list[str] = []
        self.table = False  # whether the kill switch's table exists
        self.dns_restored = 0
        monkeypatch.setattr(netconfig, "_netlink", lambda fn: fn(self.nl))
        monkeypatch.setattr(nftables, "run", self._nft)
        monkeypatch.setattr(netconfig, "restore_resolv_conf", self._resolv)

    def _nft(self, ruleset: dict[str, Any]) -> Any:
        cmds = ruleset["nftables"]

        class Done:
            returncode, stderr = 0, ""
        if "list" in cmds[0]:
            Done.returncode = 0 if self.table else 1
            return Done()
        chains = [c["add"]["chain"] for c in cmds if "chain" in c.get("add", {})]
        self.nft.append("delete table" if "delete" in cmds[0] and len(cmds) == 1 else
                        f"replace table, policy {chains[0]['policy']}")
        self.table = len(cmds) > 1
        return Done()

    def _resolv(self) -> list[str]:
        self.dns_restored += 1
        return ["restored /etc/resolv.conf"]


class FakeDevice:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_the_kill_switch_table_carries_its_marker_and_a_plain_table_clears_it(
        run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch)
    net = NetConfig(kill_switch=True)
    net.fd = 5  # as if the device were open
    net.route_through_tunnel([("192.0.2.21", 9001)])
    assert rec.nft == ["replace table, policy drop"] and killmark.is_marked()
    assert ("route", "0.0.0.0/1", 7) in rec.nl.calls and ("route", "192.0.2.21/32", 2) in rec.nl.calls
    NetConfig(kill_switch=False).route_through_tunnel([("192.0.2.21", 9001)])  # a session without one replaces it
    assert rec.nft[-1] == "replace table, policy accept" and not killmark.is_marked()


def test_before_the_device_a_route_lets_the_guard_through_a_kept_block(run_dir: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch, tun=False)
    killmark.set_mark()  # kept after an engine died
    net = NetConfig(kill_switch=True)
    net.route_through_tunnel([("198.51.100.22", 9001)])
    assert rec.nl.calls == [("route", "198.51.100.22/32", 2)]  # no split routes without the device
    assert rec.nft == ["replace table, policy drop"] and killmark.is_marked()  # replaced, never deleted
    net.fd = 5  # a device we opened that went away under us is an error, not "not yet"
    with pytest.raises(Exception, match="went away"):
        net.route_through_tunnel([("198.51.100.22", 9001)])


def test_abandon_keeps_a_kill_switch_and_only_lets_go_of_the_device(run_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch)
    net = NetConfig(kill_switch=True)
    net._dev, net.fd, net.address = FakeDevice(), 5, "100.64.0.7"
    dev = net._dev
    killmark.set_mark()
    assert net.abandon() is True
    assert dev.closed and net.fd == -1 and net.address is None
    assert rec.nft == [] and rec.dns_restored == 0 and rec.nl.calls == [] and killmark.is_marked()


def test_abandon_without_a_kill_switch_restores_everything(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch)
    net = NetConfig(kill_switch=False)
    net._dev, net.fd = FakeDevice(), 5
    assert net.abandon() is False
    assert rec.nft == ["delete table"] and rec.dns_restored == 1 and ("delete link", "shallot0") in rec.nl.calls


def test_a_new_session_keeps_a_kept_block_and_cleanup_removes_it(run_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch)
    rec.table = True
    killmark.set_mark()
    assert netconfig.cleanup(quiet=True, keep_block=True) == ["removed device shallot0"]
    assert rec.nft == [] and rec.dns_restored == 0 and killmark.is_marked()
    done = netconfig.cleanup()  # `shallot connect --cleanup`, or a restore
    assert rec.nft == ["delete table"] and rec.dns_restored == 1 and not killmark.is_marked()
    assert "removed nftables table inet shallot_client" in done
    rec.nft.clear()
    netconfig.cleanup(quiet=True, keep_block=True)  # nothing kept: a new session starts from nothing
    assert rec.nft == ["delete table"]
    killmark.set_mark()  # a marker without its table (a namespace that is gone, its inode reused): stale
    rec.nft.clear()
    netconfig.cleanup(quiet=True, keep_block=True)
    assert rec.nft == ["delete table"] and not killmark.is_marked()  # a full cleanup, the marker with it


# ---------------------------------------------------------------------------------------------- Tunnel


class StandInNet:
    """NetConfig's interface as the Tunnel uses it."""

    def __init__(self) -> None:
        self.guards: list[tuple[str, int]] = []
        self.address: str | None = None
        self.calls: list[tuple[Any, ...]] = []

    def route_through_tunnel(self, guards: list[tuple[str, int]]) -> None:
        self.calls.append(("route", list(guards)))
        self.guards = list(guards)

    def close_device(self) -> None:
        self.calls.append(("close_device",))


def test_prepare_routes_before_the_device_only_through_a_kept_block(run_dir: Path) -> None:
    t = Tunnel()
    t._net = net = StandInNet()
    t.prepare([("192.0.2.21", 9001)])
    assert net.calls == []  # no block, no device: the first build goes out as the system routes it
    killmark.set_mark()
    t.prepare([("192.0.2.21", 9001)])
    assert net.calls == [("route", [("192.0.2.21", 9001)])]
    t.prepare([("192.0.2.21", 9001)])  # already let through
    t.prepare([("198.51.100.22", 9001)])  # that build failed, another guard: only the guard of this build
    assert net.calls[1:] == [("route", [("198.51.100.22", 9001)])]


@pytest.fixture
def helper_pair() -> Iterator[tuple[HelperNetConfig, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    net = HelperNetConfig(ours, kill_switch=True)
    yield net, theirs
    ours.close()
    theirs.close()


def test_a_helper_that_quits_is_reported_at_once_and_let_go_of(helper_pair: tuple) -> None:
    net, theirs = helper_pair
    t = Tunnel()
    t._net = net
    troubles: list[tuple[str, bool]] = []
    t.on_trouble = lambda reason, final: troubles.append((reason, final))

    async def run() -> None:
        t.watch()
        theirs.close()  # the helper is killed
        for _ in range(100):
            if troubles:
                break
            await asyncio.sleep(0.01)
        assert troubles == [("the privileged helper quit", True)]
        assert net.alive is False and t.privileged == ""
        t.forget_helper()
        assert t._net is None and net.sock.fileno() == -1

    asyncio.run(run())


def test_a_disconnect_with_a_dead_helper_lets_it_go_and_raises_nothing(helper_pair: tuple) -> None:
    net, theirs = helper_pair
    theirs.close()
    t = Tunnel()
    t._net = net

    async def run() -> None:
        t.close()  # the restore cannot reach the helper: its kill switch stays, the session is let go of

    asyncio.run(run())
    assert t._net is None and net.alive is False


def test_a_crash_ends_the_helper_session_without_a_restore(helper_pair: tuple) -> None:
    net, theirs = helper_pair
    t = Tunnel()
    t._net = net

    async def run() -> None:
        t.abandon()

    asyncio.run(run())
    theirs.settimeout(5)
    assert theirs.recv(100) == b""  # end of file and not one request: the helper keeps its kill switch


def test_a_crash_as_root_abandons_the_netconfig(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    net = NetConfig(kill_switch=True)
    monkeypatch.setattr(net, "abandon", lambda: seen.append("abandon") or True)
    monkeypatch.setattr(net, "restore", lambda: seen.append("restore"))
    t = Tunnel()
    t._net = net

    async def run() -> None:
        t.abandon()

    asyncio.run(run())
    assert seen == ["abandon"] and t._net is None


def test_a_device_removed_under_the_tunnel_is_let_go_of_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = os.pipe()
    t = Tunnel()
    t._net = net = StandInNet()
    troubles: list[tuple[str, bool]] = []
    t.on_trouble = lambda reason, final: troubles.append((reason, final))
    monkeypatch.setattr(tunnel_mod, "read_packets", lambda fd: ([], OSError(errno.EBADFD, "bad state")))

    async def run() -> None:
        t._fd = r
        asyncio.get_running_loop().add_reader(r, t._on_readable)
        t._on_readable()
        assert asyncio.get_running_loop().remove_reader(r) is False  # no longer watched: no busy loop

    try:
        asyncio.run(run())
    finally:
        os.close(r)
        os.close(w)
    assert troubles == [("the TUN device shallot0 went away", False)]
    assert t.fd == -1 and net.calls == [("close_device",)]


# ---------------------------------------------------------------------------------------------- manager


def test_privileges_lost_is_final_whatever_the_phase() -> None:
    d = Drive()
    circuit = d.connected()
    actions = d.feed(m.PrivilegesLost(d.now, "the privileged helper quit"))
    assert d.one(m.Drop, actions).circuit == circuit and d.one(m.GiveUp, actions).kind is ErrorKind.HELPER_FAILED
    assert (d.m.state, d.m.error_kind, d.m.trying, d.m.timer()) == (EngineState.ERROR, ErrorKind.HELPER_FAILED,
                                                                     False, None)
    assert d.feed(m.PrivilegesLost(d.now, "again")) == []  # not trying: nothing to stop
    # a connect asks for privileges anew (the engine starts a new helper session)
    assert any(isinstance(a, m.AcquirePrivileges) for a in d.connect(need_privileges=True))


def test_privileges_lost_while_retrying_stops_the_retries() -> None:
    d = Drive()
    d.connect()
    d.feed(m.Failed(d.now, d.m._token, "no relays"))
    assert d.m.state is EngineState.RECONNECTING and d.m.timer() is not None
    d.feed(m.PrivilegesLost(d.now, "the privileged helper quit"))
    assert (d.m.trying, d.m.timer(), d.m.error_kind) == (False, None, ErrorKind.HELPER_FAILED)


# ---------------------------------------------------------------------------------------------- engine


class FakeTunnel:
    """The temporary Tunnel an engine without one of its own makes to unblock."""

    made: list[FakeTunnel] = []
    refuse: PrivilegeError | None = None

    def __init__(self, **kw: Any) -> None:
        self.kw, self.calls = kw, []
        FakeTunnel.made.append(self)

    def forget_helper(self) -> None:
        self.calls.append("forget_helper")

    def ensure_ready(self) -> None:
        self.calls.append("ensure_ready")
        if FakeTunnel.refuse is not None:
            raise FakeTunnel.refuse

    def watch(self) -> None:
        self.calls.append("watch")

    def close(self) -> None:
        self.calls.append("close")
        killmark.clear_mark()  # the helper's restore

    def shutdown(self) -> None:
        self.calls.append("shutdown")


@pytest.fixture
def engine(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from shallot.core.engine import engine as engine_mod
    FakeTunnel.made, FakeTunnel.refuse = [], None
    monkeypatch.setattr(engine_mod, "Tunnel", FakeTunnel)
    return engine_mod.ClientEngine


def test_disconnect_lifts_a_kept_kill_switch_and_shutdown_does_not(engine: Any) -> None:
    async def run() -> None:
        e = engine()
        killmark.set_mark()
        assert e.snapshot().blocked is True  # not trying, and the marker is there
        await e.close()  # shutdown/SIGTERM of an engine that never connected: not its block to open
        assert FakeTunnel.made == [] and killmark.is_marked()
        e = engine()
        snap = await e.disconnect()
        assert snap.blocked is False and not killmark.is_marked()
        assert FakeTunnel.made[0].kw == {"kill_switch": True, "dns": False}
        assert FakeTunnel.made[0].calls == ["forget_helper", "ensure_ready", "watch", "close", "shutdown"]
        snap = await e.disconnect()  # nothing kept: nothing to do
        assert len(FakeTunnel.made) == 1 and snap.state is EngineState.DISCONNECTED

    asyncio.run(run())


def test_an_unblock_the_helper_refuses_keeps_the_block_and_says_why(engine: Any) -> None:
    async def run() -> None:
        killmark.set_mark()
        FakeTunnel.refuse = PrivilegeError("helper-denied", "permission to configure the network was refused")
        with pytest.raises(ControlError) as refused:
            await engine().disconnect()
        assert refused.value.kind is ErrorKind.HELPER_DENIED
        assert str(refused.value) == "the kill switch stays on: permission to configure the network was refused"
        assert killmark.is_marked() and FakeTunnel.made[0].calls[-1] == "shutdown"

    asyncio.run(run())


def test_run_engine_restores_on_a_stop_and_abandons_on_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shallot.core.control.api import EngineConfig
    from shallot.core.engine import engine as engine_mod
    from shallot.core.engine import service

    ends: list[str] = []

    async def close(self: Any) -> None:
        ends.append("close")

    async def abandon(self: Any) -> None:
        ends.append("abandon")

    async def crash(self: Any, **kw: Any) -> None:
        raise RuntimeError("a bug while connecting")

    monkeypatch.setattr(engine_mod.ClientEngine, "close", close)
    monkeypatch.setattr(engine_mod.ClientEngine, "abandon", abandon)
    monkeypatch.setattr(engine_mod.ClientEngine, "connect", crash)
    with pytest.raises(RuntimeError, match="a bug"):
        asyncio.run(service.run_engine(tmp_path / "a.sock", EngineConfig(), autoconnect=True))
    assert ends == ["abandon"]

    async def stopped() -> None:
        from shallot.core.control.client import ControlClient
        task = asyncio.create_task(service.run_engine(tmp_path / "b.sock", EngineConfig()))
        while not (tmp_path / "b.sock").exists():
            await asyncio.sleep(0.01)
        client = await ControlClient.connect(tmp_path / "b.sock")
        with contextlib.suppress(Exception):  # the reply may or may not beat the close
            await client.call("shutdown", timeout=5)  # an explicit stop, as SIGTERM and SIGINT are
        await client.close()
        await asyncio.wait_for(task, 10)

    asyncio.run(stopped())
    assert ends == ["abandon", "close"]
