"""How addresses are judged (pure): which network an address counts as, and where a relay may extend.

``Address`` (host, port) itself and its wire format live in crypto/codec.py, the ground floor.
"""

from __future__ import annotations

import enum
import ipaddress

from shallot.core.errors import ShallotError
from shallot.crypto.codec import Address

__all__ = ["Address", "Scope", "aggregate_key", "extend_target_allowed", "host_key", "parse_hostport", "scope",
           "source_key", "subnet_key"]


class Scope(enum.Enum):
    GLOBAL = "global"
    PRIVATE = "private"  # CGNAT, RFC 1918, ULA, documentation: routable somewhere, not on the internet
    LINK_LOCAL = "link-local"
    LOOPBACK = "loopback"
    UNSPECIFIED = "unspecified"


def scope(host: str) -> Scope | None:
    """Where ``host`` is reachable from, or None for addresses nobody may extend to (not an IP address,
    multicast, broadcast).  IPv4-mapped and 6to4 IPv6 addresses are judged as the IPv4 address they carry."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            ip = embedded
    if ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        return None
    if ip.is_unspecified:
        return Scope.UNSPECIFIED
    if ip.is_loopback:
        return Scope.LOOPBACK
    if ip.is_link_local:
        return Scope.LINK_LOCAL
    return Scope.GLOBAL if ip.is_global else Scope.PRIVATE


def extend_target_allowed(own_host: str, target_host: str) -> bool:
    """A relay extends only to addresses in its own scope: a public relay only to global addresses (a
    client could otherwise aim it at services behind it, e.g. 169.254.169.254), a relay on a private
    network also to private ones, a loopback test relay only to loopback.  Never to multicast,
    broadcast or unspecified addresses.  The NAT layer applies the same rule to STUN forwarding."""
    target, own = scope(target_host), scope(own_host)
    if target is None or target is Scope.UNSPECIFIED or own is None:
        return False
    if own is Scope.LOOPBACK:
        return target is Scope.LOOPBACK
    if target is Scope.GLOBAL:
        return True
    if target is Scope.PRIVATE:
        return own in (Scope.PRIVATE, Scope.UNSPECIFIED)
    if target is Scope.LINK_LOCAL:
        return own is Scope.LINK_LOCAL
    return False


def subnet_key(host: str, port: int) -> str:
    """The network a relay address counts as.  Loopback relays (a test network on one machine, such as
    ``shallot demo``) count one network per address and port; nothing else is relaxed."""
    ip = ipaddress.ip_address(host)
    if ip.is_loopback:
        return f"loopback {host} {port}"
    prefix = 16 if ip.version == 4 else 32
    return str(ipaddress.ip_network(f"{host}/{prefix}", strict=False))


def host_key(host: str, port: int) -> str:
    """The address an operator cannot cheaply have many of: the IPv4 address or the IPv6 /64.  Loopback
    relays (a test network on one machine) count one address per address *and port*, as in subnet_key."""
    ip = ipaddress.ip_address(host)
    if ip.is_loopback:
        return f"loopback {host} {port}"
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{host}/64", strict=False))
    return host


def source_key(host: str) -> str:
    """Whom a per-source limit counts: an IPv4 address, or the /64 of an IPv6 address (one subscriber's
    prefix: an attacker rotating addresses inside it is still one source)."""
    ip = _unmapped(host)
    if ip is None:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _unmapped(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an address, an IPv4-mapped IPv6 address as its IPv4 address; None if not an address."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_hostport(text: str) -> Address:
    """``HOST:PORT`` or ``[v6]:PORT`` with an IP address, as the command line takes relay addresses."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ShallotError(f"bad address {text!r}: expected HOST:PORT with an IP address and a port 1-65535")
    return host, int(port)


def aggregate_key(host: str) -> str:
    """The neighbourhood of a source for aggregate limits: the IPv4 /24 or the IPv6 /48 (one site).  A
    loopback address is its own aggregate: on one machine (``shallot demo``, the tests' networks of
    127.x.y.z hosts) a /24 is no site."""
    ip = _unmapped(host)
    if ip is None:
        return host
    if ip.is_loopback:
        return str(ip)
    prefix = 48 if isinstance(ip, ipaddress.IPv6Address) else 24
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
