"""Entry guards (core/circuit/guards.py GuardSet, core/engine/guards.py on disk; docs/PROTOCOL.md §5.4): every
rule with simulated (wall) time and a seeded Random, and the circuit manager driving them."""

from __future__ import annotations

import json
import logging
import random
import stat
from pathlib import Path

import pytest

from shallot.core.circuit import guards as gm
from shallot.core.circuit import manager as m
from shallot.core.circuit.guards import GuardSet, Outcome, PathRequest
from shallot.core.engine.guards import PersistentGuards, load_guards, save_guards
from shallot.core.errors import ShallotError
from shallot.crypto.descriptor import Descriptor
from shallot.crypto.keys import RelayKeys
from tests.simnet import WALL0, det_rng
from tests.unit.test_circuit_manager import Drive

NOW = WALL0 + 1000.0


def _relay(i: int, exit_node: bool = False, family: tuple[bytes, ...] = ()) -> Descriptor:
    keys = RelayKeys.generate(det_rng(9100 + i), WALL0)
    host = f"10.{i}.0.1" if i < 256 else f"11.{i - 256}.0.1"  # one /16 each
    return Descriptor.create(keys, nickname=f"g{i}", addresses=((host, 9000 + i),), exit_node=exit_node,
                             published=int(WALL0), lifetime_s=86400)


RELAYS = tuple(_relay(i, exit_node=i >= 8) for i in range(12))  # eight non-exits, four exits, twelve /16s
BY_ID = {r.relay_id: r for r in RELAYS}


def fresh(seed: int = 1) -> GuardSet:
    return GuardSet(random.Random(seed))


def guard_of(gs: GuardSet, now: float = NOW, relays: tuple[Descriptor, ...] = RELAYS, **req: object) -> bytes:
    return gs.plan(relays, PathRequest(**req), now)[0].relay_id  # type: ignore[arg-type]


def test_the_sample_holds_primaries_and_a_spare_non_exits_and_every_circuit_uses_the_first_primary() -> None:
    gs = fresh()
    guards = {guard_of(gs) for _ in range(100)}
    assert len(gs.guards) == gm.PRIMARY_COUNT + gm.SAMPLE_SPARE
    assert not any(BY_ID[g.relay_id].is_exit for g in gs.guards)
    assert guards == {gs.primaries()[0].relay_id}


def test_failures_beyond_the_guard_never_move_the_circuits_off_it() -> None:
    gs = fresh()
    first = guard_of(gs)
    for i in range(15):  # below the path-bias minimum: no judgement yet
        gs.failed(first, (Outcome.BUILD_FAILED, Outcome.USE_FAILED, Outcome.CLOSED)[i % 3], NOW + i)
        assert guard_of(gs, NOW + i) == first
    assert len(gs.guards) == gm.PRIMARY_COUNT + gm.SAMPLE_SPARE  # nor grow the sample


def test_an_unreachable_guard_backs_off_to_the_next_primary_and_is_retried_later() -> None:
    gs = fresh()
    first, second = (g.relay_id for g in gs.primaries()) if gs.guards else (None, None)
    first = guard_of(gs)
    second = gs.primaries()[1].relay_id
    gs.failed(first, Outcome.UNREACHABLE, NOW)
    assert guard_of(gs, NOW + 1) == second
    assert guard_of(gs, NOW + gm.RETRY_S[0] - 1) == second
    assert guard_of(gs, NOW + gm.RETRY_S[0]) == first  # its back-off is over: the first primary again
    gs.failed(first, Outcome.UNREACHABLE, NOW + 40)
    assert gs.guards[0].retry_at == NOW + 40 + gm.RETRY_S[1]  # the back-off grows
    gs.succeeded(first, NOW + 200)
    assert gs.guards[0].failures == 0 and gs.guards[0].down_since is None


