"""The privileged part of the client (Linux): TUN device, routes, kill switch, IPv6 block, DNS.  Narrow
on purpose: the engine asks for exactly these operations and nothing else.  A client running as root
(servers) calls it in-process; an ordinary user's engine reaches it through the privileged helper
(core/vpn/helper.py, started with pkexec), which calls the same code.

Routes, addresses and links go through netlink (core/vpn/netlink.py, pyroute2); the kill switch is an
nftables table loaded as JSON (core/vpn/nftables.py).  Nothing is spliced into a command line or a rule
text.

Everything it changes is undone by ``restore()`` and, after a crash, by ``cleanup()``
(``shallot connect --cleanup``): routes carry Shallot's routing-protocol tag, the nftables table and the
device carry Shallot's names, and DNS changes are undone from the saved copy (core/vpn/dnsconfig.py).

The kill switch fails closed (docs/PRIVILEGES.md): while its table is in place a marker says so
(core/vpn/killmark.py), and an engine that dies without an explicit ``restore`` leaves table, marker
and DNS as they are (``abandon``); a new session keeps them (``cleanup(keep_block=True)``) until its
own ``route`` replaces the table or its ``restore`` removes it.

IPv6 is never tunnelled (the exits hand out IPv4 only), so it is blocked while connected, with or
without the kill switch: a v6-capable network must not carry the user's traffic around the tunnel.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import TYPE_CHECKING, TypeVar

from shallot.core.errors import ShallotError
from shallot.core.vpn import killmark, nftables
from shallot.core.vpn.dnsconfig import DnsConfig, restore_resolv_conf
from shallot.core.vpn.nftables import ACCEPT, DROP, PRIO_FILTER, Chain, match, meta, payload

if TYPE_CHECKING:
    from shallot.core.vpn.netlink import Netlink

log = logging.getLogger("shallot.netconfig")
T = TypeVar("T")
TUN_NAME = "shallot0"
NFT_TABLE = "shallot_client"
SPLIT_ROUTES = (IPv4Network("0.0.0.0/1"), IPv4Network("128.0.0.0/1"))
RT_PROTO = 147  # every route we add carries this routing-protocol tag, so cleanup finds them without a state file
TXQUEUELEN = 4096  # absorbs TCP bursts
NO_ROUTE = "no IPv4 default route: connect to a network first"
TUNSETOWNER = 0x400454CC


def _netlink(fn: Callable[[Netlink], T]) -> T:
    # pyroute2 takes ~90 ms to import: only a process that configures the network itself pays for it, not
    # every engine (an ordinary user's engine leaves this to the helper)
    from shallot.core.vpn.netlink import session
    return session(fn)


def _host(host: str) -> IPv4Network:
    try:
        return IPv4Network(f"{host}/32")
    except ValueError:
        raise ShallotError(f"{host} is not an IPv4 address: a guard must be reachable over IPv4") from None


def kill_switch_ruleset(guards: list[tuple[str, int]], *, kill_switch: bool) -> nftables.Ruleset:
    """Kill switch: nothing leaves but loopback, the tunnel and the encrypted UDP to the guards.
    Without it, only IPv6 is blocked (no v6 leak around the IPv4-only tunnel)."""
    loopback = (match(meta("oifname"), "lo"), ACCEPT)
    if kill_switch:
        rules = (loopback, (match(meta("oifname"), TUN_NAME), match(meta("nfproto"), "ipv4"), ACCEPT),
                 *((match(payload("ip", "daddr"), host), match(payload("udp", "dport"), port), ACCEPT)
                   for host, port in guards))
        policy = "drop"
    else:
        rules = (loopback, (match(meta("nfproto"), "ipv6"), DROP))
        policy = "accept"
    return nftables.replace_table("inet", NFT_TABLE, [Chain("output", "filter", "output", PRIO_FILTER, policy,
                                                            rules)])


@dataclass
class NetConfig:
    kill_switch: bool = True
    fd: int = -1
    _dev: object | None = None
    guards: list[tuple[str, int]] = field(default_factory=list)
    address: str | None = None
    _guard_routes: set[str] = field(default_factory=set)
    dns: DnsConfig = field(default_factory=lambda: DnsConfig(TUN_NAME))

    def open_tun(self, mtu: int, owner: int | None = None) -> int:
        """Create the TUN device and return its non-blocking fd; ``owner``: the uid it belongs to (the
        helper's user).  A device this session made before goes first: it was removed under us (by hand),
        and a new device starts without an address."""
        self.close_device()
        try:
            from pytun import IFF_NO_PI, IFF_TUN, TunTapDevice
            dev = TunTapDevice(name=TUN_NAME, flags=IFF_TUN | IFF_NO_PI)
        except Exception as exc:
            raise ShallotError(f"cannot create {TUN_NAME}: {exc} (run as root, or install the helper)") from None
        self._dev = dev
        self.fd = dev.fileno()
        if owner is not None:
            fcntl.ioctl(self.fd, TUNSETOWNER, owner)  # the user's device, as far as the kernel cares
        dev.mtu = mtu
        dev.up()
        with contextlib.suppress(OSError):
            _netlink(lambda nl: nl.set_txqueuelen(TUN_NAME, TXQUEUELEN))
        os.set_blocking(self.fd, False)
        return self.fd

    def close_device(self) -> None:
        """Let go of the device (it disappears with its last fd, its split routes with it)."""
        if self._dev is not None:
            with contextlib.suppress(Exception):
                self._dev.close()
            self._dev = None
        self.fd = -1
        self.address = None

    def set_address(self, address: str) -> None:
        if self.address == address:
            return
        old = self.address

        def change(nl: Netlink) -> None:
            # add the new address before removing the old: a device left without an IPv4 address loses its
            # routes, and the split routes must never disappear (the kill switch would catch the traffic,
            # but nothing would flow)
            try:
                nl.add_address(TUN_NAME, address, 32)
            except OSError as exc:
                raise ShallotError(f"cannot add {address}/32 to {TUN_NAME}: {exc.strerror or exc}") from None
            if old is not None:
                with contextlib.suppress(OSError):
                    nl.delete_address(TUN_NAME, old, 32)

        _netlink(change)
        self.address = address

    def route_through_tunnel(self, guards: list[tuple[str, int]]) -> None:
        """All IPv4 into the TUN, except the paths to ``guards`` (the current one and, while switching,
        the next); IPv6 blocked by the kill switch, which lets out only UDP to these guards.  Before the
        device exists (a kill switch kept from a session that died: the first build's guard must get
        through it) only the guards' routes and the table change; the split routes follow with the device."""
        _netlink(lambda nl: self._route(nl, {host for host, _ in guards}))
        self.guards = list(guards)
        self.apply_firewall()

    def _route(self, nl: Netlink, wanted: set[str]) -> None:
        tun = nl.index(TUN_NAME)
        stale = self._guard_routes - wanted
        _delete_guard_routes(nl, stale)
        self._guard_routes -= stale
        for host in sorted(wanted - self._guard_routes):
            # the system's own path to this guard: its real egress, never our routes or the tunnel
            egress = nl.egress(host, ignore_proto=RT_PROTO, ignore_oif=tun)
            if egress is None:
                raise ShallotError(NO_ROUTE)
            try:
                nl.replace_route(_host(host), oif=egress.oif, gateway=egress.gateway, proto=RT_PROTO)
            except OSError as exc:
                raise ShallotError(f"cannot route {host} around the tunnel: {exc.strerror or exc}") from None
            self._guard_routes.add(host)
        if tun is None:
            if self.fd >= 0:
                raise ShallotError(f"the device {TUN_NAME} went away")
            return
        for prefix in SPLIT_ROUTES:  # idempotent: re-asserted whenever the guards or the address change
            try:
                nl.replace_route(prefix, oif=tun, proto=RT_PROTO)
            except OSError as exc:
                raise ShallotError(f"cannot route {prefix} into {TUN_NAME}: {exc.strerror or exc}") from None

    def set_dns(self, servers: list[str]) -> None:
        """Send the system's DNS to ``servers`` (the exit's resolver, reached through the tunnel)."""
        self.dns.apply(servers)

    def apply_firewall(self) -> None:
        """Replace the table in one transaction (never a moment without it); the marker follows."""
        nftables.load(kill_switch_ruleset(self.guards, kill_switch=self.kill_switch), "the kill switch")
        if self.kill_switch:
            killmark.set_mark()
        else:
            killmark.clear_mark()  # a block kept from an earlier session was just replaced by ours

    def restore(self) -> None:
        """An explicit disconnect: everything back, a kept kill switch included."""
        self.dns.restore()
        hosts, self._guard_routes = self._guard_routes, set()
        if hosts:
            with contextlib.suppress(OSError):  # cleanup below flushes every route of ours anyway
                _netlink(lambda nl: _delete_guard_routes(nl, hosts))
        self.guards = []
        cleanup(quiet=True)
        self.close_device()

    def abandon(self) -> bool:
        """The engine died without a disconnect.  With a kill-switch block in place (ours, or one kept from
        an earlier session) the table, its marker and the DNS change stay and only the device goes: traffic
        stays blocked until an explicit disconnect, ``--cleanup`` or a new session.  Without one there is
        nothing to keep: restore.  True if a block was kept."""
        if not killmark.is_marked():
            self.restore()
            return False
        self.close_device()
        log.warning("the engine went away without disconnecting: the kill switch and DNS stay until a "
                    "disconnect, `shallot connect --cleanup` or the next connect")
        return True


def _delete_guard_routes(nl: Netlink, hosts: set[str]) -> None:
    for host in hosts:
        nl.delete_route(_host(host), proto=RT_PROTO)


def _remove_routes_and_device(nl: Netlink) -> list[str]:
    done = []
    names = nl.names()
    for entry in nl.routes(proto=RT_PROTO):
        if nl.delete_route(entry.dst, proto=RT_PROTO):
            done.append(f"removed route {entry.describe(names)} proto {RT_PROTO}")
    if nl.delete_link(TUN_NAME):
        done.append(f"removed device {TUN_NAME}")
    return done


def _table_exists() -> bool:
    """A marker without its table is stale (left in a namespace that is gone, whose inode came back)."""
    return nftables.run(nftables.list_table("inet", NFT_TABLE)).returncode == 0


def cleanup(*, quiet: bool = False, keep_block: bool = False) -> list[str]:
    """Remove whatever a (crashed) client left: kill switch, split routes, the TUN, the DNS change.
    ``keep_block`` (a new session starts): a kill-switch block kept after an engine died stays, table,
    marker and DNS, and only a leftover device goes; the session's ``route`` replaces the table."""
    if keep_block and killmark.is_marked() and _table_exists():
        done = []
        try:
            if _netlink(lambda nl: nl.delete_link(TUN_NAME)):
                done.append(f"removed device {TUN_NAME}")
        except OSError as exc:
            log.warning("cleanup: %s", exc)
        log.info("a kill switch kept after an engine died stays until this session replaces it")
        return done
    done = restore_resolv_conf()
    if nftables.run(nftables.delete_table("inet", NFT_TABLE)).returncode == 0:
        done.append(f"removed nftables table inet {NFT_TABLE}")
    if killmark.clear_mark() and not done:
        done.append("removed a stale kill-switch marker")
    try:
        done.extend(_netlink(_remove_routes_and_device))
    except OSError as exc:
        log.warning("cleanup: %s", exc)
    if not quiet:
        log.info("cleanup: %s", ", ".join(done) or "nothing to do")
    return done
