"""The last good network view on disk (0600), so the next start is fast and works with the seeds down.

The file is an ordinary directory file (docs/PROTOCOL.md §3.5): it needs no new parser, and every
descriptor in it is checked again (signature, expiry) when it is read, so a stale or tampered cache
can only ever shrink the view.  Beside it, ``<cache>.seen`` (0600) keeps when this client first met
each relay (core/discovery/view.py encode_seen), which path selection weights by: a lost or damaged one
only makes relays look new.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from shallot.core.discovery.directory import MAX_DIRECTORY_BYTES
from shallot.core.discovery.view import decode_seen, encode_seen
from shallot.core.errors import ShallotError
from shallot.core.privfile import check_private_dir, read_regular, write_private
from shallot.crypto.descriptor import Descriptor, DescriptorError, decode_directory, encode_directory

log = logging.getLogger(__name__)


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shallot" / "network-view"


def seen_path(cache: Path) -> Path:
    return cache.with_name(cache.name + ".seen")


def save_view(path: Path, descriptors: list[Descriptor]) -> None:
    """Write atomically with mode 0600 (the view says which relays this user may be using)."""
    if not descriptors:
        return  # never replace a good cache with an empty view
    write_private(path, encode_directory(descriptors))


def save_seen(cache: Path, seen: dict[bytes, tuple[float, float]]) -> None:
    """The first-seen history next to the cache, atomically, 0600."""
    if seen:
        write_private(seen_path(cache), encode_seen(seen))


def load_seen(cache: Path) -> dict[bytes, tuple[float, float]]:
    try:
        check_private_dir(cache.parent)
        return decode_seen(read_regular(seen_path(cache), MAX_DIRECTORY_BYTES, private=True).decode())
    except (OSError, ShallotError, UnicodeDecodeError):
        return {}  # none yet, or unreadable: every relay starts as just met


def load_view(path: Path, wall: float) -> list[Descriptor]:
    """Descriptors from the cache that are still valid; [] if there is none or it is unusable."""
    try:  # a cache in a folder another user can change is refused: it would choose this client's relays
        check_private_dir(path.parent)
        text = read_regular(path, MAX_DIRECTORY_BYTES, private=True).decode()
    except FileNotFoundError:
        return []
    except (ShallotError, UnicodeDecodeError) as exc:
        log.warning("ignoring the network view cache %s: %s", path, exc)
        return []
    try:
        good, problems = decode_directory(text, wall)
    except DescriptorError as exc:
        log.info("network view cache %s holds nothing usable: %s", path, exc)
        return []
    if problems:
        log.info("network view cache: skipped %d entries: %s", len(problems), "; ".join(problems[:3]))
    return good
