"""One-round-trip circuit build (docs/PROTOCOL.md §5).

The client writes one record per hop into a CREATE body of N_SLOTS fixed slots.  Each record is
encrypted to its hop's onion key with a fresh client ephemeral X.  Hop i reads slot 0, strips one
ChaCha20 layer (keyed by its record secret) from the later slots, shifts them left and appends a
random filler slot, so every hop sees the same layout and no slot is equal on two links.

Each hop answers with a fresh ephemeral Y and an auth tag.  Circuit keys mix DH(x, Y) (forward
secrecy) with DH(x, B) (authenticates the hop's onion key), as in ntor.  On the way back each hop
adds a ChaCha20 layer (keyed by its circuit keys) over the reply slots and prepends its own reply.

    slot    = onion_key_id[4] | X[32] | AEAD(k_rec, nonce 0, payload[96], ad = key_id | X)
    payload = version u8 | kind u8 | hour u32 | kind-specific[90]
      kind 1 EXTEND:    address[19] | next link key[32] | next relay id[20] | zero[19]
      kind 2 TERMINATE: service u8 | zero[89]
    reply   = Y[32] | auth[16]

Circuit keys and auth bind the protocol id and the hop's relay id and link key (ntor's ID and PROTOID):
a relay that publishes another relay's onion key and forwards CREATEs to it cannot pass as that hop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from shallot.crypto.codec import DecodeError, Reader, decode_address, encode_address
from shallot.crypto.keys import RELAY_ID_LEN, onion_key_id
from shallot.crypto.params import (
    CREATE_SLOTS_LEN,
    CREATED_SLOTS_LEN,
    LABEL_CIRCUIT,
    LABEL_CREATED,
    LABEL_LAYER,
    LABEL_RECORD,
    N_SLOTS,
    PROTOCOL_VERSION,
    PROTOID_BUILD,
    RECORD_EPOCH_S,
    RECORD_LEN,
    RECORD_PAYLOAD_LEN,
    RECORD_SLACK_S,
    REPLY_LEN,
)
from shallot.crypto.primitives import (
    AuthFailure,
    RandomBytes,
    X25519Key,
    aead_open,
    aead_seal,
    hkdf,
    hmac_sha256,
)

KIND_EXTEND = 1
KIND_TERMINATE = 2
SERVICE_ECHO = 1  # answer every datagram with the same bytes
SERVICE_IP = 2  # whole IP packets to and from the internet (exit/ipservice.py)
SERVICE_DISCARD = 3  # count and drop (RFC 863 style): one-way measurements
SERVICES = {SERVICE_ECHO: "echo", SERVICE_IP: "ip", SERVICE_DISCARD: "discard"}
ZERO_NONCE = bytes(12)


@dataclass(frozen=True)
class HopKeys:
    """Symmetric keys of one hop of one circuit (8 x 32 bytes from HKDF)."""

    fwd_hdr: bytes
    fwd_body: bytes
    bwd_hdr: bytes
    bwd_body: bytes
    fwd_e2e: bytes
    bwd_e2e: bytes
    reply_layer: bytes
    auth: bytes

    def __repr__(self) -> str:
        return "HopKeys(<redacted>)"

    @classmethod
    def derive(cls, dh_ephemeral: bytes, dh_onion: bytes, x_pub: bytes, onion_pub: bytes, y_pub: bytes,
               hop: HopIdentity) -> HopKeys:
        info = PROTOID_BUILD + hop.relay_id + hop.link_pub + x_pub + onion_pub + y_pub
        okm = hkdf(dh_ephemeral + dh_onion, salt=LABEL_CIRCUIT, info=info, length=8 * 32)
        return cls(*(okm[i * 32:(i + 1) * 32] for i in range(8)))


@dataclass(frozen=True)
class HopIdentity:
    """Who the client means to reach at this hop (from its descriptor), bound into the hop's keys."""

    relay_id: bytes
    link_pub: bytes

    def __post_init__(self) -> None:
        if len(self.relay_id) != RELAY_ID_LEN or len(self.link_pub) != 32:
            raise ValueError("bad hop identity")


@dataclass(frozen=True)
class ExtendTo:
    host: str
    port: int
    link_pub: bytes
    relay_id: bytes


@dataclass(frozen=True)
class Terminate:
    service: int


Instruction = ExtendTo | Terminate


@dataclass(frozen=True)
class HopTarget:
    """What the client needs to know about a hop to write its record."""

    onion_pub: bytes
    instruction: Instruction
    identity: HopIdentity


@dataclass(frozen=True)
class PendingHop:
    x_private: X25519Key
    x_pub: bytes
    onion_pub: bytes
    dh_onion: bytes = field(repr=False)
    identity: HopIdentity


