"""Where a circuit's path and its guard come from (pure): the seam a guard manager plugs into.

The circuit manager (manager.py) asks a ``GuardPolicy`` for every path and tells it how each guard fared.
``AvoidFailedGuards`` is the first policy and the behaviour the engine always had: any guard, except one
whose circuit failed since the last connect (most failures are the guard's link), unless no path is
left without it.  A guard manager with persistent entry guards (sampled, kept across runs, outcome
reporting as in arti's tor-guardmgr) replaces it without touching the manager.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from shallot.core.circuit.path import NO_HISTORY, Known, choose_path
from shallot.core.errors import ShallotError
from shallot.crypto.descriptor import Descriptor

if TYPE_CHECKING:  # the caller passes its Random in; this module draws no randomness of its own
    import random


@dataclass(frozen=True)
class PathRequest:
    path_spec: str | None = None  # the user's "guard,middle,exit" (ids, prefixes or nicknames)
    exit_spec: str | None = None  # the user's exit
    # a new circuit for a live connection: leave these relays out (the current path) while a path remains;
    # None: a circuit for a connection that has none
    away_from: frozenset[bytes] | None = None


class GuardPolicy(Protocol):
    def plan(self, relays: Sequence[Descriptor], request: PathRequest) -> list[Descriptor]:
        """A path for ``request`` from ``relays``; raises ShallotError (in words for the user) if none fits."""
        ...

    def succeeded(self, guard: bytes) -> None:
        """A circuit through ``guard`` was built."""
        ...

    def failed(self, guard: bytes) -> None:
        """A circuit through ``guard`` could not be built, or died."""
        ...

    def reset(self) -> None:
        """A new connection (``connect``): what was learnt during the last one may be forgotten."""
        ...


class AvoidFailedGuards:
    def __init__(self, rng: random.Random, known: Callable[[], Known] = lambda: NO_HISTORY) -> None:
        """``known``: how long this client has known each relay, now (path selection weights by it)."""
        self.rng = rng
        self.known = known
        self.avoided: set[bytes] = set()  # guards that failed since the last connect

    def plan(self, relays: Sequence[Descriptor], request: PathRequest) -> list[Descriptor]:
        avoid = request.away_from if request.away_from is not None else frozenset(self.avoided)
        try:
            return self._choose([d for d in relays if d.relay_id not in avoid], request)
        except ShallotError:
            if not avoid:
                raise
            return self._choose(list(relays), request)  # a path through an avoided relay beats no path

    def succeeded(self, guard: bytes) -> None:
        pass  # a guard stays avoided until the next connect, even after a good circuit elsewhere

    def failed(self, guard: bytes) -> None:
        self.avoided.add(guard)

    def reset(self) -> None:
        self.avoided.clear()

    def _choose(self, relays: list[Descriptor], request: PathRequest) -> list[Descriptor]:
        return choose_path(relays, self.rng, path_spec=request.path_spec, exit_spec=request.exit_spec,
                           known=self.known())
