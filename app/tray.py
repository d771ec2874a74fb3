"""The system tray icon: the state as a coloured dot and a tooltip, a menu to connect, disconnect, show
the window and quit, and the notifications for a dropped or restored connection."""

from __future__ import annotations

from PySide6.QtGui import QAction
from PySide6.QtWidgets import QMenu, QSystemTrayIcon, QWidget

from shallot.app.icons import state_icon
from shallot.app.presenter import ViewState
from shallot.core.control.api import EngineState


class Tray(QSystemTrayIcon):
    def __init__(self, window: QWidget) -> None:
        super().__init__(state_icon(EngineState.DISCONNECTED), window)
        self.window = window
        self.menu = QMenu(window)
        self.state_item = QAction("Not connected", self.menu)
        self.state_item.setEnabled(False)
        self.toggle_item = QAction("Connect", self.menu)
        self.new_circuit_item = QAction("New circuit", self.menu)
        self.show_item = QAction("Show Shallot", self.menu)
        self.quit_item = QAction("Quit", self.menu)
        for item in (self.state_item, None, self.toggle_item, self.new_circuit_item, None, self.show_item,
                     self.quit_item):
            if item is None:
                self.menu.addSeparator()
            else:
                self.menu.addAction(item)
        self.setContextMenu(self.menu)
        self.setToolTip("Shallot: not connected")
        self.last_message: tuple[str, str] | None = None
        self._phase: EngineState | None = None

    @staticmethod
    def available() -> bool:
        return QSystemTrayIcon.isSystemTrayAvailable()

    def show_state(self, view: ViewState) -> None:
        if view.phase is not self._phase:
            self._phase = view.phase
            self.setIcon(state_icon(view.phase))
        self.state_item.setText(view.headline)
        self.setToolTip(f"Shallot: {view.headline}\n{view.detail}")
        self.toggle_item.setText(view.button_text)
        self.new_circuit_item.setEnabled(view.can_new_circuit)

    def message(self, title: str, text: str) -> None:
        self.last_message = (title, text)
        if self.isVisible() and self.supportsMessages():
            self.showMessage(title, text, state_icon(self._phase or EngineState.DISCONNECTED), 6000)
