"""Minimal sans-I/O STUN Binding codec (RFC 8489, RFC 5780 CHANGE-REQUEST) for the link socket.

Only what NAT discovery needs: Binding requests and success responses, XOR-MAPPED-ADDRESS,
CHANGE-REQUEST, FINGERPRINT, and two private comprehension-optional attributes used between
relays for the filtering test (docs/PROTOCOL.md §13.2).  STUN shares the link socket with link
packets (first byte 0x51..0x54) and the NAT messages (0x55..0x58): a STUN message has its top two
bits zero (first byte 0x00 or 0x01) *and* the magic cookie at offset 4, so the demux is unambiguous.
"""

from __future__ import annotations

import ipaddress
import zlib
from dataclasses import dataclass

from shallot.crypto.codec import Address, DecodeError, Reader

MAGIC = 0x2112A442
MAGIC_BYTES = MAGIC.to_bytes(4, "big")
HEADER_LEN = 20
TXID_LEN = 12
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
ATTR_CHANGE_REQUEST = 0x0003
ATTR_PADDING = 0xC05C  # private, comprehension-optional: zeros padding a request to the longest answer it can get
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_FINGERPRINT = 0x8028
# private, comprehension-optional (0x8000-0xFFFF): ignored by standard STUN servers
ATTR_OTHER_RELAY = 0xC05A  # "ask this relay to answer me" (filtering test, §13.2)
ATTR_RESPONSE_DESTINATION = 0xC05B  # relay-to-relay: "answer this address instead of the source"
CHANGE_IP = 0x04
CHANGE_PORT = 0x02
FINGERPRINT_XOR = 0x5354554E
MAX_ATTRIBUTES = 8
MAX_MESSAGE_LEN = 548  # RFC 8489: fits any path MTU; we never need more
# the longest Binding success response a relay sends: header, XOR-MAPPED-ADDRESS of an IPv6 address (4 + 20)
# and FINGERPRINT (8).  Every Binding request we send is at least this long, and a relay answers a request
# only with an answer no longer than it (no amplification, docs/PROTOCOL.md §13.1)
MAX_RESPONSE_LEN = HEADER_LEN + 24 + 8
FIRST_BYTE_LIMIT = 0x40  # a STUN message's top two bits are zero: its first byte is below this



def is_stun(data: bytes) -> bool:
    """Cheap demux test: top two bits zero, magic cookie in place, 4-byte aligned, long enough."""
    return len(data) >= HEADER_LEN and data[0] < FIRST_BYTE_LIMIT and data[4:8] == MAGIC_BYTES and len(data) % 4 == 0


@dataclass(frozen=True)
class StunMessage:
    msg_type: int
    txid: bytes
    attributes: tuple[tuple[int, bytes], ...] = ()

    def get(self, attr_type: int) -> bytes | None:
        for t, v in self.attributes:
            if t == attr_type:
                return v
        return None

    @property
    def has_fingerprint(self) -> bool:
        return self.get(ATTR_FINGERPRINT) is not None


def _fingerprint(data: bytes) -> bytes:
    return ((zlib.crc32(data) ^ FINGERPRINT_XOR) & 0xFFFFFFFF).to_bytes(4, "big")


def encode(msg: StunMessage, *, fingerprint: bool = True) -> bytes:
    if len(msg.txid) != TXID_LEN or not 0 <= msg.msg_type < 0x4000:
        raise ValueError("bad STUN header")
    body = bytearray()
    for attr_type, value in msg.attributes:
        if attr_type == ATTR_FINGERPRINT:
            continue
        body += attr_type.to_bytes(2, "big") + len(value).to_bytes(2, "big") + value
        body += bytes(-len(value) % 4)
    length = len(body) + (8 if fingerprint else 0)
    out = msg.msg_type.to_bytes(2, "big") + length.to_bytes(2, "big") + MAGIC_BYTES + msg.txid + bytes(body)
    if fingerprint:
        out += ATTR_FINGERPRINT.to_bytes(2, "big") + (4).to_bytes(2, "big") + _fingerprint(out)
    return out


