"""What the user asks for by name (--path, --exit, relay ids and nicknames) and the small rules around a
drawn path: each refusal is worded for the user, and each rule turns a test red when it is removed
(scripts/mutation.py targets core/circuit/path.py)."""

from __future__ import annotations

import random

import pytest

from shallot.core.circuit.path import PathError, check_path, choose_path, related, resolve_relay, select_path
from shallot.core.errors import ShallotError
from shallot.crypto.descriptor import Descriptor
from shallot.crypto.keys import RelayKeys
from tests.simnet import WALL0, det_rng


def _relay(i: int, host: str, *, exit_node: bool = False, nickname: str | None = None,
           keys: RelayKeys | None = None) -> Descriptor:
    keys = keys or RelayKeys.generate(det_rng(7000 + i), WALL0)
    return Descriptor.create(keys, nickname=nickname or f"r{i}", addresses=((host, 9000 + i),), exit_node=exit_node,
                             published=int(WALL0), lifetime_s=86400)


@pytest.fixture(scope="module")
def relays() -> list[Descriptor]:
    return [_relay(0, "10.1.0.1", nickname="guard"), _relay(1, "10.2.0.1", nickname="middle"),
            _relay(2, "10.3.0.1", exit_node=True, nickname="exit"), _relay(3, "10.4.0.1", exit_node=True)]


def test_one_relay_under_two_addresses_is_still_one_relay() -> None:
    keys = RelayKeys.generate(det_rng(7100), WALL0)
    a, b = _relay(10, "10.10.0.1", keys=keys), _relay(11, "10.11.0.1", keys=keys)
    assert a.relay_id == b.relay_id
    assert related(a, b)  # different /16s, no family: only the identity tells
    with pytest.raises(PathError, match="may not share a circuit"):
        check_path([a, _relay(12, "10.12.0.1"), b])


def test_an_empty_path_is_refused() -> None:
    with pytest.raises(PathError, match="empty path"):
        check_path([])


def test_a_one_hop_selection_is_just_an_exit(relays: list[Descriptor]) -> None:
    for seed in range(20):
        (only,) = select_path(relays, random.Random(seed), hops=1)
        assert only.is_exit


def test_a_path_needs_exactly_three_names(relays: list[Descriptor]) -> None:
    with pytest.raises(ShallotError, match=r"exactly three relays .* got 2"):
        choose_path(relays, random.Random(1), path_spec="guard,exit", exit_spec=None)
    with pytest.raises(ShallotError, match="got 4"):
        choose_path(relays, random.Random(1), path_spec="guard,middle,exit,r3", exit_spec=None)
    path = choose_path(relays, random.Random(1), path_spec="guard,middle,exit", exit_spec=None)
    assert [d.nickname for d in path] == ["guard", "middle", "exit"]


def test_an_exit_that_disagrees_with_the_path_is_refused(relays: list[Descriptor]) -> None:
    with pytest.raises(ShallotError, match="--exit disagrees"):
        choose_path(relays, random.Random(1), path_spec="guard,middle,exit", exit_spec="r3")
    path = choose_path(relays, random.Random(1), path_spec="guard,middle,exit", exit_spec="exit")
    assert path[-1].nickname == "exit"


def test_relays_are_found_by_full_id_nickname_or_a_unique_prefix_of_four_digits(relays: list[Descriptor]) -> None:
    target = relays[1]
    assert resolve_relay(target.id_hex.upper(), relays) is target
    assert resolve_relay(" Middle ", relays) is target
    prefix = next(n for n in range(4, 40) if sum(d.id_hex.startswith(target.id_hex[:n]) for d in relays) == 1)
    assert resolve_relay(target.id_hex[:max(prefix, 4)], relays) is target
    with pytest.raises(ShallotError, match="empty relay id"):
        resolve_relay("  ", relays)
    with pytest.raises(ShallotError, match="unknown relay"):
        resolve_relay(target.id_hex[:3], relays)  # three digits are too few to name a relay, even if unique


def test_a_nickname_that_looks_like_another_relays_id_prefix_captures_nothing() -> None:
    real = _relay(20, "10.20.0.1")
    impostor = _relay(21, "10.21.0.1", nickname=real.id_hex[:8])  # what a user copies from `shallot status`
    with pytest.raises(ShallotError, match="ambiguous: it fits 2 relays"):
        resolve_relay(real.id_hex[:8], [impostor, real])
    assert resolve_relay(real.id_hex, [impostor, real]) is real  # a full id still names one relay
    assert resolve_relay(real.id_hex[:8], [impostor]) is impostor  # the nickname alone, with nobody to shadow


def test_an_ambiguous_prefix_is_refused_not_guessed() -> None:
    by_prefix: dict[str, RelayKeys] = {}
    for seed in range(8000, 12000):  # deterministic keys until two ids share four hex digits (birthday: ~300)
        keys = RelayKeys.generate(det_rng(seed), WALL0)
        other = by_prefix.setdefault(keys.relay_id.hex()[:4], keys)
        if other is not keys:
            break
    else:
        raise AssertionError("no two of 4000 ids share a 4-digit prefix")
    a, b = _relay(40, "10.40.0.1", keys=other), _relay(41, "10.41.0.1", keys=keys)
    prefix = a.id_hex[:4]
    with pytest.raises(ShallotError, match="ambiguous"):
        resolve_relay(prefix, [a, b])
    assert resolve_relay(prefix, [a]) is a
