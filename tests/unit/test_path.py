"""Path selection: every drawn path obeys the rules (distinct relays, different /16s, no family, exit last
and allowing the port), over many seeded draws from a synthetic directory."""

from __future__ import annotations

import random

import pytest

from shallot.core.circuit.path import (
    AGE_FLOOR,
    AGE_RAMP_S,
    PathError,
    age_weight,
    cap_per_address,
    check_path,
    related,
    sample_guards,
    select_path,
    weights,
)
from shallot.core.wire.addresses import subnet_key
from shallot.crypto.descriptor import Descriptor, ExitPolicySummary, Reachability
from shallot.crypto.keys import RelayKeys
from tests.simnet import WALL0, det_rng


def _relay(i: int, host: str, *, exit_node: bool = False, family: tuple[bytes, ...] = (),
           policy: ExitPolicySummary | None = None) -> Descriptor:
    keys = RelayKeys.generate(det_rng(5000 + i), WALL0)
    return Descriptor.create(keys, nickname=f"n{i}", addresses=((host, 9000 + i),), exit_node=exit_node,
                             published=int(WALL0), lifetime_s=86400, family=family, exit_policy=policy)


def _directory() -> list[Descriptor]:
    relays = [_relay(i, f"10.{i % 6}.{i}.1") for i in range(12)]  # six /16s, two relays in each
    relays += [_relay(20, "10.20.0.1", exit_node=True),
               _relay(21, "10.21.0.1", exit_node=True, policy=ExitPolicySummary(False, ((80, 80), (443, 443)))),
               _relay(22, "10.20.9.1", exit_node=True)]  # same /16 as exit 20
    # relays 0 and 1 declare each other family (both sides, as operators do)
    a, b = relays[0], relays[1]
    keys_a, keys_b = RelayKeys.generate(det_rng(5000), WALL0), RelayKeys.generate(det_rng(5001), WALL0)
    relays[0] = Descriptor.create(keys_a, nickname="n0", addresses=a.addresses, exit_node=False,
                                  published=int(WALL0), lifetime_s=86400, family=(b.relay_id,))
    relays[1] = Descriptor.create(keys_b, nickname="n1", addresses=b.addresses, exit_node=False,
                                  published=int(WALL0), lifetime_s=86400, family=(a.relay_id,))
    return relays


def test_thousand_paths_obey_every_rule() -> None:
    relays = _directory()
    rng = random.Random(7)
    exits_seen, guards_seen = set(), set()
    for _ in range(1000):
        port = rng.choice([None, 22, 80, 443])
        path = select_path(relays, rng, port=port)
        assert len(path) == 3 and len({d.relay_id for d in path}) == 3
        nets = [subnet_key(*d.address) for d in path]
        assert len(set(nets)) == 3, nets
        for i, x in enumerate(path):
            for y in path[i + 1:]:
                assert x.relay_id not in y.family and y.relay_id not in x.family
        assert path[-1].is_exit
        if port is not None:
            assert path[-1].exit_policy.allows_port(port)
        assert not path[0].is_exit and not path[1].is_exit  # enough non-exits: exits stay exits
        check_path(path, port=port)
        exits_seen.add(path[-1].nickname)
        guards_seen.add(path[0].nickname)
    assert exits_seen == {"n20", "n21", "n22"}  # every exit gets used
    assert len(guards_seen) >= 10  # and the choice is spread, not stuck


def test_port_rules_choose_the_exit() -> None:
    relays = _directory()
    rng = random.Random(1)
    for _ in range(50):
        assert select_path(relays, rng, port=22)[-1].nickname in {"n20", "n22"}  # n21 only allows 80, 443


def test_no_exit_allows_port_25_by_default() -> None:
    relays = _directory()
    with pytest.raises(PathError, match="no exit"):
        select_path(relays, random.Random(1), port=25)


def test_chosen_exit_and_exclusions() -> None:
    relays = _directory()
    target = next(d for d in relays if d.nickname == "n21")
    rng = random.Random(3)
    for _ in range(20):
        assert select_path(relays, rng, exit_id=target.relay_id)[-1] is target
    banned = frozenset(d.relay_id for d in relays[:10])
    for _ in range(50):
        assert not {d.relay_id for d in select_path(relays, rng, exclude=banned)} & banned
    with pytest.raises(PathError, match="chosen exit"):
        select_path(relays, rng, exit_id=target.relay_id, port=22)


