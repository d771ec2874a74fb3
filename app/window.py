"""The main window: the Connect button and what is happening, the circuit, traffic, and the log.  It only
shows what the controller says and forwards clicks to it; nothing here waits for the engine."""

from __future__ import annotations

import logging
import time

import shiboken6
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QAction, QCloseEvent, QColor, QGuiApplication, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QComboBox,
    QFrame,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMessageBox,
    QPushButton,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from shallot.app import theme as themes
from shallot.app.circuit_view import CircuitView
from shallot.app.connect_button import ConnectButton
from shallot.app.controller import AppController
from shallot.app.icons import app_icon, render
from shallot.app.log_view import LogView
from shallot.app.presenter import ViewAction, ViewState, format_bytes, format_duration, format_ms, format_rate
from shallot.app.settings import Settings
from shallot.app.settings_dialog import SettingsDialog
from shallot.app.speed_graph import SpeedGraph
from shallot.app.tray import Tray
from shallot.core.control.api import EngineMode, EngineState, StatusSnapshot

log = logging.getLogger("shallot.app")
ACTION_TEXT = {ViewAction.PROBE_MODE: "Connect in probe mode", ViewAction.SETTINGS: "Open settings…",
               ViewAction.RETRY: "Try again", ViewAction.UNBLOCK: "Unblock"}


def card(title: str | None = None) -> tuple[QFrame, QVBoxLayout]:
    frame = QFrame()
    frame.setObjectName("card")
    lay = QVBoxLayout(frame)
    lay.setContentsMargins(16, 14, 16, 14)
    lay.setSpacing(10)
    if title:
        lay.addWidget(card_title(title))
    return frame, lay


def card_title(text: str) -> QLabel:
    label = QLabel(text)
    label.setObjectName("cardTitle")
    return label


def card_with_header(title: str) -> tuple[QFrame, QVBoxLayout, QHBoxLayout]:
    """A card whose first row is its title on the left and whatever the caller adds on the right."""
    frame, lay = card()
    top = QHBoxLayout()
    top.addWidget(card_title(title))
    top.addStretch(1)
    lay.addLayout(top)
    return frame, lay, top


