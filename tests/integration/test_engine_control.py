"""The control API of a real ``shallot engine`` process, driven over its Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shallot.core.control.api import CONTROL_VERSION, Configure, EngineConfig, ErrorKind, Role
from shallot.core.control.client import ControlClient
from shallot.core.control.errors import ControlError
from shallot.core.vpn.netconfig import TUN_NAME
from shallot.crypto.descriptor import encode_directory
from shallot.relay import state as state_dir
from shallot.relay.localnet import free_udp_ports
from tests.integration.conftest import Proc, ProcGroup, RunningNetwork, wait_until

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]

NOBODY = 65534


@dataclass
class Engine:
    proc: Proc
    sock: Path


@pytest.fixture
def engine(procs: ProcGroup, short_tmp: Path, network: RunningNetwork) -> Engine:
    sock = short_tmp / "engine.sock"
    proc = procs.start("engine", "--socket", sock, "--directory", network.directory)
    line = proc.wait_line("listening")
    assert str(sock) in line
    return Engine(proc, sock)


@contextlib.asynccontextmanager
async def control(sock: Path) -> AsyncIterator[ControlClient]:
    client = await ControlClient.connect(sock)
    try:
        yield client
    finally:
        await client.close()


def host_network_state() -> dict[str, str]:
    """What a VPN engine would change in this network namespace: routes and policy rules (both families, every
    table), the tunnel device, the nftables ruleset (readable as root only) and resolv.conf.  Read-only."""
    def run(*argv: str) -> str:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return res.stdout if res.returncode == 0 else f"exit {res.returncode}: {res.stderr.strip()}"

    state = {"routes4": run("ip", "-4", "route", "show", "table", "all"),
             "routes6": run("ip", "-6", "route", "show", "table", "all"),
             "rules4": run("ip", "-4", "rule", "show"), "rules6": run("ip", "-6", "rule", "show"),
             "tun": run("ip", "link", "show", "dev", TUN_NAME),
             "resolv.conf": Path("/etc/resolv.conf").read_text(errors="replace")}
    if os.geteuid() == 0:
        state["nftables"] = run("nft", "list", "ruleset")
    return state


async def wait_state(c: ControlClient, pred: Any, timeout: float, what: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        snap = await c.call("status")
        return snap if pred(snap) else None

    return await wait_until(check, timeout, interval=0.05, what=what)


def _connected_with_rtt(snap: dict[str, Any]) -> bool:
    return snap["state"] == "connected" and isinstance(snap["rtt_ms"], int | float) and bool(snap["circuit"])


# ---------------------------------------------------------------------------------------------- happy path


async def test_socket_mode_and_hello(engine: Engine, network: RunningNetwork) -> None:
    assert stat.S_ISSOCK(engine.sock.stat().st_mode)
    assert stat.S_IMODE(engine.sock.stat().st_mode) == 0o600
    async with control(engine.sock) as c:
        # version 2 lists what it answers; a client knows an older engine by its hello (no "configure")
        assert (c.hello.version, c.hello.role) == (CONTROL_VERSION, Role.CLIENT) == (2, Role.CLIENT)
        assert {"status", "connect", "disconnect", "new_circuit", "configure", "set_directory", "peers", "shutdown",
                "subscribe"} == set(c.hello.supports)
        snap = await c.call("status")
        assert snap["state"] == "disconnected"
        assert snap["circuit"] == []
        assert snap["directory"] == str(network.directory)


async def test_connect_new_circuit_disconnect(engine: Engine, network: RunningNetwork) -> None:
    by_id = {d.id_hex: d for d in network.descriptors}
    events: list[dict[str, Any]] = []

    async with control(engine.sock) as c, control(engine.sock) as watcher:
        async def collect() -> None:
            async for ev in watcher.events():
                events.append(ev)

        async def saw_disconnected() -> bool:
            return any(ev.get("data", {}).get("state") == "disconnected" for ev in events)

        collector = asyncio.create_task(collect())
        await asyncio.sleep(0)  # the collector writes its "subscribe" line ...
        await watcher.call("status")  # ... and once this is answered, the subscription is in place
        try:
            await c.call("connect")
            snap = await wait_state(c, _connected_with_rtt, 20, "state connected with an rtt")
            circuit = snap["circuit"]
            assert len(circuit) == 3 and len({h["id"] for h in circuit}) == 3
            for hop in circuit:
                desc = by_id[hop["id"]]  # KeyError: a relay that is not in the directory
                assert hop["nickname"] == desc.nickname
                assert hop["address"] == f"{desc.address[0]}:{desc.address[1]}"
                assert hop["exit"] == desc.is_exit
            assert circuit[-1]["exit"] is True
            assert snap["rtt_ms"] > 0 and snap["build_ms"] > 0
            assert snap["error"] == ""
            first_since = snap["connected_since"]
            assert isinstance(first_since, float) and isinstance(snap["circuit_since"], float)
            first_path = [h["id"] for h in circuit]

            await c.call("new_circuit")
            built = snap["circuits_built"]
            snap2 = await wait_state(c, lambda s: _connected_with_rtt(s) and s["circuits_built"] > built,
                                     20, "a new circuit")
            assert snap2["circuit_since"] > snap["circuit_since"]
            assert snap2["connected_since"] == first_since  # the connection did not drop
            assert len(snap2["circuit"]) == 3 and snap2["circuit"][-1]["exit"] is True
            # six relays, two exits: the new circuit keeps the entry guard (PROTOCOL §5.10) and avoids
            # the old middle and exit
            new_path = [h["id"] for h in snap2["circuit"]]
            assert new_path[0] == first_path[0] and not set(first_path[1:]) & set(new_path[1:])
            in_use = [g for g in snap2["guards"] if g["in_use"]]
            assert [g["id"] for g in in_use] == [new_path[0]] and in_use[0]["primary"]

            result = await c.call("disconnect")
            assert result["state"] == "disconnected"
            snap3 = await c.call("status")
            assert snap3["state"] == "disconnected" and snap3["circuit"] == []
            await wait_until(saw_disconnected, 5, what="the disconnected event")
        finally:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
    states = [ev["data"]["state"] for ev in events if ev.get("event") == "state"]
    assert "connecting" in states and "connected" in states and states[-1] == "disconnected", states
    assert states.index("connecting") < states.index("connected")


async def test_new_circuit_is_not_reported_as_an_error(engine: Engine) -> None:
    events: list[dict[str, Any]] = []
    async with control(engine.sock) as c, control(engine.sock) as watcher:
        async def collect() -> None:
            async for ev in watcher.events():
                events.append(ev["data"])

        await c.call("connect")
        first = await wait_state(c, _connected_with_rtt, 20, "state connected")
        collector = asyncio.create_task(collect())
        await asyncio.sleep(0)
        await watcher.call("status")  # subscribed from here on
        try:
            await c.call("new_circuit")
            await wait_state(c, lambda s: _connected_with_rtt(s) and s["circuits_built"] > first["circuits_built"],
                             20, "a new circuit")
        finally:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
    problems = [(e["state"], e["error"]) for e in events if e["error"] or e["state"] in ("reconnecting", "error")]
    assert problems == [], f"a requested new circuit was reported as a problem: {problems}"
    assert "circuit problem" not in engine.proc.stderr()


async def test_configure_applies_when_idle_and_is_refused_while_connected(engine: Engine, network: RunningNetwork,
                                                                           tmp_path: Path) -> None:
    directory = str(network.directory)
    base = {"directory": directory, "bootstrap": [], "cache": None, "vpn": False, "kill_switch": True, "dns": True}
    async with control(engine.sock) as c:
        snap = await c.call("configure", **base)  # what the command line said: nothing changes
        assert (snap["state"], snap["directory"], snap["mode"]) == ("disconnected", directory, "probe")
        for args, kind in ((dict(base, directory=str(tmp_path / "missing")), ErrorKind.BAD_DIRECTORY),
                           (dict(base, bootstrap=["127.0.0.1:7001"]), ErrorKind.BAD_CONFIG),
                           (dict(base, directory=None, bootstrap=["relay.example:7001"]), ErrorKind.BAD_CONFIG),
                           (dict(base, vpn="yes"), ErrorKind.BAD_REQUEST),
                           (dict(base, bootstrap="127.0.0.1:7001"), ErrorKind.BAD_REQUEST)):
            with pytest.raises(ControlError) as err:
                await c.call("configure", **args)
            assert err.value.kind is kind, (args, err.value)
            assert "Traceback" not in str(err.value)
        assert (await c.call("status"))["directory"] == directory  # a refused configure changed nothing

        await c.call("connect")
        await wait_state(c, _connected_with_rtt, 20, "state connected")
        assert (await c.ask(Configure(EngineConfig(directory=directory))))["state"] == "connected"  # the same: fine
        with pytest.raises(ControlError) as err:
            await c.call("configure", **dict(base, vpn=True))
        assert err.value.kind is ErrorKind.BUSY and "disconnect" in str(err.value)
        snap = await c.call("status")
        assert (snap["state"], snap["mode"]) == ("connected", "probe")

        await c.call("disconnect")
        snap = await c.call("configure", **dict(base, directory=None))
        assert snap["directory"] is None
        with pytest.raises(ControlError) as err:
            await c.call("connect")
        assert err.value.kind is ErrorKind.NO_DIRECTORY


# ---------------------------------------------------------------------------------------------- bad requests


async def test_malformed_lines_get_errors_and_the_engine_keeps_serving(engine: Engine) -> None:
    reader, writer = await asyncio.open_unix_connection(str(engine.sock))
    try:
        hello = json.loads(await asyncio.wait_for(reader.readline(), 5))
        assert hello["shallot"] == "control"

        async def ask(raw: bytes) -> dict[str, Any]:
            writer.write(raw)
            await writer.drain()
            return json.loads(await asyncio.wait_for(reader.readline(), 5))

        for raw in (b"not json\n", b"[1, 2]\n", b'{"id": 3}\n', b'{"id": 4, "cmd": 5}\n',
                    b'{"id": 5, "cmd": "status", "args": [1]}\n', b"\xff\xfe\n"):
            reply = await ask(raw)
            assert reply["ok"] is False, (raw, reply)
            assert reply["error"]["kind"] == "bad-request", (raw, reply)
            assert reply["error"]["message"]
        reply = await ask(b'{"id": 7, "cmd": "status"}\n')
        assert reply["id"] == 7 and reply["ok"] is True and reply["result"]["state"] == "disconnected"
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    # an over-long line: an error, and the server goes on (the connection too: tests/unit/test_control_limits.py)
    reader, writer = await asyncio.open_unix_connection(str(engine.sock))
    try:
        await asyncio.wait_for(reader.readline(), 5)
        writer.write(b"x" * (200 * 1024) + b"\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        reply = json.loads(await asyncio.wait_for(reader.readline(), 5))
        assert reply["ok"] is False and reply["error"]["kind"] == "bad-request"
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    async with control(engine.sock) as c:
        assert (await c.call("status"))["state"] == "disconnected"
    assert engine.proc.popen.poll() is None


async def _raw_ask(sock: Path, lines: list[bytes]) -> list[dict[str, Any]]:
    """Send each line on one connection and read one answer to each."""
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        assert json.loads(await asyncio.wait_for(reader.readline(), 5))["shallot"] == "control"
        answers = []
        for line in lines:
            writer.write(line)
            await writer.drain()
            answers.append(json.loads(await asyncio.wait_for(reader.readline(), 5)))
        return answers
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def test_deep_json_gets_bad_request_and_the_same_connection_goes_on(engine: Engine) -> None:
    deep = b'{"id": 1, "cmd": "status", "args": {"x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}}\n"
    bad, good = await _raw_ask(engine.sock, [deep, b'{"id": 2, "cmd": "status"}\n'])
    assert bad["ok"] is False and bad["error"]["kind"] == "bad-request" and "deeper" in bad["error"]["message"]
    assert good["id"] == 2 and good["ok"] is True
    assert engine.proc.popen.poll() is None


async def test_set_directory_never_waits_on_a_fifo_or_reads_a_huge_file(engine: Engine, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody ever writes: a blocking open or read would freeze the engine
    huge = tmp_path / "huge"
    with open(huge, "wb") as f:
        f.truncate(100 << 20)  # 100 MB (sparse)
    async with control(engine.sock) as c:
        for path, why in ((fifo, "not a regular file"), (huge, "more than the limit"),
                          (Path("/dev/zero"), "not a regular file")):
            started = time.monotonic()
            with pytest.raises(ControlError, match=why):
                await c.call("set_directory", path=str(path), timeout=10)
            assert time.monotonic() - started < 2.0, path
        for path in (fifo, huge):
            with pytest.raises(ControlError) as err:
                await c.call("configure", directory=str(path), timeout=10)
            assert err.value.kind is ErrorKind.BAD_DIRECTORY
        assert (await c.call("status"))["state"] == "disconnected"


async def test_unknown_command_and_bad_arguments(engine: Engine, tmp_path: Path) -> None:
    async with control(engine.sock) as c:
        with pytest.raises(ControlError) as err:
            await c.call("make_coffee")
        assert err.value.kind is ErrorKind.UNKNOWN_COMMAND

        missing = tmp_path / "no-such-directory-file"
        with pytest.raises(ControlError) as err:
            await c.call("set_directory", path=str(missing))
        assert str(missing) in str(err.value)
        assert "Traceback" not in str(err.value)

        with pytest.raises(ControlError) as err:
            await c.call("set_directory")
        assert err.value.kind is ErrorKind.BAD_REQUEST

        with pytest.raises(ControlError) as err:
            await c.call("new_circuit")
        assert err.value.kind is ErrorKind.NOT_CONNECTED

        snap = await c.call("status")  # a failed set_directory leaves the old one in place
        assert snap["directory"] and snap["directory"] != str(missing)


async def test_connect_with_only_unreachable_relays(engine: Engine, tmp_path: Path) -> None:
    # relays that were keygen'd but nobody runs: their ports are free and stay silent
    ports = free_udp_ports(3)
    descs = [state_dir.keygen(tmp_path / f"ghost{i}", ("127.0.0.1", p), f"ghost{i}", i == 2)
             for i, p in enumerate(ports)]
    directory = tmp_path / "ghosts"
    directory.write_text(encode_directory(descs))
    async with control(engine.sock) as c:
        snap = await c.call("set_directory", path=str(directory))
        assert snap["directory"] == str(directory)
        await c.call("connect")
        snap = await wait_state(c, lambda s: s["state"] in ("reconnecting", "error"), 25,
                                "the engine to give up on the unreachable relays")
        error = snap["error"]
        assert isinstance(error, str) and error.strip(), snap
        assert "\n" not in error and "Traceback" not in error, error
        assert snap["circuit"] == []
        result = await c.call("disconnect")
        assert result["state"] == "disconnected"
    assert "Traceback" not in engine.proc.stderr()


async def test_engine_does_not_delete_a_regular_file_at_its_socket_path(procs: ProcGroup, short_tmp: Path) -> None:
    precious = short_tmp / "notes.txt"
    precious.write_text("precious\n")
    proc = procs.start("engine", "--socket", precious)
    deadline = time.monotonic() + 15
    while proc.popen.poll() is None and not any("listening" in ln for ln in proc.stdout_lines):
        if time.monotonic() > deadline:
            pytest.fail("the engine neither started nor failed")
        await asyncio.sleep(0.05)
    assert precious.is_file() and precious.read_text() == "precious\n", "the engine deleted a regular file"
    assert await asyncio.to_thread(proc.wait, 15) != 0
    lines = proc.stderr().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shallot: error:"), lines


# ---------------------------------------------------------------------------------------------- other users


def _try_as_nobody(sock: Path) -> bytes:
    """In a forked child running as nobody: connect and read the hello.  Returns what happened."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest, no asyncio; always leaves through os._exit
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(str(sock))
                data = s.recv(4096)
                msg = b"hello:" + data if data else b"closed"
            except PermissionError:
                msg = b"EACCES"
            except OSError as exc:
                msg = f"oserror:{exc.errno}".encode()
            os.write(w, msg)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        deadline = time.monotonic() + 15
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the child running as nobody hung")
            time.sleep(0.02)
        assert os.waitstatus_to_exitcode(status) == 0
        with os.fdopen(r, "rb") as f:
            r = -1
            return f.read()
    finally:
        if r != -1:
            os.close(r)


