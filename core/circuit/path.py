"""Path selection (pure): guard -> middle -> exit from a verified set of descriptors.

Rules: three distinct relays; no two in the same IPv4 /16 (IPv6 /32) or in each other's declared
family; the last one is an exit whose policy allows the requested port; a relay behind a NAT (its
descriptor carries a reachability extension) only ever comes first: the client reaches it through its
introducers, but a relay extending a circuit has only the address and keys (PROTOCOL §5.1, §13.7).
Randomness comes from a ``random.Random`` the caller passes (SystemRandom in production, seeded in tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from shallot.core.circuit.entry import introducers_fit
from shallot.core.errors import ShallotError
from shallot.core.wire.addresses import subnet_key
from shallot.crypto.descriptor import Descriptor

if TYPE_CHECKING:  # the caller passes its Random in; this module draws no randomness of its own
    import random


class PathError(ValueError):
    """No path satisfies the constraints; the message says why in plain words."""


def related(a: Descriptor, b: Descriptor) -> bool:
    """True if a and b must not share a circuit: same relay, same /16, or either declares the other family."""
    if a.relay_id == b.relay_id:
        return True
    if {subnet_key(h, p) for h, p in a.addresses} & {subnet_key(h, p) for h, p in b.addresses}:
        return True
    return b.relay_id in a.family or a.relay_id in b.family


def _compatible(candidate: Descriptor, chosen: Sequence[Descriptor]) -> bool:
    return not any(related(candidate, c) for c in chosen)


def behind_nat(desc: Descriptor) -> bool:
    """The relay is reached through introducers: it can be a guard, never a middle or an exit."""
    return desc.reachability is not None


def select_path(relays: Sequence[Descriptor], rng: random.Random, *, exit_id: bytes | None = None,
                port: int | None = None, hops: int = 3,
                exclude: frozenset[bytes] = frozenset()) -> list[Descriptor]:
    """Choose ``hops`` relays, exit last, none of them in ``exclude``."""
    pool = [d for d in relays if d.relay_id not in exclude]
    exits = [d for d in pool if d.is_exit and not behind_nat(d)
             and (port is None or d.exit_policy.allows_port(port))]
    if exit_id is not None:
        exits = [d for d in exits if d.relay_id == exit_id]
        if not exits:
            raise PathError("the chosen exit is not in the directory, is not an exit, or refuses this port")
    if not exits:
        raise PathError("no exit relay in the directory allows this traffic (exits behind a NAT are never used)")
    rng.shuffle(exits)
    known = {d.relay_id: d for d in relays}
    for exit_relay in exits:
        chosen = [exit_relay]
        others = [d for d in pool if d.relay_id != exit_relay.relay_id]
        # positions are filled from the exit backwards, each uniformly among the relays that fit it; only
        # the last one filled (the guard) may be behind a NAT.  Guard and middle come from non-exits first:
        # exit capacity is the scarce kind (Tor weights the same way); exits fill those positions only
        # when there are not enough other relays
        while len(chosen) < hops:
            guard_slot = len(chosen) == hops - 1
            fits = [c for c in others if (guard_slot or not behind_nat(c)) and _compatible(c, chosen)
                    and (not guard_slot or introducers_fit(c, chosen, known))]  # entry position (entry.py)
            if not fits:
                break
            cand = rng.choice([c for c in fits if not c.is_exit] or fits)
            others.remove(cand)
            chosen.append(cand)
        if len(chosen) == hops:
            return [*chosen[1:][::-1], exit_relay] if hops > 1 else [exit_relay]
    raise PathError(f"not enough unrelated relays for a {hops}-hop circuit "
                    "(relays must be distinct, in different /16 networks and not in the same family)")


def check_path(path: Sequence[Descriptor], *, port: int | None = None) -> None:
    """Validate a user-chosen path with the same rules; raises PathError."""
    if not path:
        raise PathError("empty path")
    for i, a in enumerate(path):
        for b in path[i + 1:]:
            if related(a, b):
                raise PathError(f"relays {a.nickname} and {b.nickname} may not share a circuit "
                                "(same relay, same /16 network or same family)")
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
                exit_spec: str | None) -> list[Descriptor]:
    """The path the user asked for (``--path``, checked) or one drawn for ``--exit`` or any exit; the
    errors are worded for the user (ShallotError)."""
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
        return select_path(relays, rng, exit_id=exit_id)
    except PathError as exc:
        raise ShallotError(str(exc)) from None


def resolve_relay(name: str, relays: list[Descriptor]) -> Descriptor:
    """Find a relay by full id, unique id prefix (at least 4 hex digits) or nickname."""
    key = name.strip().lower()
    if not key:
        raise ShallotError("empty relay id")
    exact = [d for d in relays if d.id_hex == key]
    if exact:
        return exact[0]
    by_nick = [d for d in relays if d.nickname.lower() == key]
    if len(by_nick) == 1:
        return by_nick[0]
    if len(key) >= 4:
        by_prefix = [d for d in relays if d.id_hex.startswith(key)]
        if len(by_prefix) == 1:
            return by_prefix[0]
        if len(by_prefix) > 1:
            raise ShallotError(f"relay id {name!r} is ambiguous: give more digits")
    raise ShallotError(f"unknown relay {name!r}: not in the directory (or its descriptor expired)")
