"""Where the engine's control socket lives, checked so that another user cannot plant it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from shallot.core.errors import ShallotError


def default_socket(*, create: bool = False) -> Path:
    """$XDG_RUNTIME_DIR/shallot/engine.sock, else /tmp/shallot-<uid>/engine.sock.  With ``create`` the
    directory is made (0700) if missing; either way an existing one must be a real directory (not a
    symlink) owned by us and closed to others, since /tmp is shared and another user could plant it."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    root = Path(base) / "shallot" if base else Path(f"/tmp/shallot-{os.geteuid()}")
    if create:
        try:
            root.mkdir(mode=0o700, parents=bool(base))
        except FileExistsError:
            pass
        except OSError as exc:
            raise ShallotError(f"cannot create {root}: {exc.strerror}") from None
    try:
        st = root.lstat()
    except FileNotFoundError:
        return root / "engine.sock"  # nothing there yet: connecting will say nothing is running
    if not stat.S_ISDIR(st.st_mode):
        raise ShallotError(f"refusing {root}: it is not a directory (a symlink or a file is in the way)")
    if st.st_uid != os.geteuid():
        raise ShallotError(f"refusing {root}: it belongs to uid {st.st_uid}, not to you")
    if st.st_mode & 0o077:
        if not create:
            raise ShallotError(f"refusing {root}: other users can open it (mode {st.st_mode & 0o777:o})")
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
    return root / "engine.sock"
