"""Token buckets keyed by source (an address, a link, a circuit), with a bounded table (pure)."""

from __future__ import annotations

from collections.abc import Hashable


class TokenBuckets:
    """Per-key token buckets with a bounded table (oldest entries evicted)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 65536) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: dict[Hashable, tuple[float, float]] = {}

    def allow(self, key: Hashable, now: float) -> bool:
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
        if len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]
        return ok
