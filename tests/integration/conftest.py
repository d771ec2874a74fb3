"""Shared fixtures for the integration tests: a live local network, subprocess helpers, control-socket helpers.

Everything here talks only to 127.0.0.1 and only stops processes it started itself (by PID).

* ``network`` (session): a ``LocalNetwork`` of 6 relays (2 exits) running as child processes.  Its event
  loop lives in a background thread so that async tests (pytest-asyncio, one loop per test) and sync tests
  can share it; the relays' stdout/stderr are drained continuously so a chatty relay can never block.
* ``procs`` (function): starts subprocesses with line-buffered output readers and kills whatever is still
  running at teardown.
* ``run_cli``: runs ``python -m shallot ...`` to completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from shallot.core.control.client import ControlClient
from shallot.core.discovery.directory import load_directory
from shallot.crypto.descriptor import Descriptor
from shallot.relay import state as state_dir
from shallot.relay.localnet import LocalNetwork

SHALLOT = [sys.executable, "-m", "shallot"]
CLI_TIMEOUT_S = 25.0
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------------------------------------- waiting


async def wait_until(cond: Callable[[], Awaitable[Any]], timeout: float = 10.0, interval: float = 0.02,
                     what: str = "condition") -> Any:
    """Await ``cond()`` until it returns something truthy; return that.  Fails the test on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await cond()
        if last:
            return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last value: {last!r})")
        await asyncio.sleep(interval)


def wait_until_sync(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
                    what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        last = cond()
        if last:
            return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last value: {last!r})")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------- control


