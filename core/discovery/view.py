"""The client's view of the whole network: every live relay's newest verified descriptor (pure).

Like Tor's consensus, a client chooses paths only from this local copy (core/circuit/path.py), built by
enumerating the whole DHT (docs/DHT.md §3), never by looking up the relays it is about to use.  Every
record is checked here again, whoever delivered it: signature, key, expiry, version, addresses; a
record never replaces a newer one.  The node's own relay id (if it also runs a relay) is never in
the view, so it is never in its own circuit.

The view also remembers when it first met each relay (``first_seen``, wall seconds) and when it last
listed it: path selection weights relays by how long they have been known (core/circuit/path.py), and the
cache keeps that history across restarts (``encode_seen``/``decode_seen``, docs/PROTOCOL.md §5.1).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from shallot.core.discovery.records import RecordError, check_live, supersedes, validate_record
from shallot.crypto.descriptor import Descriptor
from shallot.crypto.keys import RELAY_ID_LEN

SEEN_HEADER = "shallot-seen 1"
FORGET_S = 30 * 86400.0  # a relay out of the view this long is forgotten (a returning one starts anew)
MAX_SEEN = 20000  # entries kept; beyond it the longest-absent go first



class NetworkView:
    def __init__(self, *, allow_loopback: bool, allow_private: bool = False, self_ids: Iterable[bytes] = ()) -> None:
        self.allow_loopback = allow_loopback
        self.allow_private = allow_private
        self.self_ids = frozenset(self_ids)
        self._relays: dict[bytes, Descriptor] = {}
        self.counters: dict[str, int] = {}
        self.first_seen: dict[bytes, float] = {}  # relay id -> wall time this view first took it
        self.last_seen: dict[bytes, float] = {}  # relay id -> wall time it was last live in the view

    def remember(self, seen: Mapping[bytes, tuple[float, float]], wall: float) -> None:
        """History from the cache (relay id -> (first, last seen)): the earlier first-seen time wins; times
        in the future (a clock that went back, an edited file) count as now, so nothing gains age that way."""
        for rid, (first, last) in seen.items():  # the own relay's entry is harmless: it never enters the view
            self.first_seen[rid] = min(self.first_seen.get(rid, wall), first, wall)
            self.last_seen[rid] = max(self.last_seen.get(rid, 0.0), min(last, wall))

    def known_s(self, wall: float) -> dict[bytes, float]:
        """Seconds this view has known each live relay (what path selection weights by)."""
        return {rid: max(0.0, wall - self.first_seen.get(rid, wall)) for rid in self.live_ids(wall)}

    def seen(self, wall: float) -> dict[bytes, tuple[float, float]]:
        """The history worth keeping: relays live now or within FORGET_S, at most MAX_SEEN of them."""
        for rid in self.live_ids(wall):
            self.last_seen[rid] = wall
        recent = [rid for rid, last in self.last_seen.items() if wall - last <= FORGET_S and rid in self.first_seen]
        keep = sorted(recent, key=lambda r: (-self.last_seen[r], self.first_seen[r]))[:MAX_SEEN]
        return {rid: (self.first_seen[rid], self.last_seen[rid]) for rid in keep}

    def live_ids(self, wall: float) -> list[bytes]:
        return [d.relay_id for d in self.relays(wall)]

    def offer(self, key: bytes | None, raw: object, wall: float) -> str:
        """Take one record (``key`` None: use the relay id inside it).  Returns the outcome, also counted:
        "added", "updated", "same", or a rejection reason from records.REASONS."""
        try:
            if key is None:
                if not isinstance(raw, bytes):
                    raise RecordError("type")
                try:
                    key = Descriptor.decode(raw).relay_id
                except Exception:
                    key = b"\x00" * 20  # validate_record below names the real problem
            desc = validate_record(key, raw, wall, allow_loopback=self.allow_loopback, allow_private=self.allow_private)
        except RecordError as exc:
            return self._count(exc.reason)
        return self.offer_descriptor(desc, wall)

    def offer_descriptor(self, desc: Descriptor, wall: float) -> str:
        """Take an already signature-checked descriptor (from the disk cache, or validate_record)."""
        try:
            check_live(desc, wall, allow_loopback=self.allow_loopback, allow_private=self.allow_private)
        except RecordError as exc:
            return self._count(exc.reason)
        if desc.relay_id in self.self_ids:
            return self._count("self")
        old = self._relays.get(desc.relay_id)
        if old is None:
            self._relays[desc.relay_id] = desc
            self.first_seen.setdefault(desc.relay_id, wall)
            self.last_seen[desc.relay_id] = max(self.last_seen.get(desc.relay_id, 0.0), wall)
            return self._count("added")
        if old.encode() == desc.encode():
            return self._count("same")
        if not supersedes(desc, old):
            return self._count("stale")
        self._relays[desc.relay_id] = desc
        return self._count("updated")

    def relays(self, wall: float) -> list[Descriptor]:
        """Live descriptors, in relay-id order (expired ones leave the view here)."""
        for rid in [r for r, d in self._relays.items() if wall > d.expires]:
            del self._relays[rid]
            self._count("expired_dropped")
        return [self._relays[r] for r in sorted(self._relays)]

    def get(self, relay_id: bytes) -> Descriptor | None:
        return self._relays.get(relay_id)

    def __len__(self) -> int:
        return len(self._relays)

    def rejected(self) -> dict[str, int]:
        return {k: v for k, v in self.counters.items() if k.startswith("reject_")}

    def _count(self, outcome: str) -> str:
        name = outcome if outcome in ("added", "updated", "same", "self", "expired_dropped") else f"reject_{outcome}"
        self.counters[name] = self.counters.get(name, 0) + 1
        return outcome


def encode_seen(seen: Mapping[bytes, tuple[float, float]]) -> str:
    """The history file: a header line, then ``<relay id hex> <first seen> <last seen>`` (integer wall
    seconds) per relay."""
    lines = [SEEN_HEADER] + [f"{rid.hex()} {int(first)} {int(last)}" for rid, (first, last) in sorted(seen.items())]
    return "\n".join(lines) + "\n"


def decode_seen(text: str) -> dict[bytes, tuple[float, float]]:
    """Parse a history file; a wrong header gives {} and a bad line is skipped (a damaged file only loses
    age, which makes relays weigh less, never more).  At most MAX_SEEN entries are read."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != SEEN_HEADER:
        return {}
    out: dict[bytes, tuple[float, float]] = {}
    for line in lines[1:]:
        if len(out) >= MAX_SEEN:
            break
        parts = line.split()
        if len(parts) != 3 or len(parts[0]) != 2 * RELAY_ID_LEN:
            continue
        try:
            rid = bytes.fromhex(parts[0])
            first, last = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if not (0 <= first <= last < 2**40) or rid in out:
            continue
        out[rid] = (float(first), float(last))
    return out
