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

IPv6 is never tunnelled (the exits hand out IPv4 only), so it is blocked while connected, with or
without the kill switch: a v6-capable network must not carry the user's traffic around the tunnel.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import TYPE_CHECKING, TypeVar

from shallot.core.errors import ShallotError
from shallot.core.vpn import nftables
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

    def open_tun(self, mtu: int) -> int:
        """Create the TUN device and return its non-blocking fd."""
        try:
            from pytun import IFF_NO_PI, IFF_TUN, TunTapDevice
            dev = TunTapDevice(name=TUN_NAME, flags=IFF_TUN | IFF_NO_PI)
        except Exception as exc:
            raise ShallotError(f"cannot create {TUN_NAME}: {exc} (run as root, or install the helper)") from None
        dev.mtu = mtu
        dev.up()
        with contextlib.suppress(OSError):
            _netlink(lambda nl: nl.set_txqueuelen(TUN_NAME, TXQUEUELEN))
        self._dev = dev
        self.fd = dev.fileno()
        os.set_blocking(self.fd, False)
        return self.fd

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
        the next); IPv6 blocked by the kill switch, which lets out only UDP to these guards."""
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
            raise ShallotError(f"no device {TUN_NAME}: open the tunnel first")
        for prefix in SPLIT_ROUTES:  # idempotent: re-asserted whenever the guards or the address change
            try:
                nl.replace_route(prefix, oif=tun, proto=RT_PROTO)
            except OSError as exc:
                raise ShallotError(f"cannot route {prefix} into {TUN_NAME}: {exc.strerror or exc}") from None

    def set_dns(self, servers: list[str]) -> None:
        """Send the system's DNS to ``servers`` (the exit's resolver, reached through the tunnel)."""
        self.dns.apply(servers)

    def apply_firewall(self) -> None:
        nftables.load(kill_switch_ruleset(self.guards, kill_switch=self.kill_switch), "the kill switch")

    def restore(self) -> None:
        self.dns.restore()
        hosts, self._guard_routes = self._guard_routes, set()
        if hosts:
            with contextlib.suppress(OSError):  # cleanup below flushes every route of ours anyway
                _netlink(lambda nl: _delete_guard_routes(nl, hosts))
        self.guards = []
        cleanup(quiet=True)
        if self._dev is not None:
            with contextlib.suppress(Exception):
                self._dev.close()  # the TUN device disappears with its last fd
            self._dev = None
            self.fd = -1


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


def cleanup(*, quiet: bool = False) -> list[str]:
    """Remove whatever a (crashed) client left: kill switch, split routes, the TUN, the DNS change."""
    done = restore_resolv_conf()
    if nftables.run(nftables.delete_table("inet", NFT_TABLE)).returncode == 0:
        done.append(f"removed nftables table inet {NFT_TABLE}")
    try:
        done.extend(_netlink(_remove_routes_and_device))
    except OSError as exc:
        log.warning("cleanup: %s", exc)
    if not quiet:
        log.info("cleanup: %s", ", ".join(done) or "nothing to do")
    return done
