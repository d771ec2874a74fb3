"""Where a circuit's path and its guard come from (pure): the seam a guard manager plugs into, and the
entry guards themselves (docs/PROTOCOL.md §5.4).

The circuit manager (manager.py) asks a ``GuardPolicy`` for every path and tells it how each circuit
fared (an ``Outcome``).  Two policies:

* ``AvoidFailedGuards``: any guard, except one whose circuit failed since the last connect.  The
  engine's old behaviour, kept for tests and tools that want a fresh guard per circuit.
* ``GuardSet``: persistent entry guards, Tor's guard-spec simplified.  A small sample of guard
  candidates, kept across runs in their order; the first PRIMARY_COUNT usable ones are the primary
  guards and every circuit goes through the first primary that is not backing off.  A guard that does
  not answer is retried with back-off, never replaced on the spot; a circuit that dies beyond the guard
  says nothing about it (that is path-bias accounting, below).  A guard leaves the sample only when its
  lifetime ends, after a long outage, when it has been out of the view for weeks, or when its circuits
  fail far more often than chance (path bias).

``GuardSet`` is pure: every method takes ``now`` (wall seconds: its dates are kept across runs) and the
Random is passed in.  Reading and writing the state file is core/engine/guards.py's job; the format is
``to_json``/``from_json`` here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from shallot.core.circuit.entry import introducers_fit
from shallot.core.circuit.path import (
    NO_HISTORY,
    Known,
    behind_nat,
    check_path,
    choose_path,
    related,
    resolve_relay,
    sample_guards,
    select_path,
)
from shallot.core.errors import ShallotError
from shallot.crypto.descriptor import Descriptor
from shallot.crypto.keys import RELAY_ID_LEN

if TYPE_CHECKING:  # the caller passes its Random in; this module draws no randomness of its own
    import random

DAY = 86400.0
PRIMARY_COUNT = 2  # primary guards: circuits use the first one that is not backing off
SAMPLE_SPARE = 1  # usable sampled guards beyond the primaries, tried only when every primary backs off
SAMPLE_MAX = 20  # sampled guards in the view (dropped ones included while remembered): bounds the walk
MAX_ENTRIES = 3 * SAMPLE_MAX  # with those out of the view (another network, a directory file): oldest go first
LIFETIME_S = (90 * DAY, 120 * DAY)  # a sampled guard is replaced at a uniformly drawn age in this range
UNLISTED_DROP_S = 20 * DAY  # out of the view this long: forgotten (until then it keeps its place)
OUTAGE_DROP_S = 3 * DAY  # unreachable this long while other guards worked: dropped
GROW_AFTER_S = 3600.0  # every usable guard down this long: one more is sampled (at most one per this)
DROPPED_KEEP_S = 30 * DAY  # a dropped guard is remembered (never sampled again) this long
RETRY_S = (30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)  # an unreachable guard's back-off; the last repeats
# path bias (Tor's pathbias, simplified): success rates over the guard's last circuits
PB_MIN_CIRCUITS = 20  # no judgement before this many attempts
PB_WARN_RATE = 0.7  # below: a warning
PB_DROP_RATE = 0.3  # below: the guard is dropped
PB_SCALE_AT = 200  # counts are halved beyond this, so recent behaviour weighs most
STATE_VERSION = 1


@dataclass(frozen=True)
class PathRequest:
    path_spec: str | None = None  # the user's "guard,middle,exit" (ids, prefixes or nicknames)
    exit_spec: str | None = None  # the user's exit
    # a new circuit for a live connection: leave these relays out (the current path) while a path remains;
    # None: a circuit for a connection that has none.  Entry guards keep the guard: only middle and exit change
    away_from: frozenset[bytes] | None = None
    # the middle and exit of a circuit that just died or failed to build beyond its guard: entry guards leave
    # them out of those positions while a path remains (a dead relay must not cost another build timeout)
    recently_failed: frozenset[bytes] = frozenset()


class Outcome(enum.Enum):
    """Why a circuit through a guard ended badly, as far as the client can tell (docs/PROTOCOL.md §5.4)."""

    UNREACHABLE = "unreachable"  # the guard itself did not answer: its link never came up, or it fell silent
    BUILD_FAILED = "build-failed"  # the guard answered; the circuit beyond it could not be built
    USE_FAILED = "use-failed"  # built, then died beyond the guard before anything came back through it
    CLOSED = "closed"  # died beyond the guard after it had carried answers: ordinary churn


class GuardPolicy(Protocol):
    def plan(self, relays: Sequence[Descriptor], request: PathRequest) -> list[Descriptor]:
        """A path for ``request`` from ``relays``; raises ShallotError (in words for the user) if none fits."""
        ...

    def succeeded(self, guard: bytes) -> None:
        """A circuit through ``guard`` was built."""
        ...

    def failed(self, guard: bytes, outcome: Outcome = Outcome.UNREACHABLE) -> None:
        """A circuit through ``guard`` could not be built, or died; ``outcome`` says whose fault it looks."""
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

    def failed(self, guard: bytes, outcome: Outcome = Outcome.UNREACHABLE) -> None:
        self.avoided.add(guard)

    def reset(self) -> None:
        self.avoided.clear()

    def _choose(self, relays: list[Descriptor], request: PathRequest) -> list[Descriptor]:
        return choose_path(relays, self.rng, path_spec=request.path_spec, exit_spec=request.exit_spec,
                           known=self.known())


# ---------------------------------------------------------------------------------------------- entry guards


@dataclass
class Guard:
    """One sampled guard and what we know of it (the fields of the state file, §5.4)."""

    relay_id: bytes
    nickname: str
    added: float  # when sampled
    expires: float  # added + a lifetime drawn from LIFETIME_S
    unlisted_since: float | None = None  # not in the view since then
    down_since: float | None = None  # unreachable since then (cleared by a built circuit)
    failures: int = 0  # unreachable outcomes in a row
    retry_at: float = 0.0  # backing off until then
    dropped: str = ""  # why it was dropped ("" while usable)
    dropped_at: float | None = None
    # path bias
    builds: float = 0.0  # build attempts that reached the guard
    built: float = 0.0
    uses: float = 0.0  # built circuits
    use_failed: float = 0.0  # built circuits that died beyond the guard before any answer
    warned: bool = False

    @property
    def id_hex(self) -> str:
        return self.relay_id.hex()

    def usable(self) -> bool:
        return not self.dropped and self.unlisted_since is None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id_hex, "nickname": self.nickname, "added": self.added, "expires": self.expires,
                "unlisted_since": self.unlisted_since, "down_since": self.down_since, "failures": self.failures,
                "retry_at": self.retry_at, "dropped": self.dropped, "dropped_at": self.dropped_at,
                "builds": self.builds, "built": self.built, "uses": self.uses, "use_failed": self.use_failed,
                "warned": self.warned}

    @classmethod
    def from_json(cls, raw: Any) -> Guard:
        """Raises ValueError (or KeyError, TypeError) on anything that is not a guard entry."""
        relay_id = bytes.fromhex(_typed(raw["id"], str))
        if len(relay_id) != RELAY_ID_LEN:
            raise ValueError("bad relay id")
        g = cls(relay_id, _typed(raw["nickname"], str)[:64], _time(raw["added"]), _time(raw["expires"]),
                _opt_time(raw.get("unlisted_since")), _opt_time(raw.get("down_since")),
                min(_typed(raw.get("failures", 0), int), 1000), _time(raw.get("retry_at", 0.0)),
                _typed(raw.get("dropped", ""), str)[:200], _opt_time(raw.get("dropped_at")))
        for name in ("builds", "built", "uses", "use_failed"):
            setattr(g, name, _time(raw.get(name, 0.0)))
        g.built, g.use_failed = min(g.built, g.builds), min(g.use_failed, g.uses)
        g.warned = raw.get("warned") is True
        return g


class GuardSet:
    """The persistent entry guards (docs/PROTOCOL.md §5.4).  ``notices`` collects warnings for the user
    (the engine logs them and shows the latest in its snapshot); ``changed`` says the state should be saved."""

    def __init__(self, rng: random.Random, guards: list[Guard] | None = None) -> None:
        self.rng = rng
        self.guards: list[Guard] = guards or []  # the sample, in the order it was drawn: its priority
        self.last_success: float | None = None  # any guard: the network worked then
        self.notices: list[str] = []
        self.changed = False
        self._now = 0.0  # of the plan under way
        # how long this client has known each relay, now: guards, middles and exits are drawn by path.py's
        # weights (age, per-address and /16 caps), so a burst of new identities does not fill the sample
        self.known: Callable[[], Known] = lambda: NO_HISTORY
        # this client's public address when known (its NAT probe): a guard behind a NAT whose introducer sits in
        # the client's own /16 would put one operator on both sides of the first link (entry.py)
        self.client_host: Callable[[], str | None] = lambda: None

    # ------------------------------------------------------------------ the state file's contents
    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "guards": [g.to_json() for g in self.guards],
                "last_success": self.last_success}

    @classmethod
    def from_json(cls, raw: Any, rng: random.Random) -> GuardSet:
        """Raises ValueError if ``raw`` is not a guard state this version understands."""
        try:
            version = raw.get("version")
            if type(version) is not int or version != STATE_VERSION:  # True == 1 in Python
                raise ValueError(f"unknown guard state version {str(raw.get('version'))[:20]}")
            guards = [Guard.from_json(g) for g in _typed(raw["guards"], list)[:SAMPLE_MAX * 2]]
            last = _opt_time(raw.get("last_success"))
        except (AttributeError, KeyError, TypeError) as exc:
            raise ValueError(f"malformed guard state ({type(exc).__name__})") from None
        seen: set[bytes] = set()
        unique = [g for g in guards if not (g.relay_id in seen or seen.add(g.relay_id))]  # type: ignore[func-returns-value]
        out = cls(rng, unique)
        out.last_success = last
        return out

    # ------------------------------------------------------------------ the policy
    def primaries(self) -> list[Guard]:
        return [g for g in self.guards if g.usable()][:PRIMARY_COUNT]

    def plan(self, relays: Sequence[Descriptor], request: PathRequest, now: float) -> list[Descriptor]:
        if request.path_spec:  # the user chose the whole path: their call, guards or not
            return choose_path(list(relays), self.rng, path_spec=request.path_spec, exit_spec=request.exit_spec)
        by_id = {d.relay_id: d for d in relays}
        self._now = now
        self._refresh(by_id, now)
        for guard in self._order(now):
            path = self._path_through(by_id[guard.relay_id], relays, request)
            if path is not None:
                return path
        # no sampled guard fits this request (the chosen exit is one of them, or shares their /16 or family):
        # one more guard that fits is sampled, within SAMPLE_MAX
        added = self._sample_one(by_id, now, fits=lambda d: self._path_through(d, relays, request) is not None)
        path = self._path_through(by_id[added.relay_id], relays, request) if added is not None else None
        if path is None:
            raise ShallotError("no entry guard fits this circuit: the guards and the chosen exit share a "
                               "network or family, or too few relays are known")
        return path

    def succeeded(self, guard: bytes, now: float) -> None:
        g = self._find(guard)
        self.last_success = now
        self.changed = True
        if g is None:
            return
        g.failures, g.retry_at, g.down_since = 0, 0.0, None
        g.builds += 1
        g.built += 1
        g.uses += 1
        self._judge(g, now)

    def failed(self, guard: bytes, outcome: Outcome, now: float) -> None:
        g = self._find(guard)
        if g is None:
            return
        self.changed = True
        if outcome is Outcome.UNREACHABLE:  # reachability: back off and retry the same guard later
            g.failures += 1
            g.retry_at = now + RETRY_S[min(g.failures, len(RETRY_S)) - 1]
            if g.down_since is None:
                g.down_since = now
            return
        if outcome is Outcome.BUILD_FAILED:
            g.builds += 1
        elif outcome is Outcome.USE_FAILED:
            g.use_failed = min(g.use_failed + 1, g.uses)
        self._judge(g, now)

    def reset(self) -> None:
        pass  # what we learnt about guards outlives a connection: that is the point of them

    def in_backoff(self, g: Guard, now: float) -> bool:
        # a clock set back after a failure must not keep a guard away for longer than the longest back-off
        return now < g.retry_at <= now + RETRY_S[-1]

    # ------------------------------------------------------------------ internals
    def _find(self, relay_id: bytes) -> Guard | None:
        return next((g for g in self.guards if g.relay_id == relay_id), None)

    def _order(self, now: float) -> list[Guard]:
        """The guards to try, best first: the primaries not backing off, then the other usable sampled
        guards not backing off (every primary is down), then those backing off, soonest retry first."""
        usable = [g for g in self.guards if g.usable()]
        ready = [g for g in usable if not self.in_backoff(g, now)]
        waiting = sorted((g for g in usable if self.in_backoff(g, now)), key=lambda g: g.retry_at)
        return ready + waiting

    def _refresh(self, by_id: dict[bytes, Descriptor], now: float) -> None:
        """Listed or not, lifetimes, long outages; then top the sample up to the primaries and a spare."""
        keep: list[Guard] = []
        for g in self.guards:
            if g.relay_id in by_id:
                if g.unlisted_since is not None:
                    g.unlisted_since = None
                    self.changed = True
            elif g.unlisted_since is None:
                g.unlisted_since = now
                self.changed = True
            if g.dropped:
                if g.dropped_at is not None and now - g.dropped_at < DROPPED_KEEP_S:
                    keep.append(g)
                continue
            if now >= g.expires:
                self.notices.append(f"guard {g.nickname} reached the end of its lifetime: choosing a new one")
                continue
            if g.unlisted_since is not None and now - g.unlisted_since >= UNLISTED_DROP_S:
                self.notices.append(f"guard {g.nickname} left the network view weeks ago: choosing a new one")
                continue
            if (g.down_since is not None and now - g.down_since >= OUTAGE_DROP_S
                    and self.last_success is not None and self.last_success > g.down_since):
                self._drop(g, now, "unreachable for days while other guards worked")
            keep.append(g)
        unlisted = sorted((g for g in keep if g.unlisted_since is not None and not g.dropped), key=lambda g: g.added)
        for g in unlisted[:max(0, len(keep) - MAX_ENTRIES)]:
            keep.remove(g)
        if len(keep) != len(self.guards):
            self.changed = True
        self.guards = keep
        usable = [g for g in self.guards if g.usable()]
        need = PRIMARY_COUNT + SAMPLE_SPARE - len(usable)
        if need <= 0 and usable and all(self.in_backoff(g, now) for g in usable) and self._may_grow(usable, now):
            need = 1
        for _ in range(max(0, need)):
            if self._sample_one(by_id, now) is None:
                break

    def _may_grow(self, usable: list[Guard], now: float) -> bool:
        """Every usable guard backs off: one more candidate?  Yes while none ever worked (a stale view);
        once they have, only after all of them were down GROW_AFTER_S and at most one per GROW_AFTER_S:
        failures that look like our own network being down must not walk us through the network."""
        if self.last_success is None:
            return True
        latest_down = max(g.down_since if g.down_since is not None else now for g in usable)
        newest = max(g.added for g in self.guards)
        return now - latest_down >= GROW_AFTER_S and now - newest >= GROW_AFTER_S

    def _sample_one(self, by_id: dict[bytes, Descriptor], now: float, fits: Any = None) -> Guard | None:
        """Add one relay of the view to the sample (None when the sample is full or nothing fits).  Non-exits
        first (exit capacity is scarce), and one not sharing a /16 or family with the usable guards."""
        if sum(1 for g in self.guards if g.dropped or g.unlisted_since is None) >= SAMPLE_MAX:
            return None
        sampled = {g.relay_id for g in self.guards}
        usable = [by_id[g.relay_id] for g in self.guards if g.usable() and g.relay_id in by_id]
        host = self.client_host()
        pool = [d for d in by_id.values() if d.relay_id not in sampled and (fits is None or fits(d))
                and introducers_fit(d, [], {}, client_host=host)]
        # by weight, non-exits first, none related to the usable guards (path.sample_guards); if nothing
        # unrelated is left, any relay of the pool beats no guard
        picks = sample_guards(pool, self.rng, 1, known=self.known(), keep=usable) or \
            sample_guards(pool, self.rng, 1, known=self.known())
        if not picks:
            return None
        d = picks[0]
        g = Guard(d.relay_id, d.nickname, now, now + self.rng.uniform(*LIFETIME_S))
        self.guards.append(g)
        self.changed = True
        return g

    def _path_through(self, guard: Descriptor, relays: Sequence[Descriptor],
                      request: PathRequest) -> list[Descriptor] | None:
        """guard -> middle -> exit with this guard, by path.py's rules (None: no such path)."""
        if not introducers_fit(guard, [], {}, client_host=self.client_host()):
            return None  # sampled before the client knew its public address: its introducers are our neighbours
        try:
            exit_id = resolve_relay(request.exit_spec, list(relays)).relay_id if request.exit_spec else None
        except ShallotError:
            raise  # an unknown exit: the same answer whatever the guard
        rest = [d for d in relays if not related(d, guard) and not behind_nat(d)]
        # guards that did not answer their link (backing off) are no better as middle or exit
        down = frozenset(g.relay_id for g in self.guards if g.failures and self.in_backoff(g, self._now))
        avoid = (request.away_from or frozenset()) | request.recently_failed | down
        pools = [[d for d in rest if d.relay_id not in avoid], [d for d in rest if d.relay_id not in down], rest]
        for pool in [p for i, p in enumerate(pools) if i == 0 or len(p) != len(pools[i - 1])]:
            try:
                path = [guard, *select_path(pool, self.rng, exit_id=exit_id, hops=2, known=self.known())]
                check_path(path)
                return path
            except ValueError:  # PathError
                continue
        return None

    def _judge(self, g: Guard, now: float) -> None:
        """Path bias: success rates of builds and of uses, judged once there are PB_MIN_CIRCUITS attempts."""
        if g.builds > PB_SCALE_AT:
            g.builds, g.built = g.builds / 2, g.built / 2
        if g.uses > PB_SCALE_AT:
            g.uses, g.use_failed = g.uses / 2, g.use_failed / 2
        rates = []
        if g.builds >= PB_MIN_CIRCUITS:
            rates.append(("built", g.built / g.builds))
        if g.uses >= PB_MIN_CIRCUITS:
            rates.append(("carried traffic", 1 - g.use_failed / g.uses))
        for what, rate in rates:
            if rate < PB_DROP_RATE:
                self._drop(g, now, f"only {rate:.0%} of its circuits {what} (path bias)")
                return
            if rate < PB_WARN_RATE and not g.warned:
                g.warned = True
                self.notices.append(f"guard {g.nickname}: only {rate:.0%} of its circuits {what}; it may be "
                                    f"failing circuits on purpose (dropped below {PB_DROP_RATE:.0%})")

    def _drop(self, g: Guard, now: float, why: str) -> None:
        g.dropped, g.dropped_at = why, now
        self.changed = True
        self.notices.append(f"guard {g.nickname} dropped: {why}")


def _typed(value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise TypeError(kind.__name__)
    return value


def _time(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e12:
        raise ValueError("bad number")
    return float(value)


def _opt_time(value: Any) -> float | None:
    return None if value is None else _time(value)
