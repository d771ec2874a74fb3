"""Loading a directory file: the signed descriptors of a network, written by ``shallot directory``."""

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