def _xor_stream(key: bytes, data: bytes) -> bytes:
    """ChaCha20 keystream XOR with a zero nonce: each key here is used for exactly one message."""
    enc = Cipher(algorithms.ChaCha20(key, bytes(16)), None).encryptor()
    return enc.update(data)


def _record_keys(dh_onion: bytes, x_pub: bytes, onion_pub: bytes) -> tuple[bytes, bytes]:
    info = x_pub + onion_pub
    return (hkdf(dh_onion, salt=LABEL_RECORD, info=info, length=32),
            hkdf(dh_onion, salt=LABEL_LAYER, info=info, length=32))


def _auth(keys: HopKeys, x_pub: bytes, y_pub: bytes, onion_pub: bytes, hop: HopIdentity) -> bytes:
    data = LABEL_CREATED + PROTOID_BUILD + hop.relay_id + hop.link_pub + x_pub + y_pub + onion_pub
    return hmac_sha256(keys.auth, data)[:16]


def encode_payload(instruction: Instruction, hour: int) -> bytes:
    out = bytearray([PROTOCOL_VERSION])
    if isinstance(instruction, ExtendTo):
        out.append(KIND_EXTEND)
        out += hour.to_bytes(4, "big")
        out += encode_address(instruction.host, instruction.port) + instruction.link_pub + instruction.relay_id
    else:
        out.append(KIND_TERMINATE)
        out += hour.to_bytes(4, "big")
        out.append(instruction.service)
    return bytes(out.ljust(RECORD_PAYLOAD_LEN, b"\x00"))


def decode_payload(payload: bytes) -> tuple[Instruction, int]:
    r = Reader(payload)
    if r.u8() != PROTOCOL_VERSION:
        raise DecodeError("unsupported record version")
    kind, hour = r.u8(), r.u32()
    instruction: Instruction
    if kind == KIND_EXTEND:
        host, port = decode_address(r)
        link_pub, relay_id = r.take(32), r.take(RELAY_ID_LEN)
        instruction = ExtendTo(host, port, link_pub, relay_id)
    elif kind == KIND_TERMINATE:
        service = r.u8()
        if service not in SERVICES:
            raise DecodeError("unknown service")
        instruction = Terminate(service)
    else:
        raise DecodeError("unknown record kind")
    if any(r.take(r.remaining())):
        raise DecodeError("nonzero record padding")
    return instruction, hour


