"""Path selection (pure): exit, then guard, then middle, from a verified set of descriptors (PROTOCOL §5.1).

Rules: three distinct relays; no two whose *dialed* addresses (``addresses[0]``, the one the link handshake
proves) are in the same IPv4 /16 (IPv6 /32), and no two in one *mutual* family (both list each other: a
one-sided claim could otherwise exclude honest relays); the last one is an exit whose policy allows the
requested port; a relay behind a NAT (its descriptor carries a reachability extension) only ever comes
first: the client reaches it through its introducers, but a relay extending a circuit has only the address
and keys (§13.7).

Sybil bounds, before and while drawing: at most MAX_PER_ADDRESS relays per IPv4 address or IPv6 /64 (the
longest-known kept), each relay weighted by how long this client has known it (a burst of new identities
starts at AGE_FLOOR of an old relay's weight), and the total weight of one /16 never above that of its
heaviest relay (an operator gains nothing from more relays in its network).  ``sample_guards`` draws with the
same caps and weights for a guard manager.  Randomness comes from a ``random.Random`` the caller passes
(SystemRandom in production, seeded in tests); "how long known" comes in as seconds per relay id.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from ipaddress import ip_address, ip_network
from typing import TYPE_CHECKING

from shallot.core.circuit.entry import introducers_fit
from shallot.core.errors import ShallotError
from shallot.core.wire.addresses import host_key, subnet_key
from shallot.crypto.descriptor import Descriptor

if TYPE_CHECKING:  # the caller passes its Random in; this module draws no randomness of its own
    import random

MAX_PER_ADDRESS = 2  # relays per IPv4 address / IPv6 /64 (Tor's consensus rule); loopback: per address and port
AGE_RAMP_S = 8 * 86400.0  # known this long: full weight (Tor's Guard flag asks for about 8 days)
AGE_FLOOR = 1 / 16  # the weight of a relay this client has just met, relative to one known for AGE_RAMP_S
NET_WEIGHT_CAP = 1.0  # a /16's total weight, in units of its heaviest relay's weight

Known = Mapping[bytes, float]  # seconds this client has known each relay (absent: just met)
NO_HISTORY: Known = {}


# parsing an address is the slow part of drawing a path: each address is judged once
_net = lru_cache(maxsize=1 << 16)(subnet_key)
_host = lru_cache(maxsize=1 << 16)(host_key)


class PathError(ValueError):
    """No path satisfies the constraints; the message says why in plain words."""


def mutual_family(a: Descriptor, b: Descriptor) -> bool:
    """Both relays list each other: only then is the family claim believed (either side alone can lie)."""
    return b.relay_id in a.family and a.relay_id in b.family


def related(a: Descriptor, b: Descriptor) -> bool:
    """True if a and b must not share a circuit: same relay, dialed addresses in one /16, or mutual family.
    Extra descriptor addresses are never dialed and never verified, so they do not count."""
    if a.identity_pub == b.identity_pub:  # the same relay (the id is a hash of it; comparing is cheaper)
        return True
    if _net(*a.address) == _net(*b.address):
        return True
    return bool(a.family and b.family) and mutual_family(a, b)


def _compatible(candidate: Descriptor, chosen: Sequence[Descriptor]) -> bool:
    return not any(related(candidate, c) for c in chosen)


def behind_nat(desc: Descriptor) -> bool:
    """The relay is reached through introducers: it can be a guard, never a middle or an exit."""
    return desc.reachability is not None


def age_weight(known_s: float) -> float:
    """AGE_FLOOR for a relay just met, rising linearly to 1 after AGE_RAMP_S (negative ages count as 0)."""
    return AGE_FLOOR + (1 - AGE_FLOOR) * min(1.0, max(0.0, known_s) / AGE_RAMP_S)


class Candidates:
    """Relays prepared for many draws: excluded ones and duplicate ids removed, and the per-address cap
    worked out as far as it is fixed (``pool`` finishes it with the caller's rng on every draw)."""

    def __init__(self, relays: Sequence[Descriptor], known: Known = NO_HISTORY,
                 exclude: frozenset[bytes] = frozenset()) -> None:
        self.age = {d.relay_id: age_weight(known.get(d.relay_id, 0.0)) for d in relays}
        groups: dict[str, list[Descriptor]] = {}
        seen: set[bytes] = set(exclude)
        for d in relays:
            if d.relay_id not in seen:
                seen.add(d.relay_id)
                groups.setdefault(_host(*d.address), []).append(d)
        self.fixed: list[Descriptor] = []  # relays the cap keeps whatever the draw
        self.ties: list[tuple[list[Descriptor], int]] = []  # (equally long known relays, how many of them stay)
        for members in groups.values():
            if len(members) <= MAX_PER_ADDRESS:
                self.fixed += members
                continue
            age = [known.get(d.relay_id, 0.0) for d in members]
            cut = sorted(age, reverse=True)[MAX_PER_ADDRESS - 1]
            above = [d for d, a in zip(members, age, strict=True) if a > cut]
            self.fixed += above
            self.ties.append(([d for d, a in zip(members, age, strict=True) if a == cut], MAX_PER_ADDRESS - len(above)))

    def pool(self, rng: random.Random) -> list[Descriptor]:
        """The relays one draw may use: at most MAX_PER_ADDRESS per dialed IPv4 address / IPv6 /64, the
        longest-known kept.  Ties at the cut are broken with ``rng`` (a relay id order could be ground by
        whoever mints identities, and a squatter claiming an honest relay's address could then always
        push it out)."""
        out = list(self.fixed)
        for tied, k in self.ties:
            out += rng.sample(tied, k)
        return out

    def weights(self, pool: Sequence[Descriptor]) -> dict[bytes, float]:
        """Each relay's selection weight: its age weight, scaled down within its dialed /16 so that the
        /16's total is at most NET_WEIGHT_CAP times its heaviest relay's."""
        nets: dict[str, list[bytes]] = {}
        for d in pool:
            nets.setdefault(_net(*d.address), []).append(d.relay_id)
        out: dict[bytes, float] = {}
        for ids in nets.values():
            if len(ids) == 1:
                out[ids[0]] = self.age[ids[0]]
                continue
            total = sum(self.age[r] for r in ids)
            scale = min(1.0, NET_WEIGHT_CAP * max(self.age[r] for r in ids) / total)
            for r in ids:
                out[r] = self.age[r] * scale
        return out


def cap_per_address(relays: Sequence[Descriptor], rng: random.Random, known: Known = NO_HISTORY) -> list[Descriptor]:
    """The relays a draw may use (Candidates.pool)."""
    return Candidates(relays, known).pool(rng)


def weights(relays: Sequence[Descriptor], known: Known = NO_HISTORY) -> dict[bytes, float]:
    """The selection weights of a pool (Candidates.weights)."""
    return Candidates(relays, known).weights(relays)


def _weighted_order(items: Sequence[Descriptor], w: Mapping[bytes, float], rng: random.Random) -> Iterator[Descriptor]:
    """Items in a random order, each next one drawn with probability proportional to its weight."""
    left = list(items)
    while left:
        total = sum(w[d.relay_id] for d in left)
        x = rng.random() * total
        i = 0
        while i < len(left) - 1:  # the last one also takes any floating-point remainder
            x -= w[left[i].relay_id]
            if x < 0:
                break
            i += 1
        yield left.pop(i)


def _draw(fits: Sequence[Descriptor], w: Mapping[bytes, float], rng: random.Random) -> Iterator[Descriptor]:
    """Non-exits first (exit capacity is the scarce kind; Tor weights the same way), exits only after them."""
    yield from _weighted_order([c for c in fits if not c.is_exit], w, rng)
    yield from _weighted_order([c for c in fits if c.is_exit], w, rng)


def select_path(relays: Sequence[Descriptor], rng: random.Random, *, exit_id: bytes | None = None,
                port: int | None = None, hops: int = 3, exclude: frozenset[bytes] = frozenset(),
                known: Known = NO_HISTORY, guards: Sequence[bytes] | None = None) -> list[Descriptor]:
    """Choose ``hops`` relays (guard first, exit last), none of them in ``exclude``.  The exit is drawn
    first, then the guard, then the middle(s), each by weight among the relays that fit the position.
    ``guards``: a guard manager's ordered guards; the guard is then the first of them that fits the exit
    (no weighting: the manager already drew them), and without one that fits there is no path."""
    return draw_path(Candidates(relays, known, exclude), rng, exit_id=exit_id, port=port, hops=hops, guards=guards)


def draw_path(cands: Candidates, rng: random.Random, *, exit_id: bytes | None = None, port: int | None = None,
              hops: int = 3, guards: Sequence[bytes] | None = None) -> list[Descriptor]:
    """select_path on relays prepared once (many draws from one view: ``shallot paths``, simulations)."""
    pool = cands.pool(rng)
    w = cands.weights(pool)
    exits = [d for d in pool if d.is_exit and not behind_nat(d)
             and (port is None or d.exit_policy.allows_port(port))]
    if exit_id is not None:
        exits = [d for d in exits if d.relay_id == exit_id]
        if not exits:
            raise PathError("the chosen exit is not in the directory, is not an exit, refuses this port, "
                            f"or shares its address with {MAX_PER_ADDRESS} relays known longer")
    if not exits:
        raise PathError("no exit relay in the directory allows this traffic (exits behind a NAT are never used)")
    by_id = {d.relay_id: d for d in pool}
    for exit_relay in _weighted_order(exits, w, rng):
        if hops == 1:
            return [exit_relay]
        others = [d for d in pool if not related(d, exit_relay)]
        if guards is not None:
            guard_order: Iterator[Descriptor] = iter([by_id[g] for g in guards if g in by_id
                                                      and not related(by_id[g], exit_relay)][:1])
        else:
            guard_order = _draw(others, w, rng)
        for guard in guard_order:
            chosen = [guard, exit_relay]
            middles = _fill(others, chosen, hops - 2, w, rng)
            # a guard behind a NAT brings its introducers into the entry position (entry.py): they must fit
            # the middle and exit like the guard itself, or the next guard is drawn
            if middles is not None and introducers_fit(guard, [*middles, exit_relay], by_id):
                return [guard, *middles, exit_relay]
    if guards is not None:
        raise PathError("no guard of this client's guard set fits any exit (same /16 network or family)")
    raise PathError(f"not enough unrelated relays for a {hops}-hop circuit "
                    "(relays must be distinct, in different /16 networks and not in the same family)")


def _fill(others: Sequence[Descriptor], chosen: list[Descriptor], n: int, w: Mapping[bytes, float],
          rng: random.Random) -> list[Descriptor] | None:
    """``n`` middles (public relays) unrelated to ``chosen`` and to each other, or None if they do not fit."""
    middles: list[Descriptor] = []
    for _ in range(n):
        fits = [c for c in others if not behind_nat(c) and _compatible(c, [*chosen, *middles])]
        pick = next(_draw(fits, w, rng), None)
        if pick is None:
            return None
        middles.append(pick)
    return middles


def sample_guards(relays: Sequence[Descriptor], rng: random.Random, n: int, *, known: Known = NO_HISTORY,
                  exclude: frozenset[bytes] = frozenset(), keep: Sequence[Descriptor] = ()) -> list[Descriptor]:
    """Up to ``n`` new guard candidates for a guard manager's sample: drawn by the guard position's weight
    (same per-address cap, age weight and /16 cap as select_path; non-exits first), none of them in
    ``exclude``, none related (same relay, /16 or mutual family) to another or to the guards it already
    ``keep``s, so that two guards of one client never belong to one operator as far as it can tell."""
    cands = Candidates(relays, known, exclude)
    pool = cands.pool(rng)
    w = cands.weights(pool)
    out: list[Descriptor] = []
    for cand in _draw(pool, w, rng):
        if len(out) >= n:
            break
        if _compatible(cand, [*keep, *out]):
            out.append(cand)
    return out


def same_operator(a: Descriptor, b: Descriptor) -> dict[str, bool]:
    """Whether two relays look like one operator, for audits (``shallot paths``): same IP address (without
    port, so a loopback test network is one operator), same /16 (IPv6 /32, literal: loopback too), mutual
    family."""
    ha, hb = ip_address(a.address[0]), ip_address(b.address[0])
    bits = 16 if ha.version == 4 else 32
    same_net = ha.version == hb.version and ip_network(f"{ha}/{bits}", strict=False) == \
        ip_network(f"{hb}/{bits}", strict=False)
    return {"ip": ha == hb, "slash16": same_net, "family": mutual_family(a, b)}


def check_path(path: Sequence[Descriptor], *, port: int | None = None) -> None:
    """Validate a user-chosen path with the same rules; raises PathError."""
    if not path:
        raise PathError("empty path")
    for i, a in enumerate(path):
        for b in path[i + 1:]:
            if related(a, b):
                raise PathError(f"relays {a.nickname} and {b.nickname} may not share a circuit "
                                "(same relay, same /16 network or same mutual family)")
    for d in path[1:]:
        if behind_nat(d):
            raise PathError(f"relay {d.nickname} is behind a NAT: it can only be the first relay (the guard)")
    if not introducers_fit(path[0], path[1:], {d.relay_id: d for d in path}):
        raise PathError(f"an introducer of {path[0].nickname} is a later relay of the path or shares its /16 "
                        "network or family")
    last = path[-1]
    if not last.is_exit:
        raise PathError(f"the last relay, {last.nickname}, is not an exit")
    if port is not None and not last.exit_policy.allows_port(port):
        raise PathError(f"exit {last.nickname} does not allow port {port}")


def choose_path(relays: list[Descriptor], rng: random.Random, *, path_spec: str | None,
                exit_spec: str | None, known: Known = NO_HISTORY) -> list[Descriptor]:
    """The path the user asked for (``--path``, checked) or one drawn for ``--exit`` or any exit (``known``:
    seconds this client has known each relay); the errors are worded for the user (ShallotError)."""
    try:
        if path_spec:
            names = [p for p in path_spec.split(",") if p.strip()]
            if len(names) != 3:
                raise ShallotError(f"--path needs exactly three relays (guard,middle,exit), got {len(names)}")
            path = [resolve_relay(n, relays) for n in names]
            if exit_spec and resolve_relay(exit_spec, relays).relay_id != path[-1].relay_id:
                raise ShallotError("--exit disagrees with the last relay of --path")
            check_path(path)
            return path
        exit_id = resolve_relay(exit_spec, relays).relay_id if exit_spec else None
        return select_path(relays, rng, exit_id=exit_id, known=known)
    except PathError as exc:
        raise ShallotError(str(exc)) from None


def resolve_relay(name: str, relays: list[Descriptor]) -> Descriptor:
    """Find a relay by full id, unique id prefix (at least 4 hex digits) or nickname.  A name that fits
    more than one relay is refused, also when one relay's nickname is another's id prefix: nicknames are
    chosen by their operators, so a relay named like a popular relay's id prefix must not capture it."""
    key = name.strip().lower()
    if not key:
        raise ShallotError("empty relay id")
    found = {d.relay_id: d for d in relays if d.nickname.lower() == key}
    if len(key) >= 4:
        found.update((d.relay_id, d) for d in relays if d.id_hex.startswith(key))
    if len(found) == 1:
        return next(iter(found.values()))
    if len(found) > 1:
        raise ShallotError(f"relay {name!r} is ambiguous: it fits {len(found)} relays (give more id digits)")
    raise ShallotError(f"unknown relay {name!r}: not in the directory (or its descriptor expired)")
