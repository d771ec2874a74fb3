"""``shallot app``: the composition root.  One QApplication, one qasync loop (asyncio on Qt's loop) that
runs the controller's conversations with the engine, and the window.  The engine runs in its own process;
nothing of the data plane runs here.

``--demo`` starts the local network of ``shallot demo`` first (its own socket and settings that are not
saved), ``--autoconnect`` connects at once and ``--screenshot FILE`` writes the window to a PNG when it is
connected (status 0) or shows an error or times out (status 1), then quits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from shallot.app.cli_args import display_available
from shallot.core.errors import ShallotError

log = logging.getLogger("shallot.app")
SCREENSHOT_SETTLE_S = 2.5  # after connecting: two speed samples and a measured round trip in the picture


def run_app(args: argparse.Namespace) -> int:
    if args.screenshot is not None and not display_available():
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # a picture needs no screen
    if not display_available() and not os.environ.get("QT_QPA_PLATFORM"):
        raise ShallotError("no display to open a window on (DISPLAY and WAYLAND_DISPLAY are unset); "
                           "use 'shallot connect' or 'shallot engine' without one")
    if args.screenshot is not None:
        args.screenshot = args.screenshot.resolve()
        if not args.screenshot.parent.is_dir():
            raise ShallotError(f"cannot write {args.screenshot}: {args.screenshot.parent} is not a directory")
    root = logging.getLogger()
    for handler in root.handlers:  # the terminal keeps the -v level; the log view gets everything
        if handler.level == logging.NOTSET:
            handler.setLevel(root.level)
    os.environ.setdefault("QT_API", "pyside6")  # qasync must bind to PySide6, whatever else is installed
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QGuiApplication
    from PySide6.QtWidgets import QApplication

    QGuiApplication.setHighDpiScaleFactorRoundingPolicy(Qt.HighDpiScaleFactorRoundingPolicy.PassThrough)
    app = QApplication.instance() or QApplication([sys.argv[0]])
    assert isinstance(app, QApplication)
    app.setApplicationName("Shallot")
    app.setApplicationDisplayName("Shallot")
    app.setDesktopFileName("shallot")
    app.setQuitOnLastWindowClosed(False)  # the tray keeps the app; Quit ends it
    import qasync

    loop = qasync.QEventLoop(app)
    asyncio.set_event_loop(loop)
    session = AppSession(app, args)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(session.run())
    finally:
        session.cleanup()
        with contextlib.suppress(Exception):
            loop.close()
        asyncio.set_event_loop(None)
    return session.status


class AppSession:
    def __init__(self, app: Any, args: argparse.Namespace) -> None:
        from shallot.app.controller import AppController
        from shallot.app.demo_network import DemoNetwork
        from shallot.app.icons import app_icon
        from shallot.app.settings import SettingsStore
        from shallot.app.window import MainWindow
        from shallot.core.control.paths import default_socket

        self.app, self.args = app, args
        self.status = 0
        app.setWindowIcon(app_icon())
        self.demo = DemoNetwork() if args.demo else None
        store = SettingsStore()
        loaded = store.load()
        settings = loaded.settings
        if args.theme:
            settings = settings.replace(theme=args.theme)
        if self.demo is not None:
            settings = settings.replace(source="directory", directory="", route_all=False, exit="")
            sock = self.demo.socket
        else:
            sock = args.socket or default_socket(create=True)
        self.controller = AppController(store, socket=sock, settings=settings, persist=self.demo is None)
        self.controller.load_problems = loaded.problems
        self.window = MainWindow(self.controller, demo=self.demo is not None)
        self.done = asyncio.Event()
        self.window.quit_finished.connect(self.done.set)
        signal.signal(signal.SIGINT, lambda *_a: self.window.finish_quit(disconnect=self.demo is not None))
        signal.signal(signal.SIGTERM, lambda *_a: self.window.finish_quit(disconnect=self.demo is not None))

    async def run(self) -> None:
        from shallot.app.presenter import Problem
        from shallot.app.tray import Tray
        from shallot.core.control.api import ErrorKind

        minimized = (self.args.minimized or self.controller.settings.start_minimized) and Tray.available() \
            and self.args.screenshot is None
        if not minimized:
            self.window.show()
        watcher = None
        if self.args.screenshot is not None:
            watcher = self.controller.spawn(self._screenshot(self.args.screenshot, self.args.timeout))
        if self.demo is not None:
            self.controller.set_starting("starting the demo network: 6 relays on 127.0.0.1")
            try:
                directory = await self.demo.start()
            except ShallotError as exc:
                self.controller.starting = ""
                self.controller.fail(Problem(ErrorKind.ENGINE_START, f"the demo network did not start: {exc}"))
            else:
                self.controller.starting = ""
                self.controller.apply_settings(self.controller.settings.replace(directory=str(directory)))
        else:
            await self.controller.attach_existing()
        if (self.args.autoconnect or self.controller.settings.connect_on_start) and self.controller.problem is None:
            self.controller.connect_vpn()
        await self.done.wait()
        if watcher is not None:
            watcher.cancel()

    async def _screenshot(self, path: Path, timeout: float) -> None:
        from shallot.core.control.api import EngineState

        deadline = time.monotonic() + timeout
        connected = False
        while time.monotonic() < deadline:
            view = self.controller.view
            snap = self.controller.snapshot
            if view.phase is EngineState.CONNECTED and view.hops and snap is not None and snap.rtt_ms is not None:
                connected = True
                break
            if view.phase is EngineState.ERROR:
                break
            await asyncio.sleep(0.1)
        else:
            from shallot.app.presenter import Problem
            from shallot.core.control.api import ErrorKind
            self.controller.fail(Problem(ErrorKind.CIRCUIT, f"no connection within {timeout:.0f} s"))
        if connected:
            await asyncio.sleep(SCREENSHOT_SETTLE_S)
            connected = self.controller.view.phase is EngineState.CONNECTED
        else:
            await asyncio.sleep(0.3)  # let the error state paint
        pixmap = self.window.grab()
        if not pixmap.save(str(path), "PNG"):
            log.error("could not write %s", path)
            connected = False
        self.status = 0 if connected else 1
        print(f"shallot: {'connected' if connected else 'not connected'}; wrote {path}", flush=True)
        started = self.controller.link.started_by_us or self.demo is not None
        self.window.finish_quit(disconnect=started)

    def cleanup(self) -> None:
        """Whatever happened: the engine we started and the demo relays do not outlive us by accident."""
        proc = self.controller.link.proc
        if proc is not None and proc.poll() is None and (
                self.demo is not None or (self.status != 0 and self.args.screenshot is not None)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        if self.demo is not None:
            self.demo.stop_blocking()
