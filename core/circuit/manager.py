"""The client's circuit manager (pure): when to build, through which path, when to retry and when to give up,
and whether the circuit in use still answers.  The engine (core/engine/engine.py) carries out what it
decides; no clock, socket or task here, so all of it is tested with simulated time.

Inputs: the user's commands ``connect``, ``disconnect``, ``new_circuit``; ``handle(event)`` for what came
of the work it asked for and for what happened to the circuit (each event carries ``now``, monotonic
seconds); ``handle_timer(now)`` once ``timer()`` is due.  Outputs: a list of actions for every input, and
the status the engine publishes (``state``, ``step``, ``error``, ``error_kind``, ``trying``, ``path``).

The rules (docs/PROTOCOL.md §9.5):

1. An attempt is: privileges (VPN mode as an ordinary user, once) -> relays -> a path from the
   GuardPolicy (guards.py) -> build.  The first is CONNECTING, every later one RECONNECTING.
2. A failure whose kind is FINAL (the privileged helper is missing, refused, or died) stops trying:
   ERROR, and nothing more until the next connect.  Any other drops the circuit, reports the failed
   path's guard to the GuardPolicy and retries after RECONNECT_BACKOFF_S[n] (the last one repeats):
   RECONNECTING, ERROR from the third failure in a row.  A built circuit resets the count.  The privileged
   helper quitting at any time (``PrivilegesLost``) is such a final failure.
3. Connected: a ping goes out PING_INTERVAL_S after the last round ended and has PING_TIMEOUT_S for its
   answer; MAX_MISSED_PINGS rounds in a row without one, or the circuit closing, is a failure (rule 2).
4. ``new_circuit`` builds a circuit avoiding every relay of the current one (any path if none is left)
   while the current one carries the traffic; the new one takes over once built and the old one is
   closed.  If the build fails the current circuit is kept and ``error`` says why.  Pings pause while
   it is built; a request during a ping round starts when the round ends.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from shallot.core.circuit.guards import GuardPolicy, PathRequest
from shallot.core.control.errors import FINAL, ControlError, ErrorKind
from shallot.core.control.state import EngineState
from shallot.core.errors import ShallotError
from shallot.crypto.descriptor import Descriptor

PING_INTERVAL_S = 5.0
PING_TIMEOUT_S = 3.0
MAX_MISSED_PINGS = 3
RECONNECT_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
ERROR_AFTER_FAILURES = 3  # failures in a row after which the state says ERROR (while still retrying)

Path = tuple[Descriptor, ...]
Circuit = object  # the engine's handle of a built circuit (a ClientCircuit); the manager only compares it


def ping_payload(seq: int) -> bytes:
    """The 20-byte DATA ping of probe mode (§9.5); VPN mode pings with a CONFIG request instead."""
    return b"shallot-ping" + seq.to_bytes(8, "big")


# ---------------------------------------------------------------------------------------------- events (inputs)


@dataclass(frozen=True)
class PrivilegesAcquired:
    now: float
    token: int


@dataclass(frozen=True)
class RelaysFetched:
    now: float
    token: int
    relays: tuple[Descriptor, ...]


@dataclass(frozen=True)
class Built:
    now: float
    token: int
    circuit: Circuit


@dataclass(frozen=True)
class Failed:
    """The work of ``token`` failed (privileges, relays, or the build and its tunnel set-up)."""

    now: float
    token: int
    reason: str
    kind: ErrorKind | None = None


@dataclass(frozen=True)
class CircuitLost:
    """``circuit`` closed (a DESTROY, a timeout), could not be sent on, or its tunnel could not be kept."""

    now: float
    circuit: Circuit
    reason: str
    kind: ErrorKind | None = None


@dataclass(frozen=True)
class PrivilegesLost:
    """The means to keep the tunnel are gone (the privileged helper quit): a final failure, whatever the phase."""

    now: float
    reason: str


@dataclass(frozen=True)
class PingAnswered:
    """Something came back on the circuit in use: an echo (``payload``), or a CONFIG answer (None)."""

    now: float
    payload: bytes | None = None


Event = PrivilegesAcquired | RelaysFetched | Built | Failed | CircuitLost | PrivilegesLost | PingAnswered

# ---------------------------------------------------------------------------------------------- actions (outputs)


@dataclass(frozen=True)
class Publish:
    """The status changed (or a ping round ended): tell the listeners."""


@dataclass(frozen=True)
class AcquirePrivileges:
    token: int  # answer with PrivilegesAcquired or Failed


@dataclass(frozen=True)
class FetchRelays:
    token: int  # answer with RelaysFetched or Failed


@dataclass(frozen=True)
class Build:
    token: int  # answer with Built or Failed
    path: Path
    replacing: Circuit | None = None  # a new circuit for a live connection (rule 4)


@dataclass(frozen=True)
class Use:
    """``circuit`` through ``path`` carries the traffic from now on."""

    circuit: Circuit
    path: Path


@dataclass(frozen=True)
class SendPing:
    circuit: Circuit
    seq: int


@dataclass(frozen=True)
class RoundTrip:
    seconds: float  # the ping that was just answered


@dataclass(frozen=True)
class Close:
    """The old circuit of a switch: its successor carries the traffic."""

    circuit: Circuit


@dataclass(frozen=True)
class Drop:
    """The connection's circuit is gone: close it; the connection begins again."""

    circuit: Circuit


