"""The app's parsers of outside input (the engine's snapshots, the settings file, typed peers) raise
only their documented errors, whatever they are given, and valid settings round-trip."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from shallot.app.presenter import present
from shallot.app.settings import THEMES, Settings, SettingsError, SettingsStore, parse_peers, parse_settings
from shallot.core.control.api import SnapshotError, StatusSnapshot

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=6)
snapshot_keys = st.sampled_from(["state", "step", "error", "error_code", "mode", "circuit", "rtt_ms", "build_ms",
                                 "connected_since", "bytes_sent", "bytes_received", "circuits_built", "exit",
                                 "trying", "kill_switch", "directory", "relays_known", "dht_peers", "discovery",
                                 "nat"])
hop = st.dictionaries(st.sampled_from(["id", "nickname", "address", "rtt_ms", "exit"]), json_values, max_size=5)
snapshot_like = st.dictionaries(snapshot_keys, json_values | st.lists(hop | json_values, min_size=3, max_size=3)
                                | st.sampled_from(["connected", "connecting", "error", "reconnecting"]),
                                max_size=10)


@settings(max_examples=400, deadline=None)
@given(st.one_of(json_values, snapshot_like))
def test_snapshot_parser_total(raw: object) -> None:
    try:
        snap = StatusSnapshot.from_json(raw)
    except SnapshotError:
        return
    assert isinstance(snap, StatusSnapshot) and len(snap.circuit) in (0, 3)
    view = present(snap)  # and whatever parsed can be shown
    assert view.headline
    assert StatusSnapshot.from_json(snap.to_json()) == snap  # and what it reads, it writes back the same


settings_like = st.dictionaries(st.sampled_from(["source", "directory", "bootstrap", "route_all", "kill_switch",
                                                 "theme", "exit", "start_minimized", "other"]),
                                json_values | st.lists(st.text(max_size=30), max_size=3), max_size=9)


@settings(max_examples=400, deadline=None)
@given(st.one_of(json_values, settings_like))
def test_settings_parser_total(raw: object) -> None:
    try:
        s, problems = parse_settings(raw)
    except SettingsError:
        return
    assert s.source in ("directory", "bootstrap") and s.theme in THEMES
    assert all(isinstance(p, str) for p in problems)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=80))
def test_peer_parser_total(text: str) -> None:
    try:
        peers = parse_peers(text)
    except SettingsError:
        return
    assert parse_peers(",".join(peers)) == peers  # what it accepts, it accepts again unchanged


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_settings_file_never_crashes_the_app(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "settings.json"
        path.write_bytes(content)
        loaded = SettingsStore(path).load()
        assert isinstance(loaded.settings, Settings)
        assert (loaded.moved_aside is None) == path.exists()


@settings(max_examples=200, deadline=None)
@given(st.builds(Settings, source=st.sampled_from(["directory", "bootstrap"]), directory=st.text(max_size=40).filter(
    lambda t: "\x00" not in t), route_all=st.booleans(), kill_switch=st.booleans(), theme=st.sampled_from(THEMES),
    bootstrap=st.lists(st.sampled_from(["192.0.2.1:7001", "h.example:9", "[2001:db8::2]:1"]), unique=True,
                       max_size=3).map(tuple), exit=st.text("0123456789abcdef", max_size=40)))
def test_valid_settings_round_trip(s: Settings) -> None:
    from shallot.app.settings import settings_to_json
    assert parse_settings(json.loads(settings_to_json(s))) == (s, [])
