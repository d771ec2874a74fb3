"""DHT datagrams and the RPC allow-list (pure; docs/PROTOCOL.md §12.3).

The datagram framing is rpcudp's, so the wrapped kademlia/rpcudp code and ours agree on the wire:

    0x00 | msg id (20 bytes) | msgpack [name, [args...]] | zero padding       request (>= 1200 bytes)
    0x01 | msg id (20 bytes) | msgpack result | Ed25519 signature (64 bytes)  response (<= the request)

**No amplification.**  Requests are padded with zero bytes to at least ``REQUEST_MIN_LEN``; an answer is
never longer than the request it answers (contact lists and record pages shrink to fit, an answer that
cannot fit is not sent).  A spoofed request therefore makes a node send at most what the spoofer sent.

rpcudp itself dispatches any name it receives to ``rpc_<name>`` and turns any unknown attribute into
a remote call.  Here only the names in ``RPCS`` exist, every argument and every result has a fixed type
and size, and anything else is a ``WireError`` whose ``reason`` the caller counts and drops.

Every answer is signed by the answering relay's identity key over the label, its relay id, the
BLAKE2s-256 digest of the exact request datagram (which holds the requester's random message id and
caller id) and the answer's own bytes (``answer_message``).  An answer therefore binds one relay key
to one request: a forged answer, an answer to an altered request and a replayed old answer all fail
``verify_answer`` (review C2).
"""

from __future__ import annotations

import io
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import umsgpack

from shallot.core.discovery.records import KEY_LEN, MAX_RECORD_LEN
from shallot.crypto.params import LABEL_DHT_ANSWER
from shallot.crypto.primitives import AuthFailure, blake2s, ed25519_verify

REQUEST = 0x00
RESPONSE = 0x01
MSG_ID_LEN = 20
HEADER_LEN = 1 + MSG_ID_LEN
SIG_LEN = 64  # Ed25519 signature closing every response
MAX_DATAGRAM = 4096  # our largest message (a list_records page) is about 1.2 KB
MAX_CONTACTS = 20  # k: a find_node answer holds at most this many contacts
MAX_PAGE_RECORDS = 16
# every request is padded to at least this (QUIC's Initial size: no IP fragments on any real path).  The
# longest answer to it: a ping answer with a 1024-byte descriptor (storage.MAX_STORED_LEN; the longest
# descriptor Descriptor.create makes is 906 bytes) is 21 + 1050 + 64 = 1135 bytes
REQUEST_MIN_LEN = 1200


