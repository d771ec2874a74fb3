"""Introducers and anonymity (issue 11, review M4; docs/PROTOCOL.md §5.1, §13.5).

An introducer learns the client's address and its guard: it is in the entry position.  Path selection keeps
it off the middle and exit positions and out of their /16s and families (core/circuit/entry.py); the
introducer limits introductions per source and per registered relay, and nothing it keeps grows unbounded.
"""

from __future__ import annotations

import random

import pytest

from shallot.core.circuit.entry import introducers_fit
from shallot.core.circuit.path import PathError, check_path, select_path
from shallot.core.nat.dialer import RecentSet
from shallot.core.nat.limits import MAX_SESSIONS_PER_SOURCE, TARGET_INTRO_BURST
from shallot.core.wire import nat_frames as nm
from shallot.core.wire.addresses import source_key
from shallot.crypto.descriptor import Descriptor, Reachability
from shallot.crypto.keys import RelayKeys
from tests.simnet import det_rng
from tests.unit.test_nat_introducer import B_ID, Scene

WALL = 1_800_000_000


def _relay(i: int, host: str, *, exit_node: bool = False, reach: Reachability | None = None,
           family: tuple[bytes, ...] = ()) -> Descriptor:
    keys = RelayKeys.generate(det_rng(9000 + i), WALL)
    return Descriptor.create(keys, nickname=f"r{i}", addresses=((host, 9000),), exit_node=exit_node,
                             published=WALL, lifetime_s=86400, reachability=reach, family=family)


# ------------------------------------------------------------------------------------------ diversity


def test_an_introducer_is_never_the_middle_or_the_exit_nor_in_their_16() -> None:
    intro = _relay(1, "192.0.2.31")
    middle, exit_ = _relay(2, "198.18.0.33"), _relay(3, "198.51.100.32", exit_node=True)
    guard = _relay(4, "203.0.113.40", reach=Reachability(1, 1, ((intro.relay_id, intro.address),)))
    known = {d.relay_id: d for d in (intro, middle, exit_, guard)}
    assert introducers_fit(guard, [middle, exit_], known)
    assert not introducers_fit(guard, [intro, exit_], known)  # the introducer as the middle
    near = _relay(5, "192.0.9.9")  # the introducer's /16
    assert not introducers_fit(guard, [middle, near], known)
    assert not introducers_fit(guard, [middle, exit_], known, client_host="192.0.77.1")  # the client's /16
    assert introducers_fit(_relay(6, "203.0.113.41"), [intro, exit_], known)  # a public guard has none
    with pytest.raises(PathError, match="introducer"):
        check_path([guard, intro, exit_])
    check_path([guard, middle, exit_])


def test_family_of_an_introducer_counts_when_mutual() -> None:
    m_keys = RelayKeys.generate(det_rng(9002), WALL)
    intro_keys = RelayKeys.generate(det_rng(9001), WALL)
    intro = Descriptor.create(intro_keys, nickname="i", addresses=(("192.0.2.31", 9000),), exit_node=False,
                              published=WALL, lifetime_s=86400, family=(m_keys.relay_id,))
    middle = Descriptor.create(m_keys, nickname="m", addresses=(("198.18.0.33", 9000),), exit_node=False,
                               published=WALL, lifetime_s=86400, family=(intro.relay_id,))
    one_sided = Descriptor.create(m_keys, nickname="m", addresses=(("198.18.0.33", 9000),), exit_node=False,
                                  published=WALL, lifetime_s=86400)
    exit_ = _relay(3, "198.51.100.32", exit_node=True)
    guard = _relay(4, "203.0.113.40", reach=Reachability(1, 1, ((intro.relay_id, intro.address),)))
    known = {intro.relay_id: intro}
    assert not introducers_fit(guard, [middle, exit_], known)
    assert introducers_fit(guard, [one_sided, exit_], known)
    assert introducers_fit(guard, [middle, exit_], {})  # an introducer we know nothing about: id and /16 only


def test_select_path_never_puts_an_introducer_after_its_guard() -> None:
    """Seeded simulation: 2 public relays that introduce for 6 NATed guards, among 8 other public relays
    and 3 exits; over 1000 paths no NATed guard shares a path with (or a /16 with) one of its introducers."""
    intros = [_relay(i, f"192.{i}.0.1") for i in range(2)]
    reach = Reachability(1, 1, tuple((d.relay_id, d.address) for d in intros))
    nated = [_relay(10 + i, f"203.{i}.113.5", reach=reach) for i in range(6)]
    public = [_relay(20 + i, f"10{i}.1.0.1") for i in range(8)]
    exits = [_relay(30 + i, f"198.{50 + i}.100.1", exit_node=True) for i in range(3)]
    relays = [*intros, *nated, *public, *exits]
    rng = random.Random(11)
    intro_ids = {d.relay_id for d in intros}
    nated_guards = 0
    for _ in range(1000):
        guard, middle, exit_ = select_path(relays, rng)
        if guard.reachability is not None:
            nated_guards += 1
            assert middle.relay_id not in intro_ids and exit_.relay_id not in intro_ids
    print(f"\n{nated_guards}/1000 paths had a guard behind a NAT; none had its introducer as middle or exit")
    assert nated_guards > 100  # the rule excludes combinations, not NATed guards


