"""Anti-replay window over 64-bit sequence numbers, shared by link sessions and circuit ends (pure)."""

from __future__ import annotations


class ReplayWindow:
    """Sliding anti-replay window over 64-bit sequence numbers (RFC 6479 style, as a Python int bitmap)."""

    __slots__ = ("_bits", "_mask", "_top", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._mask = (1 << size) - 1
        self._top = -1
        self._bits = 0

    def check_and_set(self, seq: int) -> bool:
        """Return True (and remember seq) if seq is new; False for a duplicate or a too-old value.
        Call only after the packet authenticated."""
        top = self._top
        if seq > top:
            shift = seq - top
            self._bits = ((self._bits << shift) | 1) & self._mask if shift < self.size else 1
            self._top = seq
            return True
        offset = top - seq
        if offset >= self.size:
            return False
        mask = 1 << offset
        if self._bits & mask:
            return False
        self._bits |= mask
        return True

    def would_accept(self, seq: int) -> bool:
        if seq > self._top:
            return True
        offset = self._top - seq
        return offset < self.size and not (self._bits >> offset) & 1