def test_when_every_primary_backs_off_the_spare_is_used_then_the_primaries_again() -> None:
    gs = fresh()
    guard_of(gs)
    p1, p2 = (g.relay_id for g in gs.primaries())
    spare = gs.guards[2].relay_id
    gs.failed(p1, Outcome.UNREACHABLE, NOW)
    gs.failed(p2, Outcome.UNREACHABLE, NOW + 1)
    assert guard_of(gs, NOW + 2) == spare
    gs.failed(spare, Outcome.UNREACHABLE, NOW + 3)
    # all three back off and none ever worked: one more candidate, tried before them
    assert guard_of(gs, NOW + 4) not in {p1, p2, spare} and len(gs.guards) == 4
    assert guard_of(gs, NOW + 31) == p1  # p1's back-off ended first


def test_an_offline_client_does_not_walk_through_the_network_once_its_guards_worked() -> None:
    gs = fresh()
    first = guard_of(gs)
    gs.succeeded(first, NOW)
    t = NOW + 10
    while t < NOW + gm.GROW_AFTER_S:  # every guard fails: our own network is down
        gs.failed(guard_of(gs, t), Outcome.UNREACHABLE, t)
        t += 30
    assert len(gs.guards) == gm.PRIMARY_COUNT + gm.SAMPLE_SPARE  # retried, not replaced within the hour
    while t < NOW + 3 * gm.GROW_AFTER_S + 5:  # hours offline: at most one more candidate an hour
        gs.failed(guard_of(gs, t), Outcome.UNREACHABLE, t)
        t += 30
    assert gm.PRIMARY_COUNT + gm.SAMPLE_SPARE < len(gs.guards) <= gm.PRIMARY_COUNT + gm.SAMPLE_SPARE + 2


def test_a_guard_out_of_the_view_is_skipped_kept_in_its_place_and_forgotten_after_weeks() -> None:
    gs = fresh()
    first = guard_of(gs)
    without = tuple(r for r in RELAYS if r.relay_id != first)
    assert guard_of(gs, NOW + 1, without) == gs.primaries()[0].relay_id != first
    assert guard_of(gs, NOW + 2) == first  # back in the view: back in its place
    guard_of(gs, NOW + 3, without)
    guard_of(gs, NOW + 3 + gm.UNLISTED_DROP_S, without)
    assert first not in {g.relay_id for g in gs.guards}
    assert any("left the network view" in n for n in gs.notices)


def test_a_long_outage_drops_the_guard_only_while_other_guards_work() -> None:
    gs = fresh()
    first = guard_of(gs)
    gs.failed(first, Outcome.UNREACHABLE, NOW)
    later = NOW + gm.OUTAGE_DROP_S
    gs.failed(first, Outcome.UNREACHABLE, later - 1)  # still down, retried now and then
    assert guard_of(gs, later) != first
    assert not gs.guards[0].dropped  # no other guard has worked since: it may be our network
    gs.succeeded(gs.primaries()[1].relay_id, later)
    guard_of(gs, later + 1)
    assert gs.guards[0].dropped and first not in {g.relay_id for g in gs.primaries()}
    assert len([g for g in gs.guards if g.usable()]) == gm.PRIMARY_COUNT + gm.SAMPLE_SPARE  # replaced


def test_a_guard_is_replaced_at_the_end_of_its_lifetime() -> None:
    gs = fresh()
    first = guard_of(gs)
    expires = gs.guards[0].expires
    assert gm.LIFETIME_S[0] <= expires - NOW <= gm.LIFETIME_S[1]
    assert guard_of(gs, expires - 1) == first
    assert guard_of(gs, expires) != first and first not in {g.relay_id for g in gs.guards}


def test_path_bias_warns_then_drops_a_guard_whose_circuits_fail_beyond_it() -> None:
    gs = fresh()
    first = guard_of(gs)
    t = NOW
    for i in range(gm.PB_MIN_CIRCUITS):  # 40 % of its used circuits die before carrying anything: a warning
        t += 1
        gs.succeeded(first, t)
        if i % 5 < 2:
            gs.failed(first, Outcome.USE_FAILED, t)
    assert not gs.guards[0].dropped and any("may be failing circuits" in n for n in gs.notices)
    for _ in range(3 * gm.PB_MIN_CIRCUITS):  # then every one of them: dropped
        t += 1
        gs.succeeded(first, t)
        gs.failed(first, Outcome.USE_FAILED, t)
        if gs.guards[0].dropped:
            break
    assert gs.guards[0].dropped.endswith("(path bias)") and any("dropped" in n for n in gs.notices)
    assert guard_of(gs, t + 1) != first


