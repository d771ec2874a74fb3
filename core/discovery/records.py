"""DHT records: a relay's signed descriptor stored under its relay id (pure; docs/PROTOCOL.md §12.2).

A record is self-certifying: the key is the relay id, which is a hash of the identity key inside the
value, and the value carries that key's signature.  Nobody but the relay can make a record that
validates under its key, so a DHT node can drop or withhold records but never forge or alter one.
Rollback (serving an older, still validly signed descriptor) is stopped by ``supersedes``: newer
``published`` wins everywhere, with no majority vote.

Every rejection names a reason; callers count them (``reject_<reason>``).
"""

from __future__ import annotations

from collections.abc import Iterable

from shallot.core.discovery.addresses import dht_address, same_address, usable_address
from shallot.crypto.descriptor import MAX_DESCRIPTOR_LEN, Descriptor, DescriptorError
from shallot.crypto.keys import RELAY_ID_LEN
from shallot.crypto.params import SUPPORTED_VERSIONS

KEY_LEN = RELAY_ID_LEN  # 20 bytes, the same space as Kademlia node ids
MAX_RECORD_LEN = MAX_DESCRIPTOR_LEN
FUTURE_SKEW_S = 3600  # the descriptor rule (§3.4): at most one hour of clock skew

REASONS = ("type", "size", "malformed", "signature", "key_mismatch", "expired", "future", "version", "address",
           "stale")


class RecordError(ValueError):
    """A record failed validation; ``reason`` is one of REASONS (a counter name)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


def validate_record(key: object, value: object, wall: float, *, allow_loopback: bool,
                    allow_private: bool = False) -> Descriptor:
    """The descriptor in ``value`` if it is a valid, live record for ``key``; raises RecordError."""
    if not isinstance(key, bytes) or len(key) != KEY_LEN or not isinstance(value, bytes):
        raise RecordError("type", "key and value must be bytes")
    if len(value) > MAX_RECORD_LEN:
        raise RecordError("size", f"record longer than {MAX_RECORD_LEN} bytes")
    try:
        desc = Descriptor.decode(value)
    except DescriptorError as exc:
        reason = "signature" if "bad signature" in str(exc) else "malformed"
        raise RecordError(reason, str(exc)) from None
    if desc.relay_id != key:
        raise RecordError("key_mismatch", "record stored under another relay's key")
    check_live(desc, wall, allow_loopback=allow_loopback, allow_private=allow_private)
    return desc


def check_live(desc: Descriptor, wall: float, *, allow_loopback: bool, allow_private: bool = False) -> None:
    """Expiry, clock skew, protocol version and addresses of an already signature-checked descriptor."""
    if wall > desc.expires:
        raise RecordError("expired", f"descriptor of {desc.nickname} expired")
    if desc.published > wall + FUTURE_SKEW_S:
        raise RecordError("future", f"descriptor of {desc.nickname} is from the future")
    if not any(v in SUPPORTED_VERSIONS for v in range(desc.version_min, desc.version_max + 1)):
        raise RecordError("version", f"relay {desc.nickname} speaks no protocol version we support")
    # introducers too: a client dialling a relay behind a NAT sends its requests there (§3.4.1)
    intro = [a for _, a in desc.reachability.introducers] if desc.reachability is not None else []
    if not all(usable_address(h, p, allow_loopback=allow_loopback, allow_private=allow_private)
               for h, p in [*desc.addresses, *intro]):
        raise RecordError("address", f"descriptor of {desc.nickname} has an address we never contact")


def newest_first(raws: Iterable[bytes]) -> list[bytes]:
    """Order raw records by their claimed ``published`` (bytes 102..110), newest first, before validating:
    a replayed older descriptor then always meets the newer one already in the view and is counted as
    rejected ("stale") instead of being silently superseded.  Order only: nothing is trusted here."""
    return sorted(raws, key=lambda r: r[102:110], reverse=True)


def supersedes(new: Descriptor, old: Descriptor) -> bool:
    """True if ``new`` replaces ``old`` (same relay): strictly newer ``published``; on a tie the larger
    encoding, so that every node settles on the same one without a vote."""
    if new.published != old.published:
        return new.published > old.published
    return new.encode() > old.encode()


def binds(node_id: bytes, raw: object, dht_addr: tuple[str, int], wall: float, *, allow_loopback: bool,
          allow_private: bool = False) -> bool:
    """True if ``raw`` is a valid record for ``node_id`` whose first address puts the relay's DHT socket
    (link port + 1) exactly at ``dht_addr``: the proof a DHT contact must give before it enters a
    routing table.  Only the holder of the identity key can sign it, and it names the address it
    came from, so it cannot be used from anywhere else."""
    try:
        desc = validate_record(node_id, raw, wall, allow_loopback=allow_loopback, allow_private=allow_private)
        return same_address(dht_address(desc.address), dht_addr)
    except (RecordError, ValueError):
        return False
