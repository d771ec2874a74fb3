"""The engine's circuits on the wire (asyncio): one CircuitClient, made at the first build on the guard's
address family; builds, with the tunnel's part in VPN mode (the guard is let out and routed around the
tunnel first, then the exit's CONFIG points the TUN at the new circuit); pings; and what becomes of the
circuits, reported to the circuit manager as events.

Which circuit counts is the manager's call (``current``): its echoes and CONFIG answers are ping
answers, and a closing circuit is reported whichever it is (the manager ignores those it does not hold).
Events come out of CircuitClient's dispatch, so they are reported on the next turn of the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from shallot.core.circuit import CircuitClosed, CircuitFailed, ClientCircuit, ConfigReceived
from shallot.core.circuit import manager as m
from shallot.core.control.api import ErrorKind
from shallot.core.engine.setup import EngineSetup
from shallot.core.engine.stats import EngineStats
from shallot.core.errors import ShallotError
from shallot.core.io.circuit_client import CircuitClient
from shallot.core.link import LinkState
from shallot.core.vpn.helper_client import PrivilegeError
from shallot.crypto.circuit_handshake import SERVICE_ECHO, SERVICE_IP
from shallot.crypto.descriptor import Descriptor

log = logging.getLogger("shallot.engine")
BUILD_TIMEOUT_S = 10.0
CONFIG_TRIES, CONFIG_WAIT_S = 3, 1.0  # VPN mode: how often and how long a new circuit asks its exit for CONFIG


# the privileged helper's failures (core/vpn/helper_client.py PrivilegeError.code) as error kinds; all are final
HELPER_KINDS = {"helper-missing": ErrorKind.HELPER_MISSING, "helper-denied": ErrorKind.HELPER_DENIED,
                "helper-failed": ErrorKind.HELPER_FAILED}


def failure(exc: Exception) -> tuple[str, ErrorKind | None]:
    """An exception of the engine's work as the manager sees a failure: its words and its kind (None: retry)."""
    if isinstance(exc, PrivilegeError):
        return str(exc), HELPER_KINDS.get(exc.code, ErrorKind.HELPER_FAILED)
    if isinstance(exc, ShallotError):  # the expected kind; anything else is logged as a bug
        return str(exc), None
    log.error("unexpected error while keeping the circuit", exc_info=exc)
    return f"internal error: {exc!r}", None


class BuildFailed(ShallotError):
    """A build that failed, and whether its guard answered while it was tried (``at_guard``: it did not)."""

    def __init__(self, reason: str, *, at_guard: bool) -> None:
        super().__init__(reason)
        self.at_guard = at_guard


def guard_endpoints(guard: Descriptor) -> list[tuple[str, int]]:
    """Where the link to ``guard`` may send datagrams: its address and, for a guard behind a NAT, its
    introducers (the introduction, and the relayed path when punching fails).  VPN mode routes these
    around the tunnel and lets them through the kill switch."""
    out = [guard.address]
    if guard.reachability is not None:
        out += [addr for _, addr in guard.reachability.introducers if addr not in out]
    return out


