"""The client engine: the data plane (UDP link, crypto, circuits, TUN) on its own asyncio loop, driven only
through the control API (service.py).  ``ClientEngine`` is a thin supervisor: the circuit manager
(core/circuit/manager.py) decides; this module carries its actions out and feeds it what happened, with
the time.  It has no policy of its own.

Every input reaches the manager from the loop, never from inside another: commands from the control
handlers, results at the end of the one work task (privileges, relays, a build), circuit events and
ping answers through ``call_soon`` (they arrive inside CircuitClient's dispatch), and its one timer.
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

from shallot.core.circuit import CircuitClosed, CircuitFailed, ClientCircuit, ConfigReceived
from shallot.core.circuit import manager as m
from shallot.core.circuit.guards import AvoidFailedGuards
from shallot.core.control.api import (
    ControlError,
    EngineConfig,
    EngineMode,
    ErrorKind,
    PeersReply,
    RelayEntry,
    StatusSnapshot,
)
from shallot.core.engine.setup import EngineSetup
from shallot.core.engine.stats import EngineStats
from shallot.core.errors import ShallotError
from shallot.core.io.circuit_client import CircuitClient
from shallot.core.vpn.helper import PrivilegeError
from shallot.crypto.circuit_handshake import SERVICE_ECHO, SERVICE_IP
from shallot.crypto.descriptor import Descriptor

log = logging.getLogger("shallot.engine")
T = TypeVar("T")
BUILD_TIMEOUT_S = 10.0
CONFIG_TRIES, CONFIG_WAIT_S = 3, 1.0  # VPN mode: how often and how long a new circuit asks its exit for CONFIG

# the privileged helper's failures (core/vpn/helper.py PrivilegeError.code) as error kinds; all are final
HELPER_KINDS = {"helper-missing": ErrorKind.HELPER_MISSING, "helper-denied": ErrorKind.HELPER_DENIED,
                "helper-failed": ErrorKind.HELPER_FAILED}


def guard_endpoints(guard: Descriptor) -> list[tuple[str, int]]:
    """Where the link to ``guard`` may send datagrams: its address and, for a guard behind a NAT, its
    introducers (the introduction, and the relayed path when punching fails).  VPN mode routes these
    around the tunnel and lets them through the kill switch."""
    out = [guard.address]
    if guard.reachability is not None:
        out += [addr for _, addr in guard.reachability.introducers if addr not in out]
    return out


def describe(exc: Exception) -> tuple[str, ErrorKind | None]:
    """An exception of the work as the manager's failure: its words and its kind (None: retry)."""
    if isinstance(exc, PrivilegeError):
        return str(exc), HELPER_KINDS.get(exc.code, ErrorKind.HELPER_FAILED)
    if isinstance(exc, ShallotError):  # the expected kind; anything else is logged as a bug
        return str(exc), None
    log.error("unexpected error while keeping the circuit", exc_info=exc)
    return f"internal error: {exc!r}", None


