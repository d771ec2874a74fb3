"""``shallot connect``: the engine in VPN mode.  The system's IPv4 goes into TUN ``shallot0`` and
through an IP circuit; the kill switch lets nothing else out while connected or reconnecting.

``Tunnel`` is the engine's TUN side: it configures the device from the exit's CONFIG answer (address,
MTU), keeps the routes and kill switch pointed at the current guard, and pumps packets between the
device and the circuit.  The privileged work is in core/vpn/netconfig.py, reached in-process (root) or
through the privileged helper (core/vpn/helper.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any, Protocol

from shallot.core.circuit import CircuitState, ClientCircuit
from shallot.core.errors import ShallotError
from shallot.core.vpn.helper_client import can_admin_network, start_helper
from shallot.core.vpn.netconfig import TUN_NAME, NetConfig
from shallot.core.vpn.tunio import read_batch
from shallot.core.wire.ipconfig import decode_config

log = logging.getLogger("shallot.connect")


class CircuitSink(Protocol):
    """Where the tunnel sends what it reads from the TUN: one circuit (core/io/circuit_client.py CircuitPipe)."""

    @property
    def circuit(self) -> ClientCircuit:
        """The circuit behind the sink: packets from it are delivered, it must be open to take any."""
        ...

    def send(self, packet: bytes) -> None:
        """Raises ValueError when the packet cannot go: too big for a cell, or the circuit closed."""
        ...

    def flush(self) -> None:
        """Put what ``send`` queued on the wire (once per batch read from the TUN)."""
        ...


class Tunnel:
    def __init__(self, *, kill_switch: bool = True, dns: bool = True, helper_fd: int | None = None) -> None:
        """The privileged operations go to a NetConfig in-process when we are root, else to the privileged
        helper (on ``helper_fd``, or started through pkexec).  ``dns``: point the system's DNS at the exit's
        resolver."""
        self.kill_switch = kill_switch
        self.dns = dns
        self.helper_fd = helper_fd
        self._net: Any = None
        self._fd = -1
        self.sink: CircuitSink | None = None  # the circuit in use, from the last CONFIG answer
        self.address: str | None = None
        self.packets_out = 0
        self.packets_in = 0
        self.dropped = 0

    @property
    def net(self) -> Any:
        if self._net is None:
            raise ShallotError("the tunnel is not ready")
        return self._net

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def privileged(self) -> str:
        """How the network is configured: "root" (in-process), "helper", or "" before the first connect."""
        return "" if self._net is None else "root" if isinstance(self._net, NetConfig) else "helper"

    def ensure_ready(self) -> None:
        """Get the means to configure the network.  May block while polkit asks the user: run it in an
        executor.  Raises PrivilegeError when that is impossible."""
        if self._net is not None:
            return
        if self.helper_fd is None and can_admin_network():
            self._net = NetConfig(kill_switch=self.kill_switch)
        else:
            self._net = start_helper(kill_switch=self.kill_switch, helper_fd=self.helper_fd)
            self.helper_fd = None  # that socket now belongs to the HelperNetConfig

    def configure(self, config: bytes, endpoints: list[tuple[str, int]], sink: CircuitSink) -> None:
        """The exit of ``sink``'s circuit answered CONFIG: the device gets its address and MTU, and packets go
        through that circuit from now on.  ``endpoints``: where the guard's link sends
        (core/engine/circuits.py guard_endpoints): routed around the tunnel and let through the kill switch."""
        address, resolver, mtu = decode_config(config)
        if self.fd < 0:
            fd = self._fd = self.net.open_tun(mtu)
            asyncio.get_running_loop().add_reader(fd, self._on_readable)
        changed = self.net.address != str(address)
        self.net.set_address(str(address))
        if changed or self.net.guards != endpoints:
            self.net.route_through_tunnel(endpoints)  # only the endpoints of the circuit in use from now on
        if self.dns:
            self.net.set_dns([str(resolver)])  # a no-op when unchanged
        if self.sink is None or self.sink.circuit is not sink.circuit:
            log.info("tunnel %s on %s through the circuit via %s", address, TUN_NAME, endpoints[0][0])
        self.sink, self.address = sink, str(address)

    def prepare(self, endpoints: list[tuple[str, int]]) -> None:
        """A circuit through a guard reached at ``endpoints`` is about to be built: let its link out (kill
        switch) and route it around the tunnel, keeping the current guard open until the new circuit takes
        over."""
        missing = [e for e in endpoints if e not in self.net.guards] if self.fd >= 0 else []
        if missing:
            self.net.route_through_tunnel([*self.net.guards, *missing])

    def deliver(self, circuit: ClientCircuit, packet: bytes) -> None:
        """A packet from the exit: into the TUN, if it belongs to the current circuit."""
        if self.sink is None or circuit is not self.sink.circuit or self.fd < 0:
            self.dropped += 1
            return
        try:
            os.write(self._fd, packet)
            self.packets_in += 1
        except OSError:
            self.dropped += 1

    def _on_readable(self) -> None:
        sink = self.sink
        sent = False
        for packet in read_batch(self._fd):
            if sink is None or sink.circuit.state is not CircuitState.OPEN:
                self.dropped += 1  # no circuit: the packet dies here (fail closed), it never leaks
                continue
            try:
                sink.send(packet)
                self.packets_out += 1
                sent = True
            except ValueError:
                self.dropped += 1  # too big for a cell or the circuit just closed
        if sent and sink is not None:
            sink.flush()

    def close(self) -> None:
        """Disconnected: routes, kill switch, DNS and device go; the helper session stays for the next connect."""
        if self.fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.fd)
        self._fd = -1
        if self._net is not None:
            self._net.restore()
        self.sink = None
        self.address = None

    def shutdown(self) -> None:
        """The engine quits: also end the helper session (the helper restores everything and exits)."""
        self.close()
        if self._net is not None and hasattr(self._net, "close"):
            self._net.close()
        self._net = None
