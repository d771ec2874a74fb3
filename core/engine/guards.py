"""The entry guards on disk (docs/PROTOCOL.md §5.4): the pure GuardSet (core/circuit/guards.py) as the circuit
manager's GuardPolicy, with the wall clock and the state file added.

The file is JSON, mode 0600 in a 0700 directory, replaced atomically (write, fsync, rename) after every change,
so a crash leaves the old state or the new one, never half of one.  A file that cannot be read or parsed is set
aside as ``guards.corrupt`` and the client starts a fresh sample, with a warning: a broken file must not stop
the VPN, and it must not be silently overwritten either (the user may want to look at it).

Where it lives (``default_state_dir``): $SHALLOT_STATE_DIR if set; else /var/lib/shallot for root (an engine
run as a system service); else $XDG_STATE_HOME/shallot, i.e. ~/.local/state/shallot (state that should
survive, unlike the view cache in ~/.cache, but is no configuration).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from shallot.core.circuit.guards import GuardSet, Outcome, PathRequest
from shallot.core.circuit.path import NO_HISTORY, Known
from shallot.core.errors import ShallotError
from shallot.core.privfile import UnsafePath, check_private_dir, read_regular, write_private
from shallot.crypto.descriptor import Descriptor

log = logging.getLogger("shallot.engine")
MAX_STATE_BYTES = 1 << 20


def default_state_dir() -> Path:
    override = os.environ.get("SHALLOT_STATE_DIR")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/lib/shallot")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "shallot"


def load_guards(path: Path, rng: random.Random) -> GuardSet:
    """The saved guard set, or a fresh one (nothing saved yet, or the file is unusable: set aside, warned).
    Raises UnsafePath (a ShallotError: the engine does not start) when another user can change the state
    directory (core/privfile.py check_private_dir)."""
    if os.path.lexists(path.parent):
        check_private_dir(path.parent)  # UnsafePath: whoever can write there could choose our entry guards
    try:
        data = read_regular(path, MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return GuardSet(rng)
    except UnsafePath:
        raise
    except ShallotError as exc:
        log.warning("cannot read the guard state %s (%s): choosing new entry guards", path, exc)
        return GuardSet(rng)
    try:
        if len(data) > MAX_STATE_BYTES:
            raise ValueError("file too large")
        return GuardSet.from_json(json.loads(data.decode()), rng)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        aside = path.with_name(path.name + ".corrupt")
        try:
            os.replace(path, aside)
        except OSError:
            aside = path
        log.warning("the guard state %s is unusable (%s): set aside as %s, choosing new entry guards",
                    path, str(exc)[:100], aside.name)
        return GuardSet(rng)


def save_guards(path: Path, guards: GuardSet) -> None:
    """Atomically, 0600 (the file says which relays this user enters the network through)."""
    write_private(path, json.dumps(guards.to_json(), separators=(",", ":")))


class PersistentGuards:
    """GuardSet + wall clock + state file: the engine's GuardPolicy.  ``on_notice`` gets each warning."""

    def __init__(self, path: Path, rng: random.Random, *, wall: Callable[[], float] = time.time,
                 known: Callable[[], Known] = lambda: NO_HISTORY,
                 client_host: Callable[[], str | None] = lambda: None) -> None:
        self.path = path
        self.wall = wall
        self.set = load_guards(path, rng)
        self.set.known = known
        self.set.client_host = client_host
        self.warning = ""  # the latest notice, for the snapshot
        self.on_notice: Callable[[str], None] = lambda text: None
        self._flush()

    def plan(self, relays: Sequence[Descriptor], request: PathRequest) -> list[Descriptor]:
        try:
            return self.set.plan(relays, request, self.wall())
        finally:
            self._flush()

    def succeeded(self, guard: bytes) -> None:
        self.set.succeeded(guard, self.wall())
        self._flush()

    def failed(self, guard: bytes, outcome: Outcome = Outcome.UNREACHABLE) -> None:
        self.set.failed(guard, outcome, self.wall())
        self._flush()

    def reset(self) -> None:
        self.set.reset()

    def status(self, in_use: bytes | None) -> list[dict[str, Any]]:
        """The guard set for the snapshot (core/control/state.py GuardStatus)."""
        now = self.wall()
        primaries = {g.relay_id for g in self.set.primaries()}
        out = []
        for g in self.set.guards:
            state = ("dropped" if g.dropped else "unlisted" if g.unlisted_since is not None
                     else "retrying" if self.set.in_backoff(g, now) else "usable")
            out.append({"id": g.id_hex, "nickname": g.nickname, "primary": g.relay_id in primaries,
                        "state": state, "in_use": g.relay_id == in_use, "note": g.dropped})
        return out

    def _flush(self) -> None:
        for text in self.set.notices:
            log.warning("entry guards: %s", text)
            self.warning = text
            self.on_notice(text)
        self.set.notices.clear()
        if self.set.changed:
            try:
                save_guards(self.path, self.set)
                self.set.changed = False
            except OSError as exc:  # a read-only home must not stop the VPN; the guards then last one run
                log.warning("cannot save the entry guards to %s: %s", self.path, exc.strerror)
