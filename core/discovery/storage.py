"""The DHT node's record store: kademlia's IStorage, accepting only valid signed records (pure).

kademlia's own ForgetfulStorage keeps whatever anyone sends, without a bound.  This one validates every
value on the way in (``offer``, also behind ``__setitem__``) and again on the way out (``get``: a record
can expire while stored), keeps the newest descriptor per relay id, and caps how many records may
claim one address group and one /16, and how many it holds at all.  Time comes from the ``clock`` the
owner passes (wall seconds), so tests drive it by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kademlia.storage import IStorage

from shallot.core.discovery.addresses import host_group, net_group
from shallot.core.discovery.records import RecordError, supersedes, validate_record
from shallot.crypto.descriptor import Descriptor

MAX_RECORDS = 10_000
MAX_PER_HOST = 4  # records whose first address is in one IPv4 address / IPv6 /64
MAX_PER_NET = 32  # ... in one IPv4 /16 / IPv6 /32
PAGE_BYTES = 1100  # list_records pages stay below a typical path MTU: no IP fragments
# a stored record must fit one answer to a minimum-size (1200-byte) request (wire.REQUEST_MIN_LEN: answers
# are never longer than requests); Descriptor.create never makes one longer than 906 bytes
MAX_STORED_LEN = 1024


@dataclass
class _Entry:
    desc: Descriptor
    raw: bytes
    stored_at: float  # wall seconds, our clock


class RecordStorage(IStorage):
    def __init__(self, clock: Callable[[], float], *, allow_loopback: bool, allow_private: bool = False,
                 max_records: int = MAX_RECORDS, max_per_host: int = MAX_PER_HOST,
                 max_per_net: int = MAX_PER_NET) -> None:
        self._clock = clock
        self.allow_loopback = allow_loopback
        self.allow_private = allow_private
        self.max_records, self.max_per_host, self.max_per_net = max_records, max_per_host, max_per_net
        self._data: dict[bytes, _Entry] = {}
        self._hosts: dict[str, int] = {}
        self._nets: dict[str, int] = {}
        self.counters: dict[str, int] = {}

    # ------------------------------------------------------------------ ours
    def offer(self, key: object, value: object) -> str:
        """Store if valid and newer.  Returns "stored", "same" (already held) or a rejection reason."""
        wall = self._clock()
        try:
            desc = validate_record(key, value, wall, allow_loopback=self.allow_loopback,
                                   allow_private=self.allow_private)
        except RecordError as exc:
            return self._count(exc.reason)
        assert isinstance(key, bytes) and isinstance(value, bytes)
        if len(value) > MAX_STORED_LEN:
            return self._count("too_long")  # could never be answered without amplification
        old = self._data.get(key)
        if old is not None:
            if old.raw == value:
                old.stored_at = wall
                return self._count("same")
            if not supersedes(desc, old.desc):
                return self._count("stale")  # a replay of an older descriptor: never roll back
        self._purge(wall)
        host, net = host_group(*desc.address), net_group(*desc.address)
        old_host = old_net = None
        if old is not None:
            old_host, old_net = host_group(*old.desc.address), net_group(*old.desc.address)
        if old is None and len(self._data) >= self.max_records:
            return self._count("full")
        if host != old_host and self._hosts.get(host, 0) >= self.max_per_host:
            return self._count("cap_host")
        if net != old_net and self._nets.get(net, 0) >= self.max_per_net:
            return self._count("cap_net")
        if old is not None:
            self._remove(key)
        self._data[key] = _Entry(desc, value, wall)
        self._hosts[host] = self._hosts.get(host, 0) + 1
        self._nets[net] = self._nets.get(net, 0) + 1
        return self._count("stored")

    def descriptor(self, key: bytes) -> Descriptor | None:
        entry = self._live(key)
        return entry.desc if entry else None

    def descriptors(self) -> list[Descriptor]:
        self._purge(self._clock())
        return [e.desc for e in self._data.values()]

    def page(self, after: bytes | None, max_bytes: int = PAGE_BYTES,
             max_count: int = 16) -> tuple[list[bytes], bytes | None]:
        """Records with keys above ``after`` in key order, up to ``max_bytes`` of values (at least one)
        and ``max_count`` records; the second item is the cursor for the next page, or None at the end."""
        self._purge(self._clock())
        keys = sorted(k for k in self._data if after is None or k > after)
        out: list[bytes] = []
        size = 0
        for i, key in enumerate(keys):
            raw = self._data[key].raw
            if out and (size + len(raw) > max_bytes or len(out) >= max_count):
                return out, keys[i - 1]
            out.append(raw)
            size += len(raw)
        return out, None

    def __len__(self) -> int:
        return len(self._data)

    # ------------------------------------------------------------------ kademlia's IStorage
    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.offer(key, value)  # rejections are counted, never raised into kademlia

    def __getitem__(self, key: bytes) -> bytes:
        entry = self._live(key)
        if entry is None:
            raise KeyError(key)
        return entry.raw

    def get(self, key: bytes, default: bytes | None = None) -> bytes | None:
        entry = self._live(key)
        return entry.raw if entry else default

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, bytes]]:
        wall = self._clock()
        self._purge(wall)
        return [(k, e.raw) for k, e in self._data.items() if wall - e.stored_at >= seconds_old]

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        self._purge(self._clock())
        return iter([(k, e.raw) for k, e in self._data.items()])

    # ------------------------------------------------------------------ internals
    def _count(self, outcome: str) -> str:
        name = outcome if outcome in ("stored", "same") else f"reject_{outcome}"
        self.counters[name] = self.counters.get(name, 0) + 1
        return outcome

    def _live(self, key: bytes) -> _Entry | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        try:  # validated again on read: it may have expired since it was stored
            validate_record(key, entry.raw, self._clock(), allow_loopback=self.allow_loopback,
                            allow_private=self.allow_private)
        except RecordError:
            self._remove(key)
            self.counters["expired_dropped"] = self.counters.get("expired_dropped", 0) + 1
            return None
        return entry

    def _purge(self, wall: float) -> None:
        for key in [k for k, e in self._data.items() if wall > e.desc.expires]:
            self._remove(key)
            self.counters["expired_dropped"] = self.counters.get("expired_dropped", 0) + 1

    def _remove(self, key: bytes) -> None:
        entry = self._data.pop(key)
        for table, group in ((self._hosts, host_group(*entry.desc.address)),
                             (self._nets, net_group(*entry.desc.address))):
            table[group] -= 1
            if not table[group]:
                del table[group]