def decode(data: bytes) -> StunMessage:
    """Parse one STUN message.  Raises DecodeError for anything malformed (including a bad FINGERPRINT)."""
    if len(data) > MAX_MESSAGE_LEN:
        raise DecodeError("STUN message too long")
    if not is_stun(data):
        raise DecodeError("not a STUN message")
    r = Reader(data)
    msg_type, length = r.u16(), r.u16()
    r.take(4)
    txid = r.take(TXID_LEN)
    if length != len(data) - HEADER_LEN:
        raise DecodeError("STUN length mismatch")
    attrs: list[tuple[int, bytes]] = []
    while r.remaining():
        if len(attrs) >= MAX_ATTRIBUTES:
            raise DecodeError("too many STUN attributes")
        start = r.consumed
        attr_type, attr_len = r.u16(), r.u16()
        value = r.take(attr_len)
        r.take(-attr_len % 4)
        if attr_type == ATTR_FINGERPRINT:
            if attr_len != 4 or r.remaining():
                raise DecodeError("FINGERPRINT must be last and 4 bytes")
            if value != _fingerprint(data[:start]):
                raise DecodeError("bad STUN FINGERPRINT")
        attrs.append((attr_type, value))
    return StunMessage(msg_type, txid, tuple(attrs))


def encode_xor_address(addr: Address, txid: bytes) -> bytes:
    """XOR-MAPPED-ADDRESS value (RFC 8489 §14.2); also the value of our RESPONSE-DESTINATION and OTHER-RELAY."""
    host, port = addr
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    key = MAGIC_BYTES + (txid if ip.version == 6 else b"")
    x_ip = bytes(a ^ b for a, b in zip(ip.packed, key))
    family = 0x01 if ip.version == 4 else 0x02
    return bytes((0, family)) + (port ^ (MAGIC >> 16)).to_bytes(2, "big") + x_ip


def decode_xor_address(value: bytes, txid: bytes) -> Address:
    r = Reader(value)
    r.u8()
    family = r.u8()
    port = r.u16() ^ (MAGIC >> 16)
    if family == 0x01:
        raw, key = r.take(4), MAGIC_BYTES
    elif family == 0x02:
        raw, key = r.take(16), MAGIC_BYTES + txid
    else:
        raise DecodeError("bad address family")
    r.end()
    if port == 0:
        raise DecodeError("port 0")
    return str(ipaddress.ip_address(bytes(a ^ b for a, b in zip(raw, key)))), port


def binding_request(txid: bytes, *, change_ip: bool = False, change_port: bool = False,
                    other_relay: Address | None = None, response_destination: Address | None = None,
                    fingerprint: bool = True, pad_to: int = MAX_RESPONSE_LEN) -> bytes:
    """A Binding request, padded (PADDING attribute) to at least ``pad_to`` bytes: a relay answers only
    what is no longer than the request."""
    attrs: list[tuple[int, bytes]] = []
    if change_ip or change_port:
        flags = (CHANGE_IP if change_ip else 0) | (CHANGE_PORT if change_port else 0)
        attrs.append((ATTR_CHANGE_REQUEST, flags.to_bytes(4, "big")))
    if other_relay is not None:
        attrs.append((ATTR_OTHER_RELAY, encode_xor_address(other_relay, txid)))
    if response_destination is not None:
        attrs.append((ATTR_RESPONSE_DESTINATION, encode_xor_address(response_destination, txid)))
    bare = encode(StunMessage(BINDING_REQUEST, txid, tuple(attrs)), fingerprint=fingerprint)
    if len(bare) < pad_to:  # 4-byte attribute header, then zeros; lengths stay multiples of 4
        attrs.append((ATTR_PADDING, bytes(max(0, pad_to - len(bare) - 4))))
    return encode(StunMessage(BINDING_REQUEST, txid, tuple(attrs)), fingerprint=fingerprint)


def binding_response(txid: bytes, mapped: Address, *, fingerprint: bool) -> bytes:
    attrs = ((ATTR_XOR_MAPPED_ADDRESS, encode_xor_address(mapped, txid)),)
    return encode(StunMessage(BINDING_SUCCESS, txid, attrs), fingerprint=fingerprint)


def mapped_address(msg: StunMessage) -> Address:
    """The XOR-MAPPED-ADDRESS of a success response; DecodeError if absent or malformed."""
    value = msg.get(ATTR_XOR_MAPPED_ADDRESS)
    if msg.msg_type != BINDING_SUCCESS or value is None:
        raise DecodeError("not a Binding success response with XOR-MAPPED-ADDRESS")
    return decode_xor_address(value, msg.txid)


def change_flags(msg: StunMessage) -> int:
    value = msg.get(ATTR_CHANGE_REQUEST)
    if value is None:
        return 0
    if len(value) != 4:
        raise DecodeError("bad CHANGE-REQUEST")
    return int.from_bytes(value, "big") & (CHANGE_IP | CHANGE_PORT)


def address_attr(msg: StunMessage, attr_type: int) -> Address | None:
    value = msg.get(attr_type)
    return None if value is None else decode_xor_address(value, msg.txid)
