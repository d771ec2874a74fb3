"""Shallot core: wire codecs, sans-I/O link, circuit, NAT and discovery machines, their asyncio adapters,
the VPN's system side, the client engine and the control API (docs/ARCHITECTURE.md)."""
