"""The app's only door to the engine: find a running ``shallot engine`` on its control socket, or start one
as a child process, then talk to it through the control API (core/control/, docs/PROTOCOL.md §9).  The
engine starts with no settings; the app sends them with ``configure`` (an EngineConfig made from its
Settings) before each connect.  An engine that cannot take them is older than the app, which its hello
says (no ``configure`` among the commands it lists): the app tells the user so.

No Qt here and no engine internals: commands go out as control requests, snapshots come back as "state"
events (one subscribed connection) and as answers to a ``status`` poll once a second (for the speed graph).
Every task started here is kept in ``self._tasks`` until it ends.

The engine runs in its own session (``start_new_session``) with its output in a log file, so it outlives
the window and even the app when the user quits but stays connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from shallot.app.settings import Settings
from shallot.core.control.api import Configure, EngineConfig, ErrorKind, Request, Role, Shutdown, Status
from shallot.core.control.client import ControlClient
from shallot.core.control.errors import ControlError
from shallot.core.errors import ShallotError

log = logging.getLogger("shallot.app.engine")
ENGINE_START_TIMEOUT_S = 20.0
POLL_INTERVAL_S = 1.0
MAX_LOG_READ = 64 * 1024
_LOG_LINE = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+): (.*)$")


class EngineProblem(Exception):
    """Why the engine cannot be used; ``kind`` picks the words (presenter.ADVICE)."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def engine_argv(sock: Path) -> list[str]:
    """The engine command line: only where to listen (the settings follow with ``configure``)."""
    return [sys.executable, "-m", "shallot", "-v", "engine", "--socket", str(sock)]


def engine_config(settings: Settings) -> EngineConfig:
    """What the engine needs of the app's settings."""
    bootstrap = settings.source == "bootstrap"
    return EngineConfig(directory=None if bootstrap else (settings.directory or None),
                        bootstrap=settings.bootstrap if bootstrap else (), vpn=settings.route_all,
                        kill_switch=settings.kill_switch, dns=settings.dns_through_tunnel)


