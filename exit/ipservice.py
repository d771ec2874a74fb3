"""The IP exit service (sans-I/O): circuits that ask for SERVICE_IP send and receive whole IP packets.

This is the exit's per-packet logic, with no TUN or NAT of its own.
An adapter writes ``tun_outbox`` to the exit's TUN device (whose kernel masquerades onto the
uplink) and hands every packet read from the TUN to ``route_back``.

* On attach, a circuit gets a virtual IPv4 address from 100.64.0.0/10 (drawn at random so it says
  nothing about how many clients there are); the exit's own TUN address, 100.64.0.1, is also the
  DNS resolver it offers.  The client asks with an empty CONFIG message and gets
  ``version u8 | address[4] | resolver[4] | mtu u16``.
* Client -> internet: the packet must parse, come from the circuit's own address (no spoofing),
  pass the exit policy (which also keeps clients from reaching each other: 100.64/10 is rejected)
  and the circuit's rate limit; then it goes to the TUN.  IPv6 is not offered: dropped, counted.
* Internet -> client: the destination address picks the circuit; anything else is dropped.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict
from typing import Any

from shallot.core.ratelimit import TokenBuckets
from shallot.core.wire.cells import MSG_CONFIG, MSG_DATA, encode_message
from shallot.core.wire.ipconfig import GATEWAY, GATEWAY_PACKED, POOL, TUNNEL_MTU, encode_config
from shallot.core.wire.ippacket import PROTO_UDP, v4_fields
from shallot.crypto.codec import DecodeError
from shallot.crypto.params import MAX_DATA_LEN
from shallot.crypto.primitives import RandomBytes
from shallot.exit.policy import ExitPolicy


class IpExitService:
    def __init__(self, *, rng: RandomBytes, policy: ExitPolicy | None = None, max_circuits: int = 4096,
                 max_quarantine: int = 65536, packets_per_second: float = 40000.0, burst: float = 8000.0) -> None:
        # the per-circuit packet limit (PROTOCOL §8.6): above one circuit's speed, so an honest stream is never
        # policed (at 20 000/s a single iperf3 upload lost 40 % to drops and retransmissions)
        self._rng = rng
        self.policy = policy or ExitPolicy()
        self.max_circuits = max_circuits
        self.counters: Counter[str] = Counter()
        self.tun_outbox: list[bytes] = []
        self._by_address: dict[bytes, Any] = {}  # packed address -> circuit (the per-packet lookups use bytes)
        self._address_of: dict[int, ipaddress.IPv4Address] = {}  # id(circuit) -> address
        self._packed_of: dict[int, bytes] = {}
        self._buckets = TokenBuckets(packets_per_second, burst, max_keys=max_circuits * 2)
        # freed addresses wait here until the adapter has flushed their conntrack entries (take_freed, release):
        # a new owner must never inherit the old owner's flows
        self._quarantine: OrderedDict[bytes, None] = OrderedDict()
        self._freed: list[bytes] = []
        self.max_quarantine = max_quarantine

    def attach(self, circ: Any) -> bool:
        """Give the circuit an address; False when the exit is full."""
        if len(self._by_address) >= self.max_circuits:
            self.counters["ip_refused_full"] += 1
            return False
        span = POOL.num_addresses - 3  # not the network, the gateway or the broadcast address
        while True:
            address = POOL.network_address + 2 + int.from_bytes(self._rng(4), "big") % span
            if address.packed not in self._by_address and address.packed not in self._quarantine:
                break
        self._by_address[address.packed] = circ
        self._address_of[id(circ)] = address
        self._packed_of[id(circ)] = address.packed
        self.counters["ip_circuits_attached"] += 1
        return True

    def detach(self, circ: Any) -> None:
        address = self._address_of.pop(id(circ), None)
        if address is not None:
            del self._by_address[address.packed]
            del self._packed_of[id(circ)]
            self._quarantine[address.packed] = None
            self._freed.append(address.packed)
            while len(self._quarantine) > self.max_quarantine:  # the flush keeps failing: the pool is 4 M wide
                self._quarantine.popitem(last=False)
                self.counters["ip_quarantine_overflow"] += 1

    def take_freed(self) -> list[ipaddress.IPv4Address]:
        """Addresses freed since the last call, for the adapter to flush their conntrack entries; each stays
        out of the pool until ``release``."""
        out = [ipaddress.IPv4Address(p) for p in self._freed]
        self._freed.clear()
        return out

    def release(self, address: ipaddress.IPv4Address) -> None:
        """The address's conntrack entries are gone: it may be given out again."""
        self._quarantine.pop(address.packed, None)

    def address_of(self, circ: Any) -> ipaddress.IPv4Address | None:
        return self._address_of.get(id(circ))

    def on_message(self, circ: Any, msg_type: int, data: bytes, now: float) -> list[bytes]:
        """A message from the client; returns inner messages to send back."""
        packed = self._packed_of.get(id(circ))
        if packed is None:
            self.counters["ip_drop_not_attached"] += 1
            return []
        if msg_type == MSG_CONFIG:
            return [encode_message(MSG_CONFIG, encode_config(self._address_of[id(circ)], GATEWAY, TUNNEL_MTU))]
        if msg_type != MSG_DATA:
            self.counters["ip_drop_unexpected_message"] += 1
            return []
        try:
            src, dst, proto, _sport, dport, _fragment, total = v4_fields(data)
        except DecodeError:
            ipv6 = bool(data) and data[0] >> 4 == 6
            self.counters["ip_drop_ipv6_not_offered" if ipv6 else "ip_drop_malformed"] += 1
            return []
        if src != packed:
            self.counters["ip_drop_spoofed_source"] += 1
            return []
        if data[0] != 0x45:  # IPv4 options (source routing, record route, ...): nothing honest needs them
            self.counters["ip_drop_options"] += 1
            return []
        if dst == GATEWAY_PACKED:
            # the exit itself: only its DNS forwarder (UDP 53) is offered there
            if dport != 53 or proto != PROTO_UDP:
                self.counters["ip_drop_to_exit"] += 1
                return []
        else:
            verdict = self.policy.verdict(dst, proto, dport)
            if verdict is not None:
                self.policy.counters[verdict] += 1
                self.counters["ip_drop_policy"] += 1
                return []
        if not self._buckets.allow(packed, now):
            self.counters["ip_drop_rate_limited"] += 1
            return []
        self.counters["ip_to_tun"] += 1
        self.tun_outbox.append(data[:total])
        return []

    def status(self) -> dict[str, int]:
        return {}  # the exit reports its IP counters under "ip" (relay/service.py)

    def route_back(self, packet: bytes) -> tuple[Any, bytes] | None:
        """A packet read from the TUN: (circuit, inner DATA message) for its client, or None (dropped)."""
        try:
            _src, dst, _proto, _sport, _dport, _fragment, total = v4_fields(packet)
        except DecodeError:
            self.counters["ip_from_tun_malformed"] += 1
            return None
        if packet[0] != 0x45:
            self.counters["ip_from_tun_options"] += 1
            return None
        circ = self._by_address.get(dst)
        if circ is None:
            self.counters["ip_from_tun_no_circuit"] += 1
            return None
        if total > MAX_DATA_LEN:
            self.counters["ip_from_tun_too_big"] += 1  # the TUN's MTU should prevent this
            return None
        self.counters["ip_from_tun"] += 1
        return circ, encode_message(MSG_DATA, packet[:total])
