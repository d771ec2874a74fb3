"""What the window shows for each engine state and problem, the notifications, the speed meter, and the
engine settings the app sends: pure functions, no Qt."""

from __future__ import annotations

from pathlib import Path

import pytest

from shallot.app.engine_link import engine_argv, engine_config, start_failure
from shallot.app.presenter import (
    ADVICE,
    Button,
    Notifier,
    Problem,
    RateMeter,
    ViewAction,
    format_bytes,
    format_duration,
    format_ms,
    present,
)
from shallot.app.settings import Settings
from shallot.core.control.api import (
    EngineConfig,
    EngineMode,
    EngineState,
    ErrorKind,
    Hello,
    Role,
    SnapshotError,
    StatusSnapshot,
)

parse_snapshot = StatusSnapshot.from_json  # the app reads an engine's JSON with the control API's own parser

HOPS = [{"id": f"{i:x}" * 40, "nickname": n, "address": f"127.0.0.1:{7000 + i}", "exit": n == "x",
         "rtt_ms": r} for i, (n, r) in enumerate((("g", 0.4), ("m", None), ("x", 1.9)))]


def snap(**kw: object) -> dict[str, object]:
    return {"state": "disconnected", "step": "", "error": "", "circuit": [], **kw}


def test_connected_shows_the_circuit_and_the_exit() -> None:
    v = present(parse_snapshot(snap(state="connected", circuit=HOPS, rtt_ms=1.9, connected_since=1.0)))
    assert (v.phase, v.headline, v.button_text, v.button_busy) == (EngineState.CONNECTED, "Connected", "Disconnect",
                                                                   False)
    assert [h.nickname for h in v.hops] == ["g", "m", "x"] and v.hops[0].short_id == "00000000"
    assert [h.rtt_ms for h in v.hops] == [0.4, None, 1.9]
    assert v.detail == "Through x · 1.90 ms round trip" and v.can_new_circuit


def test_connecting_shows_the_step_and_a_drop_reads_as_reconnecting() -> None:
    v = present(parse_snapshot(snap(state="connecting", step="building a circuit through a, b, c")))
    assert (v.phase, v.headline, v.detail, v.button_text) == (
        EngineState.CONNECTING, "Connecting…", "Building a circuit through a, b, c.", "Cancel")
    # the engine says "reconnecting" after a failed first build too; it was never connected, so: connecting
    first = present(parse_snapshot(snap(state="reconnecting", step="retrying in 1 s", error="circuit build timed out")))
    assert first.phase is EngineState.CONNECTING and first.advice == "Circuit build timed out."
    dropped = present(parse_snapshot(snap(state="reconnecting", connected_since=5.0, step="retrying in 1 s")))
    assert (dropped.phase, dropped.headline, dropped.button_text) == (EngineState.RECONNECTING, "Reconnecting…",
                                                                      "Disconnect")


@pytest.mark.parametrize("code", ["helper-missing", "helper-denied"])
def test_helper_errors_say_what_is_missing_and_offer_probe_mode(code: str) -> None:
    v = present(parse_snapshot(snap(state="error", error_code=code, mode="vpn", trying=False,
                                    error="pkexec: the shallot helper is not installed")))
    assert v.phase is EngineState.ERROR and v.action is ViewAction.PROBE_MODE and v.mode is EngineMode.VPN
    assert v.headline == ADVICE[ErrorKind(code)][0] and "probe mode" in v.advice
    assert v.detail == "Pkexec: the shallot helper is not installed."
    assert v.button is Button.CONNECT and v.button_text == "Connect"  # the engine stopped trying: start over


def test_a_retrying_error_offers_to_stop() -> None:
    v = present(parse_snapshot(snap(state="error", error="the circuit stopped answering", step="retrying in 5 s")))
    assert v.button is Button.DISCONNECT and v.button_text == "Disconnect"


def test_engine_errors_and_app_problems_are_sentences_with_advice() -> None:
    v = present(parse_snapshot(snap(state="error", error="the circuit stopped answering", step="retrying in 5 s")))
    assert v.headline == "No circuit right now" and v.detail == "The circuit stopped answering. Retrying in 5 s."
    p = present(None, Problem(ErrorKind.BAD_DIRECTORY, "directory file /x does not exist"))
    assert (p.phase, p.button_text, p.action) == (EngineState.ERROR, "Connect", ViewAction.SETTINGS)
    assert p.detail == "Directory file /x does not exist."
    unknown = present(None, Problem(ErrorKind.UNKNOWN_COMMAND, "boom"))  # a kind without words of its own
    assert unknown.headline == ADVICE[ErrorKind.ERROR][0]
    engine_said = present(parse_snapshot(snap(state="error", error="boom", error_code="never-heard-of-it")))
    assert engine_said.headline == ADVICE[ErrorKind.CIRCUIT][0]


def test_starting_and_disconnected() -> None:
    assert present(None, starting="starting the Shallot engine").detail == "Starting the Shallot engine."
    assert present(None).mode is EngineMode.PROBE and present(None, route_all=True).mode is EngineMode.VPN
    assert present(None).button_text == "Connect"


@pytest.mark.parametrize("raw", [None, [], "connected", {"state": "sideways"}, {"circuit": []}])
def test_not_a_snapshot(raw: object) -> None:
    with pytest.raises(SnapshotError):
        parse_snapshot(raw)


