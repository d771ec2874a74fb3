"""Wire codecs of the NAT traversal messages (docs/PROTOCOL.md §13).  Pure; raises only DecodeError.

On the link socket, by first byte (next to the link packets 0x51..0x54 and STUN 0x00/0x01):

    INTRO_REQUEST 0x55 (280 B) version u8 | request_id[8] | target relay_id[20] | mapping u8 | filtering u8 | 0^248
    INTRO_ANSWER  0x56 (37 B)  request_id[8] | status u8 | peer address[19] | session[8]
    PUNCH         0x57 (12 B)  kind u8 (0 probe, 1 reply) | token[8] | 0^2
    RELAYED       0x58         session[8] | one link packet (first byte 0x51..0x54, at most 1429 bytes)

Inside an authenticated relay link, as cells with circuit id 0:

    REGISTER  command 6  payload: version u8 (1) | zero
    INTRODUCE command 7  payload: requester address[19] | token[8] | session[8] | mapping u8 | filtering u8 | zero
"""

from __future__ import annotations

from dataclasses import dataclass

from shallot.core.wire.cells import encode_cell
from shallot.crypto.codec import Address, DecodeError, Reader, decode_address, encode_address
from shallot.crypto.params import CELL_HEADER_LEN, LINK_PACKET_LEN, MSG_INIT_CLIENT, MSG_TRANSPORT

MSG_INTRO_REQUEST = 0x55
MSG_INTRO_ANSWER = 0x56
MSG_PUNCH = 0x57
MSG_RELAYED = 0x58
CMD_NAT_REGISTER = 6
CMD_NAT_INTRODUCE = 7
NAT_VERSION = 1
# padded so that everything it makes others send to its (spoofable) source is no longer, even counting 28 bytes
# of IPv4/UDP header per datagram: the INTRO_ANSWER (37) and the registered relay's unanswered PUNCH probes
# (limits.PUNCH_PROBES_UNANSWERED = 6, 12 bytes each): 37 + 72 + 7 x 28 = 305 <= 280 + 28
INTRO_REQUEST_LEN = 280
INTRO_ANSWER_LEN = 37
PUNCH_LEN = 12
RELAYED_HEADER_LEN = 9
STATUS_OK = 0
STATUS_UNKNOWN_TARGET = 1
STATUS_BUSY = 2
PUNCH_PROBE = 0
PUNCH_REPLY = 1
_NO_CIRCUIT = bytes(4)


def _addr(addr: Address) -> bytes:
    return encode_address(*addr)  # EncodeError (a ValueError) for what cannot be on the wire


@dataclass(frozen=True)
class IntroRequest:
    request_id: bytes
    target: bytes
    mapping: int = 0
    filtering: int = 0

    def encode(self) -> bytes:
        return (bytes((MSG_INTRO_REQUEST, NAT_VERSION)) + self.request_id + self.target
                + bytes((self.mapping, self.filtering)) + bytes(INTRO_REQUEST_LEN - 32))

    @classmethod
    def decode(cls, data: bytes) -> IntroRequest:
        if len(data) != INTRO_REQUEST_LEN or data[0] != MSG_INTRO_REQUEST:
            raise DecodeError("bad INTRO_REQUEST")
        if data[1] != NAT_VERSION or any(data[32:]) or data[30] > 3 or data[31] > 3:
            raise DecodeError("bad INTRO_REQUEST fields")
        return cls(data[2:10], data[10:30], data[30], data[31])


@dataclass(frozen=True)
class IntroAnswer:
    request_id: bytes
    status: int
    peer: Address | None = None
    session: bytes = bytes(8)

    def encode(self) -> bytes:
        peer = _addr(self.peer) if self.peer is not None else bytes(19)
        return bytes((MSG_INTRO_ANSWER,)) + self.request_id + bytes((self.status,)) + peer + self.session

    @classmethod
    def decode(cls, data: bytes) -> IntroAnswer:
        if len(data) != INTRO_ANSWER_LEN or data[0] != MSG_INTRO_ANSWER:
            raise DecodeError("bad INTRO_ANSWER")
        status = data[9]
        if status == STATUS_OK:
            peer: Address | None = decode_address(Reader(data[10:29]))
        elif status in (STATUS_UNKNOWN_TARGET, STATUS_BUSY):
            peer = None
        else:
            raise DecodeError("bad INTRO_ANSWER status")
        return cls(data[1:9], status, peer, data[29:37])


def encode_punch(kind: int, token: bytes) -> bytes:
    return bytes((MSG_PUNCH, kind)) + token + bytes(2)


def decode_punch(data: bytes) -> tuple[int, bytes]:
    if len(data) != PUNCH_LEN or data[0] != MSG_PUNCH or data[1] > PUNCH_REPLY or data[10:] != bytes(2):
        raise DecodeError("bad PUNCH")
    return data[1], data[2:10]


def relayed_session(data: bytes) -> bytes:
    """Check a RELAYED datagram's framing and return its session id (the inner packet is data[9:])."""
    n = len(data) - RELAYED_HEADER_LEN
    if data[:1] != bytes((MSG_RELAYED,)) or not 1 <= n <= LINK_PACKET_LEN \
            or not MSG_INIT_CLIENT <= data[RELAYED_HEADER_LEN] <= MSG_TRANSPORT:
        raise DecodeError("bad RELAYED")
    return data[1:9]


def is_nat_cell(cell: bytes) -> bool:
    """A NAT control cell (circuit id 0, command REGISTER or above), which a node hands to its NAT part."""
    return cell[4] >= CMD_NAT_REGISTER and cell[:4] == _NO_CIRCUIT


def register_cell() -> bytes:
    return encode_cell(0, CMD_NAT_REGISTER, bytes((NAT_VERSION,)))


@dataclass(frozen=True)
class Introduce:
    requester: Address
    token: bytes
    session: bytes
    mapping: int = 0
    filtering: int = 0

    def cell(self) -> bytes:
        return encode_cell(0, CMD_NAT_INTRODUCE, _addr(self.requester) + self.token + self.session
                           + bytes((self.mapping, self.filtering)))

    @classmethod
    def decode(cls, cell: bytes) -> Introduce:
        r = Reader(cell[CELL_HEADER_LEN:])
        requester = decode_address(r)
        token, session, mapping, filtering = r.take(8), r.take(8), r.u8(), r.u8()
        if mapping > 3 or filtering > 3 or any(r.take(r.remaining())):
            raise DecodeError("bad INTRODUCE")
        return cls(requester, token, session, mapping, filtering)
