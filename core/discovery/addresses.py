"""Which relay addresses discovery accepts, and how addresses are grouped for the Sybil caps (pure).

An address group is what one operator can cheaply have many of: one IPv4 address (or IPv6 /64), and
one IPv4 /16 (or IPv6 /32) for the wider cap.  Loopback addresses are a test network on one machine
(``shallot demo``, the integration tests); as in core/circuit/path.py each loopback address *and port* counts
as its own group there, and loopback is accepted at all only when the node was told so (its seeds are
loopback), so a record can never point a real client at its own machine.

Private networks (RFC 1918, CGNAT 100.64/10, IPv6 ULA fc00::/7 and the deprecated site-local fec0::/10)
are refused the same way unless the node runs a private network on purpose (``--private-network``):
otherwise a record could make a client send link initiations into its own LAN (review M6).  Python's
``is_private`` is not used: it also covers the documentation and benchmarking ranges, which the
netns testbed uses as its "internet".
"""

from __future__ import annotations

import ipaddress

from shallot.core.wire.addresses import host_key, subnet_key
from shallot.crypto.codec import Address

PRIVATE_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7", "fec0::/10"))


def is_private_range(host: str) -> bool:
    """True for an address of a private network (RFC 1918, CGNAT, ULA, site-local); False otherwise
    (also for anything that is not an IP address)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in net for net in PRIVATE_NETWORKS if net.version == ip.version)


def usable_address(host: str, port: int, *, allow_loopback: bool, allow_private: bool = False) -> bool:
    """True if a relay may claim to be reachable at host:port."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if not 0 < port < 65536:
        return False
    if ip.is_loopback:
        return allow_loopback
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return False  # one address, one spelling: v4-mapped forms would dodge the per-IP caps
    if is_private_range(host) and not allow_private:
        return False
    return not (ip.is_unspecified or ip.is_multicast or ip.is_link_local or ip.is_reserved
                or (ip.version == 4 and ip == ipaddress.IPv4Address("255.255.255.255")))


def host_group(host: str, port: int) -> str:
    """The per-address cap's group: the IPv4 address, the IPv6 /64, or loopback address and port (the
    same groups path selection caps: core/wire/addresses.py host_key)."""
    return host_key(host, port)


def net_group(host: str, port: int) -> str:
    """The wider cap's group: IPv4 /16 or IPv6 /32 (the same networks path selection keeps apart)."""
    return subnet_key(host, port)


def dht_address(link_address: Address) -> Address:
    """A relay's DHT socket: the same IP as its link address, port + 1 (docs/PROTOCOL.md §12.1)."""
    host, port = link_address
    if port >= 65535:
        raise ValueError("a relay on port 65535 has no room for its DHT port (link port + 1)")
    return host, port + 1


def link_address_of_dht(dht: Address) -> Address:
    host, port = dht
    return host, port - 1


def same_address(a: Address, b: Address) -> bool:
    """Equal IP (whatever its spelling) and port."""
    try:
        return a[1] == b[1] and ipaddress.ip_address(a[0]) == ipaddress.ip_address(b[0])
    except ValueError:
        return False