def test_path_bias_counts_failed_builds_too() -> None:
    gs = fresh()
    first = guard_of(gs)
    for i in range(gm.PB_MIN_CIRCUITS):
        gs.failed(first, Outcome.BUILD_FAILED, NOW + i)
    assert gs.guards[0].dropped


def test_a_new_circuit_keeps_the_guard_and_changes_middle_and_exit() -> None:
    gs = fresh()
    path = gs.plan(RELAYS, PathRequest(), NOW)
    again = gs.plan(RELAYS, PathRequest(away_from=frozenset(d.relay_id for d in path)), NOW)
    assert again[0] == path[0] and not {d.relay_id for d in again[1:]} & {d.relay_id for d in path}


def test_an_exit_that_conflicts_with_the_first_primary_takes_the_second() -> None:
    sibling = _relay(12, exit_node=True)  # an exit in the first primary's /16
    gs = fresh()
    first = guard_of(gs)
    same = Descriptor.create(RelayKeys.generate(det_rng(9200), WALL0), nickname="twin",
                             addresses=((BY_ID[first].address[0].replace(".0.1", ".0.2"), 9500),),
                             exit_node=True, published=int(WALL0), lifetime_s=86400)
    relays = (*RELAYS, sibling, same)
    assert guard_of(gs, NOW, relays, exit_spec="twin") == gs.primaries()[1].relay_id
    assert guard_of(gs, NOW, relays) == first


def test_the_users_path_wins() -> None:
    gs = fresh()
    assert [d.nickname for d in gs.plan(RELAYS, PathRequest(path_spec="g5,g6,g9"), NOW)] == ["g5", "g6", "g9"]


def test_the_state_survives_a_round_trip_and_a_restart_keeps_the_primary(tmp_path: Path) -> None:
    path = tmp_path / "state" / "guards"
    clock = [NOW]
    first = PersistentGuards(path, random.Random(1), wall=lambda: clock[0])
    chosen = first.plan(RELAYS, PathRequest())[0].relay_id
    first.succeeded(chosen)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["guards"]  # no temporary file left
    for seed in range(2, 12):  # whatever the new run's randomness
        clock[0] += 3600
        again = PersistentGuards(path, random.Random(seed), wall=lambda: clock[0])
        assert again.plan(RELAYS, PathRequest())[0].relay_id == chosen
    assert GuardSet.from_json(json.loads(path.read_text()), random.Random(0)).to_json() == again.set.to_json()