def test_impossible_paths_are_refused_with_a_reason() -> None:
    same_net = [_relay(i, f"10.9.0.{i + 1}", exit_node=i == 0) for i in range(5)]
    with pytest.raises(PathError, match="unrelated relays"):
        select_path(same_net, random.Random(1))
    with pytest.raises(PathError, match="no exit"):
        select_path([_relay(i, f"10.{i}.0.1") for i in range(4)], random.Random(1))


def test_check_path_rejects_what_select_never_builds() -> None:
    relays = _directory()
    by = {d.nickname: d for d in relays}
    with pytest.raises(PathError, match="share a circuit"):
        check_path([by["n0"], by["n1"], by["n20"]])  # family
    with pytest.raises(PathError, match="share a circuit"):
        check_path([by["n2"], by["n8"], by["n20"]])  # 10.2/16 twice
    with pytest.raises(PathError, match="share a circuit"):
        check_path([by["n2"], by["n2"], by["n20"]])  # same relay
    with pytest.raises(PathError, match="not an exit"):
        check_path([by["n2"], by["n3"], by["n4"]])
    with pytest.raises(PathError, match="does not allow port"):
        check_path([by["n2"], by["n3"], by["n21"]], port=22)
    check_path([by["n2"], by["n3"], by["n21"]], port=443)


def test_loopback_relays_count_as_separate_networks_but_nothing_else_is_relaxed() -> None:
    local = [_relay(i, "127.0.0.1", exit_node=i == 2) for i in range(3)]
    path = select_path(local, random.Random(1))
    assert {d.nickname for d in path} == {"n0", "n1", "n2"}
    assert subnet_key("127.0.0.1", 1) != subnet_key("127.0.0.1", 2)
    assert subnet_key("10.1.2.3", 1) == subnet_key("10.1.200.3", 2)


def _natted(i: int, host: str, *, exit_node: bool = False) -> Descriptor:
    """A relay behind a NAT: its descriptor names an introducer (PROTOCOL §3.4.1)."""
    keys = RelayKeys.generate(det_rng(6000 + i), WALL0)
    reach = Reachability(1, 3, ((bytes(20), ("10.0.0.1", 9000)),))
    return Descriptor.create(keys, nickname=f"nat{i}", addresses=((host, 9000),), exit_node=exit_node,
                             published=int(WALL0), lifetime_s=86400, reachability=reach)


def test_natted_relays_are_guards_never_middles_or_exits() -> None:
    natted = [_natted(i, f"10.{40 + i}.0.1") for i in range(6)] + [_natted(9, "10.49.0.1", exit_node=True)]
    relays = _directory() + natted
    nat_ids = {d.relay_id for d in natted}
    rng = random.Random(7)
    guards_natted = 0
    for _ in range(1000):
        path = select_path(relays, rng)
        assert not {d.relay_id for d in path[1:]} & nat_ids, [d.nickname for d in path]
        guards_natted += path[0].relay_id in nat_ids
    # the guard is drawn (before the middle) by weight among the non-exits: the 12 public ones share six /16s
    # (two in each, so half a relay's weight each: the /16 cap), the 6 NATed ones have a /16 each, so about
    # half the guards are NATed (neither avoided nor favoured because they fit nowhere else)
    assert 430 < guards_natted < 570, guards_natted
    # with only NATed relays besides the exit there is no middle: refused with a reason, not a bad path
    with pytest.raises(PathError, match="not enough"):
        select_path([relays[12], *natted[:3]], random.Random(1))
    # a NATed exit is never an exit
    with pytest.raises(PathError, match="behind a NAT"):
        select_path([natted[-1], *relays[:4]], random.Random(1), exit_id=None)


def test_check_path_refuses_a_natted_relay_after_the_guard() -> None:
    relays = _directory()
    nat = _natted(1, "10.41.0.1")
    check_path([nat, relays[2], relays[12]])  # as the guard it is fine
    for bad in ([relays[2], nat, relays[12]], [relays[2], relays[3], _natted(2, "10.42.0.1", exit_node=True)]):
        with pytest.raises(PathError, match="behind a NAT"):
            check_path(bad)


