"""The client engine: the data plane (UDP link, crypto, circuits, TUN) on its own asyncio loop and process,
driven only through the control API (core/control).  ``shallot engine`` and ``shallot connect`` run it."""

from shallot.core.engine.engine import ClientEngine, guard_endpoints, run_engine

__all__ = ["ClientEngine", "guard_endpoints", "run_engine"]
