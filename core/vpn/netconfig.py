"""The privileged part of the client (Linux): TUN device, routes, kill switch, IPv6 block, DNS.  Narrow
on purpose: the engine asks for exactly these operations and nothing else.  A client running as root
(servers) calls it in-process; an ordinary user's engine reaches it through the privileged helper
(core/vpn/helper.py, started with pkexec), which calls the same code.  The kill switch is an nftables
table loaded as JSON (core/vpn/nftables.py): nothing is spliced into a rule text.

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
import subprocess
from dataclasses import dataclass, field

from shallot.core.errors import ShallotError
from shallot.core.vpn import nftables
from shallot.core.vpn.dnsconfig import DnsConfig, restore_resolv_conf
from shallot.core.vpn.nftables import ACCEPT, DROP, PRIO_FILTER, Chain, match, meta, payload

log = logging.getLogger("shallot.netconfig")
TUN_NAME = "shallot0"
NFT_TABLE = "shallot_client"
SPLIT_ROUTES = ("0.0.0.0/1", "128.0.0.0/1")
RT_PROTO = "147"  # every route we add carries this routing-protocol tag, so cleanup finds them without a state file


def _run(*argv: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, input=stdin)
    if check and res.returncode != 0:
        raise ShallotError(f"{' '.join(argv[:4])}... failed: {res.stderr.strip()}")
    return res


def default_route() -> tuple[str | None, str]:
    """(gateway or None, device) of the IPv4 default route."""
    words = _run("ip", "-4", "route", "show", "default").stdout.split()
    if "dev" not in words:
        raise ShallotError("no IPv4 default route: connect to a network first")
    gateway = words[words.index("via") + 1] if "via" in words else None
    return gateway, words[words.index("dev") + 1]


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
        _run("ip", "link", "set", TUN_NAME, "txqueuelen", "4096", check=False)  # absorb TCP bursts
        self._dev = dev
        self.fd = dev.fileno()
        os.set_blocking(self.fd, False)
        return self.fd

    def set_address(self, address: str) -> None:
        if self.address == address:
            return
        # add the new address before removing the old: a device left without an IPv4 address loses its
        # routes, and the split routes must never disappear (the kill switch would catch the traffic,
        # but nothing would flow)
        _run("ip", "addr", "add", f"{address}/32", "dev", TUN_NAME)
        if self.address is not None:
            _run("ip", "addr", "del", f"{self.address}/32", "dev", TUN_NAME, check=False)
        self.address = address

    def route_through_tunnel(self, guards: list[tuple[str, int]]) -> None:
        """All IPv4 into the TUN, except the paths to ``guards`` (the current one and, while switching,
        the next); IPv6 blocked by the kill switch, which lets out only UDP to these guards."""
        gateway, device = default_route()
        via = ["via", gateway] if gateway else []
        wanted = {host for host, _ in guards}
        for host in [h for h in self._guard_routes if h not in wanted]:
            _run("ip", "route", "del", f"{host}/32", check=False)
            self._guard_routes.discard(host)
        for host in wanted - self._guard_routes:
            _run("ip", "route", "replace", f"{host}/32", *via, "dev", device, "proto", RT_PROTO)
            self._guard_routes.add(host)
        for prefix in SPLIT_ROUTES:  # idempotent: re-asserted whenever the guards or the address change
            _run("ip", "route", "replace", prefix, "dev", TUN_NAME, "proto", RT_PROTO)
        self.guards = list(guards)
        self.apply_firewall()

    def set_dns(self, servers: list[str]) -> None:
        """Send the system's DNS to ``servers`` (the exit's resolver, reached through the tunnel)."""
        self.dns.apply(servers)

    def apply_firewall(self) -> None:
        nftables.load(kill_switch_ruleset(self.guards, kill_switch=self.kill_switch), "the kill switch")

    def restore(self) -> None:
        self.dns.restore()
        for host in self._guard_routes:
            _run("ip", "route", "del", f"{host}/32", check=False)
        self._guard_routes.clear()
        self.guards = []
        cleanup(quiet=True)
        if self._dev is not None:
            with contextlib.suppress(Exception):
                self._dev.close()  # the TUN device disappears with its last fd
            self._dev = None
            self.fd = -1



def cleanup(*, quiet: bool = False) -> list[str]:
    """Remove whatever a (crashed) client left: kill switch, split routes, the TUN, the DNS change."""
    done = restore_resolv_conf()
    if nftables.run(nftables.delete_table("inet", NFT_TABLE)).returncode == 0:
        done.append(f"removed nftables table inet {NFT_TABLE}")
    ours = _run("ip", "-4", "route", "show", "proto", RT_PROTO, check=False).stdout.strip()
    if ours:
        _run("ip", "-4", "route", "flush", "proto", RT_PROTO, check=False)
        done.extend(f"removed route {line}" for line in ours.splitlines())
    if _run("ip", "link", "del", TUN_NAME, check=False).returncode == 0:
        done.append(f"removed device {TUN_NAME}")
    if not quiet:
        log.info("cleanup: %s", ", ".join(done) or "nothing to do")
    return done
