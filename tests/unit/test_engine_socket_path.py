"""The engine's default control-socket directory cannot be planted by another user."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shallot.core.control.paths import default_socket
from shallot.core.errors import ShallotError


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return tmp_path / "shallot"


def test_created_private_and_reused(runtime: Path) -> None:
    assert default_socket() == runtime / "engine.sock"  # looking does not create anything
    assert not runtime.exists()
    assert default_socket(create=True) == runtime / "engine.sock"
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    assert default_socket(create=True) == runtime / "engine.sock"


def test_symlink_in_the_way_is_refused(runtime: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o755)
    runtime.symlink_to(target)
    for create in (False, True):
        with pytest.raises(ShallotError, match="not a directory"):
            default_socket(create=create)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755  # never chmodded through the link


def test_open_directory_is_refused_when_looking_and_closed_when_creating(runtime: Path) -> None:
    runtime.mkdir(mode=0o755)
    os.chmod(runtime, 0o755)
    with pytest.raises(ShallotError, match="other users"):
        default_socket()
    default_socket(create=True)
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700


@pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true", reason="needs root to chown")
def test_directory_of_another_user_is_refused(runtime: Path) -> None:
    runtime.mkdir(mode=0o700)
    os.chown(runtime, 65534, 65534)
    with pytest.raises(ShallotError, match="belongs to uid 65534"):
        default_socket(create=True)
