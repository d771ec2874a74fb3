"""The app's real MainWindow in a process of its own, for tests/gui/test_app_theme.py: Qt's platform theme is
chosen when the QApplication starts (here the xdgdesktopportal theme on the test's private session bus),
so this cannot run in the pytest process.

    python theme_app.py THEME     # THEME: the app's setting, "system", "light" or "dark"

prints "theme NAME WINDOW-COLOUR PIXEL SCHEME" when the window is up and after every change of the desktop's
colour scheme: the app's theme, the palette's window colour, a pixel of the rendered window and the scheme
Qt has from the desktop."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from PySide6.QtCore import QTimer
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QApplication

from shallot.app.controller import AppController
from shallot.app.settings import Settings, SettingsStore
from shallot.app.window import MainWindow


def main() -> None:
    app = QApplication([sys.argv[0]])
    root = Path(tempfile.mkdtemp(prefix="shallot-theme-"))
    os.environ["XDG_STATE_HOME"] = str(root)
    store = SettingsStore(root / "settings.json")
    controller = AppController(store, socket=root / "nobody.sock", settings=Settings(theme=sys.argv[1]),
                               persist=False)
    window = MainWindow(controller)
    window.show()

    def report() -> None:
        window_colour = QApplication.palette().window().color().name()
        pixel = window.grab().toImage().pixelColor(3, 3).name()
        scheme = QGuiApplication.styleHints().colorScheme().name
        print(f"theme {window.theme.name} {window_colour} {pixel} {scheme}", flush=True)

    # connected after the window's own slot, so this reports what the window made of the change
    QGuiApplication.styleHints().colorSchemeChanged.connect(lambda _scheme: QTimer.singleShot(0, report))
    QTimer.singleShot(0, report)
    app.exec()


if __name__ == "__main__":
    main()
