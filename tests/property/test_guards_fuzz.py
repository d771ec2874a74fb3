"""The entry-guard state file (core/circuit/guards.py GuardSet.from_json) and the snapshot's guard list
(core/control/state.py GuardStatus) read untrusted bytes: they raise only their one documented error (or
none), and what they accept they write back unchanged."""

from __future__ import annotations

import json
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from shallot.core.circuit.guards import GuardSet
from shallot.core.control.api import EngineState, GuardStatus, StatusSnapshot

CHECK = settings(max_examples=400, deadline=None)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=8)
FIELDS = ["id", "nickname", "added", "expires", "unlisted_since", "down_since", "failures", "retry_at", "dropped",
          "dropped_at", "builds", "built", "uses", "use_failed", "warned", "x"]
ids = st.sampled_from(["00" * 20, "ab" * 20, "zz" * 20, "00" * 32, ""]) | st.text(max_size=44)
numbers = st.none() | st.integers(-5, 2**63) | st.floats(allow_nan=True) | st.booleans() | st.text(max_size=4)
entry = st.fixed_dictionaries({"id": ids}, optional={k: numbers | st.text(max_size=8) for k in FIELDS[1:]})
state_like = st.fixed_dictionaries({"version": st.sampled_from([1, 1, 2, "1", True, None])},
                                   optional={"guards": st.lists(entry, max_size=5) | json_values,
                                             "last_success": numbers})


@CHECK
@given(st.one_of(json_values, state_like))
def test_the_guard_state_parser_raises_only_value_error_and_round_trips(raw: object) -> None:
    try:
        gs = GuardSet.from_json(raw, random.Random(0))
    except ValueError:
        return
    again = GuardSet.from_json(json.loads(json.dumps(gs.to_json())), random.Random(0))
    assert again.to_json() == gs.to_json()
    for g in gs.guards:  # what it accepted is sane: counts bounded, successes never above attempts
        assert g.built <= g.builds and g.use_failed <= g.uses and 0 <= g.failures <= 1000


@CHECK
@given(st.dictionaries(st.sampled_from(["state", "guards", "guard_warning", "circuit"]),
                       json_values | st.lists(st.dictionaries(st.sampled_from(
                           ["id", "nickname", "primary", "state", "in_use", "note"]), json_values), max_size=4)))
def test_the_snapshots_guard_list_is_read_safely(raw: dict) -> None:
    raw = {**raw, "state": "connected"}
    snap = StatusSnapshot.from_json(raw)
    assert all(isinstance(g, GuardStatus) and g.state in ("usable", "retrying", "unlisted", "dropped")
               for g in snap.guards)
    assert isinstance(snap.guard_warning, str) and len(snap.guard_warning) <= 500
    assert StatusSnapshot.from_json(snap.to_json()) == snap
    assert StatusSnapshot(EngineState.CONNECTED, guards=snap.guards).to_json()["guards"] == \
        [g.to_json() for g in snap.guards]