# CI runs as root and must run this test; a developer's non-root run skips it with the reason
@pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                    reason="needs root to run a child as another uid")
async def test_other_uid_is_refused(engine: Engine) -> None:
    # the socket is 0600 in a directory anybody may enter: the kernel refuses the connect
    assert stat.S_IMODE(engine.sock.parent.stat().st_mode) == 0o755
    outcome = await asyncio.to_thread(_try_as_nobody, engine.sock)
    assert outcome == b"EACCES", outcome

    # even with the file mode opened up, the engine checks the peer's uid and says nothing
    os.chmod(engine.sock, 0o666)
    outcome = await asyncio.to_thread(_try_as_nobody, engine.sock)
    assert not outcome.startswith(b"hello:"), outcome
    assert outcome in (b"closed", b"oserror:104"), outcome  # closed (or reset) without a hello

    async with control(engine.sock) as c:  # and keeps serving its owner
        assert (await c.call("status"))["state"] == "disconnected"


# ---------------------------------------------------------------------------------------------- stopping


@pytest.mark.parametrize("how", ["shutdown", "sigterm", "sigint"])
async def test_shutdown_ends_the_engine(engine: Engine, how: str) -> None:
    async with control(engine.sock) as c:
        await c.call("connect")
        await wait_state(c, _connected_with_rtt, 20, "state connected")
        if how == "shutdown":
            with contextlib.suppress(Exception):  # the reply may or may not beat the close
                await c.call("shutdown", timeout=5)
        else:
            engine.proc.signal(signal.SIGTERM if how == "sigterm" else signal.SIGINT)
        code = await asyncio.to_thread(engine.proc.wait, 15)
    assert code == 0, engine.proc.stderr()
    assert not engine.sock.exists(), "the engine left its socket behind"
    assert "Traceback" not in engine.proc.stderr()