class Stat(QWidget):
    def __init__(self, name: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        self.name = QLabel(name)
        self.name.setObjectName("statName")
        self.value = QLabel("\u2013")
        self.value.setObjectName("statValue")
        lay.addWidget(self.name)
        lay.addWidget(self.value)


class MainWindow(QMainWindow):
    quit_finished = Signal()

    def __init__(self, controller: AppController, *, demo: bool = False) -> None:
        super().__init__()
        self.controller = controller
        self.demo = demo
        self.quitting = False
        self._told_about_tray = False
        self.theme = themes.LIGHT
        self.setWindowTitle("Shallot" + (" — demo network" if demo else ""))
        self.setWindowIcon(app_icon())
        self.resize(1060, 720)
        self.setMinimumSize(820, 560)

        root = QWidget()
        outer = QVBoxLayout(root)
        outer.setContentsMargins(18, 14, 18, 18)
        outer.setSpacing(14)
        outer.addLayout(self._header())
        body = QHBoxLayout()
        body.setSpacing(14)
        body.addWidget(self._hero(), 4)
        right = QVBoxLayout()
        right.setSpacing(14)
        right.addWidget(self._circuit_card())
        right.addWidget(self._traffic_card())
        body.addLayout(right, 7)
        outer.addLayout(body, 1)
        self.log_card, log_lay = card()
        self.log_view = LogView()
        log_lay.addWidget(self.log_view)
        outer.addWidget(self.log_card)
        self.setCentralWidget(root)

        self.tray = Tray(self)
        self.tray.toggle_item.triggered.connect(controller.toggle)
        self.tray.new_circuit_item.triggered.connect(controller.new_circuit)
        self.tray.show_item.triggered.connect(self.show_from_tray)
        self.tray.quit_item.triggered.connect(self.request_quit)
        self.tray.activated.connect(lambda reason: self.show_from_tray()
                                    if reason == Tray.ActivationReason.Trigger else None)
        if Tray.available():
            self.tray.show()
        self._actions()

        controller.view_changed.connect(self.show_view)
        controller.snapshot_changed.connect(self.show_snapshot)
        controller.traffic.connect(self._traffic)
        controller.log_record.connect(self.log_view.add)
        controller.notify.connect(self.tray.message)
        controller.settings_changed.connect(self._settings_changed)
        self._clock = QTimer(self)
        self._clock.setInterval(1000)
        self._clock.timeout.connect(self._tick)
        self._clock.start()
        hints = QGuiApplication.styleHints()
        if hasattr(hints, "colorSchemeChanged"):
            hints.colorSchemeChanged.connect(lambda _s: self.apply_theme())
        self.apply_theme()
        self._reload_exits()
        self.show_view(controller.view)
        for problem in controller.load_problems:
            self.log_view.add(logging.WARNING, "shallot.app", problem)
        if controller.load_problems:
            self.settings_note.setText("⚠ " + controller.load_problems[0])
            self.settings_note.show()

    # ------------------------------------------------------------------ building
    def _header(self) -> QHBoxLayout:
        bar = QHBoxLayout()
        icon = QLabel()
        icon.setPixmap(render(30, self.devicePixelRatioF()))
        bar.addWidget(icon)
        brand = QLabel("Shallot")
        brand.setObjectName("brand")
        bar.addWidget(brand)
        self.mode_badge = QLabel("Probe mode")
        self.mode_badge.setObjectName("badge")
        bar.addWidget(self.mode_badge)
        if self.demo:
            demo = QLabel("Demo network on 127.0.0.1")
            demo.setObjectName("badge")
            bar.addWidget(demo)
        bar.addStretch(1)
        self.settings_note = QLabel("")
        self.settings_note.setObjectName("error")
        self.settings_note.hide()
        bar.addWidget(self.settings_note)
        self.log_button = QToolButton()
        self.log_button.setText("Log")
        self.log_button.setToolTip("Show or hide the log (Ctrl+L)")
        self.log_button.clicked.connect(self.toggle_log)
        bar.addWidget(self.log_button)
        self.settings_button = QToolButton()
        self.settings_button.setText("Settings")
        self.settings_button.setToolTip("Settings (Ctrl+,)")
        self.settings_button.clicked.connect(self.open_settings)
        bar.addWidget(self.settings_button)
        return bar

    def _hero(self) -> QFrame:
        frame, lay = card()
        lay.setSpacing(8)
        lay.addStretch(1)
        self.button = ConnectButton()
        self.button.clicked.connect(self.controller.toggle)
        lay.addWidget(self.button, 0, Qt.AlignmentFlag.AlignHCenter)
        lay.addSpacing(6)
        self.headline = QLabel("Not connected")
        self.headline.setObjectName("headline")
        self.headline.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.headline.setWordWrap(True)
        self.detail = QLabel("")
        self.detail.setObjectName("detail")
        self.advice = QLabel("")
        self.advice.setObjectName("advice")
        for label in (self.detail, self.advice):
            label.setAlignment(Qt.AlignmentFlag.AlignCenter)
            label.setWordWrap(True)
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(self.headline)
        lay.addWidget(self.detail)
        lay.addWidget(self.advice)
        self.action_button = QPushButton("")
        self.action_button.setObjectName("action")
        self.action_button.clicked.connect(self._action)
        self.action_button.hide()
        lay.addWidget(self.action_button, 0, Qt.AlignmentFlag.AlignHCenter)
        lay.addStretch(1)
        frame.setMinimumWidth(300)
        return frame

    def _circuit_card(self) -> QFrame:
        frame, lay, top = card_with_header("Circuit")
        top.addWidget(QLabel("Exit"))
        self.exit_choice = QComboBox()
        self.exit_choice.setAccessibleName("Exit relay")
        self.exit_choice.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        self.exit_choice.activated.connect(self._exit_chosen)
        top.addWidget(self.exit_choice)
        self.new_circuit_button = QPushButton("New circuit")
        self.new_circuit_button.setToolTip("Build a new circuit through other relays (Ctrl+N)")
        self.new_circuit_button.clicked.connect(self.controller.new_circuit)
        top.addWidget(self.new_circuit_button)
        self.circuit_view = CircuitView()
        lay.addWidget(self.circuit_view)
        self.circuit_note = QLabel(" ")
        self.circuit_note.setObjectName("muted")
        lay.addWidget(self.circuit_note)
        return frame

    def _traffic_card(self) -> QFrame:
        frame, lay, top = card_with_header("Traffic")
        self.legend = QLabel("")
        self.legend.setObjectName("muted")
        top.addWidget(self.legend)
        self.graph = SpeedGraph()
        self.graph.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        lay.addWidget(self.graph, 1)
        stats = QHBoxLayout()
        self.stat_up, self.stat_down = Stat("Upload"), Stat("Download")
        self.stat_sent, self.stat_received = Stat("Sent"), Stat("Received")
        self.stat_time, self.stat_rtt = Stat("Connected for"), Stat("Round trip")
        for s in (self.stat_up, self.stat_down, self.stat_sent, self.stat_received, self.stat_time, self.stat_rtt):
            stats.addWidget(s)
        lay.addLayout(stats)
        return frame

    def _actions(self) -> None:
        def add(text: str, keys: str, slot: object, also: QKeySequence.StandardKey | None = None) -> QAction:
            """``keys`` always (what APP.md promises); ``also`` the platform's own bindings for the same command
            (QKeySequence(StandardKey) would keep only the first, and some platforms have none for Quit)."""
            action = QAction(text, self)
            shortcuts = [QKeySequence(keys)]
            if also is not None:
                shortcuts += [k for k in QKeySequence.keyBindings(also) if k not in shortcuts]
            action.setShortcuts(shortcuts)
            action.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
            action.triggered.connect(slot)
            self.addAction(action)
            return action

        self.toggle_action = add("Connect or disconnect", "Ctrl+Return", self.controller.toggle)
        self.new_circuit_action = add("New circuit", "Ctrl+N", self.controller.new_circuit)
        add("Settings", "Ctrl+,", self.open_settings)
        add("Log", "Ctrl+L", self.toggle_log)
        add("Quit", "Ctrl+Q", self.request_quit, QKeySequence.StandardKey.Quit)
        add("Close window", "Ctrl+W", self.close, QKeySequence.StandardKey.Close)

    # ------------------------------------------------------------------ showing
    def show_view(self, view: ViewState) -> None:
        self.button.show_state(view.phase, view.button_text, view.button_busy)
        self.headline.setText(view.headline)
        colour = themes.STATE_COLOURS[view.phase] if view.phase is not EngineState.DISCONNECTED else self.theme.text
        pal = self.headline.palette()  # a palette, not a style sheet: no re-polish of the window per state
        pal.setColor(pal.ColorRole.WindowText, QColor(colour))
        self.headline.setPalette(pal)
        self.detail.setText(view.detail)
        self.advice.setText(view.advice)
        self.advice.setVisible(bool(view.advice))
        self.action_button.setVisible(view.action is not None)
        self.action_button.setText(ACTION_TEXT[view.action] if view.action is not None else "")
        self.mode_badge.setText("VPN mode" if view.mode is EngineMode.VPN else "Probe mode")
        self.mode_badge.setToolTip("All traffic goes through the circuit." if view.mode is EngineMode.VPN else
                                   "Circuit only: your system's traffic is not routed through it.")
        self.circuit_view.show_circuit(view.hops, view.phase, guard_tip=view.guard_tip)
        self.new_circuit_button.setEnabled(view.can_new_circuit)
        self.new_circuit_action.setEnabled(view.can_new_circuit)
        self.tray.show_state(view)
        if view.phase is EngineState.DISCONNECTED:
            self.graph.clear()
        if view.phase is not EngineState.CONNECTED:  # no stale speeds beside a headline that says otherwise
            self.stat_up.value.setText("\u2013")
            self.stat_down.value.setText("\u2013")

    def show_snapshot(self, snap: StatusSnapshot | None) -> None:
        if snap is None:
            self.circuit_note.setText(" ")
            return
        self.stat_sent.value.setText(format_bytes(snap.bytes_sent))
        self.stat_received.value.setText(format_bytes(snap.bytes_received))
        self.stat_rtt.value.setText(format_ms(snap.rtt_ms) if snap.circuit else "\u2013")
        if snap.circuit and snap.build_ms is not None:
            note = f"Built in {format_ms(snap.build_ms)} (one round trip) · circuit #{snap.circuits_built}"
            if snap.mode is not EngineMode.VPN:
                note += " · probe mode: pings the exit's echo service"
            self.circuit_note.setText(note)
        elif snap.state is EngineState.DISCONNECTED:
            self.circuit_note.setText(" ")
        self._tick()

    def _traffic(self, up: float, down: float) -> None:
        self.graph.add(up, down)
        self.stat_up.value.setText(format_rate(up))
        self.stat_down.value.setText(format_rate(down))

    def _tick(self) -> None:
        snap = self.controller.snapshot
        if snap is not None and snap.connected_since is not None and snap.state is not EngineState.DISCONNECTED:
            self.stat_time.value.setText(format_duration(time.time() - snap.connected_since))
        else:
            self.stat_time.value.setText("\u2013")

    def apply_theme(self) -> None:
        self.theme = themes.resolve(self.controller.settings.theme)
        app = QApplication.instance()
        if isinstance(app, QApplication):
            themes.apply(app, self.theme)
        self.graph.set_theme(self.theme)
        t = self.theme
        self.legend.setText(f"<span style='color:{t.graph_up}'>▲ up</span>&nbsp;&nbsp;"
                            f"<span style='color:{t.graph_down}'>▼ down</span>")
        self.show_view(self.controller.view)

    def _reload_exits(self) -> None:
        self.exit_choice.clear()
        self.exit_choice.addItem("Automatic", "")
        for exit_id, label in self.controller.exits():
            self.exit_choice.addItem(label, exit_id)
        index = self.exit_choice.findData(self.controller.settings.exit)
        self.exit_choice.setCurrentIndex(max(0, index))

    # ------------------------------------------------------------------ user actions
    def _exit_chosen(self, index: int) -> None:
        self.controller.choose_exit(self.exit_choice.itemData(index) or "")

    def _action(self) -> None:
        run = {ViewAction.PROBE_MODE: self.controller.use_probe_mode, ViewAction.SETTINGS: self.open_settings,
               ViewAction.RETRY: self.controller.retry, ViewAction.UNBLOCK: self.controller.unblock}
        action = self.controller.view.action
        if action is not None:
            run[action]()

    def _settings_changed(self, settings: Settings) -> None:
        self._reload_exits()
        self.apply_theme()
        self.settings_note.hide()

    def toggle_log(self) -> None:
        self.log_card.setVisible(not self.log_card.isVisible())

    def open_settings(self) -> SettingsDialog:
        dialog = SettingsDialog(self.controller.settings, self)
        dialog.setWindowModality(Qt.WindowModality.WindowModal)
        dialog.finished.connect(lambda code: self._settings_done(dialog, code))
        dialog.open()  # not exec(): a nested loop would stall the engine's tasks while the dialog is up
        return dialog

    def _settings_done(self, dialog: SettingsDialog, code: int) -> None:
        if code and dialog.result_settings is not None:
            self.controller.apply_settings(dialog.result_settings)
            log.info("settings saved")
        dialog.deleteLater()

    def show_from_tray(self) -> None:
        self.showNormal()
        self.raise_()
        self.activateWindow()

    def closeEvent(self, event: QCloseEvent) -> None:
        if self.quitting:
            event.accept()
            return
        event.ignore()
        if Tray.available() and self.tray.isVisible():
            self.hide()  # the connection stays; the tray brings the window back
            if not self._told_about_tray:
                self._told_about_tray = True
                self.tray.message("Shallot is still running", "The connection stays up. Quit from the tray menu.")
            return
        self.request_quit()

    def request_quit(self) -> None:
        """Quit: when connected, ask whether to disconnect first."""
        snap = self.controller.snapshot
        if self.demo or snap is None or snap.state is EngineState.DISCONNECTED:
            self.finish_quit(disconnect=self.demo)
            return
        box = QMessageBox(self)
        box.setIcon(QMessageBox.Icon.Question)
        box.setWindowTitle("Quit Shallot")
        box.setText("Disconnect before quitting?")
        box.setInformativeText("If you stay connected, the Shallot engine keeps your circuit running without "
                               "the window; open Shallot again to see it.")
        disconnect = box.addButton("Disconnect and quit", QMessageBox.ButtonRole.DestructiveRole)
        stay = box.addButton("Quit, stay connected", QMessageBox.ButtonRole.AcceptRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(stay)
        box.setWindowModality(Qt.WindowModality.WindowModal)

        def done(_code: int) -> None:
            clicked = box.clickedButton()
            if clicked in (disconnect, stay):
                self.finish_quit(disconnect=clicked is disconnect)

        box.finished.connect(done)
        box.open()
        self.quit_box = box

    def finish_quit(self, *, disconnect: bool) -> None:
        self.quitting = True
        self.headline.setText("Quitting…")
        task = self.controller.spawn(self.controller.shutdown(disconnect=disconnect))
        task.add_done_callback(lambda _t: self._quit_done())

    def _quit_done(self) -> None:
        if not shiboken6.isValid(self):  # the window went first (e.g. torn down by a test)
            return
        self.tray.hide()
        self.quit_finished.emit()
        self.close()
