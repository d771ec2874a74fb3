"""The client engine: the data plane (UDP link, crypto, circuits, TUN) on its own asyncio loop and process,
driven only through the control API (core/control).  ``shallot engine`` and ``shallot connect`` run it.

    engine.py    ClientEngine: the thin supervisor that carries out what the circuit manager
                 (core/circuit/manager.py) decides
    circuits.py  EngineCircuits: the circuits on the wire (CircuitClient, the tunnel's CONFIG, pings)
    setup.py     EngineSetup: what an EngineConfig sets up (directory file or DHT discovery, VPN tunnel)
    stats.py     EngineStats: bytes, round trips, build times -> the status snapshot
    service.py   run_engine: the engine behind its control socket
"""

from shallot.core.engine.circuits import guard_endpoints
from shallot.core.engine.engine import ClientEngine
from shallot.core.engine.service import run_engine

__all__ = ["ClientEngine", "guard_endpoints", "run_engine"]
