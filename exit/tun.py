"""The exit's TUN device and NAT (I/O adapter for exit/ipservice.py; Linux, needs root or CAP_NET_ADMIN).

Creates TUN ``shallot-x<pid>`` with 100.64.0.1/10 and the tunnel MTU, turns on IPv4 forwarding and
puts one nftables table, ``ip shallot_exit``, in place: masquerade of 100.64.0.0/10 out of the uplink
and no forwarding between clients.  ``close()`` removes the table; the TUN disappears with its fd.
Packet I/O is os.read/os.write on the device fd (pytun only creates and configures it); the queue length
and the uplink go through netlink (core/vpn/netlink.py), the table as nftables JSON (core/vpn/nftables.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable

from shallot.core.errors import ShallotError
from shallot.core.vpn import nftables
from shallot.core.vpn.netlink import session
from shallot.core.vpn.nftables import (
    ACCEPT,
    DROP,
    MASQUERADE,
    PRIO_FILTER,
    PRIO_SRCNAT,
    Chain,
    match,
    meta,
    payload,
    prefix,
)
from shallot.core.vpn.tunio import read_batch
from shallot.core.wire.ipconfig import GATEWAY, POOL, TUNNEL_MTU

log = logging.getLogger("shallot.exit")
NFT_TABLE = "shallot_exit"
TXQUEUELEN = 4096


def default_uplink() -> str:
    """The interface of the IPv4 default route."""
    device = session(lambda nl: nl.default_device())
    if device is None:
        raise ShallotError("no IPv4 default route: pass --uplink IFACE")
    return device


MAX_FLOWS_PER_CIRCUIT = 512  # conntrack entries one tunnel address may hold
NEW_FLOWS_PER_S, NEW_FLOWS_BURST = 100, 300  # new connections per tunnel address (Tor's DoSStreamCreation: 100/s)
SOURCE_SET_SIZE = 65536  # tunnel addresses the kernel tracks for these two limits (above the 4 096 circuits)
COUNTERS = ("into_tun", "flow_cap", "new_flow_rate")  # named counters of the table's drops (status: kernel_drop_*)


def _counted_drop(name: str) -> tuple[nftables.Expr, ...]:
    return {"counter": name}, DROP


def nat_ruleset(tun: str, uplink: str, *, max_flows: int = MAX_FLOWS_PER_CIRCUIT,
                new_flows: tuple[int, int] = (NEW_FLOWS_PER_S, NEW_FLOWS_BURST)) -> nftables.Ruleset:
    """Masquerade the clients' pool out of the uplink; never forward from the TUN to anything but the uplink
    (so not from one client to another, and not to the exit's other networks); forward into the TUN only
    the answers of flows its clients opened (nothing from the exit's LAN or the internet may reach a client
    unasked); and cap each tunnel address's new connections per second and its conntrack entries."""
    iif, oif = meta("iifname"), meta("oifname")
    saddr = payload("ip", "saddr")
    is_new = match({"ct": {"key": "state"}}, "new", "in")
    rate, burst = new_flows
    masquerade = (match(saddr, prefix(POOL)), match(oif, uplink), MASQUERADE)
    between_clients = (match(iif, tun), match(oif, tun), DROP)
    elsewhere = (match(iif, tun), match(oif, uplink, "!="), DROP)
    answers = (match(oif, tun), match({"ct": {"key": "state"}}, ["established", "related"], "in"), ACCEPT)
    into_tun = (match(oif, tun), *_counted_drop("into_tun"))
    new_rate = (match(iif, tun), is_new, {"set": {"op": "add", "elem": saddr, "set": "@new_flows", "stmt": [
        {"limit": {"rate": rate, "burst": burst, "per": "second", "inv": True}}]}}, *_counted_drop("new_flow_rate"))
    flow_cap = (match(iif, tun), is_new, {"set": {"op": "add", "elem": saddr, "set": "@flows", "stmt": [
        {"ct count": {"val": max_flows, "inv": True}}]}}, *_counted_drop("flow_cap"))
    objects = [{"set": {"name": "flows", "type": "ipv4_addr", "size": SOURCE_SET_SIZE}},
               {"set": {"name": "new_flows", "type": "ipv4_addr", "flags": ["timeout"], "timeout": 60,
                        "size": SOURCE_SET_SIZE}},
               *({"counter": {"name": name}} for name in COUNTERS)]
    return nftables.replace_table("ip", NFT_TABLE, [
        Chain("postrouting", "nat", "postrouting", PRIO_SRCNAT, "accept", (masquerade,)),
        Chain("forward", "filter", "forward", PRIO_FILTER, "accept",
              (between_clients, elsewhere, answers, into_tun, new_rate, flow_cap)),
    ], objects)


def kernel_drops() -> dict[str, int]:
    """The table's named drop counters, as the kernel holds them (empty if nft cannot say)."""
    res = nftables.run({"nftables": [{"list": {"counters": {"family": "ip", "table": NFT_TABLE}}}]})
    if res.returncode != 0:
        return {}
    try:
        items = json.loads(res.stdout)["nftables"]
        return {f"kernel_drop_{c['counter']['name']}": int(c["counter"]["packets"]) for c in items if "counter" in c}
    except (ValueError, KeyError, TypeError):
        return {}


class ExitTun:
    def __init__(self, uplink: str, on_packet: Callable[[bytes], None],
                 after_batch: Callable[[], None] = lambda: None) -> None:
        """``on_packet`` gets every packet read; ``after_batch`` runs once after each batch of reads, so the
        cells they produce leave in one batched send."""
        self.uplink = uplink
        self.on_packet = on_packet
        self.after_batch = after_batch
        self.name = f"shallot-x{os.getpid() % 100000}"
        self._dev = None
        self._fd = -1
        self.write_errors = 0
        self.read_packets = 0
        self.written_packets = 0

    def open(self) -> None:
        try:
            from pytun import IFF_NO_PI, IFF_TUN, TunTapDevice
        except ImportError:
            raise ShallotError("python-pytun is not installed (the IP exit needs it)") from None
        try:
            dev = TunTapDevice(name=self.name, flags=IFF_TUN | IFF_NO_PI)
        except Exception as exc:  # pytun.Error: no /dev/net/tun or no permission
            raise ShallotError(f"cannot create the exit's TUN device: {exc}") from None
        self._dev = dev
        dev.addr, dev.netmask, dev.mtu = str(GATEWAY), str(POOL.netmask), TUNNEL_MTU
        dev.up()
        with contextlib.suppress(OSError):  # a longer queue absorbs TCP bursts from the internet
            session(lambda nl: nl.set_txqueuelen(self.name, TXQUEUELEN))
        self._fd = dev.fileno()
        os.set_blocking(self._fd, False)
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1")
        nftables.load(nat_ruleset(self.name, self.uplink), "the exit's rules")
        asyncio.get_running_loop().add_reader(self._fd, self._on_readable)
        log.info("IP exit on %s (%s/%d) via %s", self.name, GATEWAY, POOL.prefixlen, self.uplink)

    def _on_readable(self) -> None:
        packets = read_batch(self._fd)
        for packet in packets:
            self.on_packet(packet)
        if packets:
            self.read_packets += len(packets)
            self.after_batch()

    def write(self, packets: list[bytes]) -> None:
        for packet in packets:
            try:
                os.write(self._fd, packet)
                self.written_packets += 1
            except OSError:
                self.write_errors += 1  # the kernel refused it (e.g. no route): like a drop on the wire
        packets.clear()

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)
        if self._dev is not None:
            with contextlib.suppress(Exception):
                self._dev.close()
            self._dev = None
            self._fd = -1
        nftables.run(nftables.delete_table("ip", NFT_TABLE))