def test_a_corrupt_state_file_is_set_aside_with_a_warning_and_a_fresh_sample_starts(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "guards"
    for junk in (b"{not json", b'{"version": 1, "guards": [{"id": "zz"}]}', b"\xff\xfe", b'{"version": 99}',
                 b"[]", b'{"version": 1, "guards": [{"id": "' + b"00" * 32 + b'", "nickname": 5}]}'):
        path.write_bytes(junk)
        with caplog.at_level(logging.WARNING):
            gs = load_guards(path, random.Random(1))
        assert gs.guards == [] and "unusable" in caplog.text
        assert path.with_name("guards.corrupt").read_bytes() == junk and not path.exists()
        caplog.clear()
    assert load_guards(tmp_path / "missing", random.Random(1)).guards == []


def test_a_state_that_cannot_be_saved_does_not_stop_the_circuits(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # the state directory cannot be made below a file, whoever we are
    with caplog.at_level(logging.WARNING):
        guards = PersistentGuards(blocker / "state" / "guards", random.Random(1), wall=lambda: NOW)
        assert len(guards.plan(RELAYS, PathRequest())) == 3
    assert "cannot save the entry guards" in caplog.text


def test_save_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "guards"
    gs = fresh()
    guard_of(gs)
    save_guards(path, gs)
    before = path.stat().st_ino
    save_guards(path, gs)
    assert path.stat().st_ino != before  # a new file renamed over the old one, never rewritten in place


# ---------------------------------------------------------------------------------------------- with the manager


def test_fifty_circuits_killed_by_a_middle_use_at_most_three_guards() -> None:
    """The review's H1 attack: a relay beyond the guard kills every circuit through it; the client
    rebuilds, and the old policy walked onto a new guard each time."""
    gs = fresh(7)
    clock = [NOW]

    class Policy:  # GuardSet with the test's wall clock, as PersistentGuards does it
        def plan(self, relays, request):  # type: ignore[no-untyped-def]
            return gs.plan(relays, request, clock[0])

        def succeeded(self, guard: bytes) -> None:
            gs.succeeded(guard, clock[0])

        def failed(self, guard: bytes, outcome: Outcome = Outcome.UNREACHABLE) -> None:
            gs.failed(guard, outcome, clock[0])

        def reset(self) -> None:
            gs.reset()

    d = Drive(guards=Policy())
    evil = RELAYS[5].relay_id
    actions, kills, guards_used, circuits = d.connect(), 0, set(), 0
    while kills < 50:
        build = d.one(m.Build, d.fetched(actions, RELAYS))
        guards_used.add(build.path[0].relay_id)
        circuit, _ = d.built([build])
        circuits += 1
        if build.path[1].relay_id == evil:  # the evil middle destroys it before it carries anything
            d.feed(m.CircuitLost(d.now, circuit, "a relay reported a protocol error", at_guard=False))
            kills += 1
        else:  # an honest circuit: it answers, then the user asks for a new one
            d.answer()
            d.feed(m.CircuitLost(d.now, circuit, "closed by the exit", at_guard=False))
        mark = len(d.actions)
        d.until(d.m.timer())
        clock[0] = NOW + d.now
        actions = d.actions[mark:]
    print(f"\n50 circuits killed by a middle (of {circuits} built): {len(guards_used)} distinct guard(s)")
    assert len(guards_used) <= 3
    assert len(guards_used) == 1  # with entry guards it is, in fact, always the first primary


def _watched(d: Drive) -> object:
    circuit = d.connected()
    d.answer()
    return circuit


def test_traffic_without_answers_makes_the_circuit_suspect_within_silence_s() -> None:
    d = Drive()
    circuit = _watched(d)
    t0 = d.now
    d.feed(m.Activity(t0, circuit, 5, 3, t0))  # a normal exchange
    d.feed(m.Activity(t0 + 0.25, circuit, 9, 3, t0))  # sent, nothing back ...
    assert not any(isinstance(a, m.ProbeGuard) for a in d.actions)
    d.feed(m.Activity(t0 + 0.25 + m.SILENCE_S - 0.01, circuit, 12, 3, t0))
    assert not any(isinstance(a, m.ProbeGuard) for a in d.actions)
    probe = d.feed(m.Activity(t0 + 0.25 + m.SILENCE_S, circuit, 14, 3, t0))
    assert d.one(m.ProbeGuard, probe).circuit == circuit
    d.now = t0 + 0.25 + m.SILENCE_S
    d.until(d.now + m.PROBE_WINDOW_S)
    assert d.m.circuit is None and "and so did the guard" in d.m.error  # the guard never answered its probe


def test_an_answer_in_the_traffic_clears_the_suspicion() -> None:
    d = Drive()
    circuit = _watched(d)
    t0 = d.now
    d.feed(m.Activity(t0, circuit, 4, 0, t0))
    d.feed(m.Activity(t0 + m.SILENCE_S, circuit, 6, 0, t0))
    assert any(isinstance(a, m.ProbeGuard) for a in d.actions)
    d.feed(m.Activity(t0 + m.SILENCE_S + 0.2, circuit, 6, 1, t0))  # the answer came after all
    d.now = t0 + m.SILENCE_S + 0.2
    d.until(d.now + 3 * m.PROBE_WINDOW_S)
    assert d.m.circuit == circuit and d.m.state is m.EngineState.CONNECTED


@pytest.mark.parametrize(("guard_answers", "answered_before", "outcome"), [
    (False, True, Outcome.UNREACHABLE), (True, True, Outcome.CLOSED), (True, False, Outcome.USE_FAILED)])
def test_whether_the_guard_answered_its_probe_decides_whose_failure_it_is(
        guard_answers: bool, answered_before: bool, outcome: Outcome) -> None:
    from tests.unit.test_circuit_manager import RecordingGuards
    guards = RecordingGuards()
    d = Drive(guards=guards)
    circuit = d.connected()
    if answered_before:
        d.answer()
    t0 = d.now
    d.feed(m.Activity(t0, circuit, 3, 0, t0))
    d.feed(m.Activity(t0 + m.SILENCE_S, circuit, 5, 0, t0))
    heard = t0 + m.SILENCE_S + 0.05 if guard_answers else t0
    d.feed(m.Activity(t0 + m.SILENCE_S + 0.25, circuit, 5, 0, heard))
    d.now = t0 + m.SILENCE_S + 0.25
    d.until(t0 + m.SILENCE_S + m.PROBE_WINDOW_S)
    assert d.m.circuit is None and guards.outcomes == [outcome]


def test_a_failed_build_counts_as_the_guards_only_when_it_did_not_answer() -> None:
    from tests.unit.test_circuit_manager import RecordingGuards
    guards = RecordingGuards()
    d = Drive(guards=guards)
    build = d.one(m.Build, d.fetched(d.connect()))
    d.feed(m.Failed(d.now, build.token, "circuit build timed out", at_guard=False))
    d.until(d.m.timer())
    build = d.one(m.Build, d.fetched(d.actions[-2:]))
    d.feed(m.Failed(d.now, build.token, "could not reach the guard"))
    assert guards.outcomes == [Outcome.BUILD_FAILED, Outcome.UNREACHABLE]


def test_guards_of_another_network_do_not_use_up_the_sample() -> None:
    gs = fresh()
    other = tuple(_relay(100 + i) for i in range(40))
    for i in range(0, 40, 3):  # a client moved between networks (directory files) many times
        guard_of(gs, NOW + i, (*other[i:i + 3], *RELAYS[8:]))
    assert guard_of(gs, NOW + 50) in BY_ID  # this network still gets its guards
    assert len(gs.guards) <= gm.MAX_ENTRIES


def test_a_guard_that_did_not_answer_is_no_middle_or_exit_either() -> None:
    gs = fresh()
    first = guard_of(gs)
    gs.failed(first, Outcome.UNREACHABLE, NOW)
    for _ in range(50):  # the dead first primary is in the directory still: never the middle of the rebuild
        path = gs.plan(RELAYS, PathRequest(), NOW + 1)
        assert first not in {d.relay_id for d in path}


def test_the_rebuild_after_a_loss_leaves_out_the_lost_circuits_middle_and_exit() -> None:
    gs = fresh()
    lost = gs.plan(RELAYS, PathRequest(), NOW)
    for _ in range(50):
        path = gs.plan(RELAYS, PathRequest(recently_failed=frozenset(d.relay_id for d in lost[1:])), NOW)
        assert path[0] == lost[0] and not {d.relay_id for d in path[1:]} & {d.relay_id for d in lost[1:]}
    only = (*[r for r in RELAYS if not r.is_exit], RELAYS[8])  # one exit: it stays, a path beats none
    lost = gs.plan(only, PathRequest(), NOW)
    assert gs.plan(only, PathRequest(recently_failed=frozenset({lost[-1].relay_id})), NOW)[-1] == lost[-1]


def test_the_manager_asks_to_leave_out_the_lost_circuits_relays_until_a_circuit_is_built() -> None:
    from tests.unit.test_circuit_manager import RecordingGuards
    guards = RecordingGuards()
    d = Drive(guards=guards)
    circuit = d.connected()
    lost = d.m.path
    d.feed(m.CircuitLost(d.now, circuit, "a relay could not reach the next hop", at_guard=False))
    d.until(d.m.timer())
    build = d.one(m.Build, d.fetched(d.actions[-2:]))
    assert guards.requests[-1].recently_failed == frozenset(r.relay_id for r in lost[1:])
    d.built([build])
    d.feed(m.Failed(d.now, 99, "stale"))  # nothing
    d.said(d.m.disconnect(d.now))
    d.fetched(d.connect())
    assert guards.requests[-1].recently_failed == frozenset()


def test_an_exit_that_no_sampled_guard_fits_samples_one_more_that_fits_and_none_is_an_error() -> None:
    gs = fresh()
    guard_of(gs)
    sampled = [BY_ID[g.relay_id] for g in gs.guards]
    twins = [Descriptor.create(RelayKeys.generate(det_rng(9300 + i), WALL0), nickname=f"twin{i}",
                               addresses=((d.address[0].replace(".0.1", ".0.2"), 9600),), exit_node=True,
                               published=int(WALL0), lifetime_s=86400) for i, d in enumerate(sampled)]
    # one exit that shares a /16 with every sampled guard is impossible; instead: only these exits exist
    relays = (*[r for r in RELAYS if not r.is_exit], twins[0])
    before = len(gs.guards)
    path = gs.plan(relays, PathRequest(exit_spec="twin0"), NOW)
    assert path[-1] == twins[0] and path[0].relay_id != sampled[0].relay_id
    assert len(gs.guards) == before or path[0].relay_id in {g.relay_id for g in gs.guards}
    lonely = (RELAYS[0], RELAYS[1], RELAYS[8])  # three relays: only RELAYS[0] or [1] can be the guard
    tiny = fresh()
    tiny.plan(lonely, PathRequest(), NOW)
    with pytest.raises(ShallotError, match="no entry guard fits"):
        tiny.plan((RELAYS[0], RELAYS[8]), PathRequest(), NOW)  # two relays: no three-hop path at all


def test_the_sample_never_holds_more_than_sample_max_guards_in_the_view() -> None:
    many = tuple(_relay(200 + i) for i in range(40)) + RELAYS[8:]
    gs = fresh()
    for i in range(100):  # a fresh client (no guard ever worked) whose every guard fails: the sample grows ...
        gs.failed(guard_of(gs, NOW + i, many), Outcome.UNREACHABLE, NOW + i)
    assert len(gs.guards) == gm.SAMPLE_MAX  # ... and stops at SAMPLE_MAX


def test_reports_about_a_relay_outside_the_sample_change_nothing() -> None:
    gs = fresh()
    guard_of(gs)
    before = json.dumps(gs.to_json()["guards"])
    gs.succeeded(RELAYS[10].relay_id, NOW)  # e.g. the guard of a --path circuit
    gs.failed(RELAYS[10].relay_id, Outcome.UNREACHABLE, NOW)
    gs.failed(RELAYS[10].relay_id, Outcome.USE_FAILED, NOW)
    assert json.dumps(gs.to_json()["guards"]) == before


def test_a_dropped_guard_is_never_used_and_forgotten_after_dropped_keep_s() -> None:
    gs = fresh()
    first = guard_of(gs)
    for i in range(gm.PB_MIN_CIRCUITS):
        gs.failed(first, Outcome.BUILD_FAILED, NOW + i)
    for _ in range(20):
        assert guard_of(gs, NOW + 100) != first
    assert first in {g.relay_id for g in gs.guards}  # remembered: never sampled again meanwhile
    guard_of(gs, NOW + 100 + gm.DROPPED_KEEP_S)
    assert first not in {g.relay_id for g in gs.guards[:1]} and not any(g.dropped for g in gs.guards)


@pytest.mark.parametrize("bad", [
    {"version": 2, "guards": []}, {"guards": []}, {"version": True, "guards": []},
    {"version": 1, "guards": [{"id": "00" * 32, "nickname": "x", "added": 1, "expires": 2}]},  # wrong id length
    {"version": 1, "guards": [{"id": "00" * 20, "nickname": 7, "added": 1, "expires": 2}]},
    {"version": 1, "guards": [{"id": "00" * 20, "nickname": "x", "added": True, "expires": 2}]},
    {"version": 1, "guards": [{"id": "00" * 20, "nickname": "x", "added": "1", "expires": 2}]},
    {"version": 1, "guards": [{"id": "00" * 20, "nickname": "x", "added": -1, "expires": 2}]},
    {"version": 1, "guards": [{"id": "00" * 20, "nickname": "x", "added": 1e13, "expires": 2}]},
    {"version": 1, "guards": [{"id": "00" * 20, "nickname": "x", "added": 1, "expires": 2, "failures": 1.5}]},
    {"version": 1, "guards": [{"id": "00" * 20, "nickname": "x", "added": 1, "expires": 2, "failures": True}]},
    {"version": 1, "guards": "none"},
])
def test_the_state_parser_refuses_what_is_not_a_guard_state(bad: dict) -> None:
    with pytest.raises(ValueError):
        GuardSet.from_json(bad, random.Random(0))


def test_the_state_parser_accepts_a_minimal_entry() -> None:
    gs = GuardSet.from_json({"version": 1, "guards": [{"id": "00" * 20, "nickname": "x", "added": 1, "expires": 2}]},
                            random.Random(0))
    assert gs.guards[0].relay_id == bytes(20) and gs.guards[0].failures == 0


def test_activity_of_another_circuit_or_outside_a_connection_is_ignored() -> None:
    d = Drive()
    circuit = d.connected()
    d.answer()
    t0 = d.now
    assert d.feed(m.Activity(t0, "another circuit", 5, 0, t0)) == []
    assert d.feed(m.Activity(t0 + 5 * m.SILENCE_S, "another circuit", 50, 0, t0)) == []
    d.said(d.m.disconnect(d.now))
    assert d.feed(m.Activity(t0 + 10, circuit, 5, 0, t0)) == []
    assert d.feed(m.Activity(t0 + 20, circuit, 50, 0, t0)) == []
    assert not any(isinstance(a, m.ProbeGuard) for a in d.actions)


def test_the_old_policy_raises_when_no_path_exists_even_with_nothing_avoided() -> None:
    with pytest.raises(ShallotError):
        gm.AvoidFailedGuards(random.Random(0)).plan((RELAYS[0], RELAYS[8]), PathRequest())


def test_the_traffic_watch_pauses_while_a_new_circuit_is_built() -> None:
    d = Drive()
    circuit = d.connected()
    d.answer()
    d.said(d.m.new_circuit(d.now))  # a switch: relays are fetched for the new circuit, the old one carries on
    assert d.m.phase is m.Phase.RELAYS
    t0 = d.now
    d.feed(m.Activity(t0, circuit, 5, 0, t0))
    d.feed(m.Activity(t0 + 2 * m.SILENCE_S, circuit, 9, 0, t0))
    assert not any(isinstance(a, m.ProbeGuard) for a in d.actions)


def test_where_the_guard_state_lives(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from shallot.core.engine import guards as eg
    monkeypatch.setenv("SHALLOT_STATE_DIR", str(tmp_path / "override"))
    assert eg.default_state_dir() == tmp_path / "override"
    monkeypatch.delenv("SHALLOT_STATE_DIR")
    monkeypatch.setattr(eg.os, "geteuid", lambda: 0)
    assert eg.default_state_dir() == Path("/var/lib/shallot")  # an engine run as a system service
    monkeypatch.setattr(eg.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert eg.default_state_dir() == tmp_path / "xdg" / "shallot"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert eg.default_state_dir() == tmp_path / "home" / ".local" / "state" / "shallot"


def test_guards_are_sampled_by_path_weights_so_a_burst_of_new_identities_does_not_fill_the_sample() -> None:
    """The sample is drawn with path.py's age weights and caps (PROTOCOL §5.1): 10 relays known for 30 days
    beside 40 just met, each in its own /16; uniform sampling would give the new ones 80 % of first primaries."""
    old = [_relay(200 + i) for i in range(10)]
    new = [_relay(260 + i) for i in range(40)]
    relays = tuple(old + new) + RELAYS[8:]  # and four exits
    known = {d.relay_id: 30 * 86400.0 for d in old}
    old_ids = {d.relay_id for d in old}
    firsts = []
    for seed in range(300):
        gs = fresh(seed)
        gs.known = lambda: known
        firsts.append(guard_of(gs, relays=relays))
    share_new = sum(g not in old_ids for g in firsts) / len(firsts)
    print(f"\nfirst primary among 40 new relays beside 10 known for 30 days: {share_new:.1%} (uniform: 80 %)")
    assert share_new < 0.35  # by weight: 40 / 16 = 2.5 against 10, i.e. 20 %
