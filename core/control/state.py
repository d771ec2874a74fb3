"""The engine's state and status snapshot (pure): built by the engine, parsed by the app and ``shallot status``.

``StatusSnapshot.to_json`` writes exactly the object of docs/PROTOCOL.md §9.5.  ``from_json`` reads what
an engine sent as untrusted input: text is bounded, numbers must be finite and not negative, counts must fit
in 64 bits (a larger one would overflow the float arithmetic of whoever shows it), a wrong type
falls back to "unknown", unknown fields are ignored, and the only error it raises is SnapshotError (the
object is not a snapshot at all: not an object, or no known state).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

from shallot.core.control.errors import ErrorKind

ROLES = ("guard", "middle", "exit")  # a circuit's hops, in order
MAX_TEXT = 500  # messages and names: enough for any the engine writes, bounded for the window
MAX_PATH = 4096
MAX_COUNT = 2**64 - 1  # the engine's counters (bytes, circuits) are 64-bit


class SnapshotError(ValueError):
    """The engine sent something that is not a snapshot."""


class EngineState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    ERROR = "error"


class EngineMode(enum.Enum):
    PROBE = "probe"  # an echo circuit only: the system's traffic is not routed
    VPN = "vpn"  # the system's IPv4 goes through an IP circuit (TUN, routes, kill switch)


@dataclass(frozen=True)
class HopStatus:
    role: str  # one of ROLES, from the hop's position (not on the wire)
    id: str  # relay id, lower-case hex
    nickname: str
    address: str  # "host:port"
    exit: bool = False
    rtt_ms: float | None = None  # measured round trip to this hop, where one is (§9.5)

    @property
    def short_id(self) -> str:
        return self.id[:8]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "nickname": self.nickname, "address": self.address, "exit": self.exit,
                "rtt_ms": self.rtt_ms}

    @classmethod
    def from_json(cls, role: str, raw: dict[str, Any]) -> HopStatus:
        return cls(role, _text(raw, "id").lower(), _text(raw, "nickname"), _text(raw, "address"),
                   raw.get("exit") is True, _number(raw, "rtt_ms"))


GUARD_STATES = ("usable", "retrying", "unlisted", "dropped")
MAX_GUARDS = 64


@dataclass(frozen=True)
class GuardStatus:
    """One of the client's entry guards (docs/PROTOCOL.md §5.4): ``primary`` guards carry the circuits,
    ``state`` is one of GUARD_STATES, ``note`` why a dropped one was dropped."""

    id: str
    nickname: str
    primary: bool = False
    state: str = "usable"
    in_use: bool = False  # the guard of the current circuit
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "nickname": self.nickname, "primary": self.primary, "state": self.state,
                "in_use": self.in_use, "note": self.note}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> GuardStatus:
        state = _text(raw, "state")
        return cls(_text(raw, "id").lower(), _text(raw, "nickname"), raw.get("primary") is True,
                   state if state in GUARD_STATES else "usable", raw.get("in_use") is True, _text(raw, "note"))


@dataclass(frozen=True)
class StatusSnapshot:
    state: EngineState
    step: str = ""  # what the engine is doing now, in words
    error: str = ""  # why the last attempt failed, in words ("" when nothing failed)
    error_kind: ErrorKind | None = None  # on the wire "error_code"; set only for final errors (FINAL)
    mode: EngineMode = EngineMode.PROBE
    trying: bool = True  # the engine keeps (re)building; an engine that does not say is assumed to
    kill_switch: bool = False
    directory: str | None = None
    exit: str | None = None  # the exit the user asked for (id, prefix or nickname), or None for any
    circuit: tuple[HopStatus, ...] = ()  # only while connected
    build_ms: float | None = None
    rtt_ms: float | None = None
    connected_since: float | None = None  # unix seconds; kept across circuit switches
    circuit_since: float | None = None  # unix seconds; when the current circuit was built
    circuits_built: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    relays_known: int | None = None  # these three are None with a directory file
    dht_peers: int | None = None
    discovery: dict[str, Any] | None = field(default=None, hash=False)  # core/discovery status (§12)
    nat: dict[str, Any] | None = field(default=None, hash=False)  # core/nat status (§9.4, §13.6)
    # not trying, and a kill switch kept after an engine died blocks traffic outside the tunnel (§9.5, §9.6)
    blocked: bool = False
    guards: tuple[GuardStatus, ...] = ()  # the entry guards, in their order (§5.4)
    guard_warning: str = ""  # the latest warning about them (path bias, a guard dropped), for the user

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value, "step": self.step, "error": self.error,
            "error_code": self.error_kind.value if self.error_kind is not None else "",
            "mode": self.mode.value, "trying": self.trying, "kill_switch": self.kill_switch,
            "directory": self.directory, "exit": self.exit, "circuit": [h.to_json() for h in self.circuit],
            "build_ms": self.build_ms, "rtt_ms": self.rtt_ms,
            "connected_since": self.connected_since, "circuit_since": self.circuit_since,
            "circuits_built": self.circuits_built, "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received, "relays_known": self.relays_known, "dht_peers": self.dht_peers,
            "discovery": self.discovery, "nat": self.nat, "blocked": self.blocked,
            "guards": [g.to_json() for g in self.guards], "guard_warning": self.guard_warning,
        }

    @classmethod
    def from_json(cls, raw: Any) -> StatusSnapshot:
        if not isinstance(raw, dict):
            raise SnapshotError("a snapshot must be a JSON object")
        try:
            state = EngineState(raw.get("state"))
        except ValueError:
            raise SnapshotError(f"unknown engine state {str(raw.get('state'))[:40]!r}") from None
        guards = raw.get("guards")
        guard_list = tuple(GuardStatus.from_json(g) for g in guards[:MAX_GUARDS] if isinstance(g, dict)) \
            if isinstance(guards, list) else ()
        hops: list[HopStatus] = []
        circuit = raw.get("circuit")
        if isinstance(circuit, list) and len(circuit) == len(ROLES) and all(isinstance(h, dict) for h in circuit):
            hops = [HopStatus.from_json(role, h) for role, h in zip(ROLES, circuit)]
        try:
            mode = EngineMode(raw.get("mode"))
        except ValueError:
            mode = EngineMode.PROBE
        return cls(
            state=state, step=_text(raw, "step"), error=_text(raw, "error"),
            error_kind=ErrorKind.from_wire(raw.get("error_code")), mode=mode,
            trying=raw.get("trying") is not False, kill_switch=raw.get("kill_switch") is True,
            directory=_text(raw, "directory", MAX_PATH) or None, exit=_text(raw, "exit") or None,
            circuit=tuple(hops), build_ms=_number(raw, "build_ms"), rtt_ms=_number(raw, "rtt_ms"),
            connected_since=_number(raw, "connected_since"), circuit_since=_number(raw, "circuit_since"),
            circuits_built=_count(raw, "circuits_built") or 0, bytes_sent=_count(raw, "bytes_sent") or 0,
            bytes_received=_count(raw, "bytes_received") or 0, relays_known=_count(raw, "relays_known"),
            dht_peers=_count(raw, "dht_peers"), discovery=_object(raw, "discovery"), nat=_object(raw, "nat"),
            blocked=raw.get("blocked") is True, guards=guard_list, guard_warning=_text(raw, "guard_warning"))


def _text(raw: dict[str, Any], key: str, limit: int = MAX_TEXT) -> str:
    v = raw.get(key)
    return v[:limit] if isinstance(v, str) else ""


def _number(raw: dict[str, Any], key: str) -> float | None:
    v = raw.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        f = float(v)  # JSON integers have no limit: 10**400 does not fit a float
    except OverflowError:
        return None
    return f if math.isfinite(f) and f >= 0 else None


def _count(raw: dict[str, Any], key: str) -> int | None:
    v = raw.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_COUNT else None


def _object(raw: dict[str, Any], key: str) -> dict[str, Any] | None:
    v = raw.get(key)
    return v if isinstance(v, dict) else None
