"""The circuit manager (core/circuit/manager.py) with simulated time: what it asks for, in which state, at
which moment.  No loop, no socket: every input is a call with ``now``, every output an action."""

from __future__ import annotations

import random
from typing import Any

import pytest

from shallot.core.circuit import manager as m
from shallot.core.circuit.guards import AvoidFailedGuards, Outcome, PathRequest
from shallot.core.control.api import ControlError, EngineState, ErrorKind
from shallot.crypto.descriptor import Descriptor
from shallot.crypto.keys import RelayKeys
from tests.simnet import WALL0, det_rng


def _relay(i: int, exit_node: bool = False) -> Descriptor:
    keys = RelayKeys.generate(det_rng(7000 + i), WALL0)
    return Descriptor.create(keys, nickname=f"r{i}", addresses=((f"10.{i}.0.1", 9000 + i),), exit_node=exit_node,
                             published=int(WALL0), lifetime_s=86400)


RELAYS = tuple(_relay(i, exit_node=i >= 4) for i in range(6))  # four middles/guards, two exits, six /16s


class Drive:
    """A manager, a clock and everything it said."""

    def __init__(self, *, guards: Any = None, never: frozenset[bytes] = frozenset()) -> None:
        self.guards = guards or AvoidFailedGuards(random.Random(1))
        self.m = m.CircuitManager(self.guards, never=never)
        self.now = 100.0
        self.actions: list[m.Action] = []
        self._circuits = 0

    def said(self, actions: list[m.Action]) -> list[m.Action]:
        self.actions += actions
        return actions

    def connect(self, **kw: Any) -> list[m.Action]:
        return self.said(self.m.connect(self.now, **kw))

    def feed(self, event: m.Event) -> list[m.Action]:
        return self.said(self.m.handle(event))

    def until(self, t: float) -> None:
        """Let simulated time run to ``t``, firing the manager's timer whenever it is due."""
        while (deadline := self.m.timer()) is not None and deadline <= t:
            self.now = max(self.now, deadline)
            self.said(self.m.handle_timer(self.now))
        self.now = max(self.now, t)

    def one(self, kind: type, actions: list[m.Action]) -> Any:
        found = [a for a in actions if isinstance(a, kind)]
        assert len(found) == 1, actions
        return found[0]

    def fetched(self, actions: list[m.Action], relays: tuple[Descriptor, ...] = RELAYS) -> list[m.Action]:
        return self.feed(m.RelaysFetched(self.now, self.one(m.FetchRelays, actions).token, relays))

    def built(self, actions: list[m.Action]) -> tuple[object, list[m.Action]]:
        self._circuits += 1
        circuit = f"circuit-{self._circuits}"
        return circuit, self.feed(m.Built(self.now, self.one(m.Build, actions).token, circuit))

    def connected(self) -> object:
        """Connect and build; answers nothing yet."""
        circuit, actions = self.built(self.fetched(self.connect()))
        assert self.m.state is EngineState.CONNECTED and self.one(m.SendPing, actions).circuit == circuit
        return circuit

    def answer(self) -> list[m.Action]:
        ping = [a for a in self.actions if isinstance(a, m.SendPing)][-1]
        return self.feed(m.PingAnswered(self.now, m.ping_payload(ping.seq)))


def test_connect_builds_a_circuit_and_pings_it() -> None:
    d = Drive()
    first = d.connect()
    assert isinstance(first[0], m.Publish) and (d.m.state, d.m.step) == (EngineState.CONNECTING, "choosing a path")
    build = d.one(m.Build, d.fetched(first))
    assert d.m.step == "building a circuit through " + ", ".join(r.nickname for r in build.path)
    assert len(build.path) == 3 and build.path[-1].is_exit and build.replacing is None
    circuit, actions = d.built([build])
    assert [type(a) for a in actions] == [m.Use, m.Publish, m.SendPing]
    assert (d.m.state, d.m.circuit, d.m.path, d.m.trying) == (EngineState.CONNECTED, circuit, build.path, True)
    d.now += 0.04
    answered = d.answer()
    assert d.one(m.RoundTrip, answered).seconds == pytest.approx(0.04)
    assert d.m.timer() == pytest.approx(d.now + m.PING_INTERVAL_S)  # the next round, 5 s after this one ended
    d.until(d.now + m.PING_INTERVAL_S)
    assert d.one(m.SendPing, d.actions[-1:]).seq == 2


