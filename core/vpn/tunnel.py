"""``shallot connect``: the engine in VPN mode.  The system's IPv4 goes into TUN ``shallot0`` and
through an IP circuit; the kill switch lets nothing else out while connected or reconnecting.

``Tunnel`` is the engine's TUN side: it configures the device from the exit's CONFIG answer (address,
MTU), keeps the routes and kill switch pointed at the current guard, and pumps packets between the
device and the circuit.  The privileged work is in core/vpn/netconfig.py, reached in-process (root) or
through the privileged helper (core/vpn/helper.py).

The kill switch fails closed (docs/PRIVILEGES.md): ``close`` (a disconnect) puts everything back,
``abandon`` (the engine crashed) leaves a kill switch on; while one is kept from a session that died
(core/vpn/killmark.py) the first build's guard is let through it before the device exists.  What goes
wrong under the tunnel (the helper quits, the device is removed) is told to ``on_trouble``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import Any, Protocol

from shallot.core.circuit import CircuitState, ClientCircuit
from shallot.core.errors import ShallotError
from shallot.core.vpn import killmark
from shallot.core.vpn.helper_client import HelperNetConfig, PrivilegeError, can_admin_network, start_helper
from shallot.core.vpn.netconfig import TUN_NAME, NetConfig
from shallot.core.vpn.tunio import read_packets
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
        # (reason, final): the helper quit (final) or the device went away (the circuit must be rebuilt)
        self.on_trouble: Callable[[str, bool], None] | None = None
        self._watched: socket.socket | None = None

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
        """How the network is configured: "root" (in-process), "helper", or "" before the first connect and
        after the helper quit."""
        if self._net is None or not getattr(self._net, "alive", True):
            return ""
        return "root" if isinstance(self._net, NetConfig) else "helper"

    def ensure_ready(self) -> None:
        """Get the means to configure the network.  May block while polkit asks the user: run it in an
        executor.  Raises PrivilegeError when that is impossible.  A helper that quit is replaced."""
        if self.privileged:
            return
        if self._net is not None:
            raise ShallotError("the tunnel must let go of a helper that quit first (on the loop: forget_helper)")
        if self.helper_fd is None and can_admin_network():
            self._net = NetConfig(kill_switch=self.kill_switch)
        else:
            self._net = start_helper(kill_switch=self.kill_switch, helper_fd=self.helper_fd)
            self.helper_fd = None  # that socket now belongs to the HelperNetConfig

    def watch(self) -> None:
        """On the loop, after ``ensure_ready``: tell ``on_trouble`` as soon as the helper's socket closes
        (the helper died), not at the next request, which may come only at the next disconnect."""
        net = self._net
        if not isinstance(net, HelperNetConfig) or self._watched is net.sock:
            return
        self._unwatch()
        self._watched = net.sock
        asyncio.get_running_loop().add_reader(net.sock.fileno(), self._helper_readable)

    def _unwatch(self) -> None:
        if self._watched is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._watched.fileno())
            self._watched = None

    def _helper_readable(self) -> None:
        # the helper speaks only to answer a request, and requests wait for their answer on the loop, so
        # anything readable here is the helper going away (end of file) or a helper out of step
        net = self._net
        try:
            data = net.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) if net is not None else b""
            reason = "the privileged helper quit" if not data else "the privileged helper spoke out of turn"
        except BlockingIOError:
            return
        except OSError as exc:
            reason = f"the privileged helper's socket failed: {exc.strerror or exc}"
        self._unwatch()
        if isinstance(net, HelperNetConfig):
            net.alive = False
        log.error("%s: the kill switch stays on until you connect or disconnect", reason)
        if self.on_trouble is not None:
            self.on_trouble(reason, True)

    def forget_helper(self) -> None:
        """On the loop: let go of a helper that quit (its kill switch stays on) and of the device, so that the
        next ``ensure_ready`` starts a new session."""
        if self._net is None or self.privileged:
            return
        self._drop_device()
        self._unwatch()
        with contextlib.suppress(Exception):
            self._net.close()
        self._net = None
        self.sink, self.address = None, None

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
        over.  Before the device exists this is needed only when a kill switch is in place already (kept
        after an engine died): its table is then replaced by one that lets this guard out, never removed."""
        if self.fd >= 0:
            missing = [e for e in endpoints if e not in self.net.guards]
            if missing:
                self.net.route_through_tunnel([*self.net.guards, *missing])
        elif self.net.guards != endpoints and killmark.is_marked():
            self.net.route_through_tunnel(endpoints)

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
        packets, error = read_packets(self._fd)
        if error is not None and error.errno in (errno.EBADFD, errno.EIO, errno.ENODEV, errno.EBADF):
            self._device_gone(error)
        for packet in packets:
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

    def _device_gone(self, error: OSError) -> None:
        """The device was removed under us (by hand): its split routes went with it, the kill switch holds.
        The engine drops the circuit and the next one creates the device anew."""
        log.error("the TUN device %s went away (%s): traffic stays blocked until a new circuit is built",
                  TUN_NAME, error.strerror or error)
        self._drop_device()
        self.sink = None
        if self.on_trouble is not None:
            self.on_trouble(f"the TUN device {TUN_NAME} went away", False)

    def _drop_device(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)
        self._fd = -1
        if self._net is not None:
            self._net.close_device()

    def close(self) -> None:
        """Disconnected: routes, kill switch, DNS and device go; the helper session stays for the next connect.
        If the helper has quit nothing could be put back (its kill switch stays on) and it is let go of."""
        if self.fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.fd)
        self._fd = -1
        if self._net is not None:
            try:
                self._net.restore()
            except PrivilegeError as exc:
                log.warning("%s: the kill switch stays on", exc)
                self.forget_helper()
        self.sink = None
        self.address = None

    def abandon(self) -> None:
        """The engine crashed (an exception unwinds it): the device goes, but a kill switch in place stays on,
        with the DNS change, until an explicit disconnect, ``--cleanup`` or a new engine (docs/PRIVILEGES.md).
        Through the helper: the session ends without a ``restore`` and the helper decides the same way."""
        if self.fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.fd)
        self._fd = -1
        self._unwatch()
        net, self._net = self._net, None
        if isinstance(net, NetConfig):
            net.abandon()
        elif net is not None:
            net.close()
        self.sink = None
        self.address = None

    def shutdown(self) -> None:
        """The engine quits: also end the helper session (after the restore it has nothing left to do)."""
        self.close()
        self._unwatch()
        if self._net is not None and hasattr(self._net, "close"):
            self._net.close()
        self._net = None
