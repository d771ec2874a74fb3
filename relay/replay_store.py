"""The build replay cache on disk (docs/PROTOCOL.md §3.6, §5.7): ``DIR/replay``, 0600, append-only.

    file  = magic "SHRPLY01" (8) | secret (32) | entry*
    entry = onion key id (4) | tag (8) | expiry u32 (unix seconds)               (16 bytes)

``tag`` = HMAC-SHA256(secret, key id | X)[0:8] of each build record the relay accepted, so a CREATE
replayed after a restart is refused like one replayed before it.  The relay appends new entries and
fsyncs at least every ``FLUSH_S``, and compacts the file (drops expired entries) when it starts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from shallot.core.privfile import write_private
from shallot.relay.forwarder import REPLAY_TAG_LEN

log = logging.getLogger("shallot.relay")

REPLAY_FILE = "replay"
MAGIC = b"SHRPLY01"
SECRET_LEN = 32
ENTRY_LEN = 4 + REPLAY_TAG_LEN + 4
FLUSH_S = 1.0

Entry = tuple[bytes, bytes, float]  # (onion key id, tag, expiry)


def encode_entries(entries: list[Entry]) -> bytes:
    return b"".join(k + t + int(e).to_bytes(4, "big") for k, t, e in entries)


def decode(data: bytes) -> tuple[bytes, list[Entry]] | None:
    """(secret, entries) of a replay file, or None if it is not one.  A torn last entry (a crash in the
    middle of an append) is ignored."""
    if len(data) < len(MAGIC) + SECRET_LEN or not data.startswith(MAGIC):
        return None
    secret = data[len(MAGIC):len(MAGIC) + SECRET_LEN]
    body = data[len(MAGIC) + SECRET_LEN:]
    entries = []
    for off in range(0, len(body) - ENTRY_LEN + 1, ENTRY_LEN):
        e = body[off:off + ENTRY_LEN]
        entries.append((e[:4], e[4:4 + REPLAY_TAG_LEN], float(int.from_bytes(e[-4:], "big"))))
    return secret, entries


class ReplayStore:
    """Load, compact and append to ``DIR/replay``."""

    def __init__(self, state: Path) -> None:
        self.path = state / REPLAY_FILE
        self._fd: int | None = None

    def load(self, new_secret: bytes, wall: float) -> tuple[bytes, list[Entry]]:
        """The saved secret and the unexpired entries; the file is rewritten with just those (or created
        with ``new_secret``) and kept open for appending."""
        self.close()
        try:
            loaded = decode(self.path.read_bytes())
        except FileNotFoundError:
            loaded = None
        except OSError as exc:
            log.warning("cannot read %s (%s): starting an empty build replay cache", self.path, exc.strerror)
            loaded = None
        if loaded is None and self.path.exists():
            log.warning("%s is not a replay file: starting an empty build replay cache", self.path)
        secret, entries = loaded if loaded is not None else (new_secret, [])
        entries = [e for e in entries if e[2] >= wall]
        self.rewrite(secret, entries)
        return secret, entries

    def rewrite(self, secret: bytes, entries: list[Entry]) -> None:
        """Replace the file by exactly these entries (compaction: a running relay does it hourly)."""
        self.close()
        write_private(self.path, MAGIC + secret + encode_entries(entries))  # O_EXCL|O_NOFOLLOW temp, rename
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)

    def append(self, entries: list[Entry]) -> None:
        if not entries or self._fd is None:
            return
        os.write(self._fd, encode_entries(entries))
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
