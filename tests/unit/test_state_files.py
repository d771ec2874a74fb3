"""State directories and the files in them (core/privfile.py, relay/state.py, docs/PROTOCOL.md §3.6): created
0700; refused, with one readable error and nothing written, when another user owns them or may write to them
(or to a folder above them); keys.json refused when others may read it; every write a new O_EXCL|O_NOFOLLOW
temporary file, so nothing planted is ever followed, truncated or written through.

The attacks that need a second user (a folder of another user, root running keygen in it) use os.chown to
uid 65534 (nobody): root only, skipped on a user's machine, run in CI (which runs as root)."""

from __future__ import annotations

import logging
import os
import random
import re
import stat
import time
from pathlib import Path

import pytest

from shallot import cli
from shallot.core import privfile
from shallot.core.discovery.cache import load_seen, load_view, save_seen, save_view
from shallot.core.discovery.directory import MAX_DIRECTORY_BYTES, load_directory
from shallot.core.engine.guards import load_guards
from shallot.core.errors import ShallotError
from shallot.core.privfile import UnsafePath, private_dir, read_regular, write_private
from shallot.crypto import descriptor as descriptor_module
from shallot.crypto.descriptor import DIRECTORY_HEADER
from shallot.crypto.keys import RELAY_ID_LEN
from shallot.relay import state as state_dir

NOBODY = 65534
ADDRESS = ("198.51.100.7", 9000)
needs_root = pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                                reason="needs root to give a folder to another user (os.chown)")
TMP_NAMES = ("keys.json.tmp", "relay.json.tmp", "descriptor.tmp")  # the names keygen used to write through


def _victims(tmp_path: Path) -> dict[Path, str]:
    victims = {}
    for i in range(3):
        victim = tmp_path / f"victim{i}"
        victim.write_text(f"root's file {i}")
        victims[victim] = victim.read_text()
    return victims


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# ---------------------------------------------------------------------------------------------- keygen


def test_keygen_makes_a_private_directory_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    state = tmp_path / "a" / "relay"
    state_dir.keygen(state, ADDRESS, "disk", False)
    assert _mode(state) == 0o700
    assert _mode(state / state_dir.KEYS_FILE) == 0o600
    assert _mode(state / state_dir.SETTINGS_FILE) == 0o644 and _mode(state / state_dir.DESCRIPTOR_FILE) == 0o644
    assert sorted(p.name for p in state.iterdir()) == ["descriptor", "keys.json", "relay.json"]
    state_dir.load(state)


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_keygen_refuses_a_folder_others_may_write_to(tmp_path: Path, mode: int) -> None:
    state = tmp_path / "relay"
    state.mkdir()
    os.chmod(state, mode)
    with pytest.raises(UnsafePath, match="other users may write to it"):
        state_dir.keygen(state, ADDRESS, "disk", False)
    assert list(state.iterdir()) == []


