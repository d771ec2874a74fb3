"""Path selection: every drawn path obeys the rules (distinct relays, different /16s, no family, exit last
and allowing the port), over many seeded draws from a synthetic directory."""

from __future__ import annotations

import random

import pytest

from shallot.core.circuit.path import PathError, check_path, select_path
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
