"""The few netlink operations Shallot needs (routes, addresses, links), over pyroute2: structured
requests and answers instead of spawning ``ip`` and parsing its text.  The client's netconfig and the
exit's TUN and address watch use it; nothing else knows pyroute2's API, and its errors come out as
OSError.

Everything acts on the network namespace of the calling process (``ip netns exec`` in the tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import Any, TypeVar

from pyroute2 import Conntrack, IPRoute, NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

T = TypeVar("T")
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255  # in a delete: whatever the route's scope (`ip route del` does the same)


@dataclass(frozen=True)
class Egress:
    """Where packets for an address leave: the next hop (None on a directly connected network) and the
    interface index."""
    gateway: str | None
    oif: int


@dataclass(frozen=True)
class RouteEntry:
    """An IPv4 route of the main table."""
    dst: IPv4Network
    gateway: str | None
    oif: int | None
    proto: int
    metric: int

    def describe(self, names: dict[int, str]) -> str:
        """The route the way ``ip route`` writes it."""
        dst = str(self.dst.network_address) if self.dst.prefixlen == 32 else str(self.dst)
        via = f" via {self.gateway}" if self.gateway else ""
        dev = f" dev {names.get(self.oif, self.oif)}" if self.oif is not None else ""
        return f"{dst}{via}{dev}"


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except NetlinkError as exc:
        raise OSError(exc.code, os.strerror(exc.code)) from None


def _first_hop(msg: Any) -> tuple[str | None, int | None]:
    """(gateway, oif) of a route message; of its first next hop when it is a multipath route."""
    oif = msg.get_attr("RTA_OIF")
    if oif is None and msg.get_attr("RTA_MULTIPATH"):
        hop = msg.get_attr("RTA_MULTIPATH")[0]
        return hop.get_attr("RTA_GATEWAY"), hop["oif"]
    return msg.get_attr("RTA_GATEWAY"), oif


class Netlink:
    """One netlink session (see ``session``)."""

    def __init__(self, ipr: IPRoute) -> None:
        self._ipr = ipr

    # ------------------------------------------------------------------------------------------ links
    def index(self, name: str) -> int | None:
        found = self._ipr.link_lookup(ifname=name)
        return found[0] if found else None

    def require(self, name: str) -> int:
        index = self.index(name)
        if index is None:
            raise OSError(errno.ENODEV, f"no device {name}")
        return index

    def names(self) -> dict[int, str]:
        return {link["index"]: link.get_attr("IFLA_IFNAME") for link in self._ipr.get_links()}

    def set_txqueuelen(self, name: str, length: int) -> None:
        with _errors():
            self._ipr.link("set", index=self.require(name), txqlen=length)

    def delete_link(self, name: str) -> bool:
        index = self.index(name)
        if index is None:
            return False
        with _errors():
            self._ipr.link("del", index=index)
        return True

    # ------------------------------------------------------------------------------------------ addresses
    def add_address(self, name: str, address: str, prefixlen: int) -> None:
        with _errors():
            self._ipr.addr("add", index=self.require(name), address=address, prefixlen=prefixlen)

    def delete_address(self, name: str, address: str, prefixlen: int) -> None:
        with _errors():
            self._ipr.addr("del", index=self.require(name), address=address, prefixlen=prefixlen)

    def networks(self) -> list[IPv4Network | IPv6Network]:
        """The networks of every address in this namespace (both families)."""
        out = []
        for msg in self._ipr.get_addr():
            address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")  # IFA_ADDRESS is a ptp peer
            if address:
                out.append(ip_network(f"{address}/{msg['prefixlen']}", strict=False))
        return out

    # ------------------------------------------------------------------------------------------ routes
    def routes(self, *, proto: int | None = None) -> list[RouteEntry]:
        """The IPv4 unicast routes of the main table, those tagged ``proto`` if given."""
        out = []
        for msg in self._ipr.get_routes(family=socket.AF_INET):
            if (msg.get_attr("RTA_TABLE") or msg["table"]) != RT_TABLE_MAIN or msg["type"] != RTN_UNICAST:
                continue
            if proto is not None and msg["proto"] != proto:
                continue
            gateway, oif = _first_hop(msg)
            dst = IPv4Network(f"{msg.get_attr('RTA_DST') or '0.0.0.0'}/{msg['dst_len']}")
            out.append(RouteEntry(dst, gateway, oif, msg["proto"], msg.get_attr("RTA_PRIORITY") or 0))
        return out

    def egress(self, host: str, *, ignore_proto: int, ignore_oif: int | None = None) -> Egress | None:
        """Where the system sends packets for ``host`` when Shallot's own routes (``ignore_proto``, and any
        through ``ignore_oif``) are left out; None when nothing routes it.

        The kernel's own lookup (``ip route get``) comes first: it follows policy rules and picks one hop
        of a multipath route.  Once the split routes are in place it answers "into the tunnel" for any
        new host, so then the answer is the most specific main-table route that is not ours."""
        try:
            with _errors():
                got = self._ipr.route("get", dst=host)
        except OSError:
            got = []
        if got and got[0]["type"] == RTN_UNICAST:
            gateway, oif = _first_hop(got[0])
            if oif is not None and oif != ignore_oif:
                return Egress(gateway, oif)
        target = ip_address(host)
        usable = [entry for entry in self.routes() if entry.proto != ignore_proto and entry.oif is not None
                  and entry.oif != ignore_oif and target in entry.dst]
        if not usable:
            return None
        best = max(usable, key=lambda entry: (entry.dst.prefixlen, -entry.metric))  # longest prefix, then metric
        assert best.oif is not None
        return Egress(best.gateway, best.oif)

    def default_device(self) -> str | None:
        """The interface of the IPv4 default route (the lowest metric when there are several)."""
        defaults = [entry for entry in self.routes() if entry.dst.prefixlen == 0 and entry.oif is not None]
        if not defaults:
            return None
        oif = min(defaults, key=lambda entry: entry.metric).oif
        return self.names().get(oif) if oif is not None else None

    def replace_route(self, dst: IPv4Network, *, oif: int, proto: int, gateway: str | None = None) -> None:
        spec: dict[str, Any] = {"dst": str(dst.network_address), "dst_len": dst.prefixlen, "oif": oif,
                                "proto": proto, "table": RT_TABLE_MAIN}
        if gateway:
            spec["gateway"] = gateway
        else:
            spec["scope"] = RT_SCOPE_LINK  # what `ip route replace PREFIX dev X` sets for an on-link route
        with _errors():
            self._ipr.route("replace", **spec)

    def delete_route(self, dst: IPv4Network, *, proto: int) -> bool:
        """Delete the route to ``dst`` if it carries ``proto`` (never somebody else's route)."""
        try:
            with _errors():
                self._ipr.route("del", dst=str(dst.network_address), dst_len=dst.prefixlen, proto=proto,
                                table=RT_TABLE_MAIN, scope=RT_SCOPE_NOWHERE)
        except OSError:
            return False
        return True


def _run(fn: Callable[[Netlink], T]) -> T:
    with _errors(), IPRoute() as ipr:
        return fn(Netlink(ipr))


def session(fn: Callable[[Netlink], T]) -> T:
    """Run ``fn`` with a netlink session and close it.  pyroute2 ≥ 0.9 drives its sync API with an event loop
    of its own, which cannot run inside a running one; its maintainer's advice (pyroute2 issue 1342) is a
    thread.  So from inside asyncio the session runs in a short-lived thread (which starts in this
    process's network namespace); it still blocks the caller, like the ``ip`` spawns it replaces."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run(fn)
    with ThreadPoolExecutor(1, thread_name_prefix="netlink") as pool:
        return pool.submit(_run, fn).result()



def _flush_conntrack(source: str) -> int:
    with _errors():
        ct = Conntrack()
        try:
            entries = [e for e in ct.dump_entries(tuple_orig=NFCTAttrTuple(saddr=source))
                       if e.tuple_orig.saddr == source]  # the filter is a hint: older kernels dump everything
            for entry in entries:
                with contextlib.suppress(NetlinkError):  # gone meanwhile
                    ct.delete(entry)
            return len(entries)
        finally:
            ct.close()


def flush_conntrack(source: str) -> int:
    """Delete the conntrack entries of flows ``source`` opened (their original source); how many.  Blocks:
    from asyncio call it through ``asyncio.to_thread`` (pyroute2 runs a loop of its own, see ``session``)."""
    return _flush_conntrack(source)
