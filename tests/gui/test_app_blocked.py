"""The window when the engine stopped and its kill switch stays on (docs/PRIVILEGES.md): "Blocked: the
connection stopped", with Reconnect on the big button and Unblock beside the advice.

The engines here are stand-ins: real ControlServers of core/control/ on a real Unix socket that answer as
the VPN engine's spec says (docs/PROTOCOL.md §9.5), because a real engine in VPN mode would change this
machine's routes (the real thing, with real traffic, is tests/netns/test_engine_death.py).  The kill switch's
marker is a stand-in too (``block_kept``): a real one would be the host's.  The window, controller and
EngineLink are the app's own."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import Qt

from shallot.app.controller import AppController
from shallot.app.settings import Settings
from shallot.app.window import MainWindow
from shallot.core.control.api import (
    Configure,
    Connect,
    ControlError,
    Disconnect,
    EngineState,
    ErrorKind,
    Role,
    Status,
)
from shallot.core.control.server import ControlServer

HOPS = [{"id": f"{i:x}" * 40, "nickname": n, "address": f"192.0.2.{i}:9001", "exit": n == "x", "rtt_ms": 1.0}
        for i, n in enumerate(("g", "m", "x"), start=1)]
CONNECTED = {"state": "connected", "step": "", "error": "", "error_code": "", "mode": "vpn", "trying": True,
             "kill_switch": True, "circuit": HOPS, "rtt_ms": 1.0, "connected_since": 1.0, "blocked": False}
DISCONNECTED = {**CONNECTED, "state": "disconnected", "trying": False, "circuit": [], "connected_since": None}
BLOCKED = "Blocked: the connection stopped"
HERE = Path(__file__).resolve().parent


class StandIn:
    """One stand-in engine on ``sock``: answers every request with ``answers[cmd]`` and records the commands."""

    def __init__(self, sock: Path, answers: dict[type, Callable[[Any], Any]]) -> None:
        self.commands: list[str] = []
        self.configured: list[dict[str, Any]] = []

        def handler(cls: type, answer: Callable[[Any], Any]) -> Callable[[Any], Any]:
            async def handle(request: Any) -> Any:
                self.commands.append(cls.CMD)
                if isinstance(request, Configure):
                    self.configured.append(request.config.to_json())
                return answer(request)
            return handle

        self.server = ControlServer(sock, Role.CLIENT, {cls: handler(cls, a) for cls, a in answers.items()})


@pytest.fixture
def window(qtbot: Any, qloop: asyncio.AbstractEventLoop, make_app: Callable[..., Any],
           short_tmp: Path) -> Iterator[tuple[Callable[..., tuple], Callable[..., StandIn]]]:
    """``make(block_kept)``: the app's window (conftest's make_app) with a stand-in for the marker;
    ``serve(answers)``: a stand-in engine on the app's socket, closed at the end."""
    servers: list[StandIn] = []

    def make(block_kept: Callable[[], bool]) -> tuple[AppController, MainWindow]:
        directory = short_tmp / "directory"
        directory.write_text("unused: the stand-in engines never read it\n")
        app = make_app(Settings(directory=str(directory), route_all=True, kill_switch=True))
        app.controller.block_kept = block_kept
        return app.controller, app.window

    def serve(answers: dict[type, Callable[[Any], Any]]) -> StandIn:
        engine = StandIn(short_tmp / "engine.sock", answers)
        started = qloop.create_task(engine.server.start())
        qtbot.waitUntil(started.done, timeout=5000)
        started.result()
        servers.append(engine)
        return engine

    yield make, serve
    for engine in servers:
        closing = qloop.create_task(engine.server.close())
        qtbot.waitUntil(closing.done, timeout=5000)
    # the controllers are cyclic garbage (controller -> EngineLink -> its bound methods): collect them here, on
    # the main thread while the loop lives, not whenever a later allocation (perhaps on a helper thread) does;
    # without this a later test's Qt event processing can crash on them
    gc.collect()


