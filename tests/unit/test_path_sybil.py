"""The review's Sybil and exclusion attacks (PROTOCOL-REVIEW.md A.3, C1 and H2) replayed against path selection:
pure and seeded, through the client's NetworkView as in the proof of concept, 10 000 paths each.

Fair share.  The attacker runs 3 operators (3 IP addresses in 3 /16s) beside 30 honest ones: 33 operators.  If
each operator held 1/33 of every position, the attacker would hold guard *and* exit in (3/33)^2 = 1/121 =
0.826 % of paths (FAIR below); the target is at most twice that, 2/121 = 1.653 %.  Before the caps the
attacker held 77.4 % (review A.3a).
"""

from __future__ import annotations

import random
from fractions import Fraction

from shallot.commands.paths import tally
from shallot.core.circuit.path import Candidates, draw_path, select_path
from shallot.core.discovery.view import NetworkView
from shallot.crypto.descriptor import Descriptor
from shallot.crypto.keys import RelayKeys
from tests.simnet import WALL0, det_rng

FAIR = Fraction(3, 33) ** 2  # 1/121: 3 of 33 equal operators, in guard and in exit
TARGET = 2 * FAIR
PATHS = 10_000
DAY = 86400.0


def _relay(i: int, host: str, port: int, *, exit_node: bool, family: tuple[bytes, ...] = (),
           extra: tuple[tuple[str, int], ...] = ()) -> Descriptor:
    keys = RelayKeys.generate(det_rng(80000 + i), WALL0)
    return Descriptor.create(keys, nickname=f"r{i}", addresses=((host, port), *extra), exit_node=exit_node,
                             published=int(WALL0), lifetime_s=7 * 86400, family=family)


def _honest(n: int, exits: int) -> list[Descriptor]:
    return [_relay(i, f"{20 + i}.1.0.1", 9000, exit_node=i < exits) for i in range(n)]  # one /16 each


def _sybils(exit_on: object) -> list[Descriptor]:
    """300 identities on 3 IP addresses (3 /16s), 100 per address on ports 10000-10099, 100 of them exits;
    ``exit_on(j)`` says whether identity j (address j // 100) is an exit."""
    return [_relay(1000 + j, f"{200 + j // 100}.9.0.1", 10000 + j % 100, exit_node=exit_on(j))  # type: ignore[operator]
            for j in range(300)]


def _share(relays: list[Descriptor], attacker: set[bytes], seed: int, known: dict[bytes, float] | None = None) -> float:
    """Through the client's view, as in A.3: every record offered, then PATHS draws."""
    view = NetworkView(allow_loopback=False)
    for d in relays:
        view.offer(None, d.encode(), WALL0)
    assert len(view) == len(relays)  # the view itself still takes them all: the caps are in path selection
    cands = Candidates(view.relays(WALL0), known or {})
    rng = random.Random(seed)
    paths = [draw_path(cands, rng) for _ in range(PATHS)]
    return sum(p[0].relay_id in attacker and p[-1].relay_id in attacker for p in paths) / PATHS


def test_three_addresses_with_300_identities_stay_near_a_fair_share() -> None:
    honest = _honest(30, 5)
    layouts = {
        # the review's layout: every third identity an exit, spread over the three addresses
        "A.3a (exits spread)": lambda j: j % 3 == 0,
        # the attacker's best under the rules: all exits on one address, the other two full of non-exits
        "exits on one address": lambda j: j < 100,
    }
    for seed, (name, exit_on) in enumerate(layouts.items()):
        sybils = _sybils(exit_on)
        share = _share(honest + sybils, {d.relay_id for d in sybils}, seed)
        print(f"\n{name}: guard and exit both the attacker's in {share:.2%} of {PATHS} paths "
              f"(fair {float(FAIR):.3%}, target <= {float(TARGET):.3%}; 77.4% before)")
        assert share <= TARGET, (name, share)