def start_failure(output: str) -> EngineProblem:
    """An engine that exited before it listened: its last words (the CLI's one-line error) for the log."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("shallot: error:"):
            return EngineProblem(ErrorKind.ENGINE_START, line.removeprefix("shallot: error:").strip())
    return EngineProblem(ErrorKind.ENGINE_START, lines[-1][:300] if lines else "it exited without a word")


class EngineLink:
    def __init__(self, sock: Path, log_path: Path, *,
                 on_snapshot: Callable[[dict[str, Any], bool], None],
                 on_log: Callable[[int, str, str], None],
                 on_lost: Callable[[str], None]) -> None:
        self.sock = sock
        self.log_path = log_path
        self.on_snapshot, self.on_log, self.on_lost = on_snapshot, on_log, on_lost
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: ControlClient | None = None
        self._events_client: ControlClient | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._log_offset = 0
        self._closing = False

    # ------------------------------------------------------------------ lifecycle
    @property
    def attached(self) -> bool:
        return self.client is not None

    @property
    def started_by_us(self) -> bool:
        return self.proc is not None

    @property
    def engine_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def ensure(self, progress: Callable[[str], None], *, start: bool = True) -> str:
        """Attach to the engine on ``sock``, starting one first if nobody answers there.  Returns
        "attached" or "started"; raises EngineProblem."""
        if self.client is not None:
            return "attached"
        self._closing = False
        client = await self._try_connect(timeout=2.0)
        how = "attached"
        if client is None:
            if not start:
                raise EngineProblem(ErrorKind.ENGINE_LOST, f"no engine answers on {self.sock}")
            progress("starting the Shallot engine")
            client = await self._start()
            how = "started"
        if client.hello.role is not Role.CLIENT:
            await client.close()
            raise EngineProblem(ErrorKind.ENGINE_START,
                                f"{self.sock} is a {client.hello.role.value}'s socket, not an engine's")
        if not client.hello.can(Configure.CMD):
            await client.close()
            raise EngineProblem(ErrorKind.ENGINE_OUTDATED, f"the engine on {self.sock} is older than this app "
                                f"(control protocol version {client.hello.version}): it cannot take its settings")
        self.client = client
        try:
            self._events_client = await ControlClient.connect(self.sock, timeout=5.0)
        except ShallotError as exc:
            await self.detach()
            raise EngineProblem(ErrorKind.ENGINE_LOST, str(exc)) from None
        self._spawn(self._pump_events(self._events_client))
        self._spawn(self._poll())
        log.info("%s the engine on %s", "started" if how == "started" else "attached to", self.sock)
        return how

    async def ask(self, request: Request, timeout: float = 15.0) -> Any:
        """The engine's answer (JSON) to a typed request; ControlError if it refuses, EngineProblem if it is gone."""
        if self.client is None:
            raise EngineProblem(ErrorKind.ENGINE_LOST, "not attached to an engine")
        try:
            return await self.client.ask(request, timeout=timeout)
        except ControlError:
            raise
        except (ShallotError, OSError, TimeoutError) as exc:
            raise EngineProblem(ErrorKind.ENGINE_LOST, str(exc) or "no answer from the engine") from None

    async def detach(self) -> None:
        """Stop talking to the engine; it keeps running."""
        self._closing = True
        others = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        for task in others:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for client in (self.client, self._events_client):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()
        self.client = self._events_client = None

    async def shutdown_engine(self) -> None:
        """Ask the engine to exit (it disconnects first), wait for it, then detach."""
        if self.client is not None:
            self._closing = True
            with contextlib.suppress(Exception):
                await self.client.ask(Shutdown(), timeout=5.0)
        await self.detach()
        if self.proc is not None:
            deadline = time.monotonic() + 10.0
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.proc.poll() is None:  # only ever the process we started, by its pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                await asyncio.sleep(0.05)
                self.proc.poll()
            self._read_log()
            self.proc = None

    # ------------------------------------------------------------------ internals
    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _try_connect(self, timeout: float) -> ControlClient | None:
        if not self.sock.exists():
            return None
        try:
            return await ControlClient.connect(self.sock, timeout=timeout)
        except ShallotError:
            return None  # a stale socket: the engine we start replaces it

    async def _start(self) -> ControlClient:
        argv = engine_argv(self.sock)
        try:
            self.sock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise EngineProblem(ErrorKind.ENGINE_START, f"cannot prepare {exc.filename}: {exc.strerror}") from None
        try:
            self._log_offset = os.lseek(fd, 0, os.SEEK_END)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, env=env,
                                         start_new_session=True)  # survives the window and a Ctrl-C of the app
        except OSError as exc:
            raise EngineProblem(ErrorKind.ENGINE_START, f"cannot run {argv[0]}: {exc.strerror}") from None
        finally:
            os.close(fd)
        log.info("engine started (pid %d), its log is %s", self.proc.pid, self.log_path)
        deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = self._read_log()
                self.proc = None
                raise start_failure(output)
            client = await self._try_connect(timeout=1.0)
            if client is not None:
                return client
            await asyncio.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        raise EngineProblem(ErrorKind.ENGINE_START,
                            f"it did not open {self.sock} within {ENGINE_START_TIMEOUT_S:.0f} s")

    def _read_log(self) -> str:
        """New lines of the engine's log since the last read, also handed to ``on_log``."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_offset)
                data = f.read(MAX_LOG_READ)
        except OSError:
            return ""
        cut = data.rfind(b"\n") + 1
        if not cut:
            return ""
        self._log_offset += cut
        text = data[:cut].decode(errors="replace")
        for line in text.splitlines():
            if not line.strip():
                continue
            m = _LOG_LINE.match(line)
            if m:
                self.on_log(logging.getLevelName(m.group(1)), m.group(2), m.group(3))
            else:
                level = logging.ERROR if "error" in line.lower() else logging.INFO
                self.on_log(level, "shallot.engine", line)
        return text

    async def _pump_events(self, client: ControlClient) -> None:
        try:
            async for msg in client.events():
                if msg.get("event") == "state" and isinstance(msg.get("data"), dict):
                    self.on_snapshot(msg["data"], False)
        except (ShallotError, OSError, TimeoutError) as exc:
            log.debug("event stream ended: %s", exc)
        if not self._closing:
            self._read_log()
            reason = "it exited" if self.proc is not None and self.proc.poll() is not None else \
                "the control connection closed"
            self._closing = True
            self._spawn(self._lost(reason))

    async def _lost(self, reason: str) -> None:
        await self.detach()
        if self.proc is not None and self.proc.poll() is not None:
            self.proc = None
        self.on_lost(reason)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            if self.proc is not None:
                self._read_log()
            if self.client is None:
                return
            try:
                snap = await self.client.ask(Status(), timeout=5.0)
            except (ShallotError, OSError, TimeoutError):
                continue  # the event stream notices a dead engine
            if isinstance(snap, dict):
                self.on_snapshot(snap, True)