class EngineCircuits:
    def __init__(self, setup: EngineSetup, stats: EngineStats, *, current: Callable[[], object | None],
                 report: Callable[[m.Event], None]) -> None:
        """``current``: the manager's circuit; ``report``: an event to the manager."""
        self.setup, self.stats = setup, stats
        self._current, self._report = current, report
        self.client: CircuitClient | None = None
        self._config_wait: tuple[ClientCircuit, asyncio.Future[bytes]] | None = None  # a build asks for CONFIG

    async def open(self, path: tuple[Descriptor, ...]) -> ClientCircuit:
        client = self.client
        if client is None:
            client = self.client = CircuitClient()
            await client.start(path[0].address[0])
            client.on_event = self._on_event
            client.on_datagram = self._on_datagram
        tunnel = self.setup.tunnel
        if tunnel is not None:
            tunnel.prepare(guard_endpoints(path[0]))
        started = time.monotonic()
        self.probe_link(client.node.guard_link(path[0].relay_id))  # a reused link: is the guard still there?
        try:
            circ = await client.build(list(path), timeout=BUILD_TIMEOUT_S,
                                      service=SERVICE_IP if tunnel is not None else SERVICE_ECHO)
        except ShallotError as exc:
            # the guard's fault only if it did not answer while we tried (docs/PROTOCOL.md §5.4): a relay
            # beyond it failing the build must not cost us the guard
            link = client.node.guard_link(path[0].relay_id)
            heard = link is not None and link.session is not None and link.last_recv >= started
            raise BuildFailed(str(exc), at_guard=not heard) from None
        if tunnel is not None:
            try:
                config = await self._ask_config(circ)
            except ShallotError as exc:
                client.close_circuit(circ)
                raise BuildFailed(str(exc), at_guard=False) from None  # built: the guard did its part
            try:
                tunnel.configure(config, guard_endpoints(path[0]), client.sink(circ))
            except BaseException:
                client.close_circuit(circ)
                raise
        return circ

    def probe_link(self, link: object) -> None:
        """Make an established guard link answer now (manager.ProbeGuard; and before a build reuses it)."""
        client = self.client
        if client is not None and link is not None and client.endpoint is not None:
            client.node.link.probe(link, time.monotonic(), time.time())  # type: ignore[arg-type]
            client.endpoint.poke()

    def activity(self, circuit: object) -> m.Activity | None:
        """The current circuit's counters for the manager's traffic watch (rule 3), or None."""
        if not isinstance(circuit, ClientCircuit) or circuit.link is None:
            return None
        return m.Activity(time.monotonic(), circuit, circuit.sent, circuit.received, circuit.link.last_recv)

    def ping(self, circuit: object, seq: int) -> None:
        """Probe mode: an echo through the circuit; VPN mode: a CONFIG request (an IP circuit carries only IP
        packets).  Either keeps the circuit from idling out and measures the round trip."""
        assert self.client is not None and isinstance(circuit, ClientCircuit)
        try:
            if self.setup.tunnel is not None:
                self.client.request_config(circuit)
            else:
                payload = m.ping_payload(seq)
                self.client.send(circuit, payload)
                self.stats.bytes_sent += len(payload)
        except ValueError:
            self._soon(lambda now: m.CircuitLost(now, circuit, "the circuit closed"))

    def close(self, circuit: object) -> None:
        if self.client is not None and isinstance(circuit, ClientCircuit):
            with contextlib.suppress(Exception):
                self.client.close_circuit(circuit)

    def shutdown(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

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

    def _soon(self, make: Callable[[float], m.Event]) -> None:
        asyncio.get_running_loop().call_soon(lambda: self._report(make(time.monotonic())))

    def _on_event(self, event: Any) -> None:
        if isinstance(event, ConfigReceived):
            waiting = self._config_wait
            if waiting is not None and event.circuit is waiting[0] and not waiting[1].done():
                waiting[1].set_result(event.data)
            elif event.circuit is self._current() and waiting is None:  # a late one must not undo a switch
                asyncio.get_running_loop().call_soon(self._config_answer, event.circuit, event.data)
        elif isinstance(event, CircuitClosed | CircuitFailed):
            # the guard's fault when its link went down; a DESTROY or a teardown came from a live guard
            link = event.circuit.link
            at_guard = link is None or link.state is LinkState.CLOSED
            self._soon(lambda now: m.CircuitLost(now, event.circuit, event.reason, at_guard=at_guard))

    def _on_datagram(self, circ: ClientCircuit, data: bytes) -> None:
        tunnel = self.setup.tunnel
        if tunnel is not None:
            tunnel.deliver(circ, data)
        elif circ is self._current():  # probe mode: the echo of a ping
            self.stats.bytes_received += len(data)
            self._soon(lambda now: m.PingAnswered(now, data))

    def _config_answer(self, circ: ClientCircuit, data: bytes) -> None:
        """VPN mode: the exit answered a ping with CONFIG; the tunnel follows it (its address may change)."""
        tunnel = self.setup.tunnel
        if tunnel is None or self.client is None or circ is not self._current():
            return
        try:
            tunnel.configure(data, guard_endpoints(circ.path[0]), self.client.sink(circ))
        except Exception as exc:  # our tunnel, not the guard
            self._report(m.CircuitLost(time.monotonic(), circ, *failure(exc), at_guard=False))
        else:
            self._report(m.PingAnswered(time.monotonic()))