def test_a_burst_of_new_identities_weighs_little_for_a_client_with_history() -> None:
    """The same attack on a client that has known the honest relays for 30 days: the 300 new identities start
    at AGE_FLOOR of an old relay's weight."""
    honest = _honest(30, 5)
    sybils = _sybils(lambda j: j < 100)
    known = {d.relay_id: 30 * DAY for d in honest}
    share = _share(honest + sybils, {d.relay_id for d in sybils}, 7, known)
    print(f"\nwith 30 days of history: attacker guard and exit in {share:.3%} of paths")
    assert share <= FAIR / 4, share  # without age weights it is the 1.2 % of the test above


def test_many_new_relays_in_many_networks_do_not_dominate_old_ones() -> None:
    """A costlier Sybil: 120 new relays in 120 /16s beside 30 honest relays known for 30 days.  Uniform
    selection would give the newcomers 80 % of the guards; with age weights they get 120/16 / (30 + 120/16)."""
    honest = _honest(30, 5)
    fresh = [_relay(3000 + k, f"{100 + k % 100}.{50 + k // 100}.0.1", 9000, exit_node=False) for k in range(120)]
    known = {d.relay_id: 30 * DAY for d in honest}
    cands = Candidates(honest + fresh, known)
    rng = random.Random(3)
    new = {d.relay_id for d in fresh}
    share = sum(draw_path(cands, rng)[0].relay_id in new for _ in range(4000)) / 4000
    print(f"\n120 new relays in 120 /16s: {share:.1%} of guards (uniform: 80%)")
    assert share < 0.25, share


def test_one_sided_family_and_unverified_addresses_exclude_nobody() -> None:
    """Review A.3b (H2): 20 honest relays (3 exits); the attacker's exit lists 16 honest relays as family and
    3 extra addresses in honest /16s, beside 2 attacker non-exits.  Before: 100 % of circuits through the
    attacker's exit had the attacker's guard and middle.  Now its claims change nothing: the share is what 2
    attacker non-exits among 19 get anyway, 2/19 * 1/18 = 0.58 %."""
    honest = _honest(20, 3)
    evil_exit = _relay(500, "203.0.1.1", 9000, exit_node=True, family=tuple(d.relay_id for d in honest[3:19]),
                       extra=(("23.1.0.9", 9000), ("24.1.0.9", 9000), ("25.1.0.9", 9000)))
    evil = [evil_exit, _relay(501, "203.1.1.1", 9000, exit_node=False), _relay(502, "203.2.1.1", 9000, exit_node=False)]
    attacker = {d.relay_id for d in evil}
    rng = random.Random(11)
    relays = honest + evil
    through, owned = 0, 0
    for _ in range(PATHS):
        path = select_path(relays, rng)
        if path[-1].relay_id == evil_exit.relay_id:
            through += 1
            owned += path[0].relay_id in attacker and path[1].relay_id in attacker
    expected = Fraction(2, 19) * Fraction(1, 18)
    print(f"\nH2: {through} circuits through the attacker's exit; attacker guard and middle in {owned / through:.2%} "
          f"(without the claims {float(expected):.2%}; 100% before)")
    assert through > PATHS // 5  # its exit is used as any other (1 of 4 exits)
    assert owned / through <= 2 * expected


def test_the_audit_sees_the_attack() -> None:
    """``shallot paths``'s tally over the attack: the attacker's three addresses are each at most a few
    per cent of guards, and guard and exit never share a /16."""
    relays = _honest(30, 5) + _sybils(lambda j: j % 3 == 0)
    rng = random.Random(5)
    cands = Candidates(relays)
    result = tally([draw_path(cands, rng) for _ in range(2000)], relays)
    guard_ips = result["positions"]["guard"]["ips"]
    for ip in ("200.9.0.1", "201.9.0.1", "202.9.0.1"):
        assert guard_ips.get(ip, 0) / 2000 < 0.08, (ip, guard_ips.get(ip))
    assert result["guard_exit_same_operator"]["slash16"] == 0.0
