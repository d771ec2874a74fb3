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

from shallot.core.discovery.view import decode_seen, encode_seen
from shallot.core.privfile import write_private
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
        return decode_seen(seen_path(cache).read_text())
    except (OSError, UnicodeDecodeError):
        return {}  # none yet, or unreadable: every relay starts as just met


def load_view(path: Path, wall: float) -> list[Descriptor]:
    """Descriptors from the cache that are still valid; [] if there is none or it is unusable."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("ignoring the network view cache %s: %s", path, exc)
        return []
    try:
        good, problems = decode_directory(text, wall)
    except DescriptorError as exc:
        log.info("network view cache %s holds nothing usable: %s", path, exc)
        return []
    for problem in problems:
        log.info("network view cache: skipped %s", problem)
    return good