@dataclass(frozen=True)
class Teardown:
    """The user disconnected: undo what connecting set up (routes, kill switch, DNS, TUN)."""


@dataclass(frozen=True)
class Backoff:
    delay: float
    reason: str


@dataclass(frozen=True)
class GiveUp:
    reason: str
    kind: ErrorKind


@dataclass(frozen=True)
class KeepCurrent:
    reason: str  # why the new circuit could not be built


Action = (Publish | AcquirePrivileges | FetchRelays | Build | Use | SendPing | RoundTrip | Close | Drop | Teardown
          | Backoff | GiveUp | KeepCurrent)

# ---------------------------------------------------------------------------------------------- the machine


# The phases and what moves them (a "switch" is rule 4's new circuit for a live connection):
#
#   IDLE        --connect-->             PRIVILEGES (VPN mode, not yet allowed) | RELAYS
#   PRIVILEGES  --PrivilegesAcquired-->  RELAYS         --Failed-->  BACKOFF | IDLE (final)
#   RELAYS      --RelaysFetched-->       BUILDING       --Failed-->  BACKOFF | OPEN (a switch keeps the current)
#   BUILDING    --Built-->               OPEN           --Failed-->  BACKOFF | IDLE (final) | OPEN (a switch)
#   OPEN        --new_circuit, between ping rounds-->  RELAYS (a switch)
#   OPEN        --MAX_MISSED_PINGS, CircuitLost-->     BACKOFF | IDLE (final)
#   BACKOFF     --timer-->               PRIVILEGES | RELAYS
#   any         --disconnect-->          IDLE
#   any, trying --PrivilegesLost-->      IDLE (final)
class Phase(enum.Enum):
    IDLE = "idle"  # not trying: disconnected, or given up (rule 2)
    PRIVILEGES = "privileges"  # AcquirePrivileges out
    RELAYS = "relays"  # FetchRelays out
    BUILDING = "building"  # Build out
    OPEN = "open"  # a circuit carries the traffic: ping rounds (rule 3)
    BACKOFF = "backoff"  # waiting to retry (rule 2)


# the result each phase waits for; a result with another phase's type or an old token is stale (the work it
# answers was abandoned by a disconnect) and changes nothing
WAITS_FOR: dict[Phase, type] = {Phase.PRIVILEGES: PrivilegesAcquired, Phase.RELAYS: RelaysFetched,
                                Phase.BUILDING: Built}


