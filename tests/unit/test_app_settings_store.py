"""The settings file: round trip, per-field fallbacks, corrupt files kept aside, peer syntax."""

from __future__ import annotations

from pathlib import Path

import pytest

from shallot.app.settings import Settings, SettingsError, SettingsStore, check_usable, parse_hostport, parse_peers


def test_round_trip_and_mode(tmp_path: Path) -> None:
    store = SettingsStore(tmp_path / "cfg" / "settings.json")
    s = Settings(source="bootstrap", bootstrap=("192.0.2.1:7001", "[2001:db8::1]:7002"), route_all=True,
                 kill_switch=False, exit="ab" * 20, theme="dark")
    store.save(s)
    assert store.load().settings == s and store.load().problems == []
    assert (store.path.stat().st_mode & 0o777, store.path.parent.stat().st_mode & 0o777) == (0o600, 0o700)


def test_missing_file_is_defaults(tmp_path: Path) -> None:
    loaded = SettingsStore(tmp_path / "nope.json").load()
    assert loaded.settings == Settings() and loaded.problems == [] and loaded.moved_aside is None


@pytest.mark.parametrize("content", [b"", b"[1, 2]", b"\xff\xfe", b'{"a": 1', b"null", b"x" * 300_000])
def test_corrupt_file_is_moved_aside(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "settings.json"
    path.write_bytes(content)
    loaded = SettingsStore(path).load()
    assert loaded.settings == Settings() and len(loaded.problems) == 1
    assert loaded.moved_aside is not None and loaded.moved_aside.read_bytes() == content
    assert loaded.moved_aside.name in loaded.problems[0] and not path.exists()


def test_two_corrupt_files_in_one_second_both_kept(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    path.write_bytes(b"one")
    first = SettingsStore(path).load().moved_aside
    path.write_bytes(b"two")
    second = SettingsStore(path).load().moved_aside
    assert first != second and first.read_bytes() == b"one" and second.read_bytes() == b"two"


def test_unknown_keys_are_ignored_and_bad_values_named(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    path.write_text('{"version": 9, "future": 1, "theme": "purple", "exit": "zz", "bootstrap": ["nope"]}')
    loaded = SettingsStore(path).load()
    assert loaded.settings == Settings()
    assert sorted(p.split("'")[1] for p in loaded.problems) == ["bootstrap", "exit", "theme"]


@pytest.mark.parametrize("text, expected", [("192.0.2.1:7001", ("192.0.2.1", 7001)),
                                            ("relay.example.org:1", ("relay.example.org", 1)),
                                            ("[2001:db8::1]:65535", ("2001:db8::1", 65535))])
def test_hostport_ok(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["", "host", ":7001", "h:0", "h:65536", "h:x", "2001:db8::1:7", "[zz]:1",
                                  "999.1.1.1:7", "-bad.example:7", "a b:7", "h:+7", "h:٣"])
def test_hostport_bad(text: str) -> None:
    with pytest.raises(SettingsError):
        parse_hostport(text)


def test_peers_list() -> None:
    assert parse_peers("192.0.2.1:1, 192.0.2.1:1\n h.example:2") == ("192.0.2.1:1", "h.example:2")
    with pytest.raises(SettingsError):
        parse_peers(" ".join(f"192.0.2.1:{p}" for p in range(1, 40)))


def test_check_usable() -> None:
    with pytest.raises(SettingsError, match="directory"):
        check_usable(Settings())
    with pytest.raises(SettingsError, match="bootstrap"):
        check_usable(Settings(source="bootstrap"))
    check_usable(Settings(directory="/x"))

