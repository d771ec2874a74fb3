"""Exit policy (pure): which destinations an exit sends clients' packets to.

Groundwork for the IP exit (the VPN issue): nothing calls this yet; the exit's TUN service will run
every client packet through ``ExitPolicy.allows`` before it reaches the TUN.

Order of evaluation, first match wins:
1. built-in rejects that no file can override: loopback, RFC 1918, link-local (incl. the cloud metadata
   address 169.254.169.254), CGNAT 100.64.0.0/10, multicast, reserved and unspecified ranges, IPv6
   unique-local / link-local / multicast, v4-mapped IPv6 addresses (checked as the IPv4 address they
   embed), and the exit host's own addresses and networks;
2. the rules of the policy file, in order;
3. the default: reject TCP port 25 (SMTP), accept everything else.

Rule syntax, one per line (``#`` starts a comment)::

    accept|reject [tcp|udp|icmp|*] ADDRESS[/PREFIX]|*[:PORT[-PORT]|:*]

e.g. ``reject tcp *:25``, ``accept * 192.0.2.0/24:*``, ``reject udp *:137-139``, ``accept [2001:db8::/32]:443``.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass

from shallot.core.wire.ippacket import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, IPAddress, PacketInfo

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

BUILTIN_REJECTS: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "unspecified"), ("10.0.0.0/8", "private"), ("100.64.0.0/10", "cgnat"),
    ("127.0.0.0/8", "loopback"), ("169.254.0.0/16", "link-local"), ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"), ("192.168.0.0/16", "private"), ("198.18.0.0/15", "reserved"),
    ("224.0.0.0/4", "multicast"), ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"), ("::1/128", "loopback"), ("fc00::/7", "private"), ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"), ("100::/64", "reserved"), ("2001:db8::/32", "reserved"),
)
_PROTOS = {"tcp": PROTO_TCP, "udp": PROTO_UDP, "icmp": PROTO_ICMP, "*": None}


class PolicyError(ValueError):
    """A policy file line is malformed; the message names the line."""


@dataclass(frozen=True)
class Rule:
    accept: bool
    proto: int | None  # None: any protocol
    network: Network | None  # None: any address
    ports: tuple[int, int] | None  # None: any port

    def matches(self, info: PacketInfo) -> bool:
        if self.proto is not None:
            proto = PROTO_ICMP if info.proto == PROTO_ICMPV6 else info.proto
            if proto != self.proto:
                return False
        if self.network is not None and (info.dst.version != self.network.version or info.dst not in self.network):
            return False
        if self.ports is not None:
            if info.dst_port is None:
                # a portless protocol, or a non-first fragment: the first fragment carries the ports and
                # was judged, and the kernel cannot reassemble a datagram without it (Linux drops
                # overlapping fragments), so port rules do not apply here; address rules still do
                return False
            lo, hi = self.ports
            return lo <= info.dst_port <= hi
        return True


def parse_rule(line: str, lineno: int = 0) -> Rule:
    parts = line.split()
    where = f"line {lineno}: " if lineno else ""
    if len(parts) == 2:
        parts.insert(1, "*")
    if len(parts) != 3 or parts[0] not in ("accept", "reject") or parts[1] not in _PROTOS:
        raise PolicyError(f"{where}expected 'accept|reject [tcp|udp|icmp|*] ADDRESS[:PORTS]', got {line!r}")
    target = parts[2]
    ports: tuple[int, int] | None = None
    if target.startswith("["):  # [v6]:port
        addr, _, rest = target[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ("*" if not rest else None)
    elif target.count(":") == 1:
        addr, port_text = target.split(":")
    else:
        addr, port_text = target, "*"
    if port_text is None:
        raise PolicyError(f"{where}bad address {target!r}")
    if port_text != "*":
        lo_text, _, hi_text = port_text.partition("-")
        try:
            lo, hi = int(lo_text), int(hi_text or lo_text)
        except ValueError:
            raise PolicyError(f"{where}bad port {port_text!r}") from None
        if not 0 < lo <= hi < 65536:
            raise PolicyError(f"{where}ports must be 1-65535 and low-high, got {port_text!r}")
        ports = (lo, hi)
    network: Network | None = None
    if addr != "*":
        try:
            network = ipaddress.ip_network(addr, strict=False)
        except ValueError:
            raise PolicyError(f"{where}bad address {addr!r}") from None
    return Rule(parts[0] == "accept", _PROTOS[parts[1]], network, ports)


def parse_policy(text: str) -> list[Rule]:
    rules = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line:
            rules.append(parse_rule(line, lineno))
    return rules


VERDICT_CACHE = 65536
DEFAULT_TAIL = (parse_rule("reject tcp *:25"), parse_rule("accept *"))


class ExitPolicy:
    """Per-packet decisions with counters of every rejection and why."""

    def __init__(self, rules: list[Rule] | None = None, own_networks: list[Network] | None = None, *,
                 verdict_cache: int = VERDICT_CACHE) -> None:
        self.rules = list(rules or []) + list(DEFAULT_TAIL)
        self.verdict_cache = verdict_cache
        self.counters: Counter[str] = Counter()
        self._builtin = [(ipaddress.ip_network(net), why) for net, why in BUILTIN_REJECTS]
        self.own_networks: list[Network] = []
        self._verdicts: dict[tuple[bytes, int, int | None], str | None] = {}
        self.set_own_networks(own_networks or [])

    def set_own_networks(self, networks: list[Network]) -> None:
        """The exit host's own addresses and networks (refreshed when its interfaces change)."""
        if list(networks) != self.own_networks:
            self.own_networks = list(networks)
            self._verdicts.clear()

    def off_limits(self) -> list[Network]:
        """Every network the built-in rejects cover, and the exit's own (the DNS forwarder refuses their
        reverse names)."""
        return [*(network for network, _ in self._builtin), *self.own_networks]

    def builtin_reason(self, dst: IPAddress) -> str | None:
        if isinstance(dst, ipaddress.IPv6Address) and dst.ipv4_mapped is not None:
            return self.builtin_reason(dst.ipv4_mapped) or "v4-mapped"
        for network, why in self._builtin:
            if dst.version == network.version and dst in network:
                return why
        if dst == ipaddress.IPv4Address("255.255.255.255"):
            return "broadcast"
        for network in self.own_networks:
            if dst.version == network.version and dst in network:
                return "exit-own-network"
        return None

    def _judge(self, info: PacketInfo) -> str | None:
        why = self.builtin_reason(info.dst)
        if why is not None:
            return f"reject_{why}"
        for rule in self.rules:
            if rule.matches(info):
                return None if rule.accept else "reject_rule"
        return "reject_rule"  # unreachable: the tail accepts

    def verdict(self, dst: bytes, proto: int, dst_port: int | None) -> str | None:
        """None to accept, else the counter the rejection goes to.  A decision depends only on the
        destination, the protocol and the destination port, so it is cached (every packet of a flow is
        judged the same way; the cache empties when full or when the exit's own networks change)."""
        key = (dst, proto, dst_port)
        try:
            return self._verdicts[key]
        except KeyError:
            pass
        address = ipaddress.ip_address(dst)
        # _judge reads only the destination, protocol and port (the key above)
        verdict = self._judge(PacketInfo(address.version, address, address, proto, None, dst_port, False, 0))
        if len(self._verdicts) >= self.verdict_cache:
            self._verdicts.clear()
        self._verdicts[key] = verdict
        return verdict

    def allows(self, info: PacketInfo) -> bool:
        verdict = self.verdict(info.dst.packed, info.proto, info.dst_port)
        if verdict is not None:
            self.counters[verdict] += 1
            return False
        return True