def record_hour(wall: float) -> int:
    """The only clock a client puts into a build record: the hour (docs/PROTOCOL.md §5.3)."""
    return int(wall // RECORD_EPOCH_S)


def record_time_ok(hour: int, wall: float) -> bool:
    """A record of ``hour`` is acceptable now: its hour, widened by RECORD_SLACK_S on both sides."""
    return hour * RECORD_EPOCH_S - RECORD_SLACK_S <= wall < (hour + 1) * RECORD_EPOCH_S + RECORD_SLACK_S


def record_expiry(hour: int) -> float:
    """Wall time after which a record of ``hour`` can never be accepted again (its replay-cache entry
    may go then)."""
    return float((hour + 1) * RECORD_EPOCH_S + RECORD_SLACK_S)


def client_create(hops: list[HopTarget], *, hour: int, rng: RandomBytes,
                  ephemerals: list[bytes] | list[X25519Key] | None = None) -> tuple[list[PendingHop], bytes]:
    """Return per-hop state and the CREATE slots region (CREATE_SLOTS_LEN bytes)."""
    if not 1 <= len(hops) <= N_SLOTS:
        raise ValueError(f"a circuit has 1..{N_SLOTS} hops")
    pending: list[PendingHop] = []
    records: list[bytes] = []
    layers: list[bytes] = []
    for i, hop in enumerate(hops):
        given = ephemerals[i] if ephemerals is not None else None
        x_priv = given if isinstance(given, X25519Key) else X25519Key(given if given is not None else rng(32))
        x_pub = x_priv.public
        dh_onion = x_priv.exchange(hop.onion_pub)
        k_rec, k_layer = _record_keys(dh_onion, x_pub, hop.onion_pub)
        key_id = onion_key_id(hop.onion_pub)
        sealed = aead_seal(k_rec, ZERO_NONCE, encode_payload(hop.instruction, hour), key_id + x_pub)
        records.append(key_id + x_pub + sealed)
        layers.append(_xor_stream(k_layer, bytes((N_SLOTS - 1) * RECORD_LEN)))
        pending.append(PendingHop(x_priv, x_pub, hop.onion_pub, dh_onion, hop.identity))
    # Hop i sees slot j (j >= 1) after hops 0..i-1 stripped their layers; so in the first hop's view,
    # hop k's record sits in slot k, XORed with the layer of every earlier hop at the offset it sees.
    slots = [bytearray(rng(RECORD_LEN)) for _ in range(N_SLOTS)]
    for k, record in enumerate(records):
        data = int.from_bytes(record, "big")
        for i in range(k - 1, -1, -1):  # hop i sees hop k's record at its slot k - i, i.e. layer offset k-i-1
            off = (k - i - 1) * RECORD_LEN
            data ^= int.from_bytes(layers[i][off:off + RECORD_LEN], "big")
        slots[k] = bytearray(data.to_bytes(RECORD_LEN, "big"))
    return pending, b"".join(bytes(s) for s in slots)


@dataclass(frozen=True)
class RecordOpened:
    instruction: Instruction
    hour: int
    x_pub: bytes
    dh_onion: bytes = field(repr=False)
    onion_pub: bytes = b""
    forward_slots: bytes = field(default=b"", repr=False)  # what to send to the next hop (meaningless for TERMINATE)


def relay_open(slots: bytes, onion_keys: dict[bytes, X25519Key], *, rng: RandomBytes) -> RecordOpened:
    """Open our record (slot 0).  ``onion_keys`` maps key id -> private onion key.

    Raises DecodeError or AuthFailure (unknown key id, bad AEAD, malformed payload)."""
    if len(slots) != CREATE_SLOTS_LEN:
        raise DecodeError("bad CREATE length")
    key_id, x_pub, sealed = slots[:4], slots[4:36], slots[36:RECORD_LEN]
    private = onion_keys.get(key_id)
    if private is None:
        raise AuthFailure("unknown onion key")
    public = private.public
    dh_onion = private.exchange(x_pub)
    k_rec, k_layer = _record_keys(dh_onion, x_pub, public)
    payload = aead_open(k_rec, ZERO_NONCE, sealed, key_id + x_pub)
    instruction, hour = decode_payload(payload)
    rest = _xor_stream(k_layer, slots[RECORD_LEN:])
    return RecordOpened(instruction, hour, x_pub, dh_onion, public, rest + rng(RECORD_LEN))


def relay_reply(opened: RecordOpened, own: HopIdentity, *, rng: RandomBytes,
                y_private: bytes | X25519Key | None = None) -> tuple[HopKeys, bytes]:
    """Return our circuit keys and our 48-byte reply.  ``own``: this relay's id and link key."""
    y = y_private if isinstance(y_private, X25519Key) else X25519Key(y_private if y_private is not None else rng(32))
    y_pub = y.public
    keys = HopKeys.derive(y.exchange(opened.x_pub), opened.dh_onion, opened.x_pub, opened.onion_pub, y_pub, own)
    return keys, y_pub + _auth(keys, opened.x_pub, y_pub, opened.onion_pub, own)


def relay_created_first(reply: bytes, *, rng: RandomBytes) -> bytes:
    """The last hop starts the CREATED slots: its reply, then random filler."""
    return reply + rng(CREATED_SLOTS_LEN - REPLY_LEN)


def relay_created_wrap(keys: HopKeys, reply: bytes, slots_from_next: bytes) -> bytes:
    """A forwarding hop layers the next hop's slots and prepends its own reply (dropping the last slot)."""
    if len(slots_from_next) != CREATED_SLOTS_LEN:
        raise DecodeError("bad CREATED length")
    return reply + _xor_stream(keys.reply_layer, slots_from_next[:CREATED_SLOTS_LEN - REPLY_LEN])


def client_created(pending: list[PendingHop], slots: bytes) -> list[HopKeys]:
    """Check every hop's reply and return their keys.  Raises AuthFailure or DecodeError."""
    if len(slots) != CREATED_SLOTS_LEN:
        raise DecodeError("bad CREATED length")
    out: list[HopKeys] = []
    data = slots
    for hop in pending:
        y_pub, auth = data[:32], data[32:REPLY_LEN]
        keys = HopKeys.derive(hop.x_private.exchange(y_pub), hop.dh_onion, hop.x_pub, hop.onion_pub, y_pub,
                              hop.identity)
        if not _ct_equal(_auth(keys, hop.x_pub, y_pub, hop.onion_pub, hop.identity), auth):
            raise AuthFailure("hop reply failed authentication")
        out.append(keys)
        data = _xor_stream(keys.reply_layer, data[REPLY_LEN:])
    return out


def _ct_equal(a: bytes, b: bytes) -> bool:
    import hmac
    return hmac.compare_digest(a, b)
