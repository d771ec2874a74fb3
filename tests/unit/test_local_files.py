"""What Shallot keeps on disk fails safely: a relay's state directory and descriptor, the client's cached
network view, the engine's socket directory and the seeds a user types.  Damaged or hostile input is one
readable error (or ignored, for a cache), never a traceback, and never writes through a planted symlink."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import pytest

from shallot.core import privfile
from shallot.core.control.paths import default_socket
from shallot.core.discovery.addresses import link_address_of_dht, same_address, usable_address
from shallot.core.discovery.cache import load_view, save_view
from shallot.core.discovery.service import parse_seeds
from shallot.core.errors import ShallotError
from shallot.exit.policy import DEFAULT_TAIL, parse_rule
from shallot.exit.service import load_policy
from shallot.relay import state as state_dir


@pytest.fixture
def relay_state(tmp_path: Path) -> Path:
    state = tmp_path / "relay"
    state_dir.keygen(state, ("198.51.100.7", 9000), "disk", False)
    return state


# ---------------------------------------------------------------------------------------------- relay state


def test_keygen_never_overwrites_keys(relay_state: Path) -> None:
    keys_before = (relay_state / state_dir.KEYS_FILE).read_bytes()
    with pytest.raises(ShallotError, match="already holds relay keys"):
        state_dir.keygen(relay_state, ("198.51.100.8", 9000), "again", False)
    assert (relay_state / state_dir.KEYS_FILE).read_bytes() == keys_before
    assert (relay_state / state_dir.KEYS_FILE).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("settings", ["not json", json.dumps({"nickname": "x"}),
                                      json.dumps({"nickname": "x", "address": ["h", "port"], "exit": False}),
                                      json.dumps({"nickname": "x", "address": 7, "exit": False})])
def test_corrupt_settings_are_one_error_naming_the_file(relay_state: Path, settings: str) -> None:
    (relay_state / state_dir.SETTINGS_FILE).write_text(settings)
    with pytest.raises(ShallotError, match=re.escape(f"corrupt {state_dir.SETTINGS_FILE}")):
        state_dir.load(relay_state)


def test_unreadable_state_and_descriptor_are_one_error(relay_state: Path) -> None:
    keys = relay_state / state_dir.KEYS_FILE
    keys.unlink()
    keys.mkdir()  # reading it fails with EISDIR, not "missing"
    with pytest.raises(ShallotError, match=r"refusing .*: not a regular file"):
        state_dir.load(relay_state)
    desc = relay_state / state_dir.DESCRIPTOR_FILE
    good = desc.read_text()
    desc.write_text("not base64 at all!\n")
    with pytest.raises(ShallotError, match=re.escape(state_dir.DESCRIPTOR_FILE)):
        state_dir.read_descriptor(relay_state)
    desc.write_text(good[:40] + "\n")  # valid base64, a truncated descriptor
    with pytest.raises(ShallotError, match=re.escape(state_dir.DESCRIPTOR_FILE)):
        state_dir.read_descriptor(relay_state)
    desc.unlink()
    desc.mkdir()
    with pytest.raises(ShallotError, match=r"refusing .*: not a regular file"):
        state_dir.read_descriptor(relay_state)


# ---------------------------------------------------------------------------------------------- the view cache


def test_the_cache_is_private_and_an_empty_view_never_replaces_it(relay_state: Path, tmp_path: Path) -> None:
    desc = state_dir.read_descriptor(relay_state)
    cache = tmp_path / "cache" / "network-view"
    save_view(cache, [desc])
    assert cache.stat().st_mode & 0o777 == 0o600 and cache.parent.stat().st_mode & 0o777 == 0o700
    assert load_view(cache, time.time()) == [desc]
    save_view(cache, [])
    assert load_view(cache, time.time()) == [desc]


def test_the_cache_never_writes_through_a_planted_symlink(relay_state: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "network-view"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    monkeypatch.setattr(privfile.secrets, "token_hex", lambda n: "guessed")  # the temporary name, guessed
    (tmp_path / ".network-view.guessed.tmp").symlink_to(victim)
    with pytest.raises(OSError):
        save_view(cache, [state_dir.read_descriptor(relay_state)])
    assert victim.read_text() == "precious" and not cache.exists()


def test_a_failed_cache_write_leaves_no_temporary_file(relay_state: Path, tmp_path: Path) -> None:
    cache = tmp_path / "network-view"
    cache.mkdir()
    (cache / "something").write_text("x")  # a non-empty directory: the final rename fails
    with pytest.raises(OSError):
        save_view(cache, [state_dir.read_descriptor(relay_state)])
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_an_unusable_cache_is_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert load_view(tmp_path / "missing", time.time()) == []
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    directory = tmp_path / "a-directory"
    directory.mkdir()
    with caplog.at_level(logging.WARNING, logger="shallot.core.discovery.cache"):
        assert load_view(binary, time.time()) == []
        assert load_view(directory, time.time()) == []
    assert [r.message.split(":")[0] for r in caplog.records] == [f"ignoring the network view cache {binary}",
                                                                f"ignoring the network view cache {directory}"]


# ---------------------------------------------------------------------------------------------- socket, seeds


def test_a_socket_directory_that_cannot_be_made_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(blocker))  # a file where a directory must go
    with pytest.raises(ShallotError, match=re.escape(f"cannot create {blocker}/shallot: Not a directory")):
        default_socket(create=True)


def test_seeds_are_ip_addresses_with_room_for_the_dht_port() -> None:
    seeds = parse_seeds(" 192.0.2.1:9000, ,[2001:db8::1]:9000,")
    assert [s.address for s in seeds] == [("192.0.2.1", 9000), ("2001:db8::1", 9000)]
    assert [s.relay_id for s in seeds] == [None, None]  # unpinned (a warning says so)
    with pytest.raises(ShallotError, match="give an IP address, not a name"):
        parse_seeds("seed.example:9000")
    with pytest.raises(ShallotError, match="its DHT port would be 65536"):
        parse_seeds("192.0.2.1:65535")
    with pytest.raises(ShallotError, match=r"at least one \[ID@\]HOST:PORT"):
        parse_seeds(" , ")


def test_relay_addresses_must_be_usable_ips() -> None:
    assert not usable_address("relay.example", 9000, allow_loopback=True)  # names are never taken
    assert not usable_address("192.0.2.1", 0, allow_loopback=True)
    assert not usable_address("192.0.2.1", 65536, allow_loopback=True)
    assert same_address(("2001:db8::1", 9), ("2001:DB8:0::1", 9))  # one address, two spellings
    assert not same_address(("2001:db8::1", 9), ("2001:db8::1", 10))
    assert not same_address(("not an ip", 9), ("not an ip", 9))
    assert link_address_of_dht(("192.0.2.1", 9001)) == ("192.0.2.1", 9000)



# ---------------------------------------------------------------------------------------------- exit policy file


def test_an_exit_policy_file_is_read_and_its_errors_are_one_line(tmp_path: Path) -> None:
    policy = tmp_path / "policy"
    policy.write_text("# web only\naccept tcp *:80\n\naccept tcp 198.51.100.0/24:8000-8100\nreject *  # the rest\n")
    rules = ["accept tcp *:80", "accept tcp 198.51.100.0/24:8000-8100", "reject *"]
    assert load_policy(policy).rules == [*map(parse_rule, rules), *DEFAULT_TAIL]
    assert load_policy(None).rules == list(DEFAULT_TAIL)
    policy.write_text("accept tcp *:80\nallow everything\n")
    with pytest.raises(ShallotError, match=re.escape(f"{policy}: ")) as info:
        load_policy(policy)
    assert "\n" not in str(info.value) and "line 2:" in str(info.value)
    with pytest.raises(ShallotError, match=re.escape(f"cannot read exit policy {tmp_path / 'missing'}: No such file")):
        load_policy(tmp_path / "missing")
