"""Point the system's DNS at the exit's resolver while connected, and put it back exactly afterwards.

Two methods, chosen by what the system runs:
- **systemd-resolved** (``/run/systemd/resolve/`` exists and ``resolvectl`` is installed): the resolver is
  set on ``shallot0`` with the routing domain ``~.``, so every query goes through the tunnel; removing the
  device undoes it, and ``resolvectl revert`` is called for good measure.  /etc is not touched.
- **resolv.conf**: the current file (or symlink) is saved, then replaced by one naming only the exit's
  resolver.  The saved copy lives in ``/run/shallot/`` under the inode number of the network namespace, so
  a client in a namespace (``ip netns exec`` bind-mounts ``/etc/netns/NAME/resolv.conf`` over
  ``/etc/resolv.conf``) and one on the host never restore each other's file.  Our file carries a marker
  line, so ``cleanup`` restores only a file we wrote and never clobbers one somebody changed since.

Runs as root (in-process for ``shallot connect`` as root, or in the privileged helper).  The paths are a
``DnsPaths`` (the system's by default), so tests run this code on files of their own.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from shallot.core.errors import ShallotError
from shallot.core.vpn.killmark import RUN_DIR, netns_id

log = logging.getLogger("shallot.dns")
MARKER = "# written by shallot connect: the original comes back on disconnect or `shallot connect --cleanup`"


@dataclass(frozen=True)
class DnsPaths:
    resolv_conf: Path = Path("/etc/resolv.conf")
    backup_dir: Path = RUN_DIR  # 0755: it also holds the kill switch's marker; the backup itself is 0600
    resolved_dir: Path = Path("/run/systemd/resolve")  # exists where systemd-resolved runs

    def backup(self) -> Path:
        return self.backup_dir / f"resolv.conf.{netns_id()}.json"

    def uses_resolved(self) -> bool:
        return self.resolved_dir.is_dir() and shutil.which("resolvectl") is not None


SYSTEM = DnsPaths()


def _write_in_place(path: Path, text: str) -> None:
    """Atomic replace where possible; in place when the file is a bind mount (rename gives EBUSY)."""
    tmp = path.with_name(f".{path.name}.shallot-tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        return
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if exc.errno not in (errno.EBUSY, errno.EXDEV, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
    with open(path, "w") as f:  # a bind-mounted file: rewrite its contents
        f.write(text)


class DnsConfig:
    def __init__(self, device: str, paths: DnsPaths = SYSTEM) -> None:
        self.device = device
        self.paths = paths
        self.servers: list[str] = []
        self.method: str | None = None

    def apply(self, servers: list[str]) -> None:
        servers = [str(IPv4Address(s)) for s in servers]
        if servers == self.servers:
            return
        if self.paths.uses_resolved():
            self._apply_resolved(servers)
        else:
            self._apply_file(servers)
        self.servers = servers
        log.info("DNS through the tunnel: %s (%s)", ", ".join(servers), self.method)

    def _apply_resolved(self, servers: list[str]) -> None:
        for argv in (["resolvectl", "dns", self.device, *servers], ["resolvectl", "domain", self.device, "~."],
                     ["resolvectl", "default-route", self.device, "yes"]):
            res = subprocess.run(argv, capture_output=True, text=True)
            if res.returncode != 0:
                raise ShallotError(f"{' '.join(argv[:3])} failed: {res.stderr.strip()}")
        self.method = "systemd-resolved"

    def _apply_file(self, servers: list[str]) -> None:
        resolv_conf, backup = self.paths.resolv_conf, self.paths.backup()
        if not backup.exists():  # (one exists when a kill switch was kept after an engine died: keep it)
            saved: dict[str, str | None] = {"link": None, "text": None}
            if resolv_conf.is_symlink():
                saved["link"] = os.readlink(resolv_conf)
            else:
                with contextlib.suppress(FileNotFoundError):
                    saved["text"] = resolv_conf.read_text()
            if saved["text"] is not None and MARKER in saved["text"]:
                raise ShallotError(f"{resolv_conf} was written by an earlier shallot connect that did not clean "
                                   "up: run `shallot connect --cleanup` first")
            self.paths.backup_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.chmod(self.paths.backup_dir, 0o755)  # whatever the umask: the kill switch's marker is read here
            fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(saved, f)
        text = MARKER + "\n" + "".join(f"nameserver {s}\n" for s in servers) + "options edns0\n"
        if resolv_conf.is_symlink():
            resolv_conf.unlink()  # the symlink is in the backup; a dangling one would break every lookup
        _write_in_place(resolv_conf, text)
        self.method = "resolv.conf"

    def restore(self) -> list[str]:
        done = []
        if self.method == "systemd-resolved":
            subprocess.run(["resolvectl", "revert", self.device], capture_output=True)
            done.append(f"reverted systemd-resolved settings of {self.device}")
        elif self.method == "resolv.conf":
            done.extend(restore_resolv_conf(self.paths))
        self.method, self.servers = None, []
        return done


def restore_resolv_conf(paths: DnsPaths = SYSTEM) -> list[str]:
    """Put back the resolv.conf saved for this network namespace, if ours is still in place."""
    resolv_conf, backup = paths.resolv_conf, paths.backup()
    try:
        saved = json.loads(backup.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s (%s): leaving %s as it is", backup, exc, resolv_conf)
        return []
    try:
        current = resolv_conf.read_text() if not resolv_conf.is_symlink() else ""
    except FileNotFoundError:
        current = MARKER
    if MARKER not in current:  # somebody (a network manager, the user) replaced our file: theirs wins
        backup.unlink()
        return [f"left {resolv_conf} alone: it was changed by something else while connected"]
    if saved.get("link"):
        with contextlib.suppress(FileNotFoundError):
            resolv_conf.unlink()
        os.symlink(saved["link"], resolv_conf)
    elif saved.get("text") is not None:
        _write_in_place(resolv_conf, saved["text"])
    else:  # there was none
        try:
            resolv_conf.unlink()
        except OSError:
            _write_in_place(resolv_conf, "")
    backup.unlink()
    return [f"restored {resolv_conf}"]
