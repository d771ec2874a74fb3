"""State files and directories that another user must not be able to read, plant or swap (relay keys, the
view cache and its history, the entry guards), and files we read without trusting what they are
(docs/PROTOCOL.md §3.5, §3.6).

* ``private_dir``: a state directory is created 0700 and refused (UnsafePath) when it is not a directory we
  (or root) own, when group or others may write to it, or when a directory above it can be changed by another user
  (writable by group/other without the sticky bit, or owned by someone other than us or root): whoever can
  write there can plant a symlink where we are about to write, or swap the whole directory.
* ``write_private``: a new temporary file beside the target, opened O_CREAT|O_EXCL|O_NOFOLLOW under a random
  name (nothing planted is ever opened, truncated or followed), fsync, rename.
* ``read_regular``: open without blocking (a FIFO or a device never freezes us), refuse anything but a
  regular file, refuse it above a size limit before reading it.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path

from shallot.core.errors import ShallotError


class UnsafePath(ShallotError, OSError):
    """A state directory or file another user could tamper with.  An OSError too, so that callers that
    already treat a failed save as 'cannot save' (the view cache, the guards) keep doing so."""

    def __init__(self, message: str) -> None:
        OSError.__init__(self, errno.EPERM, message)

    def __str__(self) -> str:
        return str(self.strerror)


def _others_can_change(st: os.stat_result) -> bool:
    """Someone other than us or root can add, remove or rename entries in this directory."""
    if st.st_uid not in (0, os.geteuid()):
        return True
    return bool(st.st_mode & 0o022) and not st.st_mode & stat.S_ISVTX


def check_private_dir(path: Path) -> None:
    """Raise UnsafePath unless ``path`` is a directory we (or root) own, closed to writes by group and others,
    below directories that only we or root can change."""
    try:
        st = os.stat(path)  # a symlink we or root made is fine: its target is checked, and its own folder below
    except FileNotFoundError:
        raise UnsafePath(f"refusing {path}: it does not exist") from None
    except OSError as exc:
        raise UnsafePath(f"refusing {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"refusing {path}: it is not a directory")
    if st.st_uid not in (0, os.geteuid()):  # root may do anything anyway; as ssh, a folder of root's is trusted
        raise UnsafePath(f"refusing {path}: it belongs to uid {st.st_uid}, not to uid {os.geteuid()} (us)")
    if st.st_mode & 0o022:
        raise UnsafePath(f"refusing {path}: other users may write to it (mode {st.st_mode & 0o777:o}); "
                         f"chmod 700 it")
    absolute = Path(os.path.abspath(path))
    for chain in (absolute, Path(os.path.realpath(path))):
        for parent in chain.parents:
            try:
                pst = os.lstat(parent)
            except OSError:
                continue
            if stat.S_ISLNK(pst.st_mode):
                if pst.st_uid not in (0, os.geteuid()):
                    raise UnsafePath(f"refusing {path}: {parent} is a symlink of uid {pst.st_uid}")
                continue  # the symlink cannot change; its folder is the next parent, its target the other chain
            if _others_can_change(pst):
                raise UnsafePath(f"refusing {path}: another user can change {parent} "
                                 f"(uid {pst.st_uid}, mode {pst.st_mode & 0o7777:o})")


def private_dir(path: Path) -> Path:
    """``path``, created 0700 if missing (its missing parents too), then checked (check_private_dir)."""
    missing = []
    p = Path(os.path.abspath(path))
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise UnsafePath(f"cannot create {d}: {exc.strerror}") from None
    check_private_dir(path)
    return path


def write_private(path: Path, data: str | bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (mode 0600 unless said otherwise) in a private directory (private_dir):
    a new temporary file beside it, O_EXCL|O_NOFOLLOW under a random name, fsync, rename.  A crash leaves the
    old file or the new one, never half of one; nothing planted is followed.  Raises OSError (UnsafePath)."""
    private_dir(path.parent)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, mode)  # whatever the umask
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def read_regular(path: Path, limit: int, *, private: bool = False) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them; ShallotError otherwise (missing: its
    FileNotFoundError is kept).  Opened O_NONBLOCK|O_NOCTTY, so a FIFO or a device is refused without a
    wait, and sized before it is read.  ``private``: it must be ours and closed to group and others (a key)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | (os.O_NOFOLLOW if private else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(f"refusing {path}: it is a symlink") from None
        raise ShallotError(f"cannot read {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ShallotError(f"refusing {path}: not a regular file")
        if private and st.st_uid != os.geteuid():
            raise UnsafePath(f"refusing {path}: it belongs to uid {st.st_uid}, not to us")
        if private and st.st_mode & 0o077:
            raise UnsafePath(f"refusing {path}: group or others may read it (mode {st.st_mode & 0o777:o}); "
                             f"chmod 600 it")
        if st.st_size > limit:
            raise ShallotError(f"refusing {path}: {st.st_size} bytes, more than the limit of {limit}")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:  # it grew while we read
            raise ShallotError(f"refusing {path}: more than the limit of {limit} bytes")
        return b"".join(chunks)
    except UnsafePath:
        raise
    except OSError as exc:
        raise ShallotError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
