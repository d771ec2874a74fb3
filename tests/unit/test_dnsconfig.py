"""core/vpn/dnsconfig.py's real code on temporary files (its paths are a DnsPaths): the resolv.conf method for a
regular file and for a symlink (Debian and Ubuntu link /etc/resolv.conf), a file somebody else rewrote
while connected, the marker left by a client that did not clean up, a rename that fails as on a
bind-mounted file, and the systemd-resolved method.

This machine runs no systemd-resolved, so the resolved method runs against a recording stand-in
``resolvectl`` first on PATH (a shell script that appends its arguments to a file) and a temporary
directory in place of /run/systemd/resolve: what is checked is exactly which commands Shallot runs, in
which order, and that a failing command is reported; not what systemd-resolved makes of them.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from shallot.core.errors import ShallotError
from shallot.core.vpn import dnsconfig
from shallot.core.vpn.dnsconfig import MARKER, DnsConfig, DnsPaths, restore_resolv_conf

ORIGINAL = "# the distribution's\nnameserver 192.0.2.53\nsearch example.test\n"


@pytest.fixture
def paths(tmp_path: Path) -> DnsPaths:
    (tmp_path / "etc").mkdir()
    return DnsPaths(resolv_conf=tmp_path / "etc" / "resolv.conf", backup_dir=tmp_path / "run" / "shallot",
                    resolved_dir=tmp_path / "no-resolved")


def test_a_regular_file_is_replaced_and_comes_back_exactly(paths: DnsPaths) -> None:
    paths.resolv_conf.write_text(ORIGINAL)
    dns = DnsConfig("shallot0", paths)
    dns.apply(["100.64.0.1"])
    assert dns.method == "resolv.conf"
    assert paths.resolv_conf.read_text() == f"{MARKER}\nnameserver 100.64.0.1\noptions edns0\n"
    backup = paths.backup()
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600  # root's copy of the user's settings
    assert stat.S_IMODE(paths.backup_dir.stat().st_mode) == 0o755  # it also holds the kill switch's marker
    assert json.loads(backup.read_text()) == {"link": None, "text": ORIGINAL}
    dns.apply(["100.64.0.1"])  # unchanged: nothing happens
    dns.apply(["100.64.0.2"])  # changed: rewritten, the backup stays the original's
    assert "nameserver 100.64.0.2" in paths.resolv_conf.read_text()
    assert json.loads(backup.read_text())["text"] == ORIGINAL
    assert dns.restore() == [f"restored {paths.resolv_conf}"]
    assert paths.resolv_conf.read_text() == ORIGINAL and not backup.exists()
    assert dns.restore() == []  # twice is harmless


def test_a_symlink_is_put_back_as_the_same_symlink(paths: DnsPaths) -> None:
    target = paths.resolv_conf.parent / "stub-resolv.conf"
    target.write_text(ORIGINAL)
    paths.resolv_conf.symlink_to("stub-resolv.conf")  # relative, as systemd and resolvconf make it
    dns = DnsConfig("shallot0", paths)
    dns.apply(["100.64.0.1"])
    assert not paths.resolv_conf.is_symlink()  # replaced by our own file, the link's target untouched
    assert MARKER in paths.resolv_conf.read_text() and target.read_text() == ORIGINAL
    assert json.loads(paths.backup().read_text()) == {"link": "stub-resolv.conf", "text": None}
    restore_resolv_conf(paths)  # as `connect --cleanup` does after a crash, without the DnsConfig
    assert paths.resolv_conf.is_symlink() and os.readlink(paths.resolv_conf) == "stub-resolv.conf"
    assert paths.resolv_conf.read_text() == ORIGINAL


def test_no_file_at_all_comes_back_as_no_file(paths: DnsPaths) -> None:
    dns = DnsConfig("shallot0", paths)
    dns.apply(["100.64.0.1"])
    assert MARKER in paths.resolv_conf.read_text()
    dns.restore()
    assert not paths.resolv_conf.exists() and not paths.resolv_conf.is_symlink()


def test_a_file_somebody_else_rewrote_meanwhile_is_left_alone(paths: DnsPaths) -> None:
    paths.resolv_conf.write_text(ORIGINAL)
    dns = DnsConfig("shallot0", paths)
    dns.apply(["100.64.0.1"])
    theirs = "# NetworkManager\nnameserver 198.51.100.53\n"
    paths.resolv_conf.write_text(theirs)  # e.g. the network manager after a new DHCP lease
    assert dns.restore() == [f"left {paths.resolv_conf} alone: it was changed by something else while connected"]
    assert paths.resolv_conf.read_text() == theirs and not paths.backup().exists()


def test_the_marker_of_a_client_that_did_not_clean_up_is_not_taken_for_the_original(paths: DnsPaths) -> None:
    paths.resolv_conf.write_text(f"{MARKER}\nnameserver 100.64.0.1\n")  # no backup: it is lost, or another netns'
    with pytest.raises(ShallotError, match="did not clean up: run `shallot connect --cleanup` first"):
        DnsConfig("shallot0", paths).apply(["100.64.0.1"])
    assert not paths.backup().exists()


def test_a_stale_marker_with_its_backup_is_a_kept_connection_and_the_original_survives(paths: DnsPaths) -> None:
    """A kill switch kept after an engine died (docs/PRIVILEGES.md): our file and the backup stay; the next
    session's apply keeps the backup of the original, not of our file, and its restore brings the original."""
    paths.resolv_conf.write_text(ORIGINAL)
    DnsConfig("shallot0", paths).apply(["100.64.0.1"])  # this DnsConfig's engine dies here
    later = DnsConfig("shallot0", paths)
    later.apply(["100.64.0.1"])
    assert json.loads(paths.backup().read_text())["text"] == ORIGINAL
    later.restore()
    assert paths.resolv_conf.read_text() == ORIGINAL


