"""The client engine: owns the data plane (UDP link, crypto, circuits) on its own plain asyncio/uvloop
loop, and is driven only through the control API (core/control/).  ``shallot engine`` runs it in
its own process; the CLI and the desktop app attach to it.

Commands (docs/PROTOCOL.md §9): status, connect {exit?, path?}, disconnect, new_circuit,
set_directory {path}, shutdown.  Events: "state" with the same snapshot ``status`` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import signal
import time
from pathlib import Path
from typing import Any

from shallot.core.circuit import CircuitClosed, CircuitFailed, ClientCircuit, ConfigReceived
from shallot.core.circuit.path import choose_path
from shallot.core.control import ControlError, ControlServer
from shallot.core.discovery.directory import load_directory
from shallot.core.discovery.service import VIEW_REFRESH_S, ClientDiscovery
from shallot.core.errors import ShallotError
from shallot.core.io.circuit_client import CircuitClient
from shallot.core.vpn.helper_client import PrivilegeError
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


class EngineState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    ERROR = "error"


class ClientEngine:
    def __init__(self, directory: Path | None = None, *, tunnel: Any = None,
                 discovery: ClientDiscovery | None = None) -> None:
        """``tunnel``: a core.connect.Tunnel for VPN mode (IP circuits through a TUN device); without it
        the engine keeps an echo circuit (probe mode: no system routes).  ``discovery``: relays come from
        the DHT view (refreshed by ``run_discovery``) instead of a directory file."""
        self.tunnel = tunnel
        self.discovery = discovery
        self._configs: asyncio.Queue[bytes] = asyncio.Queue()
        self.directory_path = directory
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
        self.error_code = ""  # machine-readable kind of `error` for the GUI: helper-missing, helper-denied, ...
        self._view_ready = asyncio.Event()
        self.avoid_always: set[bytes] = set()  # this machine's own relay: never in our circuits
        self._rng = random.SystemRandom()

    # ------------------------------------------------------------------ public API
    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state.value, "step": self.step, "error": self.error, "error_code": self.error_code,
            "mode": "vpn" if self.tunnel is not None else "probe",
            "trying": self._want_connected,  # false after disconnect and after a final error: nothing retries
            "kill_switch": bool(self.tunnel is not None and self.tunnel.kill_switch),
            "directory": str(self.directory_path) if self.directory_path else None,
            "exit": self.exit_choice,
            "circuit": [{"id": d.id_hex, "nickname": d.nickname, "address": f"{d.address[0]}:{d.address[1]}",
                         "exit": d.is_exit, "rtt_ms": self._hop_rtt_ms(i)} for i, d in enumerate(self.path)]
            if self.state is EngineState.CONNECTED else [],
            "build_ms": self.build_ms, "rtt_ms": self.rtt_ms,
            "connected_since": self.connected_since,  # kept across circuit switches
            "circuit_since": self.circuit_since,  # when the current circuit was built
            "circuits_built": self.circuits_built,
            "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
            "relays_known": len(self.discovery.view) if self.discovery else None,
            "dht_peers": len(self.discovery.dht_peers) if self.discovery else None,
            "discovery": self.discovery.status() if self.discovery else None,
            # public address / NAT type (when classified) and how each link was made (docs/PROTOCOL.md §12)
            "nat": self.client.nat.status() if self.client is not None else None,
        }

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

    async def connect(self, exit_spec: str | None = None, path_spec: str | None = None) -> dict[str, Any]:
        if self.directory_path is None and self.discovery is None:
            raise ControlError("no-directory", "no directory file is set: choose one in the settings")
        self.exit_choice = exit_spec
        self._path_spec = path_spec
        self._want_connected = True
        self.avoid.clear()
        self._rotate = False
        if self._supervisor is None or self._supervisor.done():
            self._supervisor = asyncio.create_task(self._supervise())
        return self.snapshot()

    async def disconnect(self) -> dict[str, Any]:
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

    async def new_circuit(self) -> dict[str, Any]:
        """Switch to a fresh circuit through other relays; the old one carries traffic until the new
        one is up, so the user sees no gap and no error."""
        if not self._want_connected:
            raise ControlError("not-connected", "not connected")
        self._rotate = True
        self._wake.set()
        return self.snapshot()

    def set_directory(self, path: Path) -> None:
        load_directory(path)  # validate now so the user gets the error at once
        self.directory_path = path

    async def close(self) -> None:
        await self.disconnect()
        if self.tunnel is not None:
            self.tunnel.shutdown()
        if self.client is not None:
            self.client.close()
            self.client = None

    # ------------------------------------------------------------------ supervision
    def _set(self, state: EngineState, step: str = "", error: str = "", code: str = "") -> None:
        self.state, self.step, self.error = state, step, error
        self.error_code = code if error else ""
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
                self._set(EngineState.ERROR, "", str(exc), exc.code)
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
            if self.tunnel is not None:
                self.client.on_datagram = self.tunnel.deliver
                self.tunnel.client = self.client
        if self.tunnel is not None:
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


async def run_engine(socket_path: Path, *, directory: Path | None = None, tunnel: Any = None,
                     autoconnect: bool = False, path: str | None = None, exit_spec: str | None = None,
                     seeds: list[tuple[str, int]] | None = None, cache: Path | None = None,
                     own_ids: tuple[bytes, ...] = ()) -> None:
    discovery = None
    if seeds:
        from shallot.core.discovery.cache import default_cache_path
        discovery = ClientDiscovery(seeds, cache or default_cache_path(), self_ids=own_ids)
        discovery.load_cache()
    engine = ClientEngine(directory, tunnel=tunnel, discovery=discovery)
    engine.avoid_always = set(own_ids)
    stop = asyncio.Event()

    async def status(args: dict[str, Any]) -> dict[str, Any]:
        return engine.snapshot()

    async def connect(args: dict[str, Any]) -> dict[str, Any]:
        return await engine.connect(exit_spec=args.get("exit") or None, path_spec=args.get("path") or None)

    async def disconnect(args: dict[str, Any]) -> dict[str, Any]:
        return await engine.disconnect()

    async def new_circuit(args: dict[str, Any]) -> dict[str, Any]:
        return await engine.new_circuit()

    async def set_directory(args: dict[str, Any]) -> dict[str, Any]:
        path = args.get("path")
        if not isinstance(path, str) or not path:
            raise ControlError("bad-request", "set_directory needs a 'path'")
        engine.set_directory(Path(path))
        return engine.snapshot()

    async def peers(args: dict[str, Any]) -> dict[str, Any]:
        if engine.discovery is None:
            return {"dht_peers": [], "relays": [{"id": d.id_hex, "nickname": d.nickname, "exit": d.is_exit,
                                                 "address": f"{d.address[0]}:{d.address[1]}"}
                                                for d in engine._relays()] if engine.directory_path else [],
                    "dht": False}
        return {**engine.discovery.peers(), "dht": True}

    async def shutdown(args: dict[str, Any]) -> None:
        stop.set()

    server = ControlServer(socket_path, "client", {
        "status": status, "connect": connect, "disconnect": disconnect, "new_circuit": new_circuit,
        "set_directory": set_directory, "peers": peers, "shutdown": shutdown})
    engine.listeners.append(lambda snap: server.publish("state", snap))
    last_state: list[str] = [""]

    def say(snap: dict[str, Any]) -> None:  # one line per state change, for people and scripts
        if snap["state"] != last_state[0]:
            last_state[0] = snap["state"]
            hops = " -> ".join(h["nickname"] for h in snap["circuit"])
            detail = hops or snap["error"] or snap["step"]
            print(f"shallot: {snap['state']}{': ' + detail if detail else ''}", flush=True)

    engine.listeners.append(say)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"shallot engine listening on {socket_path}", flush=True)
    refresher = asyncio.create_task(engine.run_discovery()) if discovery is not None else None
    if autoconnect:
        await engine.connect(exit_spec=exit_spec, path_spec=path)
    try:
        await stop.wait()
    finally:
        if refresher is not None:
            refresher.cancel()
        await engine.close()
        if discovery is not None:
            discovery.close()
        await server.close()