def test_backoff_sequence_and_error_after_three_failures() -> None:
    d = Drive()
    actions = d.connect()
    delays, states = [], []
    for _ in range(8):
        build = d.one(m.Build, d.fetched(actions))
        failed = d.feed(m.Failed(d.now, build.token, "circuit build timed out"))
        backoff = d.one(m.Backoff, failed)
        delays.append(backoff.delay)
        states.append(d.m.state)
        assert d.m.step == f"retrying in {backoff.delay:g} s" and d.m.error == "circuit build timed out"
        assert d.m.timer() == pytest.approx(d.now + backoff.delay)
        mark = len(d.actions)
        d.until(d.now + backoff.delay - 0.001)
        assert len(d.actions) == mark  # not a moment early
        d.until(d.now + 0.001)
        actions = d.actions[mark:]
        assert d.m.state is EngineState.RECONNECTING and d.m.step == "choosing a path"  # every later attempt
    assert delays == [0.2, 1.0, 2.0, 5.0, 10.0, 30.0, 30.0, 30.0]
    assert states == [EngineState.RECONNECTING] * 2 + [EngineState.ERROR] * 6
    d.built(d.fetched(actions))  # a circuit resets the count
    mark = len(d.actions)
    d.until(d.now + m.PING_TIMEOUT_S + m.PROBE_WINDOW_S)  # the ping and the probes unanswered
    assert d.one(m.Backoff, d.actions[mark:]).delay == 0.2 and d.m.state is EngineState.RECONNECTING


@pytest.mark.parametrize("kind", [ErrorKind.HELPER_MISSING, ErrorKind.HELPER_DENIED, ErrorKind.HELPER_FAILED])
def test_final_errors_stop_retrying(kind: ErrorKind) -> None:
    d = Drive()
    first = d.connect(need_privileges=True)
    ask = d.one(m.AcquirePrivileges, first)
    assert d.m.step == "asking for permission to configure the network"
    gave_up = d.feed(m.Failed(d.now, ask.token, "the privileged helper is not installed", kind))
    assert d.one(m.GiveUp, gave_up).kind is kind
    assert (d.m.state, d.m.error_kind, d.m.trying, d.m.timer()) == (EngineState.ERROR, kind, False, None)
    d.until(d.now + 3600)
    assert d.actions[-1] == m.Publish()  # nothing retried
    assert d.one(m.AcquirePrivileges, d.connect(need_privileges=True))  # the user acts: a new connect tries again
    assert d.m.state is EngineState.CONNECTING and d.m.error_kind is None


def test_a_final_error_on_a_live_circuit_drops_it_and_stops() -> None:
    d = Drive()
    circuit = d.connected()
    lost = d.feed(m.CircuitLost(d.now, circuit, "the privileged helper quit", ErrorKind.HELPER_FAILED))
    assert [type(a) for a in lost] == [m.Drop, m.GiveUp, m.Publish] and lost[0].circuit == circuit
    assert not d.m.trying and d.m.timer() is None


def test_privileges_are_asked_once_per_connect() -> None:
    d = Drive()
    ask = d.one(m.AcquirePrivileges, d.connect(need_privileges=True))
    fetch = d.feed(m.PrivilegesAcquired(d.now, ask.token))
    assert d.one(m.FetchRelays, fetch) and d.m.step == "choosing a path"
    build = d.one(m.Build, d.fetched(fetch))
    d.feed(m.Failed(d.now, build.token, "circuit build timed out"))
    d.until(d.now + 1)
    assert isinstance(d.actions[-1], m.FetchRelays)  # the retry needs no second permission


def test_a_new_circuit_is_built_while_the_old_one_carries_the_traffic() -> None:
    d = Drive()
    old = d.connected()
    d.answer()
    rotation = d.said(d.m.new_circuit(d.now))
    assert (d.m.state, d.m.step, d.m.circuit) == (EngineState.CONNECTED, "building a new circuit", old)
    assert d.m.timer() is None  # no pings while the new circuit is built
    build = d.one(m.Build, d.fetched(rotation))
    assert build.replacing == old
    assert not {r.relay_id for r in build.path} & {r.relay_id for r in d.m.path}  # away from every old relay
    d.feed(m.CircuitLost(d.now, "some-other-circuit", "closed"))  # not ours: nothing
    new, actions = d.built([build])
    assert [type(a) for a in actions] == [m.Use, m.Publish, m.Close, m.SendPing]
    assert d.one(m.Close, actions).circuit == old and d.m.circuit == new and d.m.path == build.path
    assert not any(isinstance(a, m.Drop | m.Backoff) for a in d.actions)  # the connection never dropped


