"""The kill switch's marker: a world-readable file that exists while a kill-switch block is in place in this
network namespace (docs/PRIVILEGES.md, "When the engine dies").

The nftables table cannot be listed without privileges, but an ordinary user's engine and the desktop app
must know when a block outlived the engine that installed it.  Whoever installs the block (the privileged
helper, or an engine running as root) writes the marker; ``restore`` and ``shallot connect --cleanup``
remove it with the table.  One marker per network namespace (its inode, as for the resolv.conf backup in
core/vpn/dnsconfig.py), so a client in a namespace and one on the host never see each other's block.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

RUN_DIR = Path("/run/shallot")
TEXT = ("A Shallot kill switch blocks traffic outside the tunnel in this network namespace (nftables table "
        "inet shallot_client).  It stays until Shallot connects or disconnects again, or until "
        "`sudo shallot connect --cleanup`.\n")


def netns_id() -> int:
    """The inode of this process's network namespace (0 where it cannot be read)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


def marker_path(run_dir: Path | None = None) -> Path:
    return (run_dir or RUN_DIR) / f"kill-switch.{netns_id()}"


def set_mark(path: Path | None = None) -> None:
    """Root: the block is in place.  The directory is made world-readable (it may exist as 0700 from an
    older version), the file 0644, written atomically."""
    path = path or marker_path()
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o755)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(TEXT)
    os.chmod(tmp, 0o644)  # whatever the umask
    os.replace(tmp, path)


def clear_mark(path: Path | None = None) -> bool:
    """Root: the block is gone.  True if there was a marker."""
    with contextlib.suppress(FileNotFoundError):
        (path or marker_path()).unlink()
        return True
    return False


def is_marked(path: Path | None = None) -> bool:
    """Anyone: whether a kill-switch block is in place in this network namespace."""
    return (path or marker_path()).is_file()
