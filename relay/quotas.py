"""The relay's per-source bookkeeping against state exhaustion (docs/PROTOCOL.md §5.7, §8.2; pure).

* ``ReplayCache``: the build replay cache, in buckets by expiry, counted per source; it ages out by time
  and, when large, refuses only the sources holding more than their share.
* ``DialGuard``: who a relay may dial for an EXTEND: a short negative cache of targets whose handshake
  failed, a cap on dials in flight and a token bucket per target host, so that CREATEs naming an address
  nobody answers at cannot turn the relay into a handshake cannon.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from shallot.core.ratelimit import TokenBuckets
from shallot.core.wire.addresses import host_key
from shallot.crypto.codec import Address

# ------------------------------------------------------------------------------------------- replay cache


@dataclass
class _Bucket:
    tags: set[bytes] = field(default_factory=set)
    sources: Counter[str] = field(default_factory=Counter)


Entry = tuple[bytes, bytes, float]  # (onion key id, tag, expiry wall)


class ReplayCache:
    """Tags of accepted build records, per onion key, kept until their record can no longer be accepted.

    Every entry of one record hour shares one expiry, so entries live in a few buckets per key (one per
    expiry) and expire a bucket at a time.  Each entry is counted against the source whose CREATE made it
    (``source``: a client's IPv4 address or IPv6 /64, or a relay-tier peer).  ``admit`` says whether a
    source may add one more: below ``per_source`` (its quota), and once the cache holds ``soft_cap``
    entries, only a source holding less than the average per source.  A source that has nothing in the
    cache is therefore always admitted (an honest client is never refused for what others did) until
    ``hard_cap``; what it takes to get there is in docs/PROTOCOL.md §8.2."""

    def __init__(self, *, soft_cap: int, hard_cap: int) -> None:
        self.soft_cap, self.hard_cap = soft_cap, hard_cap
        self._keys: dict[bytes, dict[float, _Bucket]] = {}
        self.by_source: Counter[str] = Counter()
        self.total = 0

    def __len__(self) -> int:
        return self.total

    def seen(self, key_id: bytes, tag: bytes) -> bool:
        return any(tag in b.tags for b in self._keys.get(key_id, {}).values())

    def admit(self, source: str, per_source: int) -> str | None:
        """None if ``source`` may add an entry, else the counter that names the refusal."""
        held = self.by_source[source] if source in self.by_source else 0
        if held >= per_source:
            return "reject_create_replay_quota"
        if self.total >= self.hard_cap:
            return "reject_create_replay_cache_full"
        if self.total >= self.soft_cap and held * len(self.by_source) >= self.total:
            return "reject_create_replay_share"
        return None

    def add(self, key_id: bytes, tag: bytes, expiry: float, source: str) -> None:
        bucket = self._keys.setdefault(key_id, {}).get(expiry)
        if bucket is None:
            bucket = self._keys[key_id][expiry] = _Bucket()
        if tag in bucket.tags:
            return
        bucket.tags.add(tag)
        bucket.sources[source] += 1
        self.by_source[source] += 1
        self.total += 1

    def expire(self, wall: float) -> None:
        for buckets in self._keys.values():
            for expiry in [e for e in buckets if e < wall]:
                self._drop(buckets.pop(expiry))

    def keep_keys(self, key_ids: set[bytes]) -> None:
        """Forget the caches of onion keys no longer held (their records can no longer open)."""
        for key_id in [k for k in self._keys if k not in key_ids]:
            for bucket in self._keys.pop(key_id).values():
                self._drop(bucket)

    def _drop(self, bucket: _Bucket) -> None:
        self.total -= len(bucket.tags)
        self.by_source.subtract(bucket.sources)
        for source in bucket.sources:
            if self.by_source[source] <= 0:
                del self.by_source[source]

    def entries(self) -> list[Entry]:
        return [(key_id, tag, expiry) for key_id, buckets in self._keys.items()
                for expiry, bucket in buckets.items() for tag in bucket.tags]


# ------------------------------------------------------------------------------------------- dials

NEGATIVE_CACHE_S = 60.0  # a target whose handshake timed out is not dialed again for this long
# a target host: its IPv4 address or IPv6 /64 (core/wire/addresses.py host_key; on loopback, a test network
# on one machine, address and port)
MAX_PENDING_DIALS_PER_HOST = 2  # dials in flight to one target host
DIALS_PER_MINUTE_PER_HOST = 4.0  # new dials to one target host: token bucket, burst 4
MAX_NEGATIVE = 65536


class DialGuard:
    """Whether the relay may start a new link to an EXTEND target (pure; time passed in).  A dial already
    up or in flight to the same link key is reused by the link layer and never reaches here."""

    def __init__(self) -> None:
        self._failed: dict[Address, float] = {}  # target -> until (insertion order = expiry order)
        self._pending: dict[int, str] = {}  # link id -> target host key
        self._pending_hosts: Counter[str] = Counter()
        self._rate = TokenBuckets(DIALS_PER_MINUTE_PER_HOST / 60.0, DIALS_PER_MINUTE_PER_HOST)

    def refusal(self, addr: Address, now: float) -> str | None:
        """None if a dial to ``addr`` may start now, else the counter naming why not.  Takes a token."""
        until = self._failed.get(addr)
        if until is not None:
            if now < until:
                return "reject_create_dial_failed_recently"
            del self._failed[addr]
        host = host_key(*addr)
        if self._pending_hosts[host] >= MAX_PENDING_DIALS_PER_HOST:
            return "reject_create_dial_pending"
        if not self._rate.allow(host, now):
            return "reject_create_dial_rate"
        return None

    def started(self, link_id: int, addr: Address) -> None:
        host = host_key(*addr)
        self._pending[link_id] = host
        self._pending_hosts[host] += 1

    def up(self, link_id: int) -> None:
        self._release(link_id)

    def down(self, link_id: int, addr: Address, now: float) -> bool:
        """A dialed link closed.  If it was still a dial in flight (its handshake never completed), the
        target goes in the negative cache and the answer is True."""
        if not self._release(link_id):
            return False
        self._failed.pop(addr, None)
        self._failed[addr] = now + NEGATIVE_CACHE_S
        while len(self._failed) > MAX_NEGATIVE:
            del self._failed[next(iter(self._failed))]
        return True

    def _release(self, link_id: int) -> bool:
        host = self._pending.pop(link_id, None)
        if host is None:
            return False
        self._pending_hosts[host] -= 1
        if self._pending_hosts[host] <= 0:
            del self._pending_hosts[host]
        return True

    @property
    def pending(self) -> int:
        return len(self._pending)