# ----------------------------------------------------------------------------------------- Sybil bounds (§5.1)


def _plain(i: int, host: str, port: int = 9000, *, exit_node: bool = False,
           family: tuple[bytes, ...] = (), extra: tuple[tuple[str, int], ...] = ()) -> Descriptor:
    keys = RelayKeys.generate(det_rng(7000 + i), WALL0)
    return Descriptor.create(keys, nickname=f"p{i}", addresses=((host, port), *extra), exit_node=exit_node,
                             published=int(WALL0), lifetime_s=86400, family=family)


def _base() -> list[Descriptor]:
    """Three exits and six non-exits, each in its own /16."""
    return [_plain(i, f"10.{100 + i}.0.1", exit_node=i < 3) for i in range(9)]


def _counts(relays: list[Descriptor], position: int, n: int = 3000, seed: int = 1, **kw: object) -> dict[str, int]:
    rng = random.Random(seed)
    out: dict[str, int] = {}
    for _ in range(n):
        nick = select_path(relays, rng, **kw)[position].nickname  # type: ignore[arg-type]
        out[nick] = out.get(nick, 0) + 1
    return out


def test_at_most_two_relays_per_address_and_the_longest_known_stay() -> None:
    crowd = [_plain(20 + k, "10.50.0.1", 9100 + k) for k in range(6)]  # six relays on one address
    relays = _base() + crowd
    seen = set()
    rng = random.Random(2)
    for _ in range(300):
        pool = cap_per_address(relays, rng)
        assert sum(d.address[0] == "10.50.0.1" for d in pool) == 2  # never more than two in one draw
        seen |= {d.nickname for d in pool if d.address[0] == "10.50.0.1"}
    assert len(seen) == 6  # ties are broken at random, so no relay id order can push a relay out for good
    known = {d.relay_id: float(k) for k, d in enumerate(crowd)}  # p25 and p24 are known the longest
    for _ in range(50):
        assert {d.nickname for d in cap_per_address(relays, rng, known) if d.address[0] == "10.50.0.1"} \
            == {"p24", "p25"}


def test_one_ipv6_slash64_is_one_address() -> None:
    v6 = [_plain(30 + k, f"2001:db8:0:1::{k + 1}") for k in range(4)] + [_plain(40, "2001:db9::1")]
    pool = cap_per_address(_base() + v6, random.Random(1))
    assert sum(d.address[0].startswith("2001:db8:0:1::") for d in pool) == 2
    assert any(d.address[0] == "2001:db9::1" for d in pool)


def test_loopback_counts_each_port_as_its_own_address() -> None:
    """A test network on one machine (shallot demo, the integration tests): many relays on 127.0.0.1, each port
    its own address and /16, so the caps leave them all (loopback is only accepted when every seed is)."""
    local = [_plain(50 + k, "127.0.0.1", 9300 + k, exit_node=k < 2) for k in range(8)]
    assert len(cap_per_address(local, random.Random(1))) == 8
    assert set(weights(local).values()) == {AGE_FLOOR}
    assert len(_counts(local, 0, n=500)) == 6  # every non-exit is a guard sometimes


def test_a_crowded_slash16_weighs_as_much_as_its_heaviest_relay() -> None:
    """Four relays on four addresses in 10.60/16 against six non-exits in six /16s: the /16 as a whole is drawn
    as often as one of them (1/7 of guards), not as four (4/10)."""
    crowd = [_plain(60 + k, f"10.60.{k}.1") for k in range(4)]
    counts = _counts(_base() + crowd, 0, n=7000)
    crowded = sum(v for k, v in counts.items() if k in {d.nickname for d in crowd})
    assert 800 < crowded < 1200, crowded  # 1000 expected; 2800 without the cap
    w = weights(crowd, {crowd[0].relay_id: AGE_RAMP_S})  # one old relay: the /16's total is its weight
    assert abs(sum(w.values()) - 1.0) < 1e-9 and w[crowd[0].relay_id] > 0.8