def attach(qtbot: Any, controller: AppController) -> bool:
    task = controller.spawn(controller.attach_existing())
    qtbot.waitUntil(task.done, timeout=5000)
    return task.result()


def test_the_engine_dies_connected_and_unblock_lifts_the_kept_kill_switch(qtbot, window, short_tmp: Path) -> None:
    make, serve = window
    marker = [False]
    first = subprocess.Popen([sys.executable, str(HERE / "standin_engine.py"), str(short_tmp / "engine.sock"),
                              json.dumps(CONNECTED)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "listening"
        c, w = make(lambda: marker[0])
        assert attach(qtbot, c) is True
        qtbot.waitUntil(lambda: c.view.phase is EngineState.CONNECTED, timeout=5000)
        marker[0] = True  # connected with the kill switch: its marker is there
        first.kill()  # the engine dies without a word: its kill switch stays on
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    qtbot.waitUntil(lambda: w.headline.text() == BLOCKED, timeout=10000)
    assert "The engine stopped" in w.detail.text() and "Unblock" in w.advice.text()
    assert w.button.text() == "Reconnect" and w.tray.toggle_item.text() == "Reconnect"
    assert w.action_button.isVisible() and w.action_button.text() == "Unblock"

    def lift(request: Disconnect) -> dict[str, Any]:
        marker[0] = False  # what the engine's disconnect does through the helper
        return DISCONNECTED

    second = serve({Status: lambda r: DISCONNECTED, Configure: lambda r: DISCONNECTED, Disconnect: lift})
    qtbot.mouseClick(w.action_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: w.headline.text() == "Not connected", timeout=10000)
    assert second.commands[-1] == "disconnect" and "connect" not in second.commands
    assert w.button.text() == "Connect" and not w.action_button.isVisible()


def test_a_block_found_at_start_and_reconnect_takes_it_over(qtbot, window) -> None:
    make, serve = window
    c, w = make(lambda: True)
    assert attach(qtbot, c) is False  # no engine runs: the marker alone says what happened
    assert w.headline.text() == BLOCKED and w.button.text() == "Reconnect"
    assert "earlier connection stopped without disconnecting" in w.detail.text()

    connecting = {**CONNECTED, "state": "connecting", "circuit": [], "step": "choosing a path",
                  "connected_since": None}
    engine = serve({Status: lambda r: connecting, Configure: lambda r: DISCONNECTED, Connect: lambda r: connecting})
    qtbot.mouseClick(w.button, Qt.MouseButton.LeftButton)  # Reconnect: a new engine takes the kill switch over
    qtbot.waitUntil(lambda: "connect" in engine.commands, timeout=10000)
    assert engine.commands[:2] == ["configure", "connect"] and "disconnect" not in engine.commands
    assert engine.configured[0]["vpn"] is True and engine.configured[0]["kill_switch"] is True
    qtbot.waitUntil(lambda: w.headline.text() == "Connecting…", timeout=5000)


def test_an_unblock_the_engine_cannot_carry_out_keeps_the_blocked_view(qtbot, window) -> None:
    make, serve = window
    helper_failed = {**DISCONNECTED, "state": "error", "error": "the privileged helper quit",
                     "error_code": "helper-failed", "blocked": True}

    def refuse(request: Disconnect) -> None:
        raise ControlError(ErrorKind.HELPER_MISSING, "the kill switch stays on: the privileged helper is not "
                                                     "installed")

    serve({Status: lambda r: helper_failed, Configure: lambda r: helper_failed, Disconnect: refuse})
    c, w = make(lambda: True)
    assert attach(qtbot, c) is True
    qtbot.waitUntil(lambda: w.headline.text() == BLOCKED, timeout=5000)  # from the engine's own snapshot
    assert w.detail.text() == "The privileged helper quit."
    qtbot.mouseClick(w.action_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "could not be lifted" in w.detail.text(), timeout=10000)
    assert w.headline.text() == BLOCKED and "not installed" in w.detail.text()
    assert w.action_button.text() == "Unblock"
