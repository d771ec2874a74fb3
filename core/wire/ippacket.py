"""IPv4/IPv6 header parsing for the tunnel (pure).  Only what routing and exit policy need: version,
addresses, protocol, ports and whether the packet is a non-first fragment.  Raises only DecodeError.
``v4_fields`` is the exit's per-packet fast path (raw address bytes, no objects); ``parse_packet`` gives
the same facts as a PacketInfo."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from shallot.crypto.codec import DecodeError

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
_PORT_PROTOS = frozenset({PROTO_TCP, PROTO_UDP})
# IPv6 extension headers we walk through to find the transport header
_EXT_HEADERS = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options
_FRAGMENT = 44

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class PacketInfo:
    version: int
    src: IPAddress
    dst: IPAddress
    proto: int
    src_port: int | None  # None: no transport header here (not TCP/UDP, or a non-first fragment)
    dst_port: int | None
    fragment: bool  # a non-first fragment (carries no transport header)
    length: int


def parse_packet(packet: bytes) -> PacketInfo:
    if not packet:
        raise DecodeError("empty packet")
    version = packet[0] >> 4
    if version == 4:
        return _parse_v4(packet)
    if version == 6:
        return _parse_v6(packet)
    raise DecodeError("not IPv4 or IPv6")


def _ports(packet: bytes, offset: int, proto: int) -> tuple[int | None, int | None]:
    if proto not in _PORT_PROTOS:
        return None, None
    if len(packet) < offset + 4:
        raise DecodeError("truncated transport header")
    return int.from_bytes(packet[offset:offset + 2], "big"), int.from_bytes(packet[offset + 2:offset + 4], "big")


def v4_fields(packet: bytes) -> tuple[bytes, bytes, int, int | None, int | None, bool, int]:
    """(src[4], dst[4], proto, src_port, dst_port, non-first fragment, total length) of an IPv4 packet."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        raise DecodeError("truncated IPv4 header" if packet[:1] and packet[0] >> 4 == 4 else "not IPv4")
    ihl = (packet[0] & 0x0F) * 4
    total = (packet[2] << 8) | packet[3]
    if ihl < 20 or total < ihl or total > len(packet):
        raise DecodeError("bad IPv4 lengths")
    proto = packet[9]
    if ((packet[6] & 0x1F) << 8) | packet[7]:  # fragment offset
        return packet[12:16], packet[16:20], proto, None, None, True, total
    if proto not in _PORT_PROTOS:
        return packet[12:16], packet[16:20], proto, None, None, False, total
    if total < ihl + 4:
        raise DecodeError("truncated transport header")
    return (packet[12:16], packet[16:20], proto, (packet[ihl] << 8) | packet[ihl + 1],
            (packet[ihl + 2] << 8) | packet[ihl + 3], False, total)


def _parse_v4(packet: bytes) -> PacketInfo:
    src, dst, proto, sport, dport, fragment, total = v4_fields(packet)
    return PacketInfo(4, ipaddress.IPv4Address(src), ipaddress.IPv4Address(dst), proto, sport, dport, fragment, total)


def _parse_v6(packet: bytes) -> PacketInfo:
    if len(packet) < 40:
        raise DecodeError("truncated IPv6 header")
    total = 40 + int.from_bytes(packet[4:6], "big")
    if total > len(packet):
        raise DecodeError("bad IPv6 payload length")
    src = ipaddress.IPv6Address(packet[8:24])
    dst = ipaddress.IPv6Address(packet[24:40])
    proto, offset = packet[6], 40
    for _ in range(8):  # a bounded walk: no extension-header loops
        if proto in _EXT_HEADERS:
            if total < offset + 8:
                raise DecodeError("truncated IPv6 extension header")
            proto, offset = packet[offset], offset + 8 + packet[offset + 1] * 8
        elif proto == _FRAGMENT:
            if total < offset + 8:
                raise DecodeError("truncated IPv6 fragment header")
            frag_offset = int.from_bytes(packet[offset + 2:offset + 4], "big") >> 3
            proto, offset = packet[offset], offset + 8
            if frag_offset:
                return PacketInfo(6, src, dst, proto, None, None, True, total)
        else:
            break
    else:
        raise DecodeError("too many IPv6 extension headers")
    if offset > total:
        raise DecodeError("IPv6 extension headers overrun the packet")
    sport, dport = _ports(packet[:total], offset, proto)
    return PacketInfo(6, src, dst, proto, sport, dport, False, total)