async def control_call(sock: Path, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
    """One control-API call on a fresh connection (relays: DIR/control.sock; engines: their socket)."""
    client = await ControlClient.connect(sock, timeout=timeout)
    try:
        return await client.call(cmd, timeout=timeout, **args)
    finally:
        await client.close()


async def relay_status(state: Path) -> dict[str, Any]:
    return await control_call(state / state_dir.CONTROL_SOCKET, "status")


async def relay_circuits(state: Path) -> list[dict[str, Any]]:
    return await control_call(state / state_dir.CONTROL_SOCKET, "circuits")


def counter(status: dict[str, Any], name: str) -> int:
    return int(status["counters"].get(name, 0))


# ---------------------------------------------------------------------------------------------- CLI


def run_cli(*args: str | Path, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SHALLOT, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=ENV, stdin=subprocess.DEVNULL)


def assert_one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit status != 0, exactly one stderr line starting with 'shallot: error:', no traceback anywhere."""
    assert res.returncode != 0, f"expected failure, got 0; stdout={res.stdout!r} stderr={res.stderr!r}"
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    line = lines[0]
    assert line.startswith("shallot: error:"), line
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"
    return line


# ---------------------------------------------------------------------------------------------- processes


class Proc:
    """A child process whose stdout/stderr lines are collected by reader threads (never blocks the child)."""

    def __init__(self, argv: list[str], **kw: Any) -> None:
        self.argv = argv
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                      text=True, bufsize=1, env=ENV, **kw)
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        self._threads = [threading.Thread(target=self._pump, args=(self.popen.stdout, self.stdout_lines, True),
                                          daemon=True),
                         threading.Thread(target=self._pump, args=(self.popen.stderr, self.stderr_lines, False),
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any, sink: list[str], announce: bool) -> None:
        for line in stream:
            sink.append(line)
            if announce:
                self._lines.put(line)
        stream.close()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_line(self, needle: str, timeout: float = 20.0) -> str:
        """The first stdout line containing ``needle``; fails (with the child's stderr) on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"{self.argv[3:]} printed no {needle!r} line in {timeout:.0f} s; "
                            f"stdout={''.join(self.stdout_lines)!r} stderr={self.stderr()!r}")
            try:
                line = self._lines.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                if self.popen.poll() is not None and self._lines.empty():
                    self._join()
                    pytest.fail(f"{self.argv[3:]} exited with {self.popen.returncode} before printing {needle!r}: "
                                f"stdout={''.join(self.stdout_lines)!r} stderr={self.stderr()!r}")
                continue
            if needle in line:
                return line

    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, sig)

    def wait(self, timeout: float = 15.0) -> int:
        code = self.popen.wait(timeout)
        self._join()
        return code

    def _join(self) -> None:
        for t in self._threads:
            t.join(2.0)

    def kill(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        self._join()


class ProcGroup:
    def __init__(self) -> None:
        self.started: list[Proc] = []

    def start(self, *args: str | Path, script: Path | None = None, **kw: Any) -> Proc:
        argv = [sys.executable, str(script), *map(str, args)] if script else [*SHALLOT, *map(str, args)]
        proc = Proc(argv, **kw)
        self.started.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.started:  # polite first, so relays and engines remove their sockets
            proc.signal(signal.SIGTERM)
        for proc in self.started:
            try:
                proc.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
            proc.kill()


@pytest.fixture
def procs() -> Iterator[ProcGroup]:
    group = ProcGroup()
    try:
        yield group
    finally:
        group.cleanup()


# ---------------------------------------------------------------------------------------------- the network


class LoopThread:
    """An asyncio loop in a daemon thread; owns the LocalNetwork's subprocess transports."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="network-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[Any], timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(drain(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


@dataclass
class RunningNetwork:
    net: LocalNetwork
    directory: Path
    descriptors: list[Descriptor]
    states: dict[str, Path]  # relay id hex -> state directory
    pids: dict[str, int]  # relay id hex -> relay process id
    output: dict[str, list[str]] = field(default_factory=dict)  # relay id hex -> stdout+stderr lines after start

    def by_nick(self, nickname: str) -> Descriptor:
        return next(d for d in self.descriptors if d.nickname == nickname)

    @property
    def exits(self) -> list[Descriptor]:
        return [d for d in self.descriptors if d.is_exit]

    @property
    def non_exits(self) -> list[Descriptor]:
        return [d for d in self.descriptors if not d.is_exit]

    def state(self, desc: Descriptor) -> Path:
        return self.states[desc.id_hex]

    def alive(self, desc: Descriptor) -> bool:
        """The relay process exists and is neither a zombie nor dead (read from /proc: never reaps it)."""
        try:
            stat = Path(f"/proc/{self.pids[desc.id_hex]}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


async def _start_network(net: LocalNetwork, output: dict[str, list[str]], ids: list[str]) -> list[asyncio.Task[None]]:
    await net.start()

    async def drain(stream: asyncio.StreamReader | None, sink: list[str]) -> None:
        if stream is None:
            return
        while line := await stream.readline():
            sink.append(line.decode(errors="replace"))

    tasks = []
    for relay_id, proc in zip(ids, net.procs):
        sink = output.setdefault(relay_id, [])
        tasks.append(asyncio.create_task(drain(proc.stdout, sink)))
        tasks.append(asyncio.create_task(drain(proc.stderr, sink)))
    return tasks


@contextlib.contextmanager
def running_network(root: Path, n_relays: int = 6, n_exits: int = 2) -> Iterator[RunningNetwork]:
    loop = LoopThread()
    net = LocalNetwork(root, n_relays, n_exits)
    try:
        net.create()
        ids = [state_dir.read_descriptor(s).id_hex for s in net.states]
        output: dict[str, list[str]] = {}
        try:
            loop.run(_start_network(net, output, ids), 60)
            descriptors = load_directory(net.directory)
            assert sorted(d.id_hex for d in descriptors) == sorted(ids)
            yield RunningNetwork(net=net, directory=net.directory, descriptors=descriptors,
                                 states=dict(zip(ids, net.states)),
                                 pids={i: p.pid for i, p in zip(ids, net.procs)}, output=output)
        finally:
            procs = list(net.procs)
            try:
                loop.run(net.stop(), 30)
            finally:
                for proc in procs:  # belt and braces: never leave a relay behind
                    if proc.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(proc.pid, signal.SIGKILL)
    finally:
        loop.close()


@pytest.fixture(scope="session")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNetwork]:
    """6 relays (2 exits) on 127.0.0.1, shared by every integration test that does not stop relays."""
    with running_network(tmp_path_factory.mktemp("net")) as running:
        yield running


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory under /tmp (mode 0755) for Unix sockets: sun_path holds only 108 bytes."""
    import shutil
    import tempfile
    path = Path(tempfile.mkdtemp(prefix="shallot-it-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
