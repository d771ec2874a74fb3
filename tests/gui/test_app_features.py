"""What README "The desktop app" and docs/APP.md promise, each driven the way a user does it and checked in
the REAL engine's own answer (``shallot status --json`` on its socket), not in what the window says:
the Exit menu, the keyboard shortcuts, close to the tray, the Quit dialog and settings that reach the
engine through ``configure`` without restarting it.  The engine is the process the app starts (or one the
test starts), on the local network of relay processes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication, QDialogButtonBox, QMessageBox

from shallot.app.settings import Settings, SettingsStore
from shallot.app.tray import Tray
from shallot.core.control.api import EngineState
from shallot.crypto.descriptor import encode_directory
from tests.gui.conftest import engine_status
from tests.integration.conftest import RunningNetwork

pytestmark = [pytest.mark.timeout(150), pytest.mark.slow]
CONNECT_MS = 30000


def directory_settings(network: RunningNetwork, **kw: Any) -> Settings:
    return Settings(source="directory", directory=str(network.directory), **kw)


def connected(controller) -> bool:
    return controller.view.phase is EngineState.CONNECTED and len(controller.view.hops) == 3


def engine_is(sock: Path, state: str) -> bool:
    return engine_status(sock)["state"] == state


def press(qtbot, window, key: Qt.Key, modifier: Qt.KeyboardModifier = Qt.KeyboardModifier.ControlModifier) -> None:
    """A key chord as the user types it: to the active window, through Qt's shortcut map."""
    window.activateWindow()
    qtbot.waitUntil(lambda: QApplication.activeWindow() is window, timeout=5000)
    qtbot.keyClick(window, key, modifier)


