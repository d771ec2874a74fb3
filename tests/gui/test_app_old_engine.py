"""An engine older than the app (control protocol version 1: no ``configure``) answers on the socket.  The app
knows it by the engine's hello, not by anything it prints, and says so in plain words instead of sending
it settings it cannot take.  The old engine is a stand-in: a Unix socket that greets as version 1 did."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from PySide6.QtCore import Qt

from shallot.app.settings import Settings
from shallot.core.control.api import EngineState

V1_HELLO = {"shallot": "control", "version": 1, "role": "client"}
V1_STATUS = {"state": "disconnected", "step": "", "error": "", "circuit": []}


def test_an_older_engine_is_named_not_sent_settings(qtbot, qloop, make_app, short_tmp: Path) -> None:
    sock = short_tmp / "old.sock"
    commands: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(json.dumps(V1_HELLO).encode() + b"\n")
        while line := await reader.readline():
            request = json.loads(line)
            commands.append(request["cmd"])
            writer.write(json.dumps({"id": request["id"], "ok": True, "result": V1_STATUS}).encode() + b"\n")
        writer.close()

    starting = qloop.create_task(asyncio.start_unix_server(serve, path=str(sock)))
    qtbot.waitUntil(starting.done, timeout=5000)
    server = starting.result()
    try:
        app = make_app(Settings(directory="/unused"), sock=sock)
        c, w = app.controller, app.window
        attach = c.spawn(c.attach_existing())
        qtbot.waitUntil(attach.done, timeout=5000)
        assert attach.result() is False  # not attached: there is nothing it could show or be told

        qtbot.mouseClick(w.button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: c.view.phase is EngineState.ERROR, timeout=5000)
        assert w.headline.text() == "An older Shallot engine is running"
        assert "version 1" in w.detail.text() and "Stop it" in w.advice.text()
        assert w.action_button.isVisible() and w.action_button.text() == "Try again"
        assert commands == []  # no configure, no connect: it would not have understood them
        assert c.link.engine_pid is None  # and the app started no engine of its own over it
    finally:
        server.close()