def test_an_unreadable_backup_leaves_the_file_as_it_is(paths: DnsPaths) -> None:
    paths.backup_dir.mkdir(parents=True)
    paths.backup().write_text("{not json")
    paths.resolv_conf.write_text(f"{MARKER}\nnameserver 100.64.0.1\n")
    assert restore_resolv_conf(paths) == []
    assert MARKER in paths.resolv_conf.read_text()


def test_a_bind_mounted_file_is_rewritten_in_place(paths: DnsPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ip netns exec` bind-mounts the namespace's resolv.conf: a rename onto it fails with EBUSY."""
    paths.resolv_conf.write_text(ORIGINAL)
    inode = paths.resolv_conf.stat().st_ino

    def busy(src: object, dst: object) -> None:
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(dnsconfig.os, "replace", busy)
    dns = DnsConfig("shallot0", paths)
    dns.apply(["100.64.0.1"])
    assert MARKER in paths.resolv_conf.read_text() and paths.resolv_conf.stat().st_ino == inode
    assert not list(paths.resolv_conf.parent.glob(".*shallot-tmp"))  # the temporary file is gone
    dns.restore()
    assert paths.resolv_conf.read_text() == ORIGINAL and paths.resolv_conf.stat().st_ino == inode


@pytest.fixture
def resolved(tmp_path: Path, paths: DnsPaths, monkeypatch: pytest.MonkeyPatch) -> tuple[DnsPaths, Path, Path]:
    """A recording stand-in for resolvectl first on PATH, and a directory where systemd-resolved's would be."""
    bin_dir, log = tmp_path / "bin", tmp_path / "resolvectl.log"
    bin_dir.mkdir()
    script = bin_dir / "resolvectl"
    script.write_text(f'#!/bin/sh\necho "$*" >> {log}\n[ -e {tmp_path}/fail ] && {{ echo "Failed to set DNS: '
                      f'no such link" >&2; exit 1; }}\nexit 0\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    run = tmp_path / "systemd-resolve"
    run.mkdir()
    return DnsPaths(resolv_conf=paths.resolv_conf, backup_dir=paths.backup_dir, resolved_dir=run), log, tmp_path


def test_systemd_resolved_gets_the_resolver_on_the_device_and_etc_is_not_touched(resolved: tuple) -> None:
    paths, log, _ = resolved
    paths.resolv_conf.symlink_to("../run/systemd/resolve/stub-resolv.conf")
    dns = DnsConfig("shallot0", paths)
    dns.apply(["100.64.0.1"])
    assert dns.method == "systemd-resolved"
    assert log.read_text().splitlines() == ["dns shallot0 100.64.0.1", "domain shallot0 ~.",
                                            "default-route shallot0 yes"]
    assert os.readlink(paths.resolv_conf) == "../run/systemd/resolve/stub-resolv.conf"
    assert not paths.backup().exists()
    assert dns.restore() == ["reverted systemd-resolved settings of shallot0"]
    assert log.read_text().splitlines()[-1] == "revert shallot0"


def test_a_failing_resolvectl_is_reported(resolved: tuple) -> None:
    paths, _, root = resolved
    (root / "fail").touch()
    with pytest.raises(ShallotError, match="resolvectl dns shallot0 failed: Failed to set DNS: no such link"):
        DnsConfig("shallot0", paths).apply(["100.64.0.1"])


def test_without_resolvectl_the_file_method_is_used(paths: DnsPaths, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "run-resolved").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    paths = DnsPaths(paths.resolv_conf, paths.backup_dir, tmp_path / "run-resolved")
    dns = DnsConfig("shallot0", paths)
    dns.apply(["100.64.0.1"])
    assert dns.method == "resolv.conf"