def test_a_failed_new_circuit_keeps_the_current_one() -> None:
    d = Drive()
    old = d.connected()
    d.answer()
    build = d.one(m.Build, d.fetched(d.said(d.m.new_circuit(d.now))))
    kept = d.feed(m.Failed(d.now, build.token, "circuit build timed out"))
    assert [type(a) for a in kept] == [m.KeepCurrent, m.Publish, m.SendPing]
    assert (d.m.state, d.m.circuit) == (EngineState.CONNECTED, old)
    assert d.m.error == "could not build a new circuit: circuit build timed out"
    d.now += 0.01
    d.answer()
    assert d.m.error == "" and d.m.step == ""  # the next answered ping clears it


def test_the_old_circuit_dying_during_a_switch_counts_once_the_switch_failed() -> None:
    d = Drive()
    old = d.connected()
    d.answer()
    build = d.one(m.Build, d.fetched(d.said(d.m.new_circuit(d.now))))
    assert d.feed(m.CircuitLost(d.now, old, "a link of the circuit went down")) == []
    failed = d.feed(m.Failed(d.now, build.token, "circuit build timed out"))
    assert [type(a) for a in failed] == [m.KeepCurrent, m.Publish, m.Drop, m.Backoff, m.Publish]
    assert d.m.error == "a link of the circuit went down" and d.m.state is EngineState.RECONNECTING


def test_a_new_circuit_asked_during_a_ping_round_starts_when_it_ends() -> None:
    d = Drive()
    d.connected()
    assert d.said(d.m.new_circuit(d.now)) == []  # the first ping is out
    d.now += 0.02
    ended = d.answer()
    assert d.one(m.FetchRelays, ended) and d.m.step == "building a new circuit"


def test_a_missed_ping_makes_the_circuit_suspect_and_unanswered_probes_tear_it_down() -> None:
    d = Drive()
    circuit = d.connected()
    start = d.now
    d.until(start + m.PING_TIMEOUT_S)  # ping 1 unanswered: suspect, the guard is probed, probes go out
    suspect = d.actions[-2:]
    assert d.one(m.ProbeGuard, suspect).circuit == circuit and d.one(m.SendPing, suspect).seq == 2
    assert d.m.state is EngineState.CONNECTED
    d.until(start + m.PING_TIMEOUT_S + m.PROBE_WINDOW_S - 0.001)
    assert d.m.circuit == circuit  # still within the window: a lost ping is no dead circuit
    assert [a.seq for a in d.actions if isinstance(a, m.SendPing)] == [1, 2, 3, 4]  # every PROBE_RETRY_S
    d.until(start + m.PING_TIMEOUT_S + m.PROBE_WINDOW_S)
    drop = d.one(m.Drop, d.actions[-3:])
    assert drop.circuit == circuit and "stopped answering" in d.m.error
    assert d.m.state is EngineState.RECONNECTING


def test_an_answer_to_any_probe_of_the_round_ends_the_suspicion() -> None:
    d = Drive()
    d.connected()
    for _ in range(6):  # miss, then the second probe is answered: never torn down
        d.until(d.now + m.PING_TIMEOUT_S + m.PROBE_RETRY_S)
        d.feed(m.PingAnswered(d.now, m.ping_payload([a for a in d.actions if isinstance(a, m.SendPing)][-2].seq)))
        d.until(d.m.timer())
    assert d.m.state is EngineState.CONNECTED and not any(isinstance(a, m.Drop) for a in d.actions)


def test_a_late_echo_of_an_earlier_round_does_not_count() -> None:
    d = Drive()
    d.connected()
    d.answer()
    d.until(d.m.timer())  # round 2's ping out
    d.feed(m.PingAnswered(d.now, m.ping_payload(1)))
    assert d.m._outstanding == 2