def pick_exit(qtbot, window, exit_id: str) -> None:
    """Open the Exit menu and click the entry of ``exit_id`` ("" for Automatic)."""
    combo = window.exit_choice
    index = combo.findData(exit_id)
    assert index >= 0, f"{exit_id[:8]} is not in the Exit menu"
    combo.showPopup()
    view = combo.view()
    qtbot.waitUntil(view.isVisible, timeout=5000)
    rect = view.visualRect(combo.model().index(index, 0))
    qtbot.mouseClick(view.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    qtbot.waitUntil(lambda: not view.isVisible(), timeout=5000)
    assert combo.currentIndex() == index


def engine_exit(sock: Path) -> tuple[str | None, str | None]:
    """(the exit the engine was asked for, the exit of its circuit)."""
    status = engine_status(sock)
    return status["exit"], (status["circuit"][-1]["id"] if status["circuit"] else None)


# ---------------------------------------------------------------------------------------------- the Exit menu


def test_exit_menu_lists_the_exits_and_the_next_circuit_ends_at_the_chosen_one(qtbot, make_app,
                                                                               network: RunningNetwork) -> None:
    app = make_app(directory_settings(network))
    c, w = app.controller, app.window
    combo = w.exit_choice
    listed = [combo.itemData(i) for i in range(combo.count())]
    assert listed[0] == "" and combo.itemText(0) == "Automatic"
    assert sorted(listed[1:]) == sorted(d.id_hex for d in network.exits)  # the directory's exits, no others
    for i in range(1, combo.count()):
        desc = next(d for d in network.exits if d.id_hex == listed[i])
        assert desc.nickname in combo.itemText(i) and desc.id_hex[:8] in combo.itemText(i)

    first, second = (d.id_hex for d in network.exits)
    pick_exit(qtbot, w, first)  # before connecting: the first circuit ends there
    assert c.settings.exit == first and SettingsStore().load().settings.exit == first
    qtbot.mouseClick(w.button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: connected(c), timeout=CONNECT_MS)
    assert engine_exit(app.sock) == (first, first)
    assert c.view.hops[-1].id == first and w.circuit_view.cards["exit"].short_id.text() == first[:8]
    built = engine_status(app.sock)["circuits_built"]

    pick_exit(qtbot, w, second)  # while connected: a new circuit through the other exit
    qtbot.waitUntil(lambda: engine_exit(app.sock) == (second, second), timeout=CONNECT_MS)
    status = engine_status(app.sock)
    assert status["state"] == "connected" and status["circuits_built"] > built
    qtbot.waitUntil(lambda: connected(c) and c.view.hops[-1].id == second, timeout=10000)
    assert w.circuit_view.cards["exit"].short_id.text() == second[:8]

    pick_exit(qtbot, w, "")  # Automatic: the engine is no longer held to one exit
    qtbot.waitUntil(lambda: engine_status(app.sock)["exit"] is None, timeout=CONNECT_MS)
    assert c.settings.exit == ""


# ---------------------------------------------------------------------------------------------- shortcuts


def test_ctrl_return_connects_and_disconnects_and_ctrl_n_builds_a_new_circuit(qtbot, make_app,
                                                                              network: RunningNetwork) -> None:
    app = make_app(directory_settings(network))
    c, w = app.controller, app.window
    press(qtbot, w, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: connected(c), timeout=CONNECT_MS)
    before = engine_status(app.sock)
    assert before["state"] == "connected"

    press(qtbot, w, Qt.Key.Key_N)
    qtbot.waitUntil(lambda: [h["id"] for h in engine_status(app.sock)["circuit"]] not in
                    ([], [h["id"] for h in before["circuit"]]), timeout=CONNECT_MS)
    after = engine_status(app.sock)
    assert after["state"] == "connected" and after["circuits_built"] == before["circuits_built"] + 1

    press(qtbot, w, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: c.view.phase is EngineState.DISCONNECTED, timeout=10000)
    assert engine_is(app.sock, "disconnected")


# ---------------------------------------------------------------------------------------------- tray and Quit


def test_closing_the_window_keeps_the_connection_in_the_tray(qtbot, make_app, network: RunningNetwork,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Offscreen Qt has no system tray (its platform theme offers none), so the desktop's tray is the one
    stand-in here: ``Tray.available`` says there is one.  Everything else is the real window and engine."""
    monkeypatch.setattr(Tray, "available", staticmethod(lambda: True))
    app = make_app(directory_settings(network))
    c, w = app.controller, app.window
    assert w.tray.isVisible()
    qtbot.mouseClick(w.button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: connected(c), timeout=CONNECT_MS)
    quits: list[bool] = []
    w.quit_finished.connect(lambda: quits.append(True))

    press(qtbot, w, Qt.Key.Key_W)  # Ctrl+W, as a click on the title bar's close button would
    qtbot.waitUntil(lambda: not w.isVisible(), timeout=5000)
    assert w.tray.last_message is not None and "still running" in w.tray.last_message[0]
    with qtbot.waitSignal(c.snapshot_changed, timeout=5000):  # the app keeps polling the engine
        pass
    assert not w.quitting and not quits and w.tray.isVisible()
    assert engine_is(app.sock, "connected") and app.controller.link.proc.poll() is None
    assert (w.tray.state_item.text(), w.tray.toggle_item.text()) == ("Connected", "Disconnect")

    w.tray.show_item.trigger()  # "Show Shallot" from the tray menu
    qtbot.waitUntil(w.isVisible, timeout=5000)
    w.tray.toggle_item.trigger()  # "Disconnect" from the tray menu
    qtbot.waitUntil(lambda: engine_is(app.sock, "disconnected"), timeout=10000)


def open_quit_dialog(qtbot, window) -> QMessageBox:
    press(qtbot, window, Qt.Key.Key_Q)
    qtbot.waitUntil(lambda: getattr(window, "quit_box", None) is not None and window.quit_box.isVisible(),
                    timeout=5000)
    box = window.quit_box
    assert box.text() == "Disconnect before quitting?"
    return box


def dialog_button(box: QMessageBox, text: str) -> Any:
    for button in box.buttons():
        if button.text() == text:
            return button
    raise AssertionError(f"no {text!r} button in {[b.text() for b in box.buttons()]}")


def test_quit_asks_and_disconnect_and_quit_ends_the_engine(qtbot, make_app, network: RunningNetwork) -> None:
    app = make_app(directory_settings(network))
    c, w = app.controller, app.window
    qtbot.mouseClick(w.button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: connected(c), timeout=CONNECT_MS)
    proc = c.link.proc

    box = open_quit_dialog(qtbot, w)
    qtbot.mouseClick(box.button(QMessageBox.StandardButton.Cancel), Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not box.isVisible(), timeout=5000)
    assert not w.quitting and w.isVisible() and engine_is(app.sock, "connected")  # Cancel changes nothing

    box = open_quit_dialog(qtbot, w)
    with qtbot.waitSignal(w.quit_finished, timeout=20000):
        qtbot.mouseClick(dialog_button(box, "Disconnect and quit"), Qt.MouseButton.LeftButton)
    assert proc.poll() == 0  # the engine disconnected and exited on its own
    assert not app.sock.exists() and not w.isVisible()


def test_quit_stay_connected_leaves_the_engine_connected(qtbot, make_app, network: RunningNetwork) -> None:
    app = make_app(directory_settings(network))
    c, w = app.controller, app.window
    qtbot.mouseClick(w.button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: connected(c), timeout=CONNECT_MS)
    path = [h.id for h in c.view.hops]

    box = open_quit_dialog(qtbot, w)
    with qtbot.waitSignal(w.quit_finished, timeout=20000):
        qtbot.mouseClick(dialog_button(box, "Quit, stay connected"), Qt.MouseButton.LeftButton)
    assert c.link.proc.poll() is None and not c.link.attached  # the app let go; the engine runs on
    status = engine_status(app.sock)
    assert status["state"] == "connected" and [h["id"] for h in status["circuit"]] == path


def test_without_a_tray_closing_the_window_is_quit(qtbot, make_app, network: RunningNetwork) -> None:
    """The real offscreen platform (no tray): closing asks the Quit question instead of hiding the window."""
    assert not Tray.available()
    app = make_app(directory_settings(network))
    c, w = app.controller, app.window
    qtbot.mouseClick(w.button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: connected(c), timeout=CONNECT_MS)
    w.close()
    qtbot.waitUntil(lambda: getattr(w, "quit_box", None) is not None and w.quit_box.isVisible(), timeout=5000)
    assert w.isVisible()  # nothing hides it: the window is the only way back to the app
    w.quit_box.reject()


def test_quit_while_disconnected_asks_nothing_and_ends_the_engine_it_started(qtbot, make_app,
                                                                              network: RunningNetwork) -> None:
    app = make_app(directory_settings(network))
    c, w = app.controller, app.window
    qtbot.mouseClick(w.button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: connected(c), timeout=CONNECT_MS)
    qtbot.mouseClick(w.button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: c.view.phase is EngineState.DISCONNECTED, timeout=10000)
    proc = c.link.proc
    with qtbot.waitSignal(w.quit_finished, timeout=20000):
        press(qtbot, w, Qt.Key.Key_Q)
    assert getattr(w, "quit_box", None) is None  # no question
    assert proc.poll() == 0 and not app.sock.exists()


# ---------------------------------------------------------------------------------------------- settings


def save_settings(qtbot, window, **fields: Any) -> None:
    dialog = window.open_settings()
    qtbot.waitUntil(dialog.isVisible, timeout=5000)
    for name, value in fields.items():
        widget = getattr(dialog, name)
        widget.setText(value) if isinstance(value, str) else widget.setChecked(value)
    box = dialog.findChild(QDialogButtonBox)
    qtbot.mouseClick(box.button(QDialogButtonBox.StandardButton.Save), Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not dialog.isVisible(), timeout=5000)


def test_a_new_directory_file_reaches_the_engine_through_configure(qtbot, make_app, tmp_path: Path,
                                                                   network: RunningNetwork) -> None:
    """Switching the directory file in Settings: an idle engine takes it at once (``configure``); a
    connected one keeps its settings until the next connect; the engine is never restarted."""
    exit_kept = network.exits[0]
    subset = [*network.non_exits, exit_kept]
    small = tmp_path / "small-directory"
    small.write_text(encode_directory(subset))
    app = make_app(directory_settings(network))
    c, w = app.controller, app.window
    qtbot.mouseClick(w.button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: connected(c), timeout=CONNECT_MS)
    pid = c.link.engine_pid
    qtbot.mouseClick(w.button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: c.view.phase is EngineState.DISCONNECTED and engine_is(app.sock, "disconnected"),
                    timeout=10000)

    save_settings(qtbot, w, directory=str(small))  # idle: the engine takes it now
    qtbot.waitUntil(lambda: engine_status(app.sock)["directory"] == str(small.resolve()), timeout=10000)
    labels = [w.exit_choice.itemData(i) for i in range(w.exit_choice.count())]
    assert labels == ["", exit_kept.id_hex]  # the Exit menu follows the new file
    qtbot.mouseClick(w.button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: connected(c), timeout=CONNECT_MS)
    status = engine_status(app.sock)
    assert {h["id"] for h in status["circuit"]} <= {d.id_hex for d in subset}
    assert status["circuit"][-1]["id"] == exit_kept.id_hex  # the only exit the new file lists

    save_settings(qtbot, w, directory=str(network.directory))  # connected: from the next connect on
    qtbot.waitUntil(lambda: any("apply from the next connect" in line for line in w.log_view.visible_lines()),
                    timeout=5000)
    assert engine_status(app.sock)["directory"] == str(small.resolve())
    qtbot.mouseClick(w.button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: c.view.phase is EngineState.DISCONNECTED, timeout=10000)
    qtbot.mouseClick(w.button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: connected(c), timeout=CONNECT_MS)
    assert engine_status(app.sock)["directory"] == str(network.directory.resolve())
    assert c.link.engine_pid == pid and os.getpgid(pid) == pid  # one engine process all along
