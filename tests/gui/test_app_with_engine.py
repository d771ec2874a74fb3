"""The window drives a REAL engine process (started by the app) against a real local network of relay
processes on 127.0.0.1: click Connect, see the engine's circuit, ask for a new one, disconnect; bad
inputs end in a readable error state; the Qt loop keeps serving timers while circuits are built."""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path

import pytest
from PySide6.QtCore import Qt, QTimer

from shallot.app.presenter import format_ms
from shallot.app.settings import Settings
from shallot.core.control.api import EngineState
from tests.gui.conftest import engine_status
from tests.integration.conftest import Proc, ProcGroup, RunningNetwork

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]
CONNECT_MS = 30000


def directory_settings(network: RunningNetwork, **kw: object) -> Settings:
    return Settings(source="directory", directory=str(network.directory), **kw)


def wait_phase(qtbot, controller, phase: EngineState, timeout: int = CONNECT_MS) -> None:
    qtbot.waitUntil(lambda: controller.view.phase is phase and
                    (phase is not EngineState.CONNECTED or len(controller.view.hops) == 3), timeout=timeout)


def shown_ids(window) -> list[str]:
    return [short_id for _nick, short_id, _addr in window.circuit_view.shown()]


def assert_readable(text: str) -> None:
    assert text.strip(), "empty message"
    for junk in ("Traceback", "File \"", "Error(", "<class", "None"):
        assert junk not in text, text


def shown_rtt_ms(window, role: str) -> float | None:
    """The round trip a hop's card shows, in ms; None for the dash of "not measured"."""
    text = window.circuit_view.cards[role].latency.text()
    if text == "rtt \u2013":
        return None
    match = re.fullmatch(r"rtt (\d+(?:\.\d+)?) ms", text)
    assert match, f"the {role} card shows {text!r}"
    return float(match.group(1))


def assert_latency_is_the_engines(qtbot, window, sock: Path) -> None:
    """APP.md: per-hop latency is measured or absent.  The guard (its link handshake) and the exit (the echo
    through the circuit) show a real number, the one the engine reports; the middle shows a dash."""
    def engine_hop_rtts() -> list[float | None]:
        return [h["rtt_ms"] for h in engine_status(sock)["circuit"]]

    seen: list[object] = []

    def cards_show_the_engines() -> bool:  # the window polls once a second; the exit's echo changes every ping
        guard, middle, exit_ = engine_hop_rtts()
        shown = [window.circuit_view.cards[r].latency.text() for r in ("guard", "middle", "exit")]
        seen[:] = [(guard, middle, exit_), shown]
        return guard is not None and exit_ is not None and middle is None and \
            shown == [f"rtt {format_ms(guard)}", "rtt \u2013", f"rtt {format_ms(exit_)}"]

    try:
        qtbot.waitUntil(cards_show_the_engines, timeout=15000)
    except qtbot.TimeoutError:
        pytest.fail(f"the circuit's latencies (engine, window) never matched: {seen}")
    for role in ("guard", "exit"):
        rtt = shown_rtt_ms(window, role)
        assert rtt is not None and 0 < rtt < 5000, (role, rtt)
    assert shown_rtt_ms(window, "middle") is None


def test_connect_circuit_new_circuit_disconnect(qtbot, make_app, network: RunningNetwork) -> None:
    app = make_app(directory_settings(network))
    c, w = app.controller, app.window
    assert c.view.phase is EngineState.DISCONNECTED and w.button.text() == "Connect"
    qtbot.mouseClick(w.button, Qt.MouseButton.LeftButton)
    wait_phase(qtbot, c, EngineState.CONNECTED)
    assert c.link.started_by_us

    status = engine_status(app.sock)
    assert status["state"] == "connected"
    engine_path = [(h["nickname"], h["id"][:8], h["address"]) for h in status["circuit"]]
    assert w.circuit_view.shown() == engine_path  # what the cards display is the engine's circuit
    assert len({h["id"] for h in status["circuit"]}) == 3
    assert [h["id"] for h in status["circuit"]] == [h.id for h in c.view.hops]
    assert w.headline.text() == "Connected" and w.button.text() == "Disconnect"
    assert_latency_is_the_engines(qtbot, w, app.sock)
    # the guard card says it is the user's entry guard, the one the engine's guard set marks in use
    in_use = [g for g in status["guards"] if g["in_use"]]
    assert len(in_use) == 1 and in_use[0]["id"] == status["circuit"][0]["id"] and in_use[0]["primary"]
    assert w.circuit_view.cards["guard"].role_label.text() == "YOUR GUARD"
    assert "entry guard" in w.circuit_view.cards["guard"].toolTip()
    assert w.circuit_view.cards["middle"].role_label.text() == "MIDDLE"

    before = shown_ids(w)
    qtbot.waitUntil(lambda: w.new_circuit_button.isEnabled(), timeout=5000)
    qtbot.mouseClick(w.new_circuit_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: c.view.phase is EngineState.CONNECTED and len(c.view.hops) == 3
                    and shown_ids(w) != before, timeout=CONNECT_MS)
    after_status = engine_status(app.sock)
    assert [h["id"][:8] for h in after_status["circuit"]] == shown_ids(w)
    # a new circuit keeps the entry guard and avoids the old middle and exit (docs/PROTOCOL.md §5.10)
    assert shown_ids(w)[0] == before[0] and not set(before[1:]) & set(shown_ids(w)[1:])
    assert after_status["circuits_built"] >= 2

    qtbot.mouseClick(w.button, Qt.MouseButton.LeftButton)
    wait_phase(qtbot, c, EngineState.DISCONNECTED, 10000)
    assert engine_status(app.sock)["state"] == "disconnected"
    assert w.button.text() == "Connect" and w.headline.text() == "Not connected"
    assert all(nick == "\u2014" for nick, _s, _a in w.circuit_view.shown())