class WireError(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _id(v: object) -> bool:
    return isinstance(v, bytes) and len(v) == KEY_LEN


def _id_or_nil(v: object) -> bool:
    return v is None or _id(v)


def _record(v: object) -> bool:
    return isinstance(v, bytes) and 0 < len(v) <= MAX_RECORD_LEN


def _record_or_nil(v: object) -> bool:
    return v is None or _record(v)


# name -> one check per argument (the caller's node id comes first: nil for a client, which is never
# added to a routing table)
RPCS: dict[str, tuple[Any, ...]] = {
    "ping": (_id_or_nil, _record_or_nil),  # caller id, caller's descriptor (proves the id; nil for clients)
    "store": (_id_or_nil, _id, _record),  # caller id, key, record
    "find_node": (_id_or_nil, _id),  # caller id, target
    "find_value": (_id_or_nil, _id),  # caller id, key
    "list_records": (_id_or_nil, _id_or_nil),  # caller id, cursor (records with larger keys)
}


@dataclass(frozen=True)
class Datagram:
    kind: int
    msg_id: bytes
    body: Any
    signed: bytes = b""  # a response: every byte before the signature
    signature: bytes = b""  # a response: the 64-byte signature; empty for a request


def decode_datagram(data: bytes) -> Datagram:
    if len(data) < HEADER_LEN + 1:
        raise WireError("short")
    if len(data) > MAX_DATAGRAM:
        raise WireError("long")
    kind = data[0]
    if kind not in (REQUEST, RESPONSE):
        raise WireError("kind")
    if kind == REQUEST:
        if len(data) < REQUEST_MIN_LEN:
            raise WireError("unpadded")  # answering it could amplify
        stream = io.BytesIO(data[HEADER_LEN:])
        try:
            body = umsgpack.unpack(stream)  # one object; what follows is the padding
        except Exception:  # umsgpack raises many types (and RecursionError on deep nesting): all are bad input
            raise WireError("msgpack") from None
        if any(data[HEADER_LEN + stream.tell():]):
            raise WireError("padding")
        return Datagram(kind, data[1:HEADER_LEN], body)
    if len(data) < HEADER_LEN + 1 + SIG_LEN:
        raise WireError("short")
    end = len(data) - SIG_LEN
    try:
        body = umsgpack.unpackb(data[HEADER_LEN:end])
    except Exception:  # umsgpack raises many types (and RecursionError on deep nesting): all are bad input
        raise WireError("msgpack") from None
    return Datagram(kind, data[1:HEADER_LEN], body, data[:end], data[end:])


def parse_request(body: Any) -> tuple[str, tuple[Any, ...]]:
    """(name, args) of an allowed, well-typed request; raises WireError."""
    if not isinstance(body, list) or len(body) != 2 or not isinstance(body[0], str) \
            or not isinstance(body[1], list):
        raise WireError("shape")
    name, args = body
    checks = RPCS.get(name)
    if checks is None:
        raise WireError("unknown_rpc")
    if len(args) != len(checks) or not all(check(a) for check, a in zip(checks, args)):
        raise WireError("bad_args")
    return name, tuple(args)


def encode_request(msg_id: bytes, name: str, args: tuple[Any, ...]) -> bytes:
    """A request, zero-padded to at least REQUEST_MIN_LEN bytes (room for its answer)."""
    if name not in RPCS:
        raise ValueError(f"{name!r} is not an allowed RPC")
    out = bytes([REQUEST]) + msg_id + umsgpack.packb([name, list(args)])
    return out + bytes(max(0, REQUEST_MIN_LEN - len(out)))


def encode_result_within(msg_id: bytes, result: Any, room: int) -> bytes | None:
    """The unsigned response (0x01 || msg id || msgpack result) if it leaves ``room`` bytes for the
    signature and the whole answer within the request's length; a contact list is cut (farthest contacts
    first) until it fits; None if nothing fits."""
    head = bytes([RESPONSE]) + msg_id
    while True:
        unsigned = head + umsgpack.packb(result)
        if len(unsigned) + SIG_LEN <= room:
            return unsigned
        if isinstance(result, list) and result and all(isinstance(c, list) and len(c) == 3 for c in result):
            result = result[:-1]  # find_node / find_value contacts, closest first: the farthest go
            continue
        return None


def sign_response(unsigned: bytes, *, responder_id: bytes, request: bytes, sign: Callable[[bytes], bytes]) -> bytes:
    signature = sign(answer_message(responder_id, request_digest(request), unsigned))
    if len(signature) != SIG_LEN:
        raise ValueError("an Ed25519 signature is 64 bytes")
    return unsigned + signature


def request_digest(request: bytes) -> bytes:
    """BLAKE2s-256 of the exact request datagram: what an answer is bound to."""
    return blake2s(request)


def answer_message(responder_id: bytes, digest: bytes, unsigned: bytes) -> bytes:
    """The bytes an answer's signature covers: label || responder relay id (20) || request digest (32) ||
    the response datagram up to the signature (0x01 || msg id || msgpack result)."""
    return LABEL_DHT_ANSWER + responder_id + digest + unsigned


def encode_response(msg_id: bytes, result: Any, *, responder_id: bytes, request: bytes,
                    sign: Callable[[bytes], bytes]) -> bytes:
    """A signed response to the request datagram ``request``; ``sign`` is the relay identity's Ed25519."""
    return sign_response(bytes([RESPONSE]) + msg_id + umsgpack.packb(result), responder_id=responder_id,
                         request=request, sign=sign)


def verify_answer(dg: Datagram, *, identity_pub: bytes, responder_id: bytes, digest: bytes) -> bool:
    """True if the response ``dg`` is signed by ``identity_pub`` (the relay ``responder_id``) for the
    request whose digest is ``digest``.  The caller has checked that ``responder_id`` is the relay id of
    ``identity_pub`` (a descriptor that validated)."""
    try:  # a request (no signature) or a short one fails here too: cryptography refuses the length
        ed25519_verify(identity_pub, dg.signature, answer_message(responder_id, digest, dg.signed))
    except AuthFailure:
        return False
    return True


# ---------------------------------------------------------------------------------------------- results

Contact = tuple[bytes, str, int]


def parse_ping_result(v: Any) -> tuple[bytes, bytes]:
    if isinstance(v, list) and len(v) == 2 and _id(v[0]) and _record(v[1]):
        return v[0], v[1]
    raise WireError("bad_result")


def parse_store_result(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    raise WireError("bad_result")


def parse_contacts(v: Any) -> list[Contact]:
    if not isinstance(v, list) or len(v) > MAX_CONTACTS:
        raise WireError("bad_result")
    out = []
    for item in v:
        if not (isinstance(item, list) and len(item) == 3 and _id(item[0]) and isinstance(item[1], str)
                and isinstance(item[2], int) and not isinstance(item[2], bool) and 0 < item[2] < 65536):
            raise WireError("bad_result")
        try:
            ipaddress.ip_address(item[1])
        except ValueError:
            raise WireError("bad_result") from None
        out.append((item[0], item[1], item[2]))
    return out


def parse_find_value_result(v: Any) -> bytes | list[Contact]:
    if isinstance(v, dict):
        if len(v) == 1 and _record(v.get("value")):
            return v["value"]
        raise WireError("bad_result")
    return parse_contacts(v)


def parse_page_result(v: Any) -> tuple[list[bytes], bytes | None]:
    if isinstance(v, list) and len(v) == 2 and isinstance(v[0], list) and len(v[0]) <= MAX_PAGE_RECORDS \
            and all(isinstance(r, bytes) and len(r) <= MAX_RECORD_LEN for r in v[0]) and _id_or_nil(v[1]):
        return list(v[0]), v[1]
    raise WireError("bad_result")