def test_relays_weigh_by_how_long_they_are_known() -> None:
    relays = _base()
    old = {d.relay_id: 30 * 86400.0 for d in relays[3:6]}  # three of the six non-exits known for 30 days
    counts = _counts(relays, 0, n=4000, known=old)
    new = sum(counts.get(d.nickname, 0) for d in relays[6:])
    # three at weight 1 and three at 1/16: the new ones are 1/17 of the guards (about 235 of 4000)
    assert 120 < new < 400, new
    assert age_weight(0) == AGE_FLOOR and age_weight(-5) == AGE_FLOOR
    assert age_weight(AGE_RAMP_S / 2) == pytest.approx((1 + AGE_FLOOR) / 2) and age_weight(10 * AGE_RAMP_S) == 1.0


def test_family_counts_only_when_mutual() -> None:
    a = _plain(70, "10.70.0.1")
    b = _plain(71, "10.71.0.1", family=(bytes(20),))  # b has a family, but a is not in it
    claims_b = _plain(70, "10.70.0.1", family=(b.relay_id,))  # a says b is family, b does not say so
    assert not related(claims_b, b) and not related(b, claims_b)
    b_back = _plain(71, "10.71.0.1", family=(a.relay_id,))
    assert related(claims_b, b_back) and related(b_back, claims_b)
    # the one-sided claim excludes nothing: b still serves in circuits through the claimant's exit
    claimant = _plain(72, "10.72.0.1", exit_node=True, family=(b.relay_id,))
    assert not related(claimant, b)
    relays = [claimant, b, _plain(73, "10.73.0.1")]
    assert {d.nickname for d in select_path(relays, random.Random(1))} == {"p72", "p71", "p73"}


def test_only_the_dialed_address_counts_for_the_slash16_rule() -> None:
    victim = _plain(80, "10.80.0.1")
    liar = _plain(81, "10.81.0.1", exit_node=True, extra=(("10.80.9.9", 9000),))  # claims an address in 10.80/16
    assert not related(liar, victim)
    assert related(_plain(82, "10.81.5.5"), liar)  # its dialed address does count
    path = select_path([liar, victim, _plain(83, "10.83.0.1")], random.Random(1))
    assert victim in path


def test_exit_first_then_guard_then_middle() -> None:
    """Exit E, public P1 and P2, NATed N (guard only).  Drawing the guard before the middle gives N a third
    of the guards (the guard's own weight); drawing the middle first would leave N the guard in half the
    paths (whenever one of P1/P2 was taken as middle, N and the other P remain)."""
    relays = [_plain(90, "10.90.0.1", exit_node=True), _plain(91, "10.91.0.1"), _plain(92, "10.92.0.1"),
              _natted(93, "10.93.0.1")]
    counts = _counts(relays, 0, n=3000)
    assert 850 < counts["nat93"] < 1150, counts


def test_never_the_excluded_own_relay() -> None:
    relays = _base()
    own = relays[4].relay_id
    for path in (select_path(relays, random.Random(s), exclude=frozenset({own})) for s in range(300)):
        assert own not in {d.relay_id for d in path}


def test_guard_manager_helpers_respect_the_rules() -> None:
    relays = _base() + [_plain(20 + k, "10.50.0.1", 9100 + k) for k in range(6)] + \
        [_plain(60 + k, f"10.60.{k}.1") for k in range(4)]
    rng = random.Random(4)
    for _ in range(100):
        sample = sample_guards(relays, rng, 5)
        assert len(sample) == 5
        assert len({subnet_key(*d.address) for d in sample}) == 5  # one operator, one guard
        assert not any(d.is_exit for d in sample)  # six /16s of non-exits: enough without exits
    kept = [relays[5]]
    assert relays[5] not in sample_guards(relays, rng, 3, keep=kept)
    # a fixed guard order: the first guard that fits the exit is the guard
    order = [relays[3].relay_id, relays[4].relay_id]
    for _ in range(50):
        assert select_path(relays, rng, guards=order)[0] is relays[3]
    with pytest.raises(PathError, match="guard set"):
        select_path(relays, rng, guards=[relays[0].relay_id], exit_id=relays[0].relay_id)
