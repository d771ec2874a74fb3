"""VPN mode without the privileged helper.  The engine's VPN mode (``--vpn``, error_code "helper-missing")
is being added in parallel and must never run in a test on this machine (it would route the host), so the
window attaches here to a stand-in engine: a real ControlServer of core/control/ on a real Unix socket that
answers as the VPN engine's spec says it will.  The app itself is unchanged: it reattaches to a running
engine, shows what is missing in plain words and offers probe mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt

from shallot.app.settings import Settings, SettingsStore
from shallot.core.control.api import Configure, Connect, Disconnect, EngineState, Role, SetDirectory, Status
from shallot.core.control.server import ControlServer

HELPER_MISSING = {"state": "error", "step": "", "mode": "vpn", "error_code": "helper-missing", "trying": False,
                  "error": "the privileged helper (shallot-helper, via pkexec) is not installed", "circuit": [],
                  "directory": None, "exit": None, "build_ms": None, "rtt_ms": None, "connected_since": None,
                  "circuit_since": None, "circuits_built": 0, "bytes_sent": 0, "bytes_received": 0}


def test_helper_missing_is_explained_and_probe_mode_offered(qtbot, qloop, make_app, short_tmp: Path) -> None:
    sock = short_tmp / "vpn.sock"
    calls: list[str] = []

    async def answer(request: object) -> dict[str, Any]:
        return HELPER_MISSING

    async def disconnect(request: Disconnect) -> dict[str, Any]:
        calls.append("disconnect")
        return {**HELPER_MISSING, "state": "disconnected", "error_code": "", "error": ""}

    server = ControlServer(sock, Role.CLIENT, {Status: answer, Connect: answer, SetDirectory: answer,
                                               Configure: answer, Disconnect: disconnect})
    started = qloop.create_task(server.start())
    qtbot.waitUntil(started.done, timeout=5000)
    try:
        app = make_app(Settings(directory="/unused", route_all=True), sock=sock)
        c, w = app.controller, app.window
        attach = c.spawn(c.attach_existing())
        qtbot.waitUntil(attach.done, timeout=5000)
        assert attach.result() is True
        qtbot.waitUntil(lambda: c.view.phase is EngineState.ERROR, timeout=5000)
        assert w.headline.text() == "The VPN helper is not installed"
        assert "not installed" in w.detail.text() and "probe mode" in w.advice.text()
        assert w.mode_badge.text() == "VPN mode"
        assert w.action_button.isVisible() and w.action_button.text() == "Connect in probe mode"
        assert w.button.text() == "Connect"  # the engine gave up (a final error): the button starts over

        qtbot.mouseClick(w.action_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: not c.settings.route_all, timeout=5000)
        assert SettingsStore().load().settings.route_all is False  # remembered
    finally:
        for t in list(c._tasks):
            t.cancel()
        closing = qloop.create_task(server.close())
        qtbot.waitUntil(closing.done, timeout=5000)
