"""What the engine measures (bytes, round trips, build times, since when it is connected) and the status
snapshot it publishes from that and the circuit manager's status (docs/PROTOCOL.md §9.5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shallot.core.circuit import ClientCircuit
from shallot.core.circuit.manager import CircuitManager, Path
from shallot.core.control.api import ROLES, EngineMode, EngineState, GuardStatus, HopStatus, StatusSnapshot


@dataclass
class EngineStats:
    build_ms: float | None = None
    rtt_ms: float | None = None  # the last answered ping through the whole circuit
    guard_rtt_ms: dict[bytes, float] = field(default_factory=dict)  # guard id -> its last link handshake
    connected_since: float | None = None  # unix seconds; kept across circuit switches
    circuit_since: float | None = None  # unix seconds; when the current circuit was built
    circuits_built: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    def circuit_built(self, circ: ClientCircuit, guard: bytes, wall: float) -> None:
        self.build_ms = round(circ.build_s * 1000, 3)
        if circ.create_sent_at > circ.started_at:  # a fresh guard link: the CREATE waited for its handshake
            self.guard_rtt_ms[guard] = round((circ.create_sent_at - circ.started_at) * 1000, 3)
        self.connected_since = self.connected_since or wall
        self.circuit_since = wall
        self.circuits_built += 1

    def round_trip(self, seconds: float) -> None:
        self.rtt_ms = round(seconds * 1000, 3)

    def connection_lost(self) -> None:
        self.connected_since = self.circuit_since = None

    def hop_rtt_ms(self, path: Path, hop: int) -> float | None:
        """Round trip from us to this hop, where one is measured: the guard's link handshake (one datagram
        each way, timed when the link was opened) and the exit's echo through the whole circuit.  The
        middle answers nothing we could time without a link of our own to it, which would show it who we
        are, so it has none."""
        if hop == 0 and path:
            return self.guard_rtt_ms.get(path[0].relay_id)
        if hop == len(path) - 1:
            return self.rtt_ms
        return None

    def snapshot(self, manager: CircuitManager, *, mode: EngineMode, kill_switch: bool, directory: str | None,
                 discovery: dict[str, Any] | None, relays_known: int | None, dht_peers: int | None,
                 nat: dict[str, Any] | None, blocked: bool = False, guards: list[dict[str, Any]] | None = None,
                 guard_warning: str = "") -> StatusSnapshot:
        path = manager.path if manager.state is EngineState.CONNECTED else ()
        return StatusSnapshot(
            state=manager.state, step=manager.step, error=manager.error, error_kind=manager.error_kind, mode=mode,
            trying=manager.trying, kill_switch=kill_switch, directory=directory, exit=manager.exit_spec,
            circuit=tuple(HopStatus(role, d.id_hex, d.nickname, f"{d.address[0]}:{d.address[1]}", d.is_exit,
                                    self.hop_rtt_ms(path, i)) for i, (role, d) in enumerate(zip(ROLES, path))),
            build_ms=self.build_ms, rtt_ms=self.rtt_ms, connected_since=self.connected_since,
            circuit_since=self.circuit_since, circuits_built=self.circuits_built, bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received, relays_known=relays_known, dht_peers=dht_peers, discovery=discovery,
            nat=nat, blocked=blocked, guards=tuple(GuardStatus.from_json(g) for g in guards or ()),
            guard_warning=guard_warning)
