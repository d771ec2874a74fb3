"""Render the app's states into docs/screenshots/*.png.

    .venv/bin/python scripts/screenshots.py            # offscreen (no display needed)
    xvfb-run -a .venv/bin/python scripts/screenshots.py --platform xcb   # the real X11 look

Real runs where a state can be reached on one machine: the window starts the demo network (relay
processes on 127.0.0.1) and a real engine, then shows "disconnected", "connected" (light and dark),
a bad directory file and the settings dialog.  States that need a network failing on cue - connecting
mid-build, reconnecting after a drop, the VPN helper missing - are rendered by handing the same window the
engine snapshot of that state (the JSON of docs/PROTOCOL.md §9.5) through the controller, the path every
engine event takes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "screenshots"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--platform", default="offscreen", help="Qt platform plugin (offscreen, xcb)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    os.environ["QT_QPA_PLATFORM"] = args.platform
    os.environ["QT_API"] = "pyside6"
    tmp = Path(tempfile.mkdtemp(prefix="shallot-shots-"))
    os.environ["XDG_CONFIG_HOME"] = str(tmp / "config")  # never the user's settings
    os.environ["XDG_STATE_HOME"] = str(tmp / "state")
    import qasync
    from PySide6.QtWidgets import QApplication
    app = QApplication([sys.argv[0]])
    app.setApplicationName("Shallot")
    loop = qasync.QEventLoop(app)
    asyncio.set_event_loop(loop)
    args.out.mkdir(parents=True, exist_ok=True)
    with loop:
        return loop.run_until_complete(shoot(app, args.out))


async def shoot(app: object, out: Path) -> int:
    from shallot.app.controller import AppController
    from shallot.app.demo_network import DemoNetwork
    from shallot.app.presenter import Problem
    from shallot.app.settings import Settings, SettingsStore
    from shallot.app.window import MainWindow
    from shallot.core.control.api import EngineState, ErrorKind

    demo = DemoNetwork()
    directory = await demo.start()
    store = SettingsStore()
    controller = AppController(store, socket=demo.socket, settings=Settings(directory=str(directory), theme="light"),
                               persist=False)
    window = MainWindow(controller, demo=True)
    window.resize(1060, 720)
    window.show()

    async def settle(seconds: float = 0.4) -> None:
        await asyncio.sleep(seconds)

    def grab(name: str) -> None:
        window.grab().save(str(out / f"{name}.png"), "PNG")
        print(f"wrote {out / name}.png", flush=True)

    async def until(cond: object, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise SystemExit("timed out waiting for the window")
            await asyncio.sleep(0.05)

    status = 0
    try:
        await settle()
        grab("disconnected")

        controller.connect_vpn()
        await until(lambda: controller.view.phase is EngineState.CONNECTED and controller.snapshot is not None
                    and controller.snapshot.rtt_ms is not None)
        await settle(6.5)  # a few speed samples and a second ping in the graph
        grab("connected")
        real = controller.snapshot
        assert real is not None
        hops = [{"id": h.id, "nickname": h.nickname, "address": h.address, "exit": h.exit,
                 "rtt_ms": h.rtt_ms} for h in real.circuit]
        base = {"directory": str(directory), "exit": None, "build_ms": real.build_ms, "rtt_ms": real.rtt_ms,
                "circuit_since": real.circuit_since, "circuits_built": real.circuits_built,
                "bytes_sent": real.bytes_sent, "bytes_received": real.bytes_received}

        controller.apply_settings(controller.settings.replace(theme="dark"))
        await settle(1.0)
        grab("connected-dark")
        controller.apply_settings(controller.settings.replace(theme="light"))

        controller.new_circuit()
        await until(lambda: controller.snapshot is not None
                    and controller.snapshot.circuits_built > real.circuits_built)
        controller.disconnect_vpn()
        await until(lambda: controller.view.phase is EngineState.DISCONNECTED)
        await controller.link.shutdown_engine()  # the stand-in snapshots below must not race a live engine

        names = " ".join(h["nickname"] for h in hops)
        controller._on_snapshot({**base, "state": "connecting", "step": f"building a circuit through "
                                 f"{names.replace(' ', ', ')}", "error": "", "circuit": [],
                                 "connected_since": None}, False)
        await settle()
        grab("connecting")
        controller._on_snapshot({**base, "state": "reconnecting", "step": "retrying in 2 s",
                                 "error": "the circuit stopped answering", "circuit": [],
                                 "connected_since": time.time() - 754}, False)
        await settle()
        grab("reconnecting")
        controller._on_snapshot({**base, "state": "error", "mode": "vpn", "error_code": "helper-missing",
                                 "step": "", "error": "the privileged helper (pkexec policy for shallot) is not "
                                 "installed", "circuit": [], "connected_since": None}, False)
        await settle()
        grab("error-helper-missing")

        controller.snapshot = None
        controller.fail(Problem(ErrorKind.BAD_DIRECTORY, f"directory file {Path.home()}/relays.dir does not exist"))
        await settle()
        grab("error-directory")
        controller.problem = None
        controller._refresh()

        dialog = window.open_settings()
        await settle(0.6)
        dialog.grab().save(str(out / "settings.png"), "PNG")
        print(f"wrote {out / 'settings.png'}", flush=True)
        dialog.reject()
    except SystemExit as exc:
        print(f"screenshots: {exc}", file=sys.stderr)
        status = 1
    finally:
        await controller.shutdown(disconnect=True)
        await demo.stop()
    return status


if __name__ == "__main__":
    sys.exit(main())
