"""The client engine: the data plane (UDP link, crypto, circuits, TUN) on its own asyncio loop, driven only
through the control API (service.py).  ``ClientEngine`` is a thin supervisor: the circuit manager
(core/circuit/manager.py) decides; this module carries its actions out and feeds it what happened, with
the time.  It has no policy of its own.  Next to it: EngineSetup (setup.py: what the settings set up),
EngineCircuits (circuits.py: the circuits on the wire) and EngineStats (stats.py: the measurements).

Every input reaches the manager from the loop, never from inside another: commands from the control
handlers, results at the end of the one piece of work out (privileges, relays, a build), what happens
to circuits on the next loop turn (it is seen inside CircuitClient's dispatch), and its one timer.

The kill switch fails closed (docs/PRIVILEGES.md): ``close`` (shutdown, SIGTERM) puts the VPN set-up back,
``abandon`` (a crash) leaves a kill switch on, and the ``disconnect`` command also removes one that was
kept after an engine died (``blocked`` in the snapshot).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from shallot.core.circuit import ClientCircuit
from shallot.core.circuit import manager as m
from shallot.core.circuit.guards import GuardPolicy
from shallot.core.control.api import (
    FINAL,
    ControlError,
    EngineConfig,
    EngineMode,
    ErrorKind,
    PeersReply,
    RelayEntry,
    StatusSnapshot,
)
from shallot.core.engine.circuits import EngineCircuits, failure
from shallot.core.engine.guards import PersistentGuards, default_state_dir
from shallot.core.engine.setup import EngineSetup
from shallot.core.engine.stats import EngineStats
from shallot.core.vpn import killmark
from shallot.core.vpn.tunnel import Tunnel

log = logging.getLogger("shallot.engine")
T = TypeVar("T")


class ClientEngine:
    def __init__(self, *, own_ids: tuple[bytes, ...] = (), helper_fd: int | None = None,
                 rng: random.Random | None = None, guards: GuardPolicy | None = None) -> None:
        """``guards``: the guard policy; by default the persistent entry guards in the state directory."""
        self.setup = EngineSetup(own_ids=own_ids, helper_fd=helper_fd)
        self.guards = guards or PersistentGuards(default_state_dir() / "guards", rng or random.SystemRandom(),
                                                 known=self.setup.known_s, client_host=self._public_host)
        self.manager = m.CircuitManager(self.guards, never=frozenset(own_ids))
        self.stats = EngineStats()
        self.circuits = EngineCircuits(self.setup, self.stats, current=lambda: self.manager.circuit,
                                       report=self._handle)
        self.listeners: list[Callable[[StatusSnapshot], None]] = []
        self._work: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._poll: asyncio.TimerHandle | None = None  # the traffic watch (manager rule 3)
        self._runners: dict[type, Callable[[Any], None]] = {
            m.Publish: self._publish, m.AcquirePrivileges: self._acquire, m.FetchRelays: self._fetch,
            m.Build: self._build, m.Use: self._use, m.SendPing: lambda a: self.circuits.ping(a.circuit, a.seq),
            m.ProbeGuard: lambda a: self.circuits.probe_link(getattr(a.circuit, "link", None)),
            m.RoundTrip: lambda a: self.stats.round_trip(a.seconds), m.Close: lambda a: self.circuits.close(a.circuit),
            m.Drop: self._drop, m.Teardown: self._teardown,
            m.Backoff: lambda a: log.warning("circuit problem: %s (retrying in %.1f s)", a.reason, a.delay),
            m.GiveUp: lambda a: log.warning("%s", a.reason),  # retrying cannot help: the user must act
            m.KeepCurrent: lambda a: log.warning("could not build a new circuit: %s; keeping the current one",
                                                 a.reason)}

    # ------------------------------------------------------------------ the control API's commands
    def snapshot(self) -> StatusSnapshot:
        s, d, t = self.setup, self.setup.discovery, self.setup.tunnel
        return self.stats.snapshot(
            self.manager, mode=EngineMode.VPN if t is not None else EngineMode.PROBE,
            kill_switch=t is not None and t.kill_switch, directory=str(s.directory) if s.directory else None,
            relays_known=len(d.view) if d else None, dht_peers=len(d.dht_peers) if d else None,
            discovery=d.status() if d else None,
            # public address / NAT type (when classified) and how each link was made (docs/PROTOCOL.md §12)
            nat=self.circuits.client.nat.status() if self.circuits.client is not None else None,
            blocked=not self.manager.trying and killmark.is_marked(), **self._guard_status())

    def _public_host(self) -> str | None:
        """Our public address, once our NAT probe or a STUN answer told it (path rules for introducers)."""
        client = self.circuits.client if hasattr(self, "circuits") else None
        public = client.nat.own.public if client is not None else None
        return public[0] if public is not None else None

    def _guard_status(self) -> dict[str, Any]:
        g = self.guards
        if not isinstance(g, PersistentGuards):
            return {}
        in_use = self.manager.path[0].relay_id if self.manager.path else None
        return {"guards": g.status(in_use), "guard_warning": g.warning}

    def peers(self) -> PeersReply:
        """With discovery, the DHT nodes of the last crawl and the view; else the directory file's relays."""
        if self.setup.discovery is not None:
            return self.setup.discovery.peers()
        relays = self.setup.relays_now() if self.setup.directory else []
        return PeersReply(dht=False, relays=tuple(RelayEntry.of(d, dated=False) for d in relays))

    async def connect(self, exit_spec: str | None = None, path_spec: str | None = None) -> StatusSnapshot:
        if not self.setup.has_relays:
            raise ControlError(ErrorKind.NO_DIRECTORY, "no directory file is set: choose one in the settings")
        tunnel = self.setup.tunnel
        if tunnel is not None:
            tunnel.on_trouble = self._tunnel_trouble
        self._run(self.manager.connect(time.monotonic(), exit_spec=exit_spec, path_spec=path_spec,
                                       need_privileges=tunnel is not None and not tunnel.privileged))
        return self.snapshot()

    async def disconnect(self, *, unblock: bool = True) -> StatusSnapshot:
        """The user's disconnect (``unblock``): also removes a kill switch kept after an engine died, through
        a helper session of its own if need be.  Raises ControlError (a helper's kind) when that fails."""
        await self._stop_work()
        self._run(self.manager.disconnect(time.monotonic()))
        if unblock and killmark.is_marked():
            await self._unblock()
        return self.snapshot()

    async def new_circuit(self) -> StatusSnapshot:
        """Switch to a fresh circuit through other relays; the old one carries traffic until the new one
        is up, so the user sees no gap and no error."""
        self._run(self.manager.new_circuit(time.monotonic()))
        return self.snapshot()

    def configure(self, config: EngineConfig, *, check_directory: bool = True) -> StatusSnapshot:
        """Replace the settings (docs/PROTOCOL.md §9.5).  While the manager is trying, only the settings the
        engine already has are accepted: others would change the circuit's or the system's set-up under it."""
        if config != self.setup.config:
            if self.manager.trying:
                raise ControlError(ErrorKind.BUSY, "the engine is connected: disconnect before changing its settings")
            self.setup.apply(config, check_directory=check_directory)
        return self.snapshot()

    def set_directory(self, path: Path) -> StatusSnapshot:
        """Version 1's way to name the directory file (``configure`` names all settings at once)."""
        self.setup.set_directory(path)
        return self.snapshot()

    async def close(self) -> None:
        """Shutdown, SIGTERM, SIGINT: what this engine set up is put back (a kill switch kept by an engine
        that died earlier is not this engine's to open: that takes a disconnect)."""
        await self.disconnect(unblock=False)
        self.setup.close()
        self.circuits.shutdown()

    async def abandon(self) -> None:
        """The engine crashed: everything stops, and a kill switch in place stays on (with the DNS change)
        until an explicit disconnect, ``shallot connect --cleanup`` or a new engine."""
        await self._stop_work()
        for handle in (self._timer, self._poll):
            if handle is not None:
                handle.cancel()
        self._timer = self._poll = None
        if self.setup.tunnel is not None:
            self.setup.tunnel.abandon()
            self.setup.tunnel = None
        self.setup.close()
        self.circuits.shutdown()

    async def _unblock(self) -> None:
        """Remove a kept kill switch: ``hello`` then ``restore`` in a helper session (or in-process as root).
        May wait for polkit's dialog."""
        tunnel = self.setup.tunnel or Tunnel(kill_switch=True, dns=False)
        try:
            tunnel.forget_helper()
            await asyncio.get_running_loop().run_in_executor(None, tunnel.ensure_ready)
            tunnel.watch()
            tunnel.close()
        except Exception as exc:
            reason, kind = failure(exc)
            raise ControlError(kind if kind in FINAL else ErrorKind.ERROR,
                               f"the kill switch stays on: {reason}") from None
        finally:
            if tunnel is not self.setup.tunnel:
                tunnel.shutdown()
        if killmark.is_marked():
            raise ControlError(ErrorKind.HELPER_FAILED, "the kill switch stays on: the privileged helper did not "
                                                        "remove it (see the log)")
        log.info("the kill switch kept after an engine died is removed")

    # ------------------------------------------------------------------ running the manager
    def _run(self, actions: list[m.Action]) -> None:
        for action in actions:
            self._runners[type(action)](action)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.manager.timer()
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_later(max(0.0, deadline - time.monotonic()),
                                                                self._on_timer)
        if self._poll is None and self.manager.circuit is not None:
            self._poll = asyncio.get_running_loop().call_later(m.ACTIVITY_POLL_S, self._on_poll)

    def _on_poll(self) -> None:
        self._poll = None
        activity = self.circuits.activity(self.manager.circuit)
        if activity is not None:
            self._handle(activity)
    def _on_timer(self) -> None:
        self._timer = None
        self._run(self.manager.handle_timer(time.monotonic()))

    def _handle(self, event: m.Event) -> None:
        self._run(self.manager.handle(event))

    def _tunnel_trouble(self, reason: str, final: bool) -> None:
        """The helper quit (final: its kill switch stays, the session is let go of) or the device went away
        (the circuit is rebuilt, which makes a new device)."""
        if final:
            if self.setup.tunnel is not None:
                self.setup.tunnel.forget_helper()
            self._handle(m.PrivilegesLost(time.monotonic(), reason))
        elif self.manager.circuit is not None:  # our device, not the guard
            self._handle(m.CircuitLost(time.monotonic(), self.manager.circuit, reason, at_guard=False))

    def _start_work(self, token: int, job: Callable[[], Awaitable[T]], done: Callable[[float, T], m.Event]) -> None:
        """The manager's one piece of work; what comes of it, or why it failed, goes back with ``token``.
        ``job`` is started inside the task, so that a task cancelled before its first step leaves nothing."""
        async def run() -> None:
            try:
                result = await job()
            except Exception as exc:
                self._handle(m.Failed(time.monotonic(), token, *failure(exc), at_guard=getattr(exc, "at_guard", True)))
            else:
                self._handle(done(time.monotonic(), result))
        self._work = asyncio.get_running_loop().create_task(run())

    async def _stop_work(self) -> None:
        task, self._work = self._work, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # ------------------------------------------------------------------ the manager's actions
    def _publish(self, action: m.Publish) -> None:
        snap = self.snapshot()
        for listener in list(self.listeners):
            listener(snap)

    def _acquire(self, action: m.AcquirePrivileges) -> None:
        tunnel = self.setup.tunnel
        assert tunnel is not None  # ensure_ready may block while polkit asks the user: in a thread
        tunnel.forget_helper()  # one that quit: a new session (its hello keeps the kill switch it left)

        def acquired(now: float, _: object) -> m.Event:
            tunnel.watch()
            return m.PrivilegesAcquired(now, action.token)

        self._start_work(action.token, lambda: asyncio.get_running_loop().run_in_executor(None, tunnel.ensure_ready),
                         acquired)

    def _fetch(self, action: m.FetchRelays) -> None:
        self._start_work(action.token, self.setup.relays,
                         lambda now, relays: m.RelaysFetched(now, action.token, tuple(relays)))

    def _build(self, action: m.Build) -> None:
        self._start_work(action.token, lambda: self.circuits.open(action.path),
                         lambda now, circ: m.Built(now, action.token, circ))

    def _use(self, action: m.Use) -> None:
        circ = action.circuit
        assert isinstance(circ, ClientCircuit)
        self.stats.circuit_built(circ, action.path[0].relay_id, time.time())
        log.info("circuit built in %.1f ms: %s", self.stats.build_ms, " -> ".join(d.nickname for d in action.path))

    def _drop(self, action: m.Drop) -> None:
        self.circuits.close(action.circuit)
        self.stats.connection_lost()

    def _teardown(self, action: m.Teardown) -> None:
        if self.setup.tunnel is not None:
            self.setup.tunnel.close()  # routes, kill switch and TUN go with an explicit disconnect