def test_keygen_refuses_a_folder_below_one_others_may_change(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # anyone may rename our folder away and put a symlink in its place
    with pytest.raises(UnsafePath, match=f"another user can change {shared}"):
        state_dir.keygen(shared / "relay", ADDRESS, "disk", False)
    os.chmod(shared, 0o1777)  # the sticky bit (/tmp): nobody but us may rename what is ours
    state_dir.keygen(shared / "relay", ADDRESS, "disk", False)


def test_planted_temporary_names_in_our_own_folder_are_never_followed(tmp_path: Path) -> None:
    state = tmp_path / "relay"
    state.mkdir(mode=0o700)
    victims = _victims(tmp_path)
    for name, victim in zip(TMP_NAMES, victims, strict=True):
        (state / name).symlink_to(victim)
    state_dir.keygen(state, ADDRESS, "disk", False)
    assert {v: v.read_text() for v in victims} == victims
    assert all((state / name).is_symlink() for name in TMP_NAMES)  # untouched, not written through


@pytest.mark.parametrize("plant", ["symlink", "hardlink"])
def test_a_guessed_temporary_name_is_refused_not_followed_or_truncated(tmp_path: Path, plant: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """O_EXCL|O_NOFOLLOW: even a planted name that is exactly the one chosen is never opened."""
    state = private_dir(tmp_path / "relay")
    (victim,) = _victims(tmp_path).keys() - {tmp_path / "victim1", tmp_path / "victim2"}
    monkeypatch.setattr(privfile.secrets, "token_hex", lambda n: "guessed")
    planted = state / ".keys.json.guessed.tmp"
    if plant == "symlink":
        planted.symlink_to(victim)
    else:
        os.link(victim, planted)  # the same file under a second name: O_TRUNC without O_EXCL would empty it
    with pytest.raises(OSError):
        write_private(state / "keys.json", "secret keys")
    assert victim.read_text() == "root's file 0"
    assert not (state / "keys.json").exists()


@needs_root
def test_root_refuses_keygen_in_a_folder_another_user_made_and_planted(tmp_path: Path) -> None:
    """The attack of issue 12: a user makes the folder, plants the temporary names as symlinks to root's files,
    and asks root to run keygen there.  Refused; no key is written anywhere and nothing is overwritten."""
    state = tmp_path / "relay"
    state.mkdir(mode=0o755)
    victims = _victims(tmp_path)
    for name, victim in zip(TMP_NAMES, victims, strict=True):
        (state / name).symlink_to(victim)
        os.lchown(state / name, NOBODY, NOBODY)
    os.chown(state, NOBODY, NOBODY)
    with pytest.raises(UnsafePath, match=f"belongs to uid {NOBODY}"):
        state_dir.keygen(state, ADDRESS, "disk", False)
    assert {v: v.read_text() for v in victims} == victims
    assert sorted(p.name for p in state.iterdir()) == sorted(TMP_NAMES)


@needs_root
def test_root_refuses_a_folder_inside_another_users_folder(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chown(home, NOBODY, NOBODY)  # its owner may swap anything in it
    with pytest.raises(UnsafePath, match=f"another user can change {home}"):
        state_dir.keygen(home / "relay", ADDRESS, "disk", False)


def test_the_cli_says_why_in_one_line_with_exit_status_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "relay"
    state.mkdir()
    os.chmod(state, 0o777)
    assert cli.main(["keygen", "--state", str(state), "--address", "198.51.100.7:9000"]) == 1
    err = capsys.readouterr().err
    assert err == f"shallot: error: refusing {state}: other users may write to it (mode 777); chmod 700 it\n"


# ---------------------------------------------------------------------------------------------- a relay's start


@pytest.fixture
def relay(tmp_path: Path) -> Path:
    state = tmp_path / "relay"
    state_dir.keygen(state, ADDRESS, "disk", False)
    return state


def test_a_relay_refuses_keys_others_may_read_like_ssh(relay: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = relay / state_dir.KEYS_FILE
    os.chmod(keys, 0o644)
    with pytest.raises(UnsafePath, match=re.escape("group or others may read it (mode 644); chmod 600 it")):
        state_dir.load(relay)
    assert _mode(keys) == 0o644  # refused, not silently fixed: the user must know the keys were exposed
    assert cli.main(["relay", "--state", str(relay)]) == 1
    assert "chmod 600" in capsys.readouterr().err
    os.chmod(keys, 0o600)
    state_dir.load(relay)


def test_a_relay_refuses_a_state_folder_others_may_write_to(relay: Path) -> None:
    os.chmod(relay, 0o777)
    with pytest.raises(UnsafePath, match="other users may write to it"):
        state_dir.load(relay)


def test_a_relay_refuses_a_symlinked_keys_file(relay: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "keys-elsewhere"
    os.replace(relay / state_dir.KEYS_FILE, elsewhere)
    (relay / state_dir.KEYS_FILE).symlink_to(elsewhere)
    with pytest.raises(UnsafePath, match="is a symlink"):
        state_dir.load(relay)


@needs_root
def test_a_relay_refuses_a_state_folder_of_another_user(relay: Path) -> None:
    os.chown(relay, NOBODY, NOBODY)
    with pytest.raises(UnsafePath, match=f"belongs to uid {NOBODY}"):
        state_dir.load(relay)


@needs_root
def test_a_relay_refuses_keys_of_another_user(relay: Path) -> None:
    os.chown(relay / state_dir.KEYS_FILE, NOBODY, NOBODY)
    with pytest.raises(UnsafePath, match=f"belongs to uid {NOBODY}"):
        state_dir.load(relay)


def test_a_descriptor_that_is_a_fifo_is_refused_at_once(relay: Path) -> None:
    desc = relay / state_dir.DESCRIPTOR_FILE
    desc.unlink()
    os.mkfifo(desc)  # opened blocking, this would wait for a writer forever
    with pytest.raises(ShallotError, match="not a regular file"):
        state_dir.read_descriptor(relay)


# ---------------------------------------------------------------------------------------------- the client's state


def test_the_engine_refuses_a_guard_state_folder_others_may_write_to(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o757)
    with pytest.raises(UnsafePath, match="other users may write to it"):
        load_guards(state / "guards", random.Random(1))
    os.chmod(state, 0o700)
    assert load_guards(state / "guards", random.Random(1)).guards == []


def test_write_private_creates_missing_folders_0700(tmp_path: Path) -> None:
    write_private(tmp_path / "a" / "b" / "guards", "{}")
    assert _mode(tmp_path / "a") == 0o700 and _mode(tmp_path / "a" / "b") == 0o700
    assert _mode(tmp_path / "a" / "b" / "guards") == 0o600


def test_read_regular_sizes_before_reading(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(10 << 20)  # sparse: reading it would take time and memory
    with pytest.raises(ShallotError, match=f"{10 << 20} bytes, more than the limit of 1000"):
        read_regular(big, 1000)
    big.write_bytes(b"x" * 1000)
    assert read_regular(big, 1000) == b"x" * 1000


# ---------------------------------------------------------------------------------------------- directory files


@pytest.mark.parametrize("size", [MAX_DIRECTORY_BYTES + 1, 100 << 20])
def test_a_directory_file_over_the_cap_is_refused_before_it_is_read(tmp_path: Path, size: int,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    big = tmp_path / "directory"
    with open(big, "wb") as f:
        f.write(b"shallot-directory 1\n" + b"#" * 1000 + b"\n")
        f.truncate(size)  # the rest sparse: quick to make, slow to read and parse (51 s for 100 MB before)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(ShallotError, match=f"{size} bytes, more than the limit"):
        load_directory(big)
    assert time.monotonic() - started < 1.0
    assert caplog.records == []


def test_a_directory_file_that_is_a_fifo_or_a_device_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        started = time.monotonic()
        with pytest.raises(ShallotError, match="not a regular file"):
            load_directory(path)
        assert time.monotonic() - started < 1.0


def test_many_bad_entries_are_one_warning(relay: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = state_dir.read_descriptor(relay).to_text()
    bad = ["!!not base64!!", "AAAA", good]  # the last: a duplicate of the first relay
    lines = [DIRECTORY_HEADER, good] + [bad[i % 3] for i in range(15_000)]
    directory = tmp_path / "directory"
    directory.write_text("\n".join(lines) + "\n")
    assert directory.stat().st_size <= MAX_DIRECTORY_BYTES
    with caplog.at_level(logging.WARNING, logger="shallot.core.discovery.directory"):
        assert [d.nickname for d in load_directory(directory)] == ["disk"]
    (record,) = caplog.records
    assert record.getMessage().startswith(f"{directory}: skipped 15000 entries: line 3: not base64; line 4: ")
    assert record.getMessage().endswith("; ...") and len(record.getMessage()) < 1000


def test_a_view_cache_in_a_folder_others_may_write_to_is_ignored(relay: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A planted cache would choose this client's relays: with a warning it is not read (nor the history)."""
    cache = tmp_path / "cache" / "network-view"
    save_view(cache, [state_dir.read_descriptor(relay)])
    save_seen(cache, {b"\x01" * RELAY_ID_LEN: (time.time() - 10, time.time())})
    assert load_view(cache, time.time()) and load_seen(cache)
    os.chmod(cache.parent, 0o777)
    with caplog.at_level(logging.WARNING, logger="shallot.core.discovery.cache"):
        assert load_view(cache, time.time()) == [] and load_seen(cache) == {}
    assert "other users may write to it" in caplog.text


def test_a_repeated_line_is_decoded_and_verified_once(relay: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A file of one valid line repeated up to the cap would cost a signature check per line (6 s on a loaded
    two-core machine for 4 MiB before the cap was 2 MiB); a line met before gets its verdict again for free."""
    good = state_dir.read_descriptor(relay).to_text()
    directory = tmp_path / "directory"
    directory.write_text("\n".join([DIRECTORY_HEADER, *[good] * 1000, *["AAAA"] * 1000]) + "\n")
    decoded = []
    real = descriptor_module.Descriptor.decode
    monkeypatch.setattr(descriptor_module.Descriptor, "decode", lambda raw: decoded.append(raw) or real(raw))
    relays, problems = descriptor_module.decode_directory(directory.read_text(), time.time())
    assert len(relays) == 1 and len(decoded) == 2  # the good line once, "AAAA" once
    assert problems[0] == f"line 3: duplicate relay {relays[0].id_hex[:8]}" and len(problems) == 1999
    assert problems[-1].startswith("line 2001: malformed descriptor")


def test_a_state_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "relay").write_text("not a folder")
    with pytest.raises(UnsafePath, match="it is not a directory"):
        state_dir.keygen(tmp_path / "relay", ADDRESS, "disk", False)


def test_our_own_symlink_above_the_state_folder_is_fine(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")  # a symlink is mode 777: it must not count as "writable"
    state_dir.keygen(tmp_path / "link" / "relay", ADDRESS, "disk", False)
    state_dir.load(tmp_path / "link" / "relay")


@needs_root
def test_a_symlink_of_another_user_above_the_state_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    os.lchown(tmp_path / "link", NOBODY, NOBODY)
    with pytest.raises(UnsafePath, match=f"is a symlink of uid {NOBODY}"):
        state_dir.keygen(tmp_path / "link" / "relay", ADDRESS, "disk", False)


def test_a_file_that_says_it_is_small_but_is_not_is_still_cut_at_the_limit() -> None:
    status = Path("/proc/self/status")  # a regular file of st_size 0 that reads as about 1 kB
    assert status.stat().st_size == 0
    with pytest.raises(ShallotError, match="more than the limit of 100 bytes"):
        read_regular(status, 100)
    assert read_regular(status, 1 << 20).startswith(b"Name:")


@needs_root
def test_a_folder_of_root_is_trusted_by_another_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine run as a user with a state folder root made (a test harness, a system service's folder): root
    could change anything anyway, so as with ssh its folders are trusted; another user's are not."""
    state = private_dir(tmp_path / "state")
    monkeypatch.setattr(privfile.os, "geteuid", lambda: 1000)
    privfile.check_private_dir(state)
    os.chown(state, NOBODY, NOBODY)
    with pytest.raises(UnsafePath, match=f"belongs to uid {NOBODY}, not to uid 1000"):
        privfile.check_private_dir(state)