class CircuitManager:
    def __init__(self, guards: GuardPolicy, *, never: frozenset[bytes] = frozenset()) -> None:
        """``never``: relays that are in no path of ours (this machine's own relay)."""
        self.guards = guards
        self.never = never
        # the status the engine publishes
        self.state = EngineState.DISCONNECTED
        self.step = ""
        self.error = ""
        self.error_kind: ErrorKind | None = None
        self.trying = False  # false after disconnect and after a final error: nothing retries
        self.circuit: Circuit | None = None
        self.path: Path = ()
        self.exit_spec: str | None = None
        self.path_spec: str | None = None
        # the machine
        self.phase = Phase.IDLE
        self._token = 0  # of the work out; a result must bring it back
        self._failures = 0  # in a row (rule 2)
        self._need_privileges = False
        self._planned: Path = ()  # the path of the build out
        self._retry_at = 0.0
        self._rotating = False  # the work out is a new circuit for a live connection (rule 4)
        self._rotate_requested = False
        self._lost: tuple[str, ErrorKind | None] | None = None  # the current circuit died during a switch
        self._seq = 0
        self._outstanding: int | None = None  # the ping waiting for its answer
        self._sent_at = 0.0
        self._next_ping_at = 0.0
        self._missed = 0
        self._handlers = {PrivilegesAcquired: self._privileges_acquired, RelaysFetched: self._relays_fetched,
                          Built: self._built, Failed: self._failed, CircuitLost: self._circuit_lost,
                          PrivilegesLost: self._privileges_lost, PingAnswered: self._ping_answered}

    # ------------------------------------------------------------------ commands
    def connect(self, now: float, *, exit_spec: str | None = None, path_spec: str | None = None,
                need_privileges: bool = False) -> list[Action]:
        """Start trying; while already trying, only the exit and path choice change (for the next circuit)."""
        self.exit_spec, self.path_spec = exit_spec, path_spec
        self.guards.reset()
        self._rotate_requested = False
        if self.phase is not Phase.IDLE:
            return []
        self.trying = True
        self._failures = 0
        self._need_privileges = need_privileges
        return self._attempt()

    def disconnect(self, now: float) -> list[Action]:
        """Stop everything; the work out is abandoned (its result will be stale)."""
        actions: list[Action] = self._drop()
        self.trying = False
        self.phase = Phase.IDLE
        self._token += 1
        self._rotating = self._rotate_requested = False
        self._lost = None
        self._outstanding = None
        self._set(EngineState.DISCONNECTED)
        return [*actions, Teardown(), Publish()]

    def new_circuit(self, now: float) -> list[Action]:
        """Rule 4.  Raises ControlError(NOT_CONNECTED) when nothing is trying."""
        if not self.trying:
            raise ControlError(ErrorKind.NOT_CONNECTED, "not connected")
        self._rotate_requested = True
        if self.phase is Phase.OPEN and self._outstanding is None:
            return self._start_rotation()
        return []  # after the build out, or when the ping round ends

    # ------------------------------------------------------------------ events and time
    def handle(self, event: Event) -> list[Action]:
        return self._handlers[type(event)](event)

    def timer(self) -> float | None:
        if self.phase is Phase.BACKOFF:
            return self._retry_at
        if self.phase is Phase.OPEN:
            return self._sent_at + PING_TIMEOUT_S if self._outstanding is not None else self._next_ping_at
        return None

    def handle_timer(self, now: float) -> list[Action]:
        deadline = self.timer()
        if deadline is None or now < deadline:
            return []
        if self.phase is Phase.BACKOFF:
            return self._attempt()
        if self._outstanding is None:
            return self._ping(now)
        self._outstanding = None  # unanswered in time
        self._missed += 1
        if self._missed >= MAX_MISSED_PINGS:
            return self._fail(now, "the circuit stopped answering", None, self._guard_of(self.path))
        return self._round_ended(now, answered=False)

    # ------------------------------------------------------------------ results of the work
    def _current(self, token: int, event: type) -> bool:
        return token == self._token and WAITS_FOR.get(self.phase) is event

    def _privileges_acquired(self, event: PrivilegesAcquired) -> list[Action]:
        if not self._current(event.token, PrivilegesAcquired):
            return []
        self._need_privileges = False
        return self._fetch(self.state, "choosing a path")

    def _relays_fetched(self, event: RelaysFetched) -> list[Action]:
        if not self._current(event.token, RelaysFetched):
            return []
        relays = [d for d in event.relays if d.relay_id not in self.never]
        away = frozenset(d.relay_id for d in self.path) if self._rotating else None
        try:
            path = tuple(self.guards.plan(relays, PathRequest(self.path_spec, self.exit_spec, away)))
        except ShallotError as exc:
            return self._failed(Failed(event.now, event.token, str(exc)))
        self.phase, self._planned = Phase.BUILDING, path
        self._token += 1
        if self._rotating:
            return [Build(self._token, path, replacing=self.circuit)]
        self._set(self.state, "building a circuit through " + ", ".join(d.nickname for d in path))
        return [Publish(), Build(self._token, path)]

    def _built(self, event: Built) -> list[Action]:
        if not self._current(event.token, Built):
            return [Close(event.circuit)]  # built for a connection that is gone
        old = self.circuit if self._rotating else None
        self.circuit, self.path = event.circuit, self._planned
        self.guards.succeeded(self.path[0].relay_id)
        self._rotating, self._lost = False, None
        self._failures = 0
        self.phase = Phase.OPEN
        self._set(EngineState.CONNECTED)
        actions: list[Action] = [Use(event.circuit, self.path), Publish()]
        if old is not None:
            actions.append(Close(old))
        return actions + (self._start_rotation() if self._rotate_requested else self._start_pings(event.now))

    def _failed(self, event: Failed) -> list[Action]:
        if event.token != self._token or self.phase not in WAITS_FOR:
            return []
        if self._rotating:  # rule 4: the current circuit stays
            self._rotating = False
            self.phase = Phase.OPEN
            self._set(EngineState.CONNECTED, error=f"could not build a new circuit: {event.reason}")
            actions: list[Action] = [KeepCurrent(event.reason), Publish()]
            if self._lost is not None:  # it died meanwhile: that failure comes now
                reason, kind = self._lost
                return actions + self._fail(event.now, reason, kind, self._guard_of(self.path))
            return actions + self._start_pings(event.now)
        guard = self._guard_of(self._planned) if self.phase is Phase.BUILDING else None
        return self._fail(event.now, event.reason, event.kind, guard)

    def _circuit_lost(self, event: CircuitLost) -> list[Action]:
        if self.circuit is None or event.circuit is not self.circuit:
            return []  # an old circuit of a switch, or one that was being built (its build fails by itself)
        if self._rotating:
            self._lost = (event.reason, event.kind)  # the switch ends first, then the loss counts
            return []
        return self._fail(event.now, event.reason, event.kind, self._guard_of(self.path))

    def _privileges_lost(self, event: PrivilegesLost) -> list[Action]:
        if not self.trying:
            return []  # nothing to stop; the next connect asks for privileges anew
        self._rotating = self._rotate_requested = False
        self._lost = None
        self._need_privileges = True
        return self._fail(event.now, event.reason, ErrorKind.HELPER_FAILED, None)

    def _ping_answered(self, event: PingAnswered) -> list[Action]:
        if self.phase is not Phase.OPEN or self._outstanding is None:
            return []
        if event.payload is not None and event.payload != ping_payload(self._outstanding):
            return []  # a late echo of an earlier round
        self._outstanding = None
        self._missed = 0
        return [RoundTrip(event.now - self._sent_at), *self._round_ended(event.now, answered=True)]

    # ------------------------------------------------------------------ steps
    def _attempt(self) -> list[Action]:
        state = EngineState.RECONNECTING if self._failures else EngineState.CONNECTING
        if not self._need_privileges:
            return self._fetch(state, "choosing a path")
        self.phase = Phase.PRIVILEGES
        self._token += 1
        self._set(state, "asking for permission to configure the network")
        return [Publish(), AcquirePrivileges(self._token)]

    def _fetch(self, state: EngineState, step: str) -> list[Action]:
        self.phase = Phase.RELAYS
        self._token += 1
        self._set(state, step)
        return [Publish(), FetchRelays(self._token)]

    def _start_rotation(self) -> list[Action]:
        self._rotate_requested = False
        self._rotating = True
        return self._fetch(EngineState.CONNECTED, "building a new circuit")

    def _start_pings(self, now: float) -> list[Action]:
        self._missed = 0
        self._seq = 0
        return self._ping(now)

    def _ping(self, now: float) -> list[Action]:
        self._seq += 1
        self._outstanding, self._sent_at = self._seq, now
        assert self.circuit is not None
        return [SendPing(self.circuit, self._seq)]

    def _round_ended(self, now: float, *, answered: bool) -> list[Action]:
        # an answer after an error (e.g. a switch that failed) clears both; otherwise the step stays
        if answered and self.error:
            self._set(EngineState.CONNECTED)
        else:
            self._set(EngineState.CONNECTED, self.step)
        if self._rotate_requested:
            return [Publish(), *self._start_rotation()]
        self._next_ping_at = now + PING_INTERVAL_S
        return [Publish()]

    def _fail(self, now: float, reason: str, kind: ErrorKind | None, guard: bytes | None) -> list[Action]:
        actions = self._drop()
        self._outstanding = None
        if kind in FINAL:  # rule 2: retrying cannot help, the user must act
            assert kind is not None
            self.trying = False
            self.phase = Phase.IDLE
            self._set(EngineState.ERROR, error=reason, kind=kind)
            return [*actions, GiveUp(reason, kind), Publish()]
        if guard is not None:
            self.guards.failed(guard)  # most failures are the guard's link: the next path tries another
        delay = RECONNECT_BACKOFF_S[min(self._failures, len(RECONNECT_BACKOFF_S) - 1)]
        self._failures += 1
        self.phase, self._retry_at = Phase.BACKOFF, now + delay
        state = EngineState.ERROR if self._failures >= ERROR_AFTER_FAILURES else EngineState.RECONNECTING
        self._set(state, f"retrying in {delay:g} s", reason)
        return [*actions, Backoff(delay, reason), Publish()]

    def _drop(self) -> list[Action]:
        circuit, self.circuit, self.path = self.circuit, None, ()
        return [Drop(circuit)] if circuit is not None else []

    def _set(self, state: EngineState, step: str = "", error: str = "", kind: ErrorKind | None = None) -> None:
        self.state, self.step, self.error = state, step, error
        self.error_kind = kind if error else None

    @staticmethod
    def _guard_of(path: Sequence[Descriptor]) -> bytes | None:
        return path[0].relay_id if path else None