# ---------------------------------------------------------------------------------------------- VPN mode, no privileges


async def test_vpn_mode_without_the_helper_says_what_is_missing(short_tmp: Path, network: RunningNetwork) -> None:
    """An engine that may not configure the network (an ordinary user; here root with every capability
    dropped when we are root) and finds no privileged helper: a clear error the app can act on, no retry loop,
    and nothing changed."""
    from tests.integration.conftest import ENV, SHALLOT
    sock = short_tmp / "vpn.sock"
    prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"] if os.geteuid() == 0 else []
    env = {**ENV, "SHALLOT_HELPER": str(short_tmp / "no-such-helper")}
    before = host_network_state()
    assert "does not exist" in before["tun"], "a tunnel device is already there: the comparison would show nothing"
    proc = await asyncio.create_subprocess_exec(*prefix, *SHALLOT, "engine", "--vpn", "--socket", str(sock),
                                                "--directory", str(network.directory), env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert b"listening" in line
        async with control(sock) as c:
            snap = await c.call("connect")
            assert snap["mode"] == "vpn" and snap["kill_switch"] is True
            snap = await wait_state(c, lambda s: s["state"] == "error", 10, "an error state")
            assert snap["error_code"] == "helper-missing"
            assert "privileged helper is not installed" in snap["error"] and "probe mode" in snap["error"]
            await asyncio.sleep(1.0)  # it does not retry on its own: the user has to act
            snap = await c.call("status")
            assert snap["state"] == "error" and snap["circuits_built"] == 0 and snap["trying"] is False
            assert host_network_state() == before, "the engine changed the host's network while it failed"
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    assert host_network_state() == before


async def test_configure_turns_vpn_mode_on_and_off_without_a_restart(short_tmp: Path, network: RunningNetwork) -> None:
    """What the app does: an engine started with nothing but its socket takes VPN mode with ``configure``,
    stops at the missing helper (a final error), and after a ``configure`` back to probe mode connects with
    a circuit only, the same process throughout.  Unprivileged as above: nothing of the host changes."""
    from tests.integration.conftest import ENV, SHALLOT
    sock = short_tmp / "cfg.sock"
    prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"] if os.geteuid() == 0 else []
    env = {**ENV, "SHALLOT_HELPER": str(short_tmp / "no-such-helper")}
    proc = await asyncio.create_subprocess_exec(*prefix, *SHALLOT, "engine", "--socket", str(sock), env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert b"listening" in await asyncio.wait_for(proc.stdout.readline(), 20)
        vpn = EngineConfig(directory=str(network.directory), vpn=True)
        async with control(sock) as c:
            snap = await c.ask(Configure(vpn))
            assert (snap["mode"], snap["kill_switch"], snap["directory"]) == ("vpn", True, str(network.directory))
            await c.call("connect")
            snap = await wait_state(c, lambda s: s["state"] == "error", 10, "an error state")
            assert snap["error_code"] == "helper-missing" and snap["trying"] is False
            snap = await c.ask(Configure(vpn.replace(vpn=False)))  # the engine gave up: settings may change
            assert (snap["mode"], snap["kill_switch"]) == ("probe", False)
            await c.call("connect")
            snap = await wait_state(c, _connected_with_rtt, 20, "a probe-mode circuit")
            assert snap["error_code"] == "" and snap["mode"] == "probe"
            await c.call("disconnect")
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 15) == 0
