"""The window's view-model: a QObject that owns the settings and the EngineLink, runs every engine
conversation as an asyncio task on Qt's loop (qasync) and tells the widgets what to show through signals.

Widgets never await anything: they call the plain methods here (``toggle``, ``new_circuit``, ...), which
start a task and return at once.  qasync 0.28's ``asyncSlot`` keeps no reference to its task, so this class
starts tasks itself and keeps every one in ``self._tasks`` until it ends.

A kill switch kept after the engine stopped (docs/PRIVILEGES.md) is read from its marker
(core/vpn/killmark.py) when the engine goes away or none runs at start, and from the engine's snapshot
otherwise; the window then offers Reconnect and Unblock (an explicit disconnect through the engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal

from shallot.app.engine_link import EngineLink, EngineProblem, engine_config
from shallot.app.presenter import Button, Notifier, Problem, RateMeter, ViewState, present
from shallot.app.settings import Settings, SettingsError, SettingsStore, check_usable, state_dir
from shallot.core.control.api import (
    Configure,
    Connect,
    ControlError,
    Disconnect,
    EngineState,
    ErrorKind,
    NewCircuit,
    Request,
    SnapshotError,
    Status,
    StatusSnapshot,
)
from shallot.core.discovery.directory import load_directory
from shallot.core.errors import ShallotError
from shallot.core.vpn import killmark

log = logging.getLogger("shallot.app")
UNBLOCK_TIMEOUT_S = 320.0  # the engine may wait for polkit's password dialog (core/vpn/helper_client.py)
# problems that a change of settings may have fixed
SETTINGS_KINDS = (ErrorKind.SETTINGS, ErrorKind.NO_DIRECTORY, ErrorKind.BAD_DIRECTORY, ErrorKind.BAD_CONFIG)


class QtLogHandler(logging.Handler):
    """The app's own log records, forwarded to the log view."""

    def __init__(self, controller: AppController) -> None:
        super().__init__(logging.DEBUG)
        self.controller = controller

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.controller.log_record.emit(record.levelno, record.name, record.getMessage())


