"""Bounded link-layer tables that age out instead of failing closed (docs/PROTOCOL.md §4.5, §8.3), pure.

    EphemeralCache  initiation ephemerals seen recently, in time buckets; when full the oldest bucket goes
    address_bytes   the bytes of a source address a cookie is bound to
"""

from __future__ import annotations

import ipaddress
from collections import deque

from shallot.crypto.codec import Address


class EphemeralCache:
    """Ephemerals seen in the last ``lifetime`` seconds (at least), in ``buckets`` time buckets.

    A bucket closes when it is ``lifetime / buckets`` old or holds ``capacity / buckets`` entries; a
    bucket whose newest possible entry is ``lifetime`` old is dropped.  When more than ``capacity``
    entries are held, the oldest bucket is dropped early: the cache never refuses an initiation, and
    under a flood it remembers the newest ``capacity`` ephemerals (docs/PROTOCOL.md §4.5 says what a
    replay of an evicted one gains)."""

    def __init__(self, lifetime: float, capacity: int, buckets: int = 16) -> None:
        self.lifetime = lifetime
        self.capacity = max(1, capacity)
        self.width = lifetime / buckets
        self.per_bucket = max(1, self.capacity // buckets)
        self._buckets: deque[tuple[float, set[bytes]]] = deque()  # (opened at, ephemerals), oldest first
        self._size = 0
        self.evicted_buckets = 0  # dropped early because the cache was full

    def __len__(self) -> int:
        return self._size

    def check_and_add(self, e: bytes, now: float) -> bool:
        """False if ``e`` was seen (a replay); otherwise remember it and return True."""
        buckets = self._buckets
        # a bucket opened at t holds entries up to t + width: drop it once those are lifetime old
        while buckets and buckets[0][0] + self.width + self.lifetime <= now:
            self._size -= len(buckets.popleft()[1])
        for _opened, seen in buckets:
            if e in seen:
                return False
        if not buckets or now >= buckets[-1][0] + self.width or len(buckets[-1][1]) >= self.per_bucket:
            buckets.append((now, set()))
        buckets[-1][1].add(e)
        self._size += 1
        while self._size > self.capacity and len(buckets) > 1:
            self._size -= len(buckets.popleft()[1])
            self.evicted_buckets += 1
        return True


def address_bytes(addr: Address) -> bytes:
    """IP address (4 or 16 bytes) and port (u16): what a cookie binds.  A name that is not an IP address
    (the NAT layer's virtual addresses of relayed sessions) is bound by its text."""
    host, port = addr
    try:
        packed = ipaddress.ip_address(host).packed
    except ValueError:
        packed = str(host).encode()
    return packed + (port & 0xFFFF).to_bytes(2, "big")
