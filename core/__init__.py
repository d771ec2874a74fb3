"""Shallot core: wire codecs, sans-I/O link and circuit machines, path selection, asyncio adapters."""

__version__ = "0.1.0"