def test_odd_fields_fall_back() -> None:
    s = parse_snapshot({"state": "connected", "circuit": [1, 2, 3], "rtt_ms": float("nan"), "bytes_sent": -5,
                        "build_ms": True, "mode": "warp", "error": 7})
    assert (s.circuit, s.rtt_ms, s.bytes_sent, s.build_ms, s.mode, s.error) == ((), None, 0, None, EngineMode.PROBE,
                                                                                "")


def test_numbers_out_of_range_are_unknown() -> None:
    """JSON has no integer limit: a time beyond a float's range and counts beyond 64 bits (the window divides
    byte counts as floats) read as unknown, like any other odd value (found by the widget fuzz)."""
    s = parse_snapshot({"state": "connected", "bytes_sent": 2**64, "bytes_received": 10**400,
                        "circuits_built": 2**64 - 1, "relays_known": 2**70, "build_ms": 10**400, "rtt_ms": 2**64})
    assert (s.bytes_sent, s.bytes_received, s.circuits_built, s.relays_known) == (0, 0, 2**64 - 1, None)
    assert (s.build_ms, s.rtt_ms) == (None, float(2**64))
    assert format_bytes(s.circuits_built) and RateMeter().add(1.0, 2**64 - 1, 2**64 - 1) is None


def test_notifications_only_for_drop_and_recovery() -> None:
    n = Notifier()
    assert n.feed(EngineState.CONNECTING, user_action=True) is None
    assert n.feed(EngineState.CONNECTED) is None  # the user asked for it: no notification
    drop = n.feed(EngineState.RECONNECTING)
    assert drop is not None and "dropped" in drop[0]
    assert n.feed(EngineState.ERROR) is None  # once per drop
    back = n.feed(EngineState.CONNECTED)
    assert back is not None and "restored" in back[0]
    assert n.feed(EngineState.DISCONNECTED, user_action=True) is None
    assert n.feed(EngineState.ERROR) is None  # never connected since: nothing dropped


def test_rate_meter() -> None:
    m = RateMeter()
    assert m.add(10.0, 0, 0) is None
    assert m.add(11.0, 2000, 500) == (2000.0, 500.0)
    assert m.add(11.0, 9999, 9999) is None  # no time passed
    assert m.add(12.0, 100, 100) == (0.0, 0.0)  # counters went down: a new engine, not negative speed
    assert len(m.samples) == 2


def test_formats() -> None:
    assert (format_bytes(999), format_bytes(1500), format_bytes(2.5e6)) == ("999 B", "1.5 KB", "2.5 MB")
    assert (format_duration(59), format_duration(3600 + 61)) == ("0:59", "1:01:01")
    assert (format_ms(None), format_ms(1.234), format_ms(42.4)) == ("\u2013", "1.23 ms", "42 ms")


def test_engine_settings_follow_the_app_settings() -> None:
    # the engine starts with nothing but its socket; the settings go over the socket (``configure``)
    assert engine_argv(Path("/run/s.sock"))[-3:] == ["engine", "--socket", "/run/s.sock"]
    assert engine_config(Settings(directory="/d")) == EngineConfig(directory="/d")
    vpn = engine_config(Settings(directory="/d", route_all=True, kill_switch=False))
    assert (vpn.vpn, vpn.kill_switch, vpn.dns) == (True, False, True)
    assert engine_config(Settings(directory="/d", route_all=True, dns_through_tunnel=False)).dns is False
    dht = engine_config(Settings(source="bootstrap", directory="/d", bootstrap=("192.0.2.1:7001", "h.example:7")))
    assert dht.bootstrap == ("192.0.2.1:7001", "h.example:7") and dht.directory is None
    assert EngineConfig.from_json(vpn.to_json()) == vpn


def test_engine_start_failures_are_worded() -> None:
    e = start_failure("x\nshallot: error: cannot create /run/shallot: Permission denied\n")
    assert (e.kind, str(e)) == (ErrorKind.ENGINE_START, "cannot create /run/shallot: Permission denied")
    assert str(start_failure("")) == "it exited without a word"


def test_an_older_engine_is_known_by_its_hello() -> None:
    # an engine of control version 1 (before ``configure``) says only its version; it is not asked to guess
    old = Hello.from_json({"shallot": "control", "version": 1, "role": "client"})
    assert old.role is Role.CLIENT and not old.can("configure") and old.can("connect")
    new = Hello.from_json(Hello(Role.CLIENT, frozenset({"configure", "connect", "status"})).to_json())
    assert new.can("configure") and not new.can("circuits")
    assert ADVICE[ErrorKind.ENGINE_OUTDATED][2] is ViewAction.RETRY


def test_the_circuits_guard_is_shown_as_your_guard_when_it_is_an_entry_guard() -> None:
    guards = [{"id": "0" * 40, "nickname": "g", "primary": True, "state": "usable", "in_use": True},
              {"id": "9" * 40, "nickname": "other", "primary": True, "state": "retrying"}]
    snap = parse_snapshot({"state": "connected", "circuit": HOPS, "guards": guards})
    assert "primary guard 1 of 2" in present(snap).guard_tip
    spare = parse_snapshot({"state": "connected", "circuit": HOPS, "guards": [{**guards[0], "primary": False}]})
    assert "spare guard" in present(spare).guard_tip
    assert present(parse_snapshot({"state": "connected", "circuit": HOPS})).guard_tip == ""  # no guard set
    warned = parse_snapshot({"state": "connected", "circuit": HOPS, "guards": guards,
                             "guard_warning": "guard g dropped: only 20% of its circuits built (path bias)"})
    assert "path bias" in present(warned).advice
