"""Loading the directory file and resolving relay names the user typed (ids, id prefixes, nicknames)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from shallot.core.errors import ShallotError
from shallot.crypto.descriptor import Descriptor, DescriptorError, decode_directory

log = logging.getLogger(__name__)


def load_directory(path: Path, wall: float | None = None) -> list[Descriptor]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ShallotError(f"directory file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ShallotError(f"cannot read directory file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        relays, problems = decode_directory(text, time.time() if wall is None else wall)
    except DescriptorError as exc:
        raise ShallotError(f"{path}: {exc}") from None
    for problem in problems:
        log.warning("%s: skipped %s", path, problem)
    return relays


def resolve_relay(name: str, relays: list[Descriptor]) -> Descriptor:
    """Find a relay by full id, unique id prefix (at least 4 hex digits) or nickname."""
    key = name.strip().lower()
    if not key:
        raise ShallotError("empty relay id")
    exact = [d for d in relays if d.id_hex == key]
    if exact:
        return exact[0]
    by_nick = [d for d in relays if d.nickname.lower() == key]
    if len(by_nick) == 1:
        return by_nick[0]
    if len(key) >= 4:
        by_prefix = [d for d in relays if d.id_hex.startswith(key)]
        if len(by_prefix) == 1:
            return by_prefix[0]
        if len(by_prefix) > 1:
            raise ShallotError(f"relay id {name!r} is ambiguous: give more digits")
    raise ShallotError(f"unknown relay {name!r}: not in the directory (or its descriptor expired)")
