""""The window never crashes on what an engine sends" (docs/APP.md), for the widgets and not only the parser:
streams of hypothesis-made snapshots, hostile ones included (huge and odd text, markup, lone surrogates,
NaN and infinities, numbers far out of range, wrong types, unknown states, broken circuits), go through the
controller's engine callbacks (``EngineLink.on_snapshot`` / ``on_lost``: the path every engine event and
status poll takes) into the real MainWindow, which must keep rendering (``grab()`` paints every widget)
with no exception anywhere, Qt's event loop included (pytest-qt's exception capture)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PySide6.QtWidgets import QApplication

from shallot.app.settings import Settings
from shallot.core.control.api import EngineMode, EngineState, ErrorKind

pytestmark = [pytest.mark.timeout(300)]
EXAMPLES = int(os.environ.get("SHALLOT_GUI_FUZZ_EXAMPLES", "300"))  # ~10 s; 3000 ran clean in 150 s

hostile_text = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec=None), max_size=40),  # any code point, lone surrogates included
    st.sampled_from(["", " ", "\x00", "\n\n\n", "\u202eevil", "<b>bold</b>", "<img src='/etc/hostname'>",
                     "<table><tr><td>" * 50, "&amp;&lt;", "%s%n", "\U0001f9c5" * 300]),
    st.integers(1, 200_000).map(lambda n: "x" * n),  # no spaces: nothing to wrap at
    st.integers(1, 20_000).map(lambda n: "word " * n),
)
hostile_number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.integers(2**63 - 10, 2**63 + 10),
    st.just(10**400), st.just(-(10**400)), st.booleans(), st.none(), st.text(max_size=8), st.just([1.0]),
)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Three times in four ``good`` (one_of would flatten ``bad``'s many branches and drown it)."""
    return st.integers(0, 3).flatmap(lambda i: bad if i == 0 else good)


anything = st.one_of(hostile_text, hostile_number, st.lists(st.integers(), max_size=3),
                     st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
states = mostly(st.sampled_from([s.value for s in EngineState]), anything)
hop = st.fixed_dictionaries({}, optional={
    "id": st.one_of(st.text("0123456789abcdefABCDEF", min_size=0, max_size=80), hostile_text, anything),
    "nickname": hostile_text | anything, "address": hostile_text | anything, "exit": anything,
    "rtt_ms": hostile_number})
circuit = mostly(st.lists(hop, min_size=3, max_size=3), st.lists(hop, max_size=5) | anything)
snapshot = st.fixed_dictionaries({"state": states}, optional={
    "step": hostile_text | anything, "error": hostile_text | anything,
    "error_code": mostly(st.sampled_from([k.value for k in ErrorKind]), anything),
    "mode": mostly(st.sampled_from([m.value for m in EngineMode]), anything),
    "trying": anything, "kill_switch": anything, "directory": hostile_text | anything,
    "exit": hostile_text | anything, "circuit": circuit,
    "build_ms": hostile_number, "rtt_ms": hostile_number, "connected_since": hostile_number,
    "circuit_since": hostile_number, "circuits_built": hostile_number, "bytes_sent": hostile_number,
    "bytes_received": hostile_number, "relays_known": hostile_number, "dht_peers": hostile_number,
    "discovery": anything, "nat": anything,
})
event = st.one_of(
    st.tuples(st.just("snapshot"), mostly(snapshot, anything), st.booleans()),  # polled or pushed
    st.tuples(st.just("lost"), st.sampled_from(["it exited", "the control connection closed"])),  # the app's words
)


@pytest.fixture
def window_app(make_app: Any) -> Any:
    return make_app(Settings(route_all=False))  # nobody listens on its socket: only what the test feeds


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(events=st.lists(event, min_size=1, max_size=6))
def test_the_window_renders_whatever_an_engine_sends(qtbot, window_app, events: list[tuple[Any, ...]]) -> None:
    c, w = window_app.controller, window_app.window
    with qtbot.captureExceptions() as escaped:
        for kind, *args in events:
            if kind == "snapshot":
                c.link.on_snapshot(*args)
            else:
                c.link.on_lost(*args)
            w._tick()  # the 1 s clock's slot: the "connected for" time from connected_since
            QApplication.processEvents()
            picture = w.grab()
            assert not picture.isNull() and picture.width() > 0
    assert not escaped, escaped
    assert c.view.headline and w.headline.text() == c.view.headline  # it shows the controller's state
    assert c.problem is None or c.problem.kind is not ErrorKind.INTERNAL, c.problem
