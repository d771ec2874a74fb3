"""Loading a directory file: the signed descriptors of a network, written by ``shallot directory``.

The same address rules as discovery (docs/PROTOCOL.md §12.1): a relay whose addresses (or introducers)
include an unspecified, multicast, link-local, reserved or v4-mapped address is skipped, and so is one
with a loopback or private (RFC 1918, CGNAT, ULA) address unless the file describes a network on one
machine (every relay loopback) or the caller runs a private network on purpose (``private_network``,
``--private-network``).  Otherwise a file could send the client's guard link to 0.0.0.0, to its own
machine or into its LAN (review M6).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from pathlib import Path

from shallot.core.discovery.addresses import usable_address
from shallot.core.errors import ShallotError
from shallot.core.privfile import read_regular
from shallot.crypto.descriptor import Descriptor, DescriptorError, decode_directory

log = logging.getLogger(__name__)
# a relay's line is about 280 bytes (more with introducers): 2 MiB holds about 7 000 relays (Tor's whole
# network); decoding a full file of distinct relays costs 0.7-3 s of CPU on a loaded two-core machine (each
# line is a signature check; a repeated line costs nothing), and the engine decodes on its loop
MAX_DIRECTORY_BYTES = 2 << 20
SHOWN_PROBLEMS = 3  # the first few skipped entries are named in the one warning


def _hosts(desc: Descriptor) -> list[tuple[str, int]]:
    intro = [a for _, a in desc.reachability.introducers] if desc.reachability is not None else []
    return [*desc.addresses, *intro]


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def usable_relays(relays: list[Descriptor], *, private_network: bool) -> tuple[list[Descriptor], list[str]]:
    """(relays whose every address we would contact, a problem line for each one left out)."""
    one_machine = all(_loopback(h) for d in relays for h, _ in _hosts(d))
    good, problems = [], []
    for desc in relays:
        if all(usable_address(h, p, allow_loopback=private_network or one_machine, allow_private=private_network)
               for h, p in _hosts(desc)):
            good.append(desc)
        else:
            problems.append(f"relay {desc.nickname} ({desc.id_hex[:8]}): an address we never contact "
                            f"{'' if private_network else '(give --private-network for a private network)'}".rstrip())
    return good, problems


def load_directory(path: Path, wall: float | None = None, *, private_network: bool = False) -> list[Descriptor]:
    """The usable relays of a directory file.  The file is refused unless it is a regular file of at most
    MAX_DIRECTORY_BYTES (checked before reading; a FIFO or a device is refused at once, never waited on), and
    what it skips is one summarised warning, however many entries are bad (docs/PROTOCOL.md §3.5)."""
    try:
        text = read_regular(path, MAX_DIRECTORY_BYTES).decode()
    except FileNotFoundError:
        raise ShallotError(f"directory file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ShallotError(f"cannot read directory file {path}: {exc}") from None
    try:
        relays, problems = decode_directory(text, time.time() if wall is None else wall)
    except DescriptorError as exc:
        raise ShallotError(f"{path}: {exc}") from None
    relays, refused = usable_relays(relays, private_network=private_network)
    skipped = [*problems, *refused]
    if skipped:
        log.warning("%s: skipped %d %s: %s%s", path, len(skipped), "entry" if len(skipped) == 1 else "entries",
                    "; ".join(skipped[:SHOWN_PROBLEMS]), "; ..." if len(skipped) > SHOWN_PROBLEMS else "")
    if not relays:
        raise ShallotError(f"{path}: directory has no usable relay: {'; '.join(refused[:3])}")
    return relays
