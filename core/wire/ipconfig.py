"""The IP service's CONFIG answer and the tunnel address plan (docs/PROTOCOL.md §6.7), shared by the exit,
which writes it, and the client and its privileged helper, which read and check it (pure).

    CONFIG payload: version u8 (1) | address[4] | resolver[4] | mtu u16
"""

from __future__ import annotations

import ipaddress

from shallot.crypto.codec import DecodeError, Reader
from shallot.crypto.params import MAX_DATA_LEN

POOL = ipaddress.IPv4Network("100.64.0.0/10")
GATEWAY = ipaddress.IPv4Address("100.64.0.1")
GATEWAY_PACKED = GATEWAY.packed
CONFIG_VERSION = 1
TUNNEL_MTU = MAX_DATA_LEN  # one IP packet per cell


def encode_config(address: ipaddress.IPv4Address, resolver: ipaddress.IPv4Address, mtu: int) -> bytes:
    return bytes((CONFIG_VERSION,)) + address.packed + resolver.packed + mtu.to_bytes(2, "big")


def decode_config(data: bytes) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address, int]:
    r = Reader(data)
    if r.u8() != CONFIG_VERSION:
        raise DecodeError("unsupported config version")
    address, resolver, mtu = ipaddress.IPv4Address(r.take(4)), ipaddress.IPv4Address(r.take(4)), r.u16()
    r.end()
    # the resolver must sit behind the tunnel: one outside it (say, the guard's address, which is routed
    # around the tunnel) would carry the user's DNS in the clear
    if address not in POOL or resolver not in POOL or not 576 <= mtu <= MAX_DATA_LEN:
        raise DecodeError("implausible config")
    return address, resolver, mtu
