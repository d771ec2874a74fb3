"""The control API's vocabulary in one place (pure): what the engine, ``shallot`` and the app say to each other.

    state.py     EngineState, EngineMode, StatusSnapshot, HopStatus (the snapshot of §9.5)
    errors.py    ErrorKind (one Enum for every failure; the app words each from a table), ControlError
    config.py    EngineConfig (the engine's settings: from the CLI's flags, or sent with ``configure``)
    messages.py  Hello (version and commands), the requests and their codec, PeersReply

These modules import nothing with a clock, socket or loop, so every layer may speak them, the pure circuit
manager included (tests/architecture/contract.py puts them on the ground floor).  The server and client
that carry them over the socket are server.py and client.py.
"""

from shallot.core.control.config import EngineConfig
from shallot.core.control.errors import FINAL, ControlError, ErrorKind
from shallot.core.control.messages import (
    CONTROL_VERSION,
    MAX_LINE,
    REQUESTS,
    Circuits,
    Configure,
    Connect,
    DhtPeer,
    Disconnect,
    Hello,
    NewCircuit,
    Peers,
    PeersReply,
    RelayEntry,
    ReplyError,
    Request,
    Role,
    SetDirectory,
    Shutdown,
    Status,
    Subscribe,
    decode_request,
    encode_request,
)
from shallot.core.control.state import (
    ROLES,
    EngineMode,
    EngineState,
    GuardStatus,
    HopStatus,
    SnapshotError,
    StatusSnapshot,
)

__all__ = [
    "CONTROL_VERSION", "FINAL", "MAX_LINE", "REQUESTS", "ROLES", "Circuits", "Configure", "Connect", "ControlError",
    "DhtPeer", "Disconnect", "EngineConfig", "EngineMode", "EngineState", "ErrorKind", "GuardStatus", "Hello",
    "HopStatus", "NewCircuit", "Peers", "PeersReply", "RelayEntry", "ReplyError", "Request", "Role", "SetDirectory",
    "Shutdown", "SnapshotError", "Status", "StatusSnapshot", "Subscribe", "decode_request", "encode_request",
]
