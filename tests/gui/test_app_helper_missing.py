"""VPN mode without the privileged helper, against the REAL engine: ``shallot engine`` as a process that may
not configure the network (root with every capability dropped by setpriv, as
tests/integration/test_engine_control.py runs it; an ordinary user needs nothing dropped) and whose helper
path (SHALLOT_HELPER) does not exist.  The window shows the engine's own helper-missing error in plain
words and its "Connect in probe mode" makes the same engine process connect with a circuit only.

Safety: before the app may ask the engine for anything, the test reads the engine's capabilities from
/proc and refuses to go on if it could touch the host's network (an engine with CAP_NET_ADMIN would
configure routes in-process instead of looking for the helper)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from PySide6.QtCore import Qt

from shallot.app.settings import Settings, SettingsStore
from shallot.core.control.api import EngineMode, EngineState
from tests.gui.conftest import engine_status
from tests.integration.conftest import Proc, ProcGroup, RunningNetwork, control_call

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]
CAP_NET_ADMIN = 12


def capabilities(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
            fields[key] = int(value.split()[0], 16)
    return fields


def start_unprivileged_engine(procs: ProcGroup, sock: Path, helper: Path, *args: str | Path) -> Proc:
    drop = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"] if os.geteuid() == 0 else []
    argv = ["env", f"SHALLOT_HELPER={helper}", *drop, sys.executable, "-m", "shallot", "-v", "engine",
            "--socket", str(sock), *map(str, args)]
    proc = Proc(argv)  # env and setpriv exec: the pid is the engine's
    procs.started.append(proc)
    proc.wait_line("listening")
    caps = capabilities(proc.pid)
    if caps["CapEff"] >> CAP_NET_ADMIN & 1 or caps["CapPrm"] or caps["CapAmb"]:
        pytest.fail(f"refusing to go on: the engine could configure this host's network ({caps})")
    return proc


def assert_real_helper_missing_view(window, helper: Path) -> None:
    assert window.headline.text() == "The VPN helper is not installed"
    # the engine's own words (core/vpn/helper_client.py), with the path it looked for
    assert "privileged helper is not installed" in window.detail.text() and str(helper) in window.detail.text()
    assert "probe mode" in window.advice.text()
    assert window.mode_badge.text() == "VPN mode"
    assert window.action_button.isVisible() and window.action_button.text() == "Connect in probe mode"
    assert window.button.text() == "Connect"  # the engine gave up (a final error): the button starts over


def use_probe_mode(qtbot, app, engine: Proc) -> None:
    c, w = app.controller, app.window
    qtbot.mouseClick(w.action_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: c.view.phase is EngineState.CONNECTED and len(c.view.hops) == 3, timeout=30000)
    assert SettingsStore().load().settings.route_all is False  # remembered
    assert w.mode_badge.text() == "Probe mode" and c.view.mode is EngineMode.PROBE
    status = engine_status(app.sock)  # the engine says so itself, the same process all along
    assert (status["state"], status["mode"], status["error_code"]) == ("connected", "probe", "")
    assert [h["id"] for h in status["circuit"]] == [h.id for h in c.view.hops]
    assert engine.popen.poll() is None and c.link.engine_pid is None  # no engine of the app's own


def test_app_attaches_to_an_engine_stuck_at_the_missing_helper(qtbot, qloop, make_app, short_tmp: Path,
                                                               network: RunningNetwork) -> None:
    """An engine in VPN mode that another client asked to connect, already at the helper-missing error when
    the app starts: the app shows it at once and probe mode recovers it."""
    helper = short_tmp / "no-such-helper"
    sock = short_tmp / "vpn.sock"
    procs = ProcGroup()
    try:
        engine = start_unprivileged_engine(procs, sock, helper, "--vpn", "--directory", network.directory)
        asked = qloop.create_task(control_call(sock, "connect"))
        qtbot.waitUntil(asked.done, timeout=10000)
        assert asked.result()["mode"] == "vpn"
        qtbot.waitUntil(lambda: engine_status(sock)["state"] == "error", timeout=15000)

        app = make_app(Settings(source="directory", directory=str(network.directory), route_all=True), sock=sock)
        c = app.controller
        attach = c.spawn(c.attach_existing())
        qtbot.waitUntil(attach.done, timeout=10000)
        assert attach.result() is True
        qtbot.waitUntil(lambda: c.view.phase is EngineState.ERROR, timeout=5000)
        assert_real_helper_missing_view(app.window, helper)
        use_probe_mode(qtbot, app, engine)
    finally:
        procs.cleanup()


def test_connect_in_vpn_mode_without_the_helper_then_probe_mode(qtbot, qloop, make_app, short_tmp: Path,
                                                                network: RunningNetwork) -> None:
    """What a user without the helper sees: an idle engine (started as the app starts one: the socket and
    nothing else), "Route all traffic" on, Connect: the app sends ``configure`` with VPN mode, the engine
    looks for the helper and gives up with helper-missing; probe mode connects the same engine."""
    helper = short_tmp / "no-such-helper"
    sock = short_tmp / "idle.sock"
    procs = ProcGroup()
    try:
        engine = start_unprivileged_engine(procs, sock, helper)
        app = make_app(Settings(source="directory", directory=str(network.directory), route_all=True), sock=sock)
        c, w = app.controller, app.window
        attach = c.spawn(c.attach_existing())
        qtbot.waitUntil(attach.done, timeout=10000)
        assert attach.result() is True and c.view.phase is EngineState.DISCONNECTED

        qtbot.mouseClick(w.button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: c.view.phase is EngineState.ERROR, timeout=20000)
        assert_real_helper_missing_view(w, helper)
        status = engine_status(sock)
        assert (status["state"], status["error_code"], status["mode"]) == ("error", "helper-missing", "vpn")
        assert status["trying"] is False and status["circuits_built"] == 0
        use_probe_mode(qtbot, app, engine)
    finally:
        procs.cleanup()
