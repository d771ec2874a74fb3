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
   answer.  The circuit's own traffic is watched too (``Activity``, from the engine every ACTIVITY_POLL_S):
   packets sent and nothing back for SILENCE_S.  Either makes the circuit suspect: the guard's link is
   probed (``ProbeGuard``) and pings go out every PROBE_RETRY_S; nothing back within PROBE_WINDOW_S, or the
   circuit closing, is a failure (rule 2).  Whether the guard answered its probe in that window decides
   whose failure it was (an ``Outcome`` for the GuardPolicy: the guard's, or beyond it).
4. ``new_circuit`` asks for a circuit avoiding every relay of the current one (any path if none is left;
   entry guards keep the guard, docs/PROTOCOL.md §5.10)
   while the current one carries the traffic; the new one takes over once built and the old one is
   closed.  If the build fails the current circuit is kept and ``error`` says why.  Pings pause while
   it is built; a request during a ping round starts when the round ends.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from shallot.core.circuit.guards import GuardPolicy, Outcome, PathRequest
from shallot.core.control.errors import FINAL, ControlError, ErrorKind
from shallot.core.control.state import EngineState
from shallot.core.errors import ShallotError
from shallot.crypto.descriptor import Descriptor

PING_INTERVAL_S = 5.0
PING_TIMEOUT_S = 2.0  # a keepalive ping unanswered this long makes the circuit suspect
SILENCE_S = 1.0  # traffic sent and nothing back this long makes the circuit suspect
PROBE_RETRY_S = 0.5  # a suspect circuit is pinged this often (a lost ping is not a dead circuit) ...
PROBE_WINDOW_S = 1.5  # ... and declared dead when nothing came back this long after the suspicion
ACTIVITY_POLL_S = 0.25  # how often the engine reports the circuit's counters (Activity)
RECONNECT_BACKOFF_S = (0.2, 1.0, 2.0, 5.0, 10.0, 30.0)
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
    at_guard: bool = True  # a build: the guard itself did not answer (False: it did; the failure lies beyond)


@dataclass(frozen=True)
class CircuitLost:
    """``circuit`` closed (a DESTROY, a timeout), could not be sent on, or its tunnel could not be kept."""

    now: float
    circuit: Circuit
    reason: str
    kind: ErrorKind | None = None
    at_guard: bool = True  # the link to the guard went down (False: a relay beyond it ended the circuit)


@dataclass(frozen=True)
class Activity:
    """The circuit's counters (DATA cells sent and received) and when its guard's link last heard anything
    (monotonic), reported every ACTIVITY_POLL_S while connected."""

    now: float
    circuit: Circuit
    sent: int
    received: int
    guard_heard: float


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


Event = PrivilegesAcquired | RelaysFetched | Built | Failed | CircuitLost | PrivilegesLost | PingAnswered | Activity

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
class ProbeGuard:
    """The circuit looks dead: make its guard answer (a fresh link handshake), so that the failure, if it
    comes, can be told to be the guard's or a relay's beyond it."""

    circuit: Circuit


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


Action = (Publish | AcquirePrivileges | FetchRelays | Build | Use | SendPing | ProbeGuard | RoundTrip | Close | Drop
          | Teardown | Backoff | GiveUp | KeepCurrent)

# ---------------------------------------------------------------------------------------------- the machine


# The phases and what moves them (a "switch" is rule 4's new circuit for a live connection):
#
#   IDLE        --connect-->             PRIVILEGES (VPN mode, not yet allowed) | RELAYS
#   PRIVILEGES  --PrivilegesAcquired-->  RELAYS         --Failed-->  BACKOFF | IDLE (final)
#   RELAYS      --RelaysFetched-->       BUILDING       --Failed-->  BACKOFF | OPEN (a switch keeps the current)
#   BUILDING    --Built-->               OPEN           --Failed-->  BACKOFF | IDLE (final) | OPEN (a switch)
#   OPEN        --new_circuit, between ping rounds-->  RELAYS (a switch)
#   OPEN        --suspect, PROBE_WINDOW_S silent; CircuitLost-->  BACKOFF | IDLE (final)
#   BACKOFF     --timer-->               PRIVILEGES | RELAYS
#   any         --disconnect-->          IDLE
#   any, trying --PrivilegesLost-->      IDLE (final)
class Phase(enum.Enum):
    IDLE = "idle"  # not trying: disconnected, or given up (rule 2)
    PRIVILEGES = "privileges"  # AcquirePrivileges out
    RELAYS = "relays"  # FetchRelays out
    BUILDING = "building"  # Build out
    OPEN = "open"  # a circuit carries the traffic: ping rounds and traffic watch (rule 3)
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
        self._recently_failed: frozenset[bytes] = frozenset()  # middle and exit of the circuit that just failed
        self._retry_at = 0.0
        self._rotating = False  # the work out is a new circuit for a live connection (rule 4)
        self._rotate_requested = False
        self._lost: tuple[str, ErrorKind | None, Outcome] | None = None  # the current circuit died in a switch
        self._seq = 0
        self._outstanding: int | None = None  # the latest ping of the round waiting for an answer
        self._round_first = 0  # the round's first ping: an answer to any of its pings ends it
        self._sent_times: dict[int, float] = {}  # the round's pings
        self._sent_at = 0.0
        self._next_ping_at = 0.0
        # rule 3: the traffic watch
        self._answered = False  # something came back on the current circuit
        self._tx = self._rx = 0  # its counters at the last Activity
        self._quiet_since: float | None = None  # sent without anything back since then
        self._suspect_since: float | None = None
        self._probes = 0
        self._guard_heard = 0.0
        self._handlers = {PrivilegesAcquired: self._privileges_acquired, RelaysFetched: self._relays_fetched,
                          Built: self._built, Failed: self._failed, CircuitLost: self._circuit_lost,
                          PrivilegesLost: self._privileges_lost, PingAnswered: self._ping_answered,
                          Activity: self._activity}

    # ------------------------------------------------------------------ commands
    def connect(self, now: float, *, exit_spec: str | None = None, path_spec: str | None = None,
                need_privileges: bool = False) -> list[Action]:
        """Start trying; while already trying, only the exit and path choice change (for the next circuit)."""
        self.exit_spec, self.path_spec = exit_spec, path_spec
        self.guards.reset()
        self._rotate_requested = False
        self._recently_failed = frozenset()
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
            if self._suspect_since is not None:
                dead = self._suspect_since + PROBE_WINDOW_S
                return min(dead, self._sent_at + PROBE_RETRY_S)
            return self._sent_at + PING_TIMEOUT_S if self._outstanding is not None else self._next_ping_at
        return None

    def handle_timer(self, now: float) -> list[Action]:
        deadline = self.timer()
        if deadline is None or now < deadline:
            return []
        if self.phase is Phase.BACKOFF:
            return self._attempt()
        if self._suspect_since is not None:
            if now >= self._suspect_since + PROBE_WINDOW_S:
                return self._dead(now)
            return self._ping(now)
        if self._outstanding is None:
            return self._ping(now)
        return self._suspect(now)  # the ping went unanswered

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
            path = tuple(self.guards.plan(relays, PathRequest(self.path_spec, self.exit_spec, away,
                                                              self._recently_failed)))
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
        self._recently_failed = frozenset()
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
                reason, kind, outcome = self._lost
                return actions + self._fail(event.now, reason, kind, self._guard_of(self.path), outcome)
            return actions + self._start_pings(event.now)
        guard = self._guard_of(self._planned) if self.phase is Phase.BUILDING else None
        if guard is not None:
            self._recently_failed = frozenset(d.relay_id for d in self._planned[1:])
        outcome = Outcome.UNREACHABLE if event.at_guard else Outcome.BUILD_FAILED
        return self._fail(event.now, event.reason, event.kind, guard, outcome)

    def _circuit_lost(self, event: CircuitLost) -> list[Action]:
        if self.circuit is None or event.circuit is not self.circuit:
            return []  # an old circuit of a switch, or one that was being built (its build fails by itself)
        outcome = self._loss_outcome(at_guard=event.at_guard)
        if self._rotating:
            self._lost = (event.reason, event.kind, outcome)  # the switch ends first, then the loss counts
            return []
        return self._fail(event.now, event.reason, event.kind, self._guard_of(self.path), outcome)

    def _privileges_lost(self, event: PrivilegesLost) -> list[Action]:
        if not self.trying:
            return []  # nothing to stop; the next connect asks for privileges anew
        self._rotating = self._rotate_requested = False
        self._lost = None
        self._need_privileges = True
        return self._fail(event.now, event.reason, ErrorKind.HELPER_FAILED, None, Outcome.CLOSED)

    def _ping_answered(self, event: PingAnswered) -> list[Action]:
        if self.phase is not Phase.OPEN or self._outstanding is None:
            return []
        if event.payload is None:  # a CONFIG answer: the round's latest request is the nearest guess
            sent = self._sent_at
        else:
            answered = next((s for s in self._sent_times if event.payload == ping_payload(s)), None)
            if answered is None:
                return []  # a late echo of an earlier round
            sent = self._sent_times[answered]
        self._alive()
        return [RoundTrip(event.now - sent), *self._round_ended(event.now, answered=True)]

    def _activity(self, event: Activity) -> list[Action]:
        """Rule 3's traffic watch: sent, nothing back for SILENCE_S -> suspect; anything back -> alive."""
        if self.phase is not Phase.OPEN or event.circuit is not self.circuit:
            return []
        self._guard_heard = max(self._guard_heard, event.guard_heard)
        if event.received > self._rx:
            self._tx, self._rx = event.sent, event.received
            suspect = self._suspect_since is not None
            self._alive()
            return self._round_ended(event.now, answered=True) if suspect else []
        if event.sent > self._tx:
            self._tx = event.sent
            if self._quiet_since is None:
                self._quiet_since = event.now
        if (self._quiet_since is not None and self._suspect_since is None
                and event.now - self._quiet_since >= SILENCE_S):
            return self._suspect(event.now)
        return []

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
        self._seq = 0
        self._outstanding = None
        self._answered = False
        self._tx = self._rx = 0
        self._quiet_since = self._suspect_since = None
        self._guard_heard = now  # the guard just answered the build
        return self._ping(now)

    def _ping(self, now: float) -> list[Action]:
        self._seq += 1
        if self._outstanding is None:  # a new round
            self._round_first = self._seq
            self._sent_times = {}
        self._outstanding, self._sent_at = self._seq, now
        self._sent_times[self._seq] = now
        assert self.circuit is not None
        return [SendPing(self.circuit, self._seq)]

    def _suspect(self, now: float) -> list[Action]:
        """No answer where one was due: probe the guard and ping until PROBE_WINDOW_S has passed."""
        self._suspect_since = now
        assert self.circuit is not None
        return [ProbeGuard(self.circuit), *self._ping(now)]

    def _alive(self) -> None:
        self._outstanding = None
        self._answered = True
        self._quiet_since = self._suspect_since = None

    def _dead(self, now: float) -> list[Action]:
        assert self._suspect_since is not None
        at_guard = self._guard_heard < self._suspect_since  # the guard did not answer its probe either
        reason = ("the circuit stopped answering, and so did the guard" if at_guard
                  else "the circuit stopped answering beyond the guard")
        return self._fail(now, reason, None, self._guard_of(self.path), self._loss_outcome(at_guard=at_guard))

    def _loss_outcome(self, *, at_guard: bool) -> Outcome:
        """How the loss of the current circuit counts for its guard (docs/PROTOCOL.md §5.4)."""
        if at_guard:
            return Outcome.UNREACHABLE
        return Outcome.CLOSED if self._answered else Outcome.USE_FAILED

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

    def _fail(self, now: float, reason: str, kind: ErrorKind | None, guard: bytes | None,
              outcome: Outcome) -> list[Action]:
        actions = self._drop()
        self._outstanding = None
        self._suspect_since = self._quiet_since = None
        if kind in FINAL:  # rule 2: retrying cannot help, the user must act
            assert kind is not None
            self.trying = False
            self.phase = Phase.IDLE
            self._set(EngineState.ERROR, error=reason, kind=kind)
            return [*actions, GiveUp(reason, kind), Publish()]
        if guard is not None:
            self.guards.failed(guard, outcome)  # the policy decides what it means for the guard
        delay = RECONNECT_BACKOFF_S[min(self._failures, len(RECONNECT_BACKOFF_S) - 1)]
        self._failures += 1
        self.phase, self._retry_at = Phase.BACKOFF, now + delay
        state = EngineState.ERROR if self._failures >= ERROR_AFTER_FAILURES else EngineState.RECONNECTING
        self._set(state, f"retrying in {delay:g} s", reason)
        return [*actions, Backoff(delay, reason), Publish()]

    def _drop(self) -> list[Action]:
        if self.path:
            self._recently_failed = frozenset(d.relay_id for d in self.path[1:])
        circuit, self.circuit, self.path = self.circuit, None, ()
        return [Drop(circuit)] if circuit is not None else []

    def _set(self, state: EngineState, step: str = "", error: str = "", kind: ErrorKind | None = None) -> None:
        self.state, self.step, self.error = state, step, error
        self.error_kind = kind if error else None

    @staticmethod
    def _guard_of(path: Sequence[Descriptor]) -> bytes | None:
        return path[0].relay_id if path else None
