"""Private state files (the view cache and its history, the entry guards): written whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``, mode 0600 in a 0700 directory: write a temporary file beside it (named
    for this process, so two processes sharing the directory never mix), fsync, rename.  A crash leaves the
    old file or the new one, never half of one; a planted symlink is not followed.  Raises OSError."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # whatever the umask
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