# ------------------------------------------------------------------------------------------ limits


def test_one_source_holds_a_bounded_number_of_relay_sessions_least_recent_evicted() -> None:
    s = Scene()
    s.intro.on_register(s.relay_link())
    for port in range(MAX_SESSIONS_PER_SOURCE + 3):
        s.request(("198.51.100.30", 50000 + port), request_id=port.to_bytes(8, "big"), now=port * 1.0)
    assert len(s.intro.sessions) == MAX_SESSIONS_PER_SOURCE
    assert s.counters["nat_intro_source_evicted"] == 3
    assert {rs.a[1] for rs in s.intro.sessions.values()} == {50000 + p for p in range(3, MAX_SESSIONS_PER_SOURCE + 3)}
    # another source is not affected
    s.request(("198.51.100.31", 1), now=20.0)
    assert len(s.intro.sessions) == MAX_SESSIONS_PER_SOURCE + 1
    s.intro.expire(10_000.0)
    assert not s.intro.sessions and not s.intro._by_source


def test_an_ipv6_attacker_rotating_inside_its_64_is_one_source() -> None:
    s = Scene()
    s.intro.on_register(s.relay_link())
    for i in range(MAX_SESSIONS_PER_SOURCE + 5):
        s.request((f"2001:db8:1:2::{i + 1:x}", 4000), request_id=i.to_bytes(8, "big"), now=i * 1.0)
    assert len(s.intro.sessions) == MAX_SESSIONS_PER_SOURCE
    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_key("::ffff:192.0.2.1") == source_key("192.0.2.1") == "192.0.2.1"


def test_introductions_to_one_relay_are_rate_limited_whatever_the_source() -> None:
    """Spoofed INTRO_REQUESTs from many addresses must not flush the registered relay's table of pending
    introductions (MAX_INTRODUCED within a punch timeout): a bucket per target relay."""
    s = Scene()
    s.intro.on_register(s.relay_link())
    n = int(TARGET_INTRO_BURST) + 4
    for i in range(n):
        s.request((f"198.51.{i // 200}.{i % 200 + 1}", 1), request_id=i.to_bytes(8, "big"), now=0.0)
    answers = s.answers()
    assert sum(a.status == nm.STATUS_OK for a, _ in answers) == int(TARGET_INTRO_BURST)
    assert s.counters["nat_drop_intro_target_rate"] == 4
    assert all(a.status == nm.STATUS_BUSY for a, _ in answers[int(TARGET_INTRO_BURST):])
    assert B_ID in s.intro.registrations


def test_recent_set_forgets_the_least_recent() -> None:
    rs = RecentSet(3)
    for i in range(5):
        rs.add(("192.0.2.1", i))
    assert len(rs) == 3 and ("192.0.2.1", 0) not in rs and ("192.0.2.1", 4) in rs
    rs.add(("192.0.2.1", 2))  # touched: now the most recent
    rs.add(("192.0.2.1", 5))
    assert ("192.0.2.1", 2) in rs and ("192.0.2.1", 3) not in rs


def test_the_guard_set_keeps_guards_whose_introducer_is_in_the_clients_16_out_once_it_knows_its_address() -> None:
    """The entry guards (core/circuit/guards.py) ask the engine for the client's public address (its NAT
    probe): a guard behind a NAT introduced from the client's own /16 is neither sampled nor used."""
    from shallot.core.circuit.guards import GuardSet, PathRequest

    intro = _relay(11, "192.0.2.31")
    natted = _relay(12, "203.0.113.40", reach=Reachability(1, 1, ((intro.relay_id, intro.address),)))
    others = [_relay(13 + i, f"198.{18 + i}.0.1") for i in range(6)]
    exits = [_relay(30 + i, f"100.{70 + i}.0.1", exit_node=True) for i in range(2)]
    relays = (intro, natted, *others, *exits)

    def guards_used(client_host: str | None, seeds: range) -> set[bytes]:
        used = set()
        for seed in seeds:
            gs = GuardSet(random.Random(seed))
            gs.client_host = lambda: client_host
            for _ in range(3):
                used.add(gs.plan(relays, PathRequest(), WALL + 1000.0)[0].relay_id)
            used |= {g.relay_id for g in gs.guards}
        return used

    assert natted.relay_id in guards_used(None, range(60))  # the control: without the address it is a guard
    assert natted.relay_id not in guards_used("192.0.77.5", range(60))  # the client shares the introducer's /16
    # sampled before the address was known, it is passed over once it is
    for seed in range(200):
        gs = GuardSet(random.Random(seed))
        gs.plan(relays, PathRequest(), WALL + 1000.0)
        if gs.primaries()[0].relay_id == natted.relay_id:
            break
    else:
        pytest.fail("the NATed relay never became the first primary in 200 seeds")
    gs.client_host = lambda: "192.0.77.5"
    assert gs.plan(relays, PathRequest(), WALL + 1000.0)[0].relay_id != natted.relay_id
