"""pytest-qt fixtures for the desktop app: offscreen Qt, a qasync loop the sync tests drive through
qtbot.waitUntil/waitSignal (../shared/DEPENDENCIES.md, recipe A), a real local network of relay processes,
and windows whose engines are always shut down (polite first, then by the PID the app started); a shutdown
that hangs, raises or leaves an engine to be killed fails the test at teardown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("QT_API", "pyside6")

import pytest
import qasync
from PySide6.QtWidgets import QApplication
from pytestqt.exceptions import TimeoutError as QtTimeoutError

from shallot.app.controller import AppController
from shallot.app.settings import Settings, SettingsStore
from shallot.app.window import MainWindow
from tests.integration.conftest import RunningNetwork, running_network

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
SHUTDOWN_MS = 25000  # the app's worst case: 5 s for the engine's answer, 10 s for it to exit, then SIGKILL


@pytest.fixture
def qloop(qapp: QApplication) -> Iterator[asyncio.AbstractEventLoop]:
    loop = qasync.QEventLoop(qapp, already_running=True)
    asyncio.set_event_loop(loop)
    yield loop
    for task in asyncio.all_tasks(loop):
        task.cancel()
    asyncio.events._set_running_loop(None)
    loop._QEventLoop__is_running = False  # no public API; loop.stop() would call app.exit()
    loop.close()
    asyncio.set_event_loop(None)


@pytest.fixture(autouse=True)
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Settings and the engine log go to this test's own directories, never the user's."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNetwork]:
    with running_network(tmp_path_factory.mktemp("guinet")) as running:
        yield running


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="shallot-gui-", dir="/tmp"))  # unix socket paths are short
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class App:
    controller: AppController
    window: MainWindow
    sock: Path


@pytest.fixture
def make_app(qtbot: Any, qloop: asyncio.AbstractEventLoop, short_tmp: Path) -> Iterator[Callable[..., App]]:
    made: list[App] = []
    pids: list[int] = []

    def make(settings: Settings | None = None, *, sock: Path | None = None, save: bool = True) -> App:
        store = SettingsStore()
        if settings is not None and save:
            store.save(settings)
        controller = AppController(store, socket=sock or short_tmp / "engine.sock")
        window = MainWindow(controller)
        qtbot.addWidget(window)
        window.show()
        app = App(controller, window, controller.link.sock)
        made.append(app)
        return app

    yield make
    problems: list[str] = []  # a shutdown that hangs or fails is a finding, not something to swallow
    try:
        for app in made:
            problems += shut_down(qtbot, app, pids)
    finally:
        for pid in pids:  # whatever happened above: only engines these tests' apps started, by PID
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        # the controllers are cyclic garbage (controller -> EngineLink -> its bound methods, Qt objects):
        # collect them now, on the main thread while the loop lives, not whenever a later allocation (perhaps
        # on a helper thread, or in a later test's Qt event processing) does; a CI run under coverage
        # segfaulted in pytest-qt's _process_events without this
        made.clear()
        gc.collect()
    if problems:
        pytest.fail("engine shutdown at teardown: " + "; ".join(problems), pytrace=False)


def shut_down(qtbot: Any, app: App, pids: list[int]) -> list[str]:
    """Quit as "Disconnect and quit" does; what went wrong, in words (an empty list when nothing did)."""
    if app.controller.link.engine_pid is not None:
        pids.append(app.controller.link.engine_pid)
    proc = app.controller.link.proc  # an engine this app started: its exit status tells the story
    running = proc is not None and proc.poll() is None
    task = app.controller.spawn(app.controller.shutdown(disconnect=True))
    try:
        qtbot.waitUntil(task.done, timeout=SHUTDOWN_MS)
    except QtTimeoutError:
        task.cancel()
        return [f"the app's shutdown ({app.sock}) did not finish within {SHUTDOWN_MS / 1000:.0f} s{_engine_log(app)}"]
    if task.cancelled():
        return ["the app's shutdown was cancelled"]
    if task.exception() is not None:
        return [f"the app's shutdown ({app.sock}) raised {task.exception()!r}{_engine_log(app)}"]
    if running and proc is not None and proc.returncode != 0:
        return [f"the engine (pid {proc.pid}) ended with {proc.returncode} after a shutdown request "
                f"(-9: the app had to kill it after 10 s){_engine_log(app)}"]
    return []


def _engine_log(app: App, lines: int = 30) -> str:
    """The end of the log of the engine this app started (where a hang or a crash at exit shows)."""
    try:
        tail = app.controller.link.log_path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\nthe engine's log ends with:\n" + "\n".join(tail)


def engine_status(sock: Path) -> dict[str, Any]:
    """The engine's own answer, through the command line (not through the app)."""
    res = subprocess.run([sys.executable, "-m", "shallot", "status", "--socket", str(sock), "--json"],
                         capture_output=True, text=True, timeout=20, env=ENV)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)
