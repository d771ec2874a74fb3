"""The circuit manager's guards against results that come too late or for something else
(core/circuit/manager.py): a stale answer, a second answer, a lost circuit that is not the one in use, a
ping answer nobody waits for, and a timer called early.  Each must change nothing; each test also shows
the same input, on time, changing something."""

from __future__ import annotations

from shallot.core.circuit import manager as m
from shallot.core.control.api import EngineState
from tests.unit.test_circuit_manager import RELAYS, Drive


def test_a_timer_called_before_it_is_due_or_with_nothing_due_does_nothing() -> None:
    d = Drive()
    assert d.m.timer() is None and d.m.handle_timer(d.now) == []  # idle: nothing is due, ever
    d.connected()
    due = d.m.timer()
    assert due is not None and d.m.handle_timer(due - 0.01) == []  # the ping round's answer is not late yet
    # at its deadline the ping is late: the circuit is suspect (its guard probed, another ping out)
    assert [type(a) for a in d.m.handle_timer(due)] == [m.ProbeGuard, m.SendPing]


def test_late_answers_to_abandoned_work_change_nothing() -> None:
    d = Drive()
    ask = d.one(m.AcquirePrivileges, d.connect(need_privileges=True))
    d.said(d.m.disconnect(d.now))
    assert d.feed(m.PrivilegesAcquired(d.now, ask.token)) == []
    assert d.m.state is EngineState.DISCONNECTED and d.m.phase is m.Phase.IDLE
    fetch = d.one(m.FetchRelays, d.connect())
    d.said(d.m.disconnect(d.now))
    assert d.feed(m.RelaysFetched(d.now, fetch.token, RELAYS)) == []  # relays enough for a path: still nothing
    assert d.m.phase is m.Phase.IDLE
    # on time, the same answers move the machine
    ask = d.one(m.AcquirePrivileges, d.connect(need_privileges=True))
    d.one(m.FetchRelays, d.feed(m.PrivilegesAcquired(d.now, ask.token)))


def test_an_answer_of_another_kind_with_the_current_token_changes_nothing() -> None:
    d = Drive()
    fetch = d.one(m.FetchRelays, d.connect())
    assert d.feed(m.PrivilegesAcquired(d.now, fetch.token)) == []  # waiting for relays, not privileges
    assert d.m.phase is m.Phase.RELAYS


def test_a_late_failure_of_earlier_work_does_not_fail_the_build_out() -> None:
    d = Drive()
    connect = d.connect()
    fetch = d.one(m.FetchRelays, connect)
    build = d.one(m.Build, d.fetched(connect))
    assert d.feed(m.Failed(d.now, fetch.token, "the relay fetch, reported late")) == []
    assert d.m.phase is m.Phase.BUILDING and d.m.state is EngineState.CONNECTING
    assert any(isinstance(a, m.Backoff) for a in d.feed(m.Failed(d.now, build.token, "timed out")))  # on time


def test_a_failure_after_the_build_succeeded_is_not_a_second_result() -> None:
    d = Drive()
    fetched = d.fetched(d.connect())
    build = d.one(m.Build, fetched)
    circuit, _ = d.built(fetched)
    assert d.feed(m.Failed(d.now, build.token, "reported twice")) == []
    assert d.m.state is EngineState.CONNECTED and d.m.circuit == circuit
    assert d.feed(m.Failed(d.now, build.token - 1, "an older build")) == []


def test_a_lost_circuit_that_is_not_the_one_in_use_changes_nothing() -> None:
    d = Drive()
    assert d.feed(m.CircuitLost(d.now, "nothing-in-use", "gone")) == []  # idle
    assert d.feed(m.CircuitLost(d.now, None, "gone")) == []  # not even a circuit
    assert d.m.phase is m.Phase.IDLE and d.m.timer() is None
    circuit = d.connected()
    assert d.feed(m.CircuitLost(d.now, "some-old-circuit", "gone")) == []
    assert d.m.state is EngineState.CONNECTED
    lost = d.feed(m.CircuitLost(d.now, circuit, "gone"))  # the one in use: a failure
    assert any(isinstance(a, m.Drop) for a in lost) and d.m.state is EngineState.RECONNECTING


def test_a_ping_answer_nobody_waits_for_changes_nothing() -> None:
    d = Drive()
    assert d.feed(m.PingAnswered(d.now, m.ping_payload(1))) == []  # idle
    d.connected()
    d.answer()  # the round is answered: none outstanding now
    assert d.feed(m.PingAnswered(d.now, m.ping_payload(1))) == []
    assert d.feed(m.PingAnswered(d.now, None)) == []
    d.until(d.m.timer() or d.now)  # the next round goes out; its answer counts
    assert any(isinstance(a, m.RoundTrip) for a in d.answer())