class ClientEngine:
    def __init__(self, *, own_ids: tuple[bytes, ...] = (), helper_fd: int | None = None,
                 rng: random.Random | None = None) -> None:
        self.setup = EngineSetup(own_ids=own_ids, helper_fd=helper_fd)
        self.manager = m.CircuitManager(AvoidFailedGuards(rng or random.SystemRandom()), never=frozenset(own_ids))
        self.stats = EngineStats()
        self.client: CircuitClient | None = None
        self.listeners: list[Callable[[StatusSnapshot], None]] = []
        self._work: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._config_wait: tuple[ClientCircuit, asyncio.Future[bytes]] | None = None  # a build asks for CONFIG
        self._runners: dict[type, Callable[[Any], None]] = {
            m.Publish: self._publish, m.AcquirePrivileges: self._acquire, m.FetchRelays: self._fetch,
            m.Build: self._build, m.Use: self._use, m.SendPing: self._send_ping,
            m.RoundTrip: lambda a: self.stats.round_trip(a.seconds), m.Close: lambda a: self._close(a.circuit),
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
            nat=self.client.nat.status() if self.client is not None else None)

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
        self._run(self.manager.connect(time.monotonic(), exit_spec=exit_spec, path_spec=path_spec,
                                       need_privileges=tunnel is not None and not tunnel.privileged))
        return self.snapshot()

    async def disconnect(self) -> StatusSnapshot:
        await self._stop_work()
        self._run(self.manager.disconnect(time.monotonic()))
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
        await self.disconnect()
        self.setup.close()
        if self.client is not None:
            self.client.close()
            self.client = None

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

    def _on_timer(self) -> None:
        self._timer = None
        self._run(self.manager.handle_timer(time.monotonic()))

    def _handle(self, event: m.Event) -> None:
        self._run(self.manager.handle(event))

    def _soon(self, make: Callable[[float], m.Event]) -> None:
        """From inside CircuitClient's dispatch: the event reaches the manager on the next loop turn."""
        asyncio.get_running_loop().call_soon(lambda: self._handle(make(time.monotonic())))

    def _start_work(self, token: int, job: Awaitable[T], done: Callable[[float, T], m.Event]) -> None:
        """The manager's one piece of work; what comes of it, or why it failed, goes back with ``token``."""
        async def run() -> None:
            try:
                result = await job
            except Exception as exc:
                self._handle(m.Failed(time.monotonic(), token, *describe(exc)))
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
        assert self.setup.tunnel is not None  # may block while polkit asks the user: in a thread
        job = asyncio.get_running_loop().run_in_executor(None, self.setup.tunnel.ensure_ready)
        self._start_work(action.token, job, lambda now, _: m.PrivilegesAcquired(now, action.token))

    def _fetch(self, action: m.FetchRelays) -> None:
        self._start_work(action.token, self.setup.relays(),
                         lambda now, relays: m.RelaysFetched(now, action.token, tuple(relays)))

    def _build(self, action: m.Build) -> None:
        self._start_work(action.token, self._open(action.path), lambda now, circ: m.Built(now, action.token, circ))

    def _use(self, action: m.Use) -> None:
        circ = action.circuit
        assert isinstance(circ, ClientCircuit)
        self.stats.circuit_built(circ, action.path[0].relay_id, time.time())
        log.info("circuit built in %.1f ms: %s", self.stats.build_ms, " -> ".join(d.nickname for d in action.path))

    def _send_ping(self, action: m.SendPing) -> None:
        """Probe mode: an echo through the circuit; VPN mode: a CONFIG request (an IP circuit carries only IP
        packets).  Either keeps the circuit from idling out and measures the round trip."""
        circ = action.circuit
        assert self.client is not None and isinstance(circ, ClientCircuit)
        try:
            if self.setup.tunnel is not None:
                self.client.request_config(circ)
            else:
                payload = m.ping_payload(action.seq)
                self.client.send(circ, payload)
                self.stats.bytes_sent += len(payload)
        except ValueError:
            self._soon(lambda now: m.CircuitLost(now, circ, "the circuit closed"))

    def _close(self, circuit: object) -> None:
        if self.client is not None and isinstance(circuit, ClientCircuit):
            with contextlib.suppress(Exception):
                self.client.close_circuit(circuit)

    def _drop(self, action: m.Drop) -> None:
        self._close(action.circuit)
        self.stats.connection_lost()

    def _teardown(self, action: m.Teardown) -> None:
        if self.setup.tunnel is not None:
            self.setup.tunnel.close()  # routes, kill switch and TUN go with an explicit disconnect

    # ------------------------------------------------------------------ circuits
    async def _open(self, path: tuple[Descriptor, ...]) -> ClientCircuit:
        """Build a circuit through ``path``; in VPN mode also its tunnel (routes and kill switch let the
        guard out first, the exit's CONFIG then points the TUN at the new circuit)."""
        client = self.client
        if client is None:
            client = self.client = CircuitClient()
            await client.start(path[0].address[0])
            client.on_event = self._on_event
            client.on_datagram = self._on_datagram
        tunnel = self.setup.tunnel
        if tunnel is not None:
            tunnel.prepare(guard_endpoints(path[0]))
        circ = await client.build(list(path), timeout=BUILD_TIMEOUT_S,
                                  service=SERVICE_IP if tunnel is not None else SERVICE_ECHO)
        if tunnel is not None:
            try:
                tunnel.configure(await self._ask_config(circ), guard_endpoints(path[0]), client.sink(circ))
            except BaseException:
                client.close_circuit(circ)
                raise
        return circ

    async def _ask_config(self, circ: ClientCircuit) -> bytes:
        assert self.client is not None
        for _ in range(CONFIG_TRIES):
            answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            self._config_wait = (circ, answer)
            self.client.request_config(circ)
            try:
                return await asyncio.wait_for(answer, CONFIG_WAIT_S)
            except TimeoutError:
                continue
            finally:
                self._config_wait = None
        raise ShallotError("the exit did not give us a tunnel address (is it running with --ip?)")

    def _on_event(self, event: Any) -> None:
        if isinstance(event, ConfigReceived):
            waiting = self._config_wait
            if waiting is not None and event.circuit is waiting[0] and not waiting[1].done():
                waiting[1].set_result(event.data)
            elif event.circuit is self.manager.circuit and waiting is None:  # a late one must not undo a switch
                asyncio.get_running_loop().call_soon(self._config_answer, event.circuit, event.data)
        elif isinstance(event, CircuitClosed | CircuitFailed):
            self._soon(lambda now: m.CircuitLost(now, event.circuit, event.reason))  # the manager knows if it counts

    def _on_datagram(self, circ: ClientCircuit, data: bytes) -> None:
        tunnel = self.setup.tunnel
        if tunnel is not None:
            tunnel.deliver(circ, data)
        elif circ is self.manager.circuit:  # probe mode: the echo of a ping
            self.stats.bytes_received += len(data)
            self._soon(lambda now: m.PingAnswered(now, data))

    def _config_answer(self, circ: ClientCircuit, data: bytes) -> None:
        """VPN mode: the exit answered a ping with CONFIG; the tunnel follows it (its address may change)."""
        tunnel, path = self.setup.tunnel, self.manager.path
        if tunnel is None or self.client is None or circ is not self.manager.circuit:
            return
        try:
            tunnel.configure(data, guard_endpoints(path[0]), self.client.sink(circ))
        except Exception as exc:
            self._handle(m.CircuitLost(time.monotonic(), circ, *describe(exc)))
        else:
            self._handle(m.PingAnswered(time.monotonic()))
