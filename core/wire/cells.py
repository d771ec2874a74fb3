"""Cell and end-to-end message codecs (docs/PROTOCOL.md §6).  Pure; raises only DecodeError.

    cell     = circ_id u32 | command u8 | payload[CELL_LEN - 5]        (always CELL_LEN bytes)
    RELAY    payload = onion-layer region[RELAY_LEN] (crypto/onion.py)
    CREATE   payload = slots[CREATE_SLOTS_LEN] | zero padding
    CREATED  payload = slots[CREATED_SLOTS_LEN] | zero padding
    DESTROY  payload = reason u8 | zero padding
    PADDING  payload = zero padding (link keepalive)

    inner (end-to-end, INNER_LEN bytes inside the exit's AEAD) = type u8 | length u16 | data | zero padding
"""

from __future__ import annotations

import enum

from shallot.crypto.codec import DecodeError
from shallot.crypto.params import (
    CELL_HEADER_LEN,
    CELL_LEN,
    CREATE_SLOTS_LEN,
    CREATED_SLOTS_LEN,
    INNER_LEN,
    MAX_DATA_LEN,
)

CMD_CREATE = 1
CMD_CREATED = 2
CMD_RELAY = 3
CMD_DESTROY = 4
CMD_PADDING = 5
COMMANDS = frozenset({CMD_CREATE, CMD_CREATED, CMD_RELAY, CMD_DESTROY, CMD_PADDING})

MSG_DATA = 1
MSG_END = 2
MSG_DROP = 3
MSG_CONFIG = 4  # IP service: empty request from the client, address/resolver/MTU answer from the exit
MESSAGE_TYPES = frozenset({MSG_DATA, MSG_END, MSG_DROP, MSG_CONFIG})

_PAYLOAD_LEN = CELL_LEN - CELL_HEADER_LEN
_ZERO_PAYLOAD = bytes(_PAYLOAD_LEN)


class DestroyReason(enum.IntEnum):
    REQUESTED = 0  # the client or exit ended the circuit
    PROTOCOL = 1  # malformed or unexpected cell
    INTERNAL = 2
    RESOURCE_LIMIT = 3  # too many circuits, rate limited
    CONNECT_FAILED = 4  # could not reach the next hop
    LINK_DOWN = 5  # a link of the circuit died
    INTEGRITY = 6  # a layer check failed (tampering, a repeated, injected or stale cell)
    TIMEOUT = 7  # idle or build timeout
    HOP_REJECTED = 8  # a hop could not open its build record (bad key, replay, stale clock)
    DESTROYED = 9  # passed on: another hop ended the circuit (reasons never travel past one link, §7.2)
    UNKNOWN = 255


def encode_cell(circ_id: int, command: int, payload: bytes = b"") -> bytes:
    if len(payload) > _PAYLOAD_LEN:
        raise ValueError("cell payload too long")
    head = circ_id.to_bytes(4, "big") + bytes((command,))
    if len(payload) == _PAYLOAD_LEN:
        return head + payload
    return head + payload + _ZERO_PAYLOAD[len(payload):]


def decode_cell(cell: bytes) -> tuple[int, int, bytes]:
    """Return (circ_id, command, payload)."""
    if len(cell) != CELL_LEN:
        raise DecodeError("bad cell length")
    command = cell[4]
    if command not in COMMANDS:
        raise DecodeError("unknown cell command")
    circ_id = int.from_bytes(cell[:4], "big")
    if circ_id == 0 and command != CMD_PADDING:
        raise DecodeError("circuit id 0 is reserved for link padding")
    return circ_id, command, cell[CELL_HEADER_LEN:]


def create_slots(payload: bytes) -> bytes:
    if any(payload[CREATE_SLOTS_LEN:]):
        raise DecodeError("nonzero CREATE padding")
    return payload[:CREATE_SLOTS_LEN]


def created_slots(payload: bytes) -> bytes:
    if any(payload[CREATED_SLOTS_LEN:]):
        raise DecodeError("nonzero CREATED padding")
    return payload[:CREATED_SLOTS_LEN]


def destroy_reason(payload: bytes) -> DestroyReason:
    try:
        return DestroyReason(payload[0])
    except ValueError:
        return DestroyReason.UNKNOWN


_ZERO_INNER = bytes(INNER_LEN)


def encode_message(msg_type: int, data: bytes = b"") -> bytes:
    n = len(data)
    if n > MAX_DATA_LEN:
        raise ValueError(f"message data longer than {MAX_DATA_LEN} bytes")
    return bytes((msg_type, n >> 8, n & 0xFF)) + data + _ZERO_INNER[3 + n:]


def decode_message(inner: bytes) -> tuple[int, bytes]:
    if len(inner) != INNER_LEN:
        raise DecodeError("bad inner length")
    msg_type = inner[0]
    if msg_type not in MESSAGE_TYPES:
        raise DecodeError("unknown message type")
    n = (inner[1] << 8) | inner[2]
    if n > MAX_DATA_LEN:
        raise DecodeError("message length too large")
    return msg_type, inner[3:3 + n]
