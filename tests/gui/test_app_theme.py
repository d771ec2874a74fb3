"""The theme "system" follows the desktop's light/dark setting, live (docs/APP.md "Look").  The desktop is a
private D-Bus session bus with xdg-desktop-portal's Settings interface on it (tests/gui/fake_portal.py), the
way GNOME and KDE tell Qt their colour scheme; the app is the real MainWindow in its own process with Qt's
xdgdesktopportal platform theme (tests/gui/theme_app.py).  Nothing here touches the user's session bus."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shallot.app.theme import DARK, LIGHT, Theme
from tests.gui.fake_portal import PREFER_DARK, PREFER_LIGHT, FakePortal
from tests.integration.conftest import Proc, ProcGroup

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def procs() -> Iterator[ProcGroup]:
    group = ProcGroup()
    try:
        yield group
    finally:
        group.cleanup()  # by PID: SIGTERM, then SIGKILL


@pytest.fixture
def session_bus(short_tmp: Path) -> Iterator[str]:
    """A dbus-daemon of this test's own, on a socket in its temporary directory."""
    daemon = shutil.which("dbus-daemon")
    if daemon is None:
        if os.environ.get("CI") == "true":
            pytest.fail("dbus-daemon is missing (Debian: dbus-daemon)")
        pytest.skip("needs dbus-daemon (Debian: dbus-daemon)")
    address = f"unix:path={short_tmp / 'bus'}"
    proc = subprocess.Popen([daemon, "--session", "--nofork", "--print-address=1", f"--address={address}"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once it listens
        assert line.startswith(address), line
        yield line.strip()
    finally:
        proc.kill()  # ours, by its Popen
        proc.wait(10)


@pytest.fixture
def portal_on(session_bus: str) -> Iterator[list[FakePortal]]:
    made: list[FakePortal] = []
    yield made
    for portal in made:
        portal.close()


def start_app(procs: ProcGroup, bus: str, theme: str) -> Proc:
    env = {"DBUS_SESSION_BUS_ADDRESS": bus, "QT_QPA_PLATFORM": "offscreen", "QT_QPA_PLATFORMTHEME": "xdgdesktopportal",
           "PYTHONPATH": str(ROOT)}
    proc = Proc(["env", *(f"{k}={v}" for k, v in env.items()), sys.executable, str(ROOT / "tests/gui/theme_app.py"),
                 theme])
    procs.started.append(proc)
    return proc


def shown(theme: Theme, scheme: str) -> str:
    """theme_app.py's line: the app's theme, the palette's window colour, a rendered pixel, Qt's scheme."""
    return f"theme {theme.name} {theme.window} {theme.window} {scheme}"


def test_system_theme_follows_the_desktop_live(procs: ProcGroup, session_bus: str,
                                               portal_on: list[FakePortal]) -> None:
    portal = FakePortal(session_bus, PREFER_DARK)
    portal_on.append(portal)
    app = start_app(procs, session_bus, "system")
    app.wait_line(shown(DARK, "Dark"))  # the desktop prefers dark when the app starts
    portal.set(PREFER_LIGHT)
    app.wait_line(shown(LIGHT, "Light"))  # and the window follows while it runs
    portal.set(PREFER_DARK)
    app.wait_line(shown(DARK, "Dark"))


def test_a_chosen_theme_ignores_the_desktop(procs: ProcGroup, session_bus: str,
                                            portal_on: list[FakePortal]) -> None:
    """The control: with "light" chosen, the same desktop change reaches Qt and the window stays light."""
    portal = FakePortal(session_bus, PREFER_LIGHT)
    portal_on.append(portal)
    app = start_app(procs, session_bus, "light")
    app.wait_line(shown(LIGHT, "Light"))
    portal.set(PREFER_DARK)
    app.wait_line(shown(LIGHT, "Dark"))