class RecordingGuards(AvoidFailedGuards):
    def __init__(self) -> None:
        super().__init__(random.Random(3))
        self.reports: list[tuple[str, bytes]] = []
        self.requests: list[PathRequest] = []
        self.outcomes: list[Outcome] = []

    def plan(self, relays: Any, request: PathRequest) -> list[Descriptor]:
        self.requests.append(request)
        return super().plan(relays, request)

    def succeeded(self, guard: bytes) -> None:
        self.reports.append(("ok", guard))

    def failed(self, guard: bytes, outcome: Outcome = Outcome.UNREACHABLE) -> None:
        self.reports.append(("failed", guard))
        self.outcomes.append(outcome)
        super().failed(guard, outcome)


def test_the_guard_of_a_failed_circuit_is_avoided_until_the_next_connect() -> None:
    guards = RecordingGuards()
    d = Drive(guards=guards)
    build = d.one(m.Build, d.fetched(d.connect()))
    d.feed(m.Failed(d.now, build.token, "circuit build timed out"))
    first_guard = build.path[0].relay_id
    assert guards.reports == [("failed", first_guard)]
    d.until(d.now + 0.2)
    second = d.one(m.Build, d.fetched(d.actions[-2:]))
    assert second.path[0].relay_id != first_guard
    circuit, _ = d.built([second])
    d.feed(m.CircuitLost(d.now, circuit, "a relay reported a protocol error"))  # the live circuit's guard too
    assert guards.reports[-2:] == [("ok", second.path[0].relay_id), ("failed", second.path[0].relay_id)]
    assert guards.avoided == {first_guard, second.path[0].relay_id}
    d.said(d.m.disconnect(d.now))
    fetch = d.one(m.FetchRelays, d.connect())
    assert guards.avoided == set()  # a new connect forgets
    d.feed(m.Failed(d.now, fetch.token, "no relay known yet"))  # no path yet: no guard to blame
    assert guards.reports[-1] == ("failed", second.path[0].relay_id)


def test_avoiding_falls_back_to_any_path_and_own_relays_never_appear() -> None:
    own = RELAYS[0].relay_id
    guards = AvoidFailedGuards(random.Random(5))
    for r in RELAYS[1:4]:
        guards.failed(r.relay_id)  # every guard candidate has failed
    d = Drive(guards=guards, never=frozenset({own}))
    for _ in range(20):
        build = d.one(m.Build, d.fetched(d.connect()))
        assert own not in {r.relay_id for r in build.path} and len(build.path) == 3
        d.said(d.m.disconnect(d.now))
        for r in RELAYS[1:4]:
            guards.failed(r.relay_id)
    plan = guards.plan(RELAYS, PathRequest(path_spec="r1,r2,r4"))  # the user's path wins over avoiding
    assert [r.nickname for r in plan] == ["r1", "r2", "r4"]


def test_no_path_is_a_failure_to_retry() -> None:
    d = Drive()
    failed = d.fetched(d.connect(exit_spec="no-such-exit"))
    assert d.one(m.Backoff, failed) and "unknown relay" in d.m.error


def test_disconnect_abandons_the_work_out() -> None:
    d = Drive()
    build = d.one(m.Build, d.fetched(d.connect()))
    bye = d.said(d.m.disconnect(d.now))
    assert [type(a) for a in bye] == [m.Teardown, m.Publish] and d.m.state is EngineState.DISCONNECTED
    late = d.feed(m.Built(d.now, build.token, "late-circuit"))
    assert late == [m.Close("late-circuit")] and d.m.circuit is None  # built for nobody: closed
    assert d.feed(m.Failed(d.now, build.token, "x")) == [] and d.m.timer() is None
    circuit = d.connected()
    bye = d.said(d.m.disconnect(d.now))
    assert bye[0] == m.Drop(circuit) and not d.m.trying


def test_new_circuit_needs_a_connection() -> None:
    d = Drive()
    with pytest.raises(ControlError) as err:
        d.m.new_circuit(d.now)
    assert err.value.kind is ErrorKind.NOT_CONNECTED


def test_connect_while_trying_changes_only_the_choice() -> None:
    d = Drive()
    d.connected()
    assert d.connect(exit_spec="r5") == [] and d.m.exit_spec == "r5"
    rotation = d.said(d.m.new_circuit(d.now + 1)) or d.answer()
    build = d.one(m.Build, d.fetched(rotation))
    assert build.path[-1].nickname == "r5"