class AppController(QObject):
    view_changed = Signal(object)  # ViewState
    snapshot_changed = Signal(object)  # StatusSnapshot | None
    traffic = Signal(float, float)  # up, down in bytes per second
    log_record = Signal(int, str, str)  # level, source, message
    notify = Signal(str, str)  # title, text
    settings_changed = Signal(object)  # Settings

    def __init__(self, store: SettingsStore, *, socket: Path, settings: Settings | None = None,
                 persist: bool = True, block_kept: Callable[[], bool] | None = None,
                 parent: QObject | None = None) -> None:
        """``block_kept``: whether a kill switch blocks traffic (its marker; a stand-in in tests)."""
        super().__init__(parent)
        self.store = store
        self.block_kept = block_kept or killmark.is_marked
        self.persist = persist  # the demo never writes the user's settings
        self.load_problems: list[str] = []
        if settings is None:
            loaded = store.load()
            settings, self.load_problems = loaded.settings, loaded.problems
        self.settings = settings
        self.link = EngineLink(socket, state_dir() / "engine.log", on_snapshot=self._on_snapshot,
                               on_log=self._on_engine_log, on_lost=self._on_lost)
        self.snapshot: StatusSnapshot | None = None
        self.problem: Problem | None = None
        self.starting = ""
        self.view: ViewState = present(None, route_all=settings.route_all)
        self.meter = RateMeter()
        self.notifier = Notifier()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connect_task: asyncio.Task[Any] | None = None
        self._user_action = False
        self._log_handler = QtLogHandler(self)
        logging.getLogger("shallot.app").addHandler(self._log_handler)
        logging.getLogger("shallot.app").setLevel(logging.DEBUG)

    # ------------------------------------------------------------------ commands from the widgets
    def toggle(self) -> None:
        if self.view.button in (Button.CONNECT, Button.RECONNECT):
            self.connect_vpn()
        else:
            self.disconnect_vpn()

    def connect_vpn(self) -> None:
        if self._connect_task is not None and not self._connect_task.done():
            return
        self._connect_task = self.spawn(self._connect())

    def disconnect_vpn(self) -> None:
        self.spawn(self._disconnect())

    def new_circuit(self) -> None:
        self.spawn(self._command(NewCircuit()))

    def choose_exit(self, exit_id: str) -> None:
        """"" for automatic; while connected the switch goes through a new circuit."""
        if exit_id == self.settings.exit:
            return
        self.apply_settings(self.settings.replace(exit=exit_id))
        if self.snapshot is not None and self.snapshot.state in (EngineState.CONNECTED, EngineState.CONNECTING,
                                                                   EngineState.RECONNECTING):
            self.spawn(self._switch_exit(exit_id))

    def use_probe_mode(self) -> None:
        """From the helper-missing error: turn off "Route all traffic" and connect with a circuit only (the
        connect sends the engine the new settings)."""
        self.apply_settings(self.settings.replace(route_all=False))
        self.problem = None
        self.connect_vpn()

    def retry(self) -> None:
        self.problem = None
        self.connect_vpn()

    def unblock(self) -> None:
        """Lift a kill switch kept after the engine stopped: the engine's disconnect does it through the helper."""
        self.spawn(self._unblock())

    def apply_settings(self, new: Settings) -> None:
        old, self.settings = self.settings, new
        if self.persist:
            try:
                self.store.save(new)
            except OSError as exc:
                log.error("could not save the settings to %s: %s", self.store.path, exc.strerror)
        self.settings_changed.emit(new)
        if engine_config(old) != engine_config(new) and self.link.attached:
            if self.snapshot is not None and self.snapshot.trying:
                log.info("the new settings apply from the next connect")  # every connect sends them first
            else:
                self.spawn(self._configure())  # the window shows the engine's mode and directory at once
        if self.problem is not None and self.problem.kind in SETTINGS_KINDS:
            self.problem = None
        self._refresh()

    def exits(self) -> list[tuple[str, str]]:
        """(relay id, label) of the exits in the directory file; none without a readable one."""
        if self.settings.source != "directory" or not self.settings.directory:
            return []
        try:
            relays = load_directory(Path(self.settings.directory))
        except ShallotError:
            return []
        return [(d.id_hex, f"{d.nickname} · {d.id_hex[:8]} · {d.address[0]}:{d.address[1]}")
                for d in relays if d.is_exit]

    async def attach_existing(self) -> bool:
        """At start: show the state of an engine that is already running (never starts one)."""
        if self.link.sock.exists():
            try:
                await self.link.ensure(lambda _s: None, start=False)
            except EngineProblem:
                pass
            else:
                await self._refresh_status()
                return True
        if self.block_kept():
            self.fail(Problem(ErrorKind.BLOCKED, "an earlier connection stopped without disconnecting"))
        return False

    async def shutdown(self, *, disconnect: bool) -> None:
        """Quit: with ``disconnect`` the engine is told to disconnect and exit; without it, an engine we
        started while disconnected exits too, and a connected one keeps running for the next app."""
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        connected = self.snapshot is not None and self.snapshot.state is not EngineState.DISCONNECTED
        if disconnect or (self.link.started_by_us and not connected):
            if not self.link.attached and self.link.started_by_us:
                with contextlib.suppress(EngineProblem):
                    await self.link.ensure(lambda _s: None)
            await self.link.shutdown_engine()
        else:
            await self.link.detach()
        logging.getLogger("shallot.app").removeHandler(self._log_handler)

    # ------------------------------------------------------------------ tasks
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_event_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("internal error: %r", exc, exc_info=exc)
            self.problem = Problem(ErrorKind.INTERNAL, f"internal error: {exc!r}")
            self.starting = ""
            self._refresh()

    async def _connect(self) -> None:
        self.problem = None
        self._user_action = True
        try:
            check_usable(self.settings)
        except SettingsError as exc:
            self.fail(Problem(exc.kind, str(exc)))
            return
        self.set_starting("connecting to the Shallot engine")
        try:
            await self.link.ensure(self.set_starting)
            self.set_starting("sending the settings to the engine")  # it checks the directory file now
            await self.link.ask(Configure(engine_config(self.settings)))
            self.set_starting("asking the engine to connect")
            snap = await self.link.ask(Connect(exit=self.settings.exit or None))
        except (ControlError, EngineProblem) as exc:
            self.fail(Problem(exc.kind, str(exc)))
            return
        self.set_starting("the engine is choosing a path")  # until its first snapshot says more
        self._on_snapshot(snap, False)

    async def _disconnect(self) -> None:
        self._user_action = True
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._connect_task
        self._connect_task = None
        self.starting = ""
        self.problem = None
        if self.link.attached:
            try:
                snap = await self.link.ask(Disconnect())
            except (EngineProblem, ControlError) as exc:
                self.fail(Problem(ErrorKind.ERROR, str(exc)))
                return
            self._on_snapshot(snap, False)
        else:
            self._refresh()

    async def _unblock(self) -> None:
        self._user_action = True
        self.problem = None
        log.info("lifting the kill switch")
        try:
            await self.link.ensure(lambda _s: None)
            snap = await self.link.ask(Disconnect(), timeout=UNBLOCK_TIMEOUT_S)
        except (ControlError, EngineProblem) as exc:
            self.fail(Problem(ErrorKind.BLOCKED, f"the kill switch could not be lifted: {exc}"))
            return
        self._on_snapshot(snap, False)
        if self.block_kept():
            self.fail(Problem(ErrorKind.BLOCKED, "the kill switch is still on (see the log)"))

    async def _command(self, request: Request) -> None:
        what = request.CMD.replace("_", " ")
        try:
            snap = await self.link.ask(request)
        except ControlError as exc:
            log.warning("%s: %s", what, exc)
            return
        except EngineProblem as exc:
            self.fail(Problem(exc.kind, str(exc)))
            return
        log.info("%s requested", what)
        self._on_snapshot(snap, False)

    async def _configure(self) -> None:
        """Settings changed while the engine is idle: it takes them now (a problem shows at the next connect)."""
        try:
            snap = await self.link.ask(Configure(engine_config(self.settings)))
        except (ControlError, EngineProblem) as exc:
            log.warning("the engine did not take the new settings yet: %s", exc)
            return
        self._on_snapshot(snap, False)

    async def _switch_exit(self, exit_id: str) -> None:
        try:
            await self.link.ask(Connect(exit=exit_id or None))
            snap = await self.link.ask(NewCircuit())
        except (ControlError, EngineProblem) as exc:
            log.warning("could not switch the exit: %s", exc)
            return
        log.info("exit: %s", exit_id[:8] or "automatic")
        self._on_snapshot(snap, False)

    async def _refresh_status(self) -> None:
        try:
            snap = await self.link.ask(Status())
        except (ControlError, EngineProblem):
            return
        self._on_snapshot(snap, False)

    # ------------------------------------------------------------------ from the engine
    def _on_snapshot(self, raw: Any, polled: bool) -> None:
        try:
            snap = StatusSnapshot.from_json(raw)
        except SnapshotError as exc:
            log.warning("ignored a bad snapshot from the engine: %s", exc)
            return
        if self.starting and snap.state is EngineState.DISCONNECTED and self._connect_task is not None:
            return  # from before our connect request took effect
        if snap.state is not EngineState.DISCONNECTED:
            self.starting = ""
        if snap.error_kind in (ErrorKind.HELPER_MISSING, ErrorKind.HELPER_DENIED) and self.problem is None:
            log.error("%s", snap.error or snap.error_kind.value)
        old = self.snapshot
        self.snapshot = snap
        if old is None or (old.state, [h.id for h in old.circuit]) != (snap.state, [h.id for h in snap.circuit]):
            self._log_transition(snap)
        if polled:
            rates = self.meter.add(time.monotonic(), snap.bytes_sent, snap.bytes_received)
            if rates is not None:
                self.traffic.emit(*rates)
        self.snapshot_changed.emit(snap)
        self._refresh()

    def _on_engine_log(self, level: int, source: str, message: str) -> None:
        self.log_record.emit(level, source, message)

    def _on_lost(self, reason: str) -> None:
        was = self.snapshot
        self.snapshot = None
        self.meter.reset()
        if self.block_kept():  # it died connected with the kill switch on: the block stays (docs/PRIVILEGES.md)
            self.fail(Problem(ErrorKind.BLOCKED, f"the engine stopped ({reason})"))
        elif was is not None and was.state is not EngineState.DISCONNECTED:
            self.fail(Problem(ErrorKind.ENGINE_LOST, f"the engine stopped ({reason})"))
        else:
            log.info("the engine stopped (%s)", reason)
            self._refresh()
        self.snapshot_changed.emit(None)

    # ------------------------------------------------------------------ helpers
    def set_starting(self, step: str) -> None:
        self.starting = step
        self._refresh()

    def fail(self, problem: Problem) -> None:
        self.starting = ""
        self.problem = problem
        log.error("%s", problem.message)
        self._refresh()

    def _log_transition(self, snap: StatusSnapshot) -> None:
        if snap.state is EngineState.CONNECTED and snap.circuit:
            log.info("connected: %s", " → ".join(h.nickname or h.short_id for h in snap.circuit))
        elif snap.error:
            log.warning("%s: %s", snap.state.value, snap.error)
        else:
            log.info("%s%s", snap.state.value, f" ({snap.step})" if snap.step else "")

    def _refresh(self) -> None:
        view = present(self.snapshot, self.problem, starting=self.starting, route_all=self.settings.route_all)
        note = self.notifier.feed(view.phase, self._user_action)
        self._user_action = False
        if note is not None:
            self.notify.emit(*note)
        self.view = view
        self.view_changed.emit(view)
