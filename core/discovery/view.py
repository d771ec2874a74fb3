"""The client's view of the whole network: every live relay's newest verified descriptor (pure).

Like Tor's consensus, a client chooses paths only from this local copy (core/circuit/path.py), built by
enumerating the whole DHT (docs/DHT.md §3), never by looking up the relays it is about to use.  Every
record is checked here again, whoever delivered it: signature, key, expiry, version, addresses; a
record never replaces a newer one.  The node's own relay id (if it also runs a relay) is never in
the view, so it is never in its own circuit.
"""

from __future__ import annotations

from collections.abc import Iterable

from shallot.core.discovery.records import RecordError, check_live, supersedes, validate_record
from shallot.crypto.descriptor import Descriptor


class NetworkView:
    def __init__(self, *, allow_loopback: bool, allow_private: bool = False, self_ids: Iterable[bytes] = ()) -> None:
        self.allow_loopback = allow_loopback
        self.allow_private = allow_private
        self.self_ids = frozenset(self_ids)
        self._relays: dict[bytes, Descriptor] = {}
        self.counters: dict[str, int] = {}

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
