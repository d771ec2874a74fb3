"""NAT traversal (docs/NAT.md, docs/PROTOCOL.md §13), sans-I/O: STUN service, NAT classification,
introductions, hole punching and the relay fallback around a node's link layer."""

from shallot.core.nat.layer import NatLayer

__all__ = ["NatLayer"]
