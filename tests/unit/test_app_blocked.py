"""The app's "Blocked: the connection stopped" view (app/presenter.py): when the engine stopped and its kill
switch stays on (docs/PRIVILEGES.md), the window says so, offers Reconnect on the big button and Unblock
beside the advice, in the words of the one advice table.  Pure: no Qt."""

from __future__ import annotations

from shallot.app.presenter import ADVICE, BUTTON_TEXT, Button, Problem, ViewAction, present
from shallot.core.control.api import EngineMode, EngineState, ErrorKind, StatusSnapshot

BLOCKED_SNAPSHOT = {"state": "error", "error": "the privileged helper quit", "error_code": "helper-failed",
                    "trying": False, "mode": "vpn", "kill_switch": True, "blocked": True, "circuit": []}


def test_the_words_come_from_the_advice_table() -> None:
    title, what, action = ADVICE[ErrorKind.BLOCKED]
    assert title == "Blocked: the connection stopped" and action is ViewAction.UNBLOCK
    assert "Reconnect" in what and "Unblock" in what and "unprotected" in what
    assert BUTTON_TEXT[Button.RECONNECT] == "Reconnect"


def test_the_engine_went_away_with_the_kill_switch_on() -> None:
    v = present(None, Problem(ErrorKind.BLOCKED, "the engine stopped (it exited)"), route_all=True)
    assert (v.phase, v.headline, v.detail) == (EngineState.ERROR, "Blocked: the connection stopped",
                                               "The engine stopped (it exited).")
    assert (v.button, v.button_text, v.button_busy, v.action) == (Button.RECONNECT, "Reconnect", False,
                                                                  ViewAction.UNBLOCK)
    assert v.advice == ADVICE[ErrorKind.BLOCKED][1] and v.mode is EngineMode.VPN and not v.can_new_circuit


def test_an_engine_that_reports_a_kept_block_shows_it_whatever_its_error() -> None:
    v = present(StatusSnapshot.from_json(BLOCKED_SNAPSHOT))
    assert (v.headline, v.button, v.action) == ("Blocked: the connection stopped", Button.RECONNECT, ViewAction.UNBLOCK)
    assert v.detail == "The privileged helper quit."
    # a fresh engine that found the marker: disconnected, no error of its own
    fresh = present(StatusSnapshot.from_json({"state": "disconnected", "trying": False, "blocked": True}))
    assert fresh.headline == "Blocked: the connection stopped"
    assert fresh.detail == "An earlier connection stopped without disconnecting."


def test_while_the_engine_tries_the_block_is_its_own_and_the_usual_view_shows() -> None:
    trying = present(StatusSnapshot.from_json({**BLOCKED_SNAPSHOT, "state": "reconnecting", "error": "",
                                               "error_code": "", "trying": True, "step": "choosing a path"}))
    assert trying.headline == "Connecting…" and trying.button is Button.CANCEL
    # and an engine that never heard of "blocked" (an older one) is read as not blocked
    old = present(StatusSnapshot.from_json({"state": "disconnected", "trying": False}))
    assert old.headline == "Not connected" and old.button is Button.CONNECT
    # the app's own problems of another kind keep their button
    assert present(None, Problem(ErrorKind.ENGINE_LOST, "the engine stopped")).button is Button.CONNECT


def test_the_snapshot_carries_blocked_both_ways() -> None:
    snap = StatusSnapshot.from_json(BLOCKED_SNAPSHOT)
    assert snap.blocked is True and snap.to_json()["blocked"] is True
    assert StatusSnapshot.from_json({**BLOCKED_SNAPSHOT, "blocked": "yes"}).blocked is False  # only true is true
