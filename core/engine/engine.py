"""The client engine: owns the data plane (UDP link, crypto, circuits) on its own plain asyncio/uvloop
loop, and is driven only through the control API (core/control/).  ``shallot engine`` runs it in
its own process; the CLI and the desktop app attach to it.

Commands (docs/PROTOCOL.md §9.5; typed in core/control/api.py): status, connect {exit?, path?}, disconnect,
new_circuit, configure {EngineConfig}, set_directory {path}, peers, shutdown.  Events: "state" with the
same snapshot ``status`` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from pathlib import Path
from typing import Any

from shallot.core.circuit import CircuitClosed, CircuitFailed, ClientCircuit, ConfigReceived
from shallot.core.circuit.path import choose_path
from shallot.core.control import ControlServer
from shallot.core.control.api import (
    ROLES,
    Configure,
    Connect,
    ControlError,
    Disconnect,
    EngineConfig,
    EngineMode,
    EngineState,
    ErrorKind,
    HopStatus,
    NewCircuit,
    Peers,
    PeersReply,
    RelayEntry,
    Role,
    SetDirectory,
    Shutdown,
    Status,
    StatusSnapshot,
)
from shallot.core.discovery.cache import default_cache_path
from shallot.core.discovery.directory import load_directory
from shallot.core.discovery.service import VIEW_REFRESH_S, ClientDiscovery, parse_seeds
from shallot.core.errors import ShallotError
from shallot.core.io.circuit_client import CircuitClient
from shallot.core.vpn.helper import PrivilegeError
from shallot.core.vpn.tunnel import Tunnel
from shallot.crypto.circuit_handshake import SERVICE_ECHO, SERVICE_IP
from shallot.crypto.descriptor import Descriptor

log = logging.getLogger("shallot.engine")
PING_INTERVAL_S = 5.0
PING_TIMEOUT_S = 3.0
MAX_MISSED_PINGS = 3
RECONNECT_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BUILD_TIMEOUT_S = 10.0


def guard_endpoints(guard: Descriptor) -> list[tuple[str, int]]:
    """Where the link to ``guard`` may send datagrams: its address and, for a guard behind a NAT, its
    introducers (the introduction, and the relayed path when punching fails).  VPN mode routes these
    around the tunnel and lets them through the kill switch."""
    out = [guard.address]
    if guard.reachability is not None:
        out += [addr for _, addr in guard.reachability.introducers if addr not in out]
    return out


# the privileged helper's failures (core/vpn/helper.py PrivilegeError.code), as error kinds
HELPER_KINDS = {"helper-missing": ErrorKind.HELPER_MISSING, "helper-denied": ErrorKind.HELPER_DENIED,
                "helper-failed": ErrorKind.HELPER_FAILED}


class ClientEngine:
    def __init__(self, *, own_ids: tuple[bytes, ...] = (), helper_fd: int | None = None) -> None:
        """``own_ids``: this machine's relay, never in our circuits.  ``helper_fd``: a socket to a privileged
        helper that is already running (``--helper-fd``), for the first VPN tunnel.  The settings come with
        ``configure``: a directory file or DHT bootstrap peers, and VPN mode (a Tunnel: IP circuits through
        a TUN device) or probe mode (an echo circuit, no system routes)."""
        self.config = EngineConfig()
        self.tunnel: Tunnel | None = None
        self.discovery: ClientDiscovery | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._helper_fd = helper_fd
        self._own_ids = own_ids
        self._configs: asyncio.Queue[bytes] = asyncio.Queue()
        self.directory_path: Path | None = None
        self.state = EngineState.DISCONNECTED
        self.step = ""
        self.error = ""
        self.circuit: ClientCircuit | None = None
        self.path: list[Descriptor] = []
        self.build_ms: float | None = None
        self.rtt_ms: float | None = None
        self.guard_rtt_ms: dict[bytes, float] = {}  # guard id -> its last link handshake round trip
        self.connected_since: float | None = None
        self.circuit_since: float | None = None
        self.circuits_built = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.exit_choice: str | None = None
        self.avoid: set[bytes] = set()
        self.client: CircuitClient | None = None
        self.listeners: list[Any] = []
        self._supervisor: asyncio.Task[None] | None = None
        self._want_connected = False
        self._circuit_dead = asyncio.Event()
        self._wake = asyncio.Event()
        self._rotate = False
        self._path_spec: str | None = None
        self.error_kind: ErrorKind | None = None  # what kind of error `error` is, for final errors
        self._view_ready = asyncio.Event()
        self.avoid_always: set[bytes] = set(own_ids)  # this machine's own relay: never in our circuits
        self._rng = random.SystemRandom()

    # ------------------------------------------------------------------ public API
    def snapshot(self) -> StatusSnapshot:
        return StatusSnapshot(
            state=self.state, step=self.step, error=self.error, error_kind=self.error_kind,
            mode=EngineMode.VPN if self.tunnel is not None else EngineMode.PROBE,
            trying=self._want_connected,  # false after disconnect and after a final error: nothing retries
            kill_switch=self.tunnel is not None and self.tunnel.kill_switch,
            directory=str(self.directory_path) if self.directory_path else None,
            exit=self.exit_choice,
            circuit=tuple(HopStatus(role, d.id_hex, d.nickname, f"{d.address[0]}:{d.address[1]}", d.is_exit,
                                    self._hop_rtt_ms(i)) for i, (role, d) in enumerate(zip(ROLES, self.path)))
            if self.state is EngineState.CONNECTED else (),
            build_ms=self.build_ms, rtt_ms=self.rtt_ms,
            connected_since=self.connected_since,  # kept across circuit switches
            circuit_since=self.circuit_since,  # when the current circuit was built
            circuits_built=self.circuits_built, bytes_sent=self.bytes_sent, bytes_received=self.bytes_received,
            relays_known=len(self.discovery.view) if self.discovery else None,
            dht_peers=len(self.discovery.dht_peers) if self.discovery else None,
            discovery=self.discovery.status() if self.discovery else None,
            # public address / NAT type (when classified) and how each link was made (docs/PROTOCOL.md §12)
            nat=self.client.nat.status() if self.client is not None else None)

    def peers(self) -> PeersReply:
        """With discovery, the DHT nodes of the last crawl and the view; else the directory file's relays."""
        if self.discovery is not None:
            return self.discovery.peers()
        relays = self._relays() if self.directory_path else []
        return PeersReply(dht=False, relays=tuple(RelayEntry.of(d, dated=False) for d in relays))

    def _hop_rtt_ms(self, hop: int) -> float | None:
        """Round trip from us to this hop, where one is measured: the guard's link handshake (one datagram
        each way, timed when the link was opened) and the exit's echo through the whole circuit.  The
        middle answers nothing we could time without a link of our own to it, which would show it who we
        are, so it has none."""
        if hop == 0 and self.path:
            return self.guard_rtt_ms.get(self.path[0].relay_id)
        if hop == len(self.path) - 1:
            return self.rtt_ms
        return None

    async def connect(self, exit_spec: str | None = None, path_spec: str | None = None) -> StatusSnapshot:
        if self.directory_path is None and self.discovery is None:
            raise ControlError(ErrorKind.NO_DIRECTORY, "no directory file is set: choose one in the settings")
        self.exit_choice = exit_spec
        self._path_spec = path_spec
        self._want_connected = True
        self.avoid.clear()
        self._rotate = False
        if self._supervisor is None or self._supervisor.done():
            self._supervisor = asyncio.create_task(self._supervise())
        return self.snapshot()

    async def disconnect(self) -> StatusSnapshot:
        self._want_connected = False
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._supervisor
            self._supervisor = None
        self._drop_circuit()
        if self.tunnel is not None:
            self.tunnel.close()  # routes, kill switch and TUN go with an explicit disconnect
        self._set(EngineState.DISCONNECTED, "", "")
        return self.snapshot()

    async def new_circuit(self) -> StatusSnapshot:
        """Switch to a fresh circuit through other relays; the old one carries traffic until the new
        one is up, so the user sees no gap and no error."""
        if not self._want_connected:
            raise ControlError(ErrorKind.NOT_CONNECTED, "not connected")
        self._rotate = True
        self._wake.set()
        return self.snapshot()

    def set_directory(self, path: Path) -> StatusSnapshot:
        """Version 1's way to name the directory file (``configure`` names all settings at once)."""
        load_directory(path)  # validate now so the user gets the error at once
        self.directory_path = path
        self.config = self.config.replace(directory=str(path))
        return self.snapshot()

    def configure(self, config: EngineConfig, *, check_directory: bool = True) -> StatusSnapshot:
        """Replace the settings (docs/PROTOCOL.md §9.5 ``configure``).  While the engine is trying (connecting,
        connected, retrying) only the settings it already has are accepted: the others would change the
        circuit's or the system's set-up under it, so the answer is BUSY and the user disconnects first.
        Everything is checked before anything changes.  ``check_directory``: load the directory file now
        (the CLI's flags leave that to the first connect, as they always did)."""
        if config == self.config:
            return self.snapshot()
        if self._want_connected:
            raise ControlError(ErrorKind.BUSY, "the engine is connected: disconnect before changing its settings")
        if config.directory and config.bootstrap:
            raise ControlError(ErrorKind.BAD_CONFIG, "give a directory file or bootstrap peers, not both")
        try:
            seeds = [seed for text in config.bootstrap for seed in parse_seeds(text)]
        except ShallotError as exc:
            raise ControlError(ErrorKind.BAD_CONFIG, str(exc)) from None
        if config.directory and check_directory:
            try:
                load_directory(Path(config.directory))
            except ShallotError as exc:
                raise ControlError(ErrorKind.BAD_DIRECTORY, str(exc)) from None
        old, self.config = self.config, config
        self.directory_path = Path(config.directory) if config.directory else None
        if (config.bootstrap, config.cache) != (old.bootstrap, old.cache):
            self._stop_discovery()
            if seeds:
                self._start_discovery(seeds, Path(config.cache) if config.cache else default_cache_path())
        if (config.vpn, config.kill_switch) != (old.vpn, old.kill_switch) or (config.vpn and self.tunnel is None):
            self._drop_tunnel()
            if config.vpn:
                self.tunnel = Tunnel(kill_switch=config.kill_switch, dns=config.dns, helper_fd=self._helper_fd)
                self._helper_fd = None
        if self.tunnel is not None:
            self.tunnel.dns = config.dns  # read at each CONFIG answer: no new helper session needed
        return self.snapshot()

    def _start_discovery(self, seeds: list[tuple[str, int]], cache: Path) -> None:
        self.discovery = ClientDiscovery(seeds, cache, self_ids=self._own_ids)
        self.discovery.load_cache()
        self._view_ready = asyncio.Event()
        self._refresher = asyncio.get_running_loop().create_task(self.run_discovery())

    def _stop_discovery(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        if self.discovery is not None:
            self.discovery.close()
            self.discovery = None

    def _drop_tunnel(self) -> None:
        """VPN mode off, or a new kill-switch setting (the helper session is made for one): the old tunnel
        puts everything back and ends its helper session; a --helper-fd it never used goes to the next."""
        if self.tunnel is not None:
            if self.tunnel.helper_fd is not None:
                self._helper_fd = self.tunnel.helper_fd
            self.tunnel.shutdown()
            self.tunnel = None

    async def close(self) -> None:
        await self.disconnect()
        self._drop_tunnel()
        self._stop_discovery()
        if self.client is not None:
            self.client.close()
            self.client = None

    # ------------------------------------------------------------------ supervision
    def _set(self, state: EngineState, step: str = "", error: str = "", kind: ErrorKind | None = None) -> None:
        self.state, self.step, self.error = state, step, error
        self.error_kind = kind if error else None
        snap = self.snapshot()
        for listener in list(self.listeners):
            listener(snap)

    def _drop_circuit(self) -> None:
        if self.circuit is not None and self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close_circuit(self.circuit)
        self.circuit = None
        self.path = []
        self.connected_since = self.circuit_since = None

    async def _supervise(self) -> None:
        attempt = 0
        while self._want_connected:
            try:
                if self.circuit is None:
                    await self._build(reconnect=attempt > 0)
                    attempt = 0
                elif self._rotate:
                    await self._switch_circuit()
                await self._keep_alive()
            except PrivilegeError as exc:  # retrying cannot help: the user must act
                log.warning("%s", exc)
                self._want_connected = False
                self._drop_circuit()
                self._set(EngineState.ERROR, "", str(exc), HELPER_KINDS.get(exc.code, ErrorKind.HELPER_FAILED))
                return
            except Exception as exc:  # ShallotError is the expected kind; anything else is logged as a bug
                if not self._want_connected:
                    return
                if not isinstance(exc, ShallotError):
                    log.exception("unexpected error while keeping the circuit")
                    exc = ShallotError(f"internal error: {exc!r}")
                if self.path:  # the next circuit avoids the guard of the one that died (most failures are there)
                    self.avoid.add(self.path[0].relay_id)
                self._drop_circuit()
                delay = RECONNECT_BACKOFF_S[min(attempt, len(RECONNECT_BACKOFF_S) - 1)]
                attempt += 1
                log.warning("circuit problem: %s (retrying in %.1f s)", exc, delay)
                self._set(EngineState.ERROR if attempt >= 3 else EngineState.RECONNECTING,
                          f"retrying in {delay:g} s", str(exc))
                await asyncio.sleep(delay)

    async def run_discovery(self) -> None:
        """Keep the DHT view fresh: crawl now (the cache already gave a view to start from), then every
        VIEW_REFRESH_S.  A failed crawl keeps the last good view."""
        assert self.discovery is not None
        while True:
            try:
                await self.discovery.refresh()
            except Exception:
                log.exception("network view refresh failed; keeping the last good view")
            self._view_ready.set()
            await asyncio.sleep(VIEW_REFRESH_S)

    def _relays(self) -> list[Descriptor]:
        if self.directory_path is not None:
            return load_directory(self.directory_path)
        assert self.discovery is not None
        relays = self.discovery.relays()
        if not relays:
            raise ShallotError("no relay known yet: the DHT seeds did not answer and there is no cached view")
        return relays

    async def _new_path(self, avoid: set[bytes]) -> list[Descriptor]:
        if self.discovery is not None and not self.discovery.relays():
            with contextlib.suppress(TimeoutError):  # the first crawl is under way: give it its time
                await asyncio.wait_for(self._view_ready.wait(), 15.0)
        relays = [d for d in self._relays() if d.relay_id not in self.avoid_always]
        usable = [d for d in relays if d.relay_id not in avoid]
        try:
            return choose_path(usable, self._rng, path_spec=self._path_spec, exit_spec=self.exit_choice)
        except ShallotError:
            if not avoid:
                raise
            return choose_path(relays, self._rng, path_spec=self._path_spec, exit_spec=self.exit_choice)

    async def _open(self, path: list[Descriptor]) -> ClientCircuit:
        if self.client is None:
            self.client = CircuitClient()
            await self.client.start(path[0].address[0])
            self.client.on_event = self._on_event
        # VPN mode may have been switched by ``configure`` since the client was made
        self.client.on_datagram = self.tunnel.deliver if self.tunnel is not None else None
        if self.tunnel is not None:
            self.tunnel.client = self.client
            self.tunnel.prepare(guard_endpoints(path[0]))
        service = SERVICE_IP if self.tunnel is not None else SERVICE_ECHO
        circ = await self.client.build(path, timeout=BUILD_TIMEOUT_S, service=service)
        if self.tunnel is not None:
            try:
                await self._configure_tunnel(circ, path)
            except ShallotError:
                self.client.close_circuit(circ)
                raise
        return circ

    async def _ask_config(self, circ: ClientCircuit, timeout: float) -> bytes | None:
        assert self.client is not None and self.client.endpoint is not None
        while not self._configs.empty():
            self._configs.get_nowait()
        self.client.node.request_config(circ, time.monotonic())
        self.client.endpoint.poke()
        try:
            return await asyncio.wait_for(self._configs.get(), timeout)
        except TimeoutError:
            return None

    async def _configure_tunnel(self, circ: ClientCircuit, path: list[Descriptor]) -> None:
        for _ in range(3):
            data = await self._ask_config(circ, 1.0)
            if data is not None:
                self.tunnel.configure(data, guard_endpoints(path[0]), circ)
                return
        raise ShallotError("the exit did not give us a tunnel address (is it running with --ip?)")

    def _adopt(self, circ: ClientCircuit, path: list[Descriptor]) -> None:
        self.circuit, self.path = circ, path
        self.build_ms = round(circ.build_s * 1000, 3)
        if circ.create_sent_at > circ.started_at:  # a fresh guard link: the CREATE waited for its handshake
            self.guard_rtt_ms[path[0].relay_id] = round((circ.create_sent_at - circ.started_at) * 1000, 3)
        self.connected_since = self.connected_since or time.time()
        self.circuit_since = time.time()
        self.circuits_built += 1
        self._circuit_dead.clear()
        self._set(EngineState.CONNECTED, "", "")
        log.info("circuit built in %.1f ms: %s", self.build_ms, " -> ".join(d.nickname for d in path))

    async def _build(self, *, reconnect: bool) -> None:
        state = EngineState.RECONNECTING if reconnect else EngineState.CONNECTING
        if self.tunnel is not None and not self.tunnel.privileged:
            self._set(state, "asking for permission to configure the network")
            await asyncio.get_running_loop().run_in_executor(None, self.tunnel.ensure_ready)
        self._set(state, "choosing a path")
        path = await self._new_path(self.avoid)
        self._set(self.state, f"building a circuit through {path[0].nickname}, {path[1].nickname}, "
                              f"{path[2].nickname}")
        try:
            circ = await self._open(path)
        except ShallotError:
            self.avoid.add(path[0].relay_id)  # most build failures are the guard's link; try another
            raise
        self._adopt(circ, path)

    async def _switch_circuit(self) -> None:
        self._rotate = False
        old = self.circuit
        self._set(EngineState.CONNECTED, "building a new circuit")
        try:
            path = await self._new_path({d.relay_id for d in self.path})
            circ = await self._open(path)
        except ShallotError as exc:
            log.warning("could not build a new circuit: %s; keeping the current one", exc)
            self._set(EngineState.CONNECTED, "", f"could not build a new circuit: {exc}")
            return
        self._adopt(circ, path)
        if old is not None and self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close_circuit(old)

    async def _keep_alive(self) -> None:
        """Ping through the circuit: keeps it from idling out and measures the round trip.  Returns when
        a new circuit is requested; raises ShallotError when the circuit dies."""
        assert self.client is not None and self.circuit is not None
        missed = 0
        seq = 0
        circ = self.circuit
        tunnel = self.tunnel is not None
        inbox = self._configs if tunnel else self.client.inbox[circ.circuit_id]
        while not self._rotate:
            seq += 1
            payload = b"shallot-ping" + seq.to_bytes(8, "big")
            sent_at = time.monotonic()
            try:
                if tunnel:  # an IP circuit carries only IP packets: its ping is a CONFIG request
                    self.client.node.request_config(circ, time.monotonic())
                    assert self.client.endpoint is not None
                    self.client.endpoint.poke()
                else:
                    self.client.send(circ, payload)
                    self.bytes_sent += len(payload)
            except ValueError:
                raise ShallotError(self.error or "the circuit closed") from None
            got = False
            deadline = sent_at + PING_TIMEOUT_S
            dead = asyncio.ensure_future(self._circuit_dead.wait())
            try:
                while time.monotonic() < deadline:
                    getter = asyncio.ensure_future(inbox.get())
                    done, _ = await asyncio.wait({getter, dead}, timeout=deadline - time.monotonic(),
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if getter not in done:
                        getter.cancel()
                    if dead in done:
                        raise ShallotError(self.error or "the circuit closed")
                    if getter in done:
                        data = getter.result()
                        if tunnel:
                            self.tunnel.configure(data, guard_endpoints(self.path[0]), circ)
                            data = payload
                        else:
                            self.bytes_received += len(data)
                        if data == payload:
                            got = True
                            self.rtt_ms = round((time.monotonic() - sent_at) * 1000, 3)
                            break
            finally:
                dead.cancel()
            missed = 0 if got else missed + 1
            if missed >= MAX_MISSED_PINGS:
                raise ShallotError("the circuit stopped answering")
            if self.error and got:
                self._set(EngineState.CONNECTED, "", "")
            else:
                self._set(EngineState.CONNECTED, self.step)
            self._wake.clear()
            waiters = {asyncio.ensure_future(self._circuit_dead.wait()), asyncio.ensure_future(self._wake.wait())}
            try:
                await asyncio.wait(waiters, timeout=PING_INTERVAL_S, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
            if self._circuit_dead.is_set():
                raise ShallotError(self.error or "the circuit closed")

    def _on_event(self, event: Any) -> None:
        if isinstance(event, ConfigReceived):
            self._configs.put_nowait(event.data)
            return
        if isinstance(event, CircuitClosed | CircuitFailed) and event.circuit is self.circuit \
                and self.circuit is not None:
            self.error = event.reason
            self._circuit_dead.set()


async def run_engine(socket_path: Path, config: EngineConfig, *, own_ids: tuple[bytes, ...] = (),
                     helper_fd: int | None = None, autoconnect: bool = False, path: str | None = None,
                     exit_spec: str | None = None) -> None:
    """Serve the control API on ``socket_path`` until shutdown, SIGTERM or SIGINT.  ``config`` comes from the
    command line; ``configure`` replaces it."""
    engine = ClientEngine(own_ids=own_ids, helper_fd=helper_fd)
    engine.configure(config, check_directory=False)  # a bad seed fails here, before the socket opens
    stop = asyncio.Event()

    async def shutdown(request: Shutdown) -> None:
        stop.set()

    server = ControlServer(socket_path, Role.CLIENT, {
        Status: lambda r: engine.snapshot(),
        Connect: lambda r: engine.connect(exit_spec=r.exit, path_spec=r.path),
        Disconnect: lambda r: engine.disconnect(),
        NewCircuit: lambda r: engine.new_circuit(),
        Configure: lambda r: engine.configure(r.config),
        SetDirectory: lambda r: engine.set_directory(Path(r.path)),
        Peers: lambda r: engine.peers(),
        Shutdown: shutdown,
    })
    last_state: list[EngineState | None] = [None]

    def say(snap: StatusSnapshot) -> None:  # one line per state change, for people and scripts
        if snap.state is not last_state[0]:
            last_state[0] = snap.state
            hops = " -> ".join(h.nickname for h in snap.circuit)
            detail = hops or snap.error or snap.step
            print(f"shallot: {snap.state.value}{': ' + detail if detail else ''}", flush=True)

    try:
        await server.start()
    except BaseException:
        await engine.close()  # the discovery the settings started; the socket path is not ours to remove
        raise
    engine.listeners += [lambda snap: server.publish("state", snap), say]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"shallot engine listening on {socket_path}", flush=True)
    try:
        if autoconnect:
            await engine.connect(exit_spec=exit_spec, path_spec=path)
        await stop.wait()
    finally:
        await engine.close()
        await server.close()