def test_gui_keeps_serving_timers_while_circuits_are_built(qtbot, make_app, network: RunningNetwork) -> None:
    app = make_app(directory_settings(network))
    c, w = app.controller, app.window
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.monotonic()))
    timer.start()
    qtbot.wait(100)
    qtbot.mouseClick(w.button, Qt.MouseButton.LeftButton)  # starts the engine process, then builds
    wait_phase(qtbot, c, EngineState.CONNECTED)
    first = [h.id for h in c.view.hops]
    c.new_circuit()
    qtbot.waitUntil(lambda: c.view.phase is EngineState.CONNECTED and len(c.view.hops) == 3
                    and [h.id for h in c.view.hops] != first, timeout=CONNECT_MS)
    qtbot.wait(50)
    timer.stop()
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    span, worst = ticks[-1] - ticks[0], max(gaps)
    print(f"{len(ticks)} ticks over {span:.2f} s; worst gap {worst * 1000:.1f} ms ({worst / span:.0%} of the run)")
    assert len(ticks) > 20
    # A bound relative to the run, which load stretches as much as the gaps: on a loaded machine the scheduler
    # alone delays a tick now and then (53 and 88 ms seen with a CPU burner, so an absolute 50 ms bound flaked;
    # at most 7 % of the run), while a GUI thread that waits for the engine's start, most of this run, stalls
    # for 50-66 % of it (tried: docs/APP.md)
    assert worst < 0.25 * span, f"the Qt loop stalled for {worst * 1000:.1f} ms of a {span:.2f} s run"


def test_missing_directory_file_is_a_readable_error(qtbot, make_app, tmp_path: Path) -> None:
    app = make_app(Settings(directory=str(tmp_path / "no-such-directory")))
    c, w = app.controller, app.window
    qtbot.mouseClick(w.button, Qt.MouseButton.LeftButton)
    wait_phase(qtbot, c, EngineState.ERROR, 20000)
    assert w.headline.text() == "The directory file cannot be used"
    assert "does not exist" in w.detail.text()
    assert_readable(w.detail.text())
    assert_readable(w.advice.text())
    assert w.action_button.isVisible() and w.action_button.text() == "Open settings…"
    assert w.button.text() == "Connect"  # one click tries again
    assert not any("Traceback" in line for line in w.log_view.visible_lines())


def test_corrupt_directory_file_is_a_readable_error(qtbot, make_app, tmp_path: Path) -> None:
    bad = tmp_path / "directory"
    bad.write_text("this is not a directory file\n")
    app = make_app(Settings(directory=str(bad)))
    c, w = app.controller, app.window
    qtbot.mouseClick(w.button, Qt.MouseButton.LeftButton)
    wait_phase(qtbot, c, EngineState.ERROR, 20000)
    assert w.headline.text() == "The directory file cannot be used"
    assert str(bad) in w.detail.text()
    assert_readable(w.detail.text())


def test_no_bootstrap_peers_is_a_settings_error(qtbot, make_app) -> None:
    app = make_app(Settings(source="bootstrap", bootstrap=()))
    c, w = app.controller, app.window
    qtbot.mouseClick(w.button, Qt.MouseButton.LeftButton)
    wait_phase(qtbot, c, EngineState.ERROR, 5000)
    assert w.headline.text() == "Settings need attention"
    assert "bootstrap peers" in w.detail.text()
    assert c.link.engine_pid is None  # nothing was started for settings that cannot work


def test_unreachable_bootstrap_peer_is_a_readable_error(qtbot, make_app) -> None:
    from shallot.relay.localnet import free_udp_ports
    port = free_udp_ports(1)[0]  # nobody listens there
    app = make_app(Settings(source="bootstrap", bootstrap=(f"127.0.0.1:{port}",)))
    c, w = app.controller, app.window
    qtbot.mouseClick(w.button, Qt.MouseButton.LeftButton)
    wait_phase(qtbot, c, EngineState.ERROR, 60000)
    assert_readable(w.headline.text())
    assert_readable(w.detail.text())
    assert w.action_button.isVisible()


def test_reattaches_to_a_running_engine_and_quit_can_keep_it_connected(qtbot, make_app, short_tmp: Path,
                                                                       network: RunningNetwork) -> None:
    procs = ProcGroup()
    try:
        sock = short_tmp / "own.sock"
        engine: Proc = procs.start("engine", "--socket", sock, "--directory", network.directory)
        engine.wait_line("listening")
        app = make_app(directory_settings(network), sock=sock)
        c = app.controller
        task = c.spawn(c.attach_existing())
        qtbot.waitUntil(task.done, timeout=10000)
        assert task.result() is True and c.link.attached and not c.link.started_by_us
        c.connect_vpn()
        wait_phase(qtbot, c, EngineState.CONNECTED)
        done = c.spawn(c.shutdown(disconnect=False))  # "Quit, stay connected"
        qtbot.waitUntil(done.done, timeout=10000)
        assert engine.popen.poll() is None
        status = engine_status(sock)
        assert status["state"] == "connected" and len(status["circuit"]) == 3
    finally:
        procs.cleanup()
