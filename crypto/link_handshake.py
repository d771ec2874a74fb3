"""Link handshake messages (docs/PROTOCOL.md §4): Noise NK for anonymous clients, Noise IK between relays.

Pure functions and small state objects; the link machine in ``shallot.core.link`` drives them.

    INIT_CLIENT  0x51 | version u8 | sender u32 | e[32] | enc(reserved u64 = 0 | resume[16]) | mac1[16] | mac2[16]
    INIT_RELAY   0x52 | version u8 | sender u32 | e[32] | enc(s)[48] |
                 enc(identity[32] | cert_expires u64 | cert_sig[64] | timestamp_ns u64) | mac1[16] | mac2[16]
    RESPONSE     0x53 | receiver u32 | e[32] | enc(sender u32)
    COOKIE_REPLY 0x59 | receiver u32 | nonce[12] | enc(cookie[16])

mac2 and the cookie reply are WireGuard's DoS cookie (its paper, §5.4.7), with ChaCha20-Poly1305 and a
random 12-byte nonce in place of XChaCha20-Poly1305, and HMAC-SHA256 in place of keyed BLAKE2s.

The Noise prologue binds the label, the message type, the version and the sender index.  A client sends
no clock (review M5): the reserved field is zero; replays are caught by the responder's ephemeral cache,
and a replay after that cannot use the link it makes (docs/PROTOCOL.md §4.5).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from functools import lru_cache

from shallot.crypto.codec import DecodeError, Reader
from shallot.crypto.keys import relay_id_of, verify_link_cert
from shallot.crypto.noise import NoiseHandshake
from shallot.crypto.params import (
    LABEL_COOKIE,
    LABEL_MAC1,
    LABEL_PROLOGUE,
    LABEL_RESUME,
    MAC_LEN,
    MSG_COOKIE_REPLY,
    MSG_INIT_CLIENT,
    MSG_INIT_RELAY,
    MSG_RESPONSE,
    PROTOCOL_VERSION,
)
from shallot.crypto.primitives import AuthFailure, RandomBytes, aead_open, aead_seal, blake2s, hkdf, hmac_sha256

INIT_CLIENT_LEN = 1 + 1 + 4 + 32 + (8 + 16 + 16) + 2 * MAC_LEN  # 110
INIT_RELAY_LEN = 1 + 1 + 4 + 32 + 48 + (32 + 8 + 64 + 8 + 16) + 2 * MAC_LEN  # 246
RESPONSE_LEN = 1 + 4 + 32 + (4 + 16)  # 57
COOKIE_LEN = 16
COOKIE_NONCE_LEN = 12
COOKIE_REPLY_LEN = 1 + 4 + COOKIE_NONCE_LEN + COOKIE_LEN + 16  # 49
NO_MAC2 = bytes(MAC_LEN)  # mac2 of an initiator that holds no cookie
NO_RESUME = bytes(16)
NK_RESERVED = bytes(8)  # where v1 drafts had the client's clock in nanoseconds


@dataclass(frozen=True)
class TransportKeys:
    send: bytes
    recv: bytes
    resume: bytes  # 16-byte token a client may present in its next initiation to keep its circuits

    def __repr__(self) -> str:
        return "TransportKeys(<redacted>)"


@dataclass(frozen=True)
class InitiatorState:
    noise: NoiseHandshake
    sender_index: int
    mac1: bytes = b""  # of the initiation sent: the associated data of a cookie reply to it


@dataclass(frozen=True)
class RelayPeer:
    identity_pub: bytes
    cert_expires: int

    @property
    def relay_id(self) -> bytes:
        return relay_id_of(self.identity_pub)


@dataclass(frozen=True)
class Initiation:
    """A verified initiation, seen by the responder."""

    noise: NoiseHandshake
    sender_index: int
    timestamp_ns: int  # relays (IK) only; 0 for a client
    ephemeral: bytes
    resume: bytes = field(repr=False)  # NO_RESUME for a fresh client link or for a relay
    relay: RelayPeer | None  # None: anonymous client


def mac1(responder_link_pub: bytes, data: bytes) -> bytes:
    return blake2s(LABEL_MAC1 + responder_link_pub + data)[:MAC_LEN]


def mac2(cookie: bytes, data: bytes) -> bytes:
    """data: the initiation up to and including mac1."""
    return hmac_sha256(cookie, data)[:MAC_LEN]


def _macs(responder_link_pub: bytes, body: bytes, cookie: bytes | None) -> tuple[bytes, bytes]:
    m1 = mac1(responder_link_pub, body)
    return m1, body + m1 + (mac2(cookie, body + m1) if cookie is not None else NO_MAC2)


def _prologue(msg_type: int, version: int, sender_index: int) -> bytes:
    return LABEL_PROLOGUE + bytes([msg_type, version]) + sender_index.to_bytes(4, "big")


def _keys(noise: NoiseHandshake) -> TransportKeys:
    send, recv = noise.split()
    first, second = (send, recv) if noise.initiator else (recv, send)
    return TransportKeys(send=send, recv=recv, resume=hkdf(first + second, salt=LABEL_RESUME, info=b"", length=16))


def client_initiation(*, responder_link_pub: bytes, sender_index: int, rng: RandomBytes,
                      resume: bytes = NO_RESUME, ephemeral: bytes | None = None,
                      cookie: bytes | None = None) -> tuple[InitiatorState, bytes]:
    head = bytes([MSG_INIT_CLIENT, PROTOCOL_VERSION]) + sender_index.to_bytes(4, "big")
    noise = NoiseHandshake("NK", initiator=True, rs=responder_link_pub, e=ephemeral,
                           prologue=_prologue(MSG_INIT_CLIENT, PROTOCOL_VERSION, sender_index))
    body = head + noise.write_message(NK_RESERVED + resume, rng)
    m1, packet = _macs(responder_link_pub, body, cookie)
    return InitiatorState(noise, sender_index, m1), packet


def relay_initiation(*, link_private: bytes, identity_pub: bytes, cert_expires: int, cert_sig: bytes,
                     responder_link_pub: bytes, sender_index: int, timestamp_ns: int, rng: RandomBytes,
                     ephemeral: bytes | None = None, cookie: bytes | None = None) -> tuple[InitiatorState, bytes]:
    head = bytes([MSG_INIT_RELAY, PROTOCOL_VERSION]) + sender_index.to_bytes(4, "big")
    noise = NoiseHandshake("IK", initiator=True, s=link_private, rs=responder_link_pub, e=ephemeral,
                           prologue=_prologue(MSG_INIT_RELAY, PROTOCOL_VERSION, sender_index))
    payload = identity_pub + cert_expires.to_bytes(8, "big") + cert_sig + timestamp_ns.to_bytes(8, "big")
    body = head + noise.write_message(payload, rng)
    m1, packet = _macs(responder_link_pub, body, cookie)
    return InitiatorState(noise, sender_index, m1), packet


def check_mac1(link_pub: bytes, packet: bytes) -> bool:
    """Cheap pre-DH filter: only someone who knows our link key can make us do a DH."""
    return len(packet) > 2 * MAC_LEN and hmac.compare_digest(
        mac1(link_pub, packet[:-2 * MAC_LEN]), packet[-2 * MAC_LEN:-MAC_LEN])


def check_mac2(cookie: bytes, packet: bytes) -> bool:
    """The initiation carries a mac2 made with ``cookie`` (the one its source address would get now)."""
    return len(packet) > 2 * MAC_LEN and hmac.compare_digest(mac2(cookie, packet[:-MAC_LEN]), packet[-MAC_LEN:])


# ---------------------------------------------------------------------------- cookies (docs/PROTOCOL.md §4.12)


def cookie_for(secret: bytes, addr_bytes: bytes) -> bytes:
    """The cookie of a source address under one responder secret (rotated every ``COOKIE_SECRET_S``)."""
    return hmac_sha256(secret, addr_bytes)[:COOKIE_LEN]


@lru_cache(maxsize=16)  # one link key per relay: the hash is made once, not per reply
def cookie_key(responder_link_pub: bytes) -> bytes:
    """Who can read a cookie reply: anyone who knows the responder's link key, as for mac1; the
    initiation's mac1 as associated data limits it to whoever saw that initiation."""
    return blake2s(LABEL_COOKIE + responder_link_pub)


def write_cookie_reply(*, responder_link_pub: bytes, initiation: bytes, cookie: bytes, rng: RandomBytes) -> bytes:
    """The answer of a responder under load to an initiation without a valid mac2: 49 bytes, less than
    half the 110-byte initiation (no amplification)."""
    nonce = rng(COOKIE_NONCE_LEN)
    m1 = initiation[-2 * MAC_LEN:-MAC_LEN]
    return (bytes([MSG_COOKIE_REPLY]) + initiation[2:6] + nonce
            + aead_seal(cookie_key(responder_link_pub), nonce, cookie, m1))


def unauthenticated_replies() -> list[tuple[str, int, str, int]]:
    """Every answer the link layer gives to a packet it has not authenticated, with the request that causes it:
    (request, its bytes, reply, its bytes).  All replies are smaller than their requests (docs/PROTOCOL.md
    §4.10); docs/DOS.md tables the ratios."""
    return [("INIT_CLIENT", INIT_CLIENT_LEN, "RESPONSE", RESPONSE_LEN),
            ("INIT_RELAY", INIT_RELAY_LEN, "RESPONSE", RESPONSE_LEN),
            ("INIT_CLIENT", INIT_CLIENT_LEN, "COOKIE_REPLY", COOKIE_REPLY_LEN),
            ("INIT_RELAY", INIT_RELAY_LEN, "COOKIE_REPLY", COOKIE_REPLY_LEN)]


def cookie_reply_receiver(packet: bytes) -> int:
    if len(packet) != COOKIE_REPLY_LEN or packet[0] != MSG_COOKIE_REPLY:
        raise DecodeError("bad cookie reply")
    return int.from_bytes(packet[1:5], "big")


def read_cookie_reply(*, responder_link_pub: bytes, state: InitiatorState, packet: bytes) -> bytes:
    """The cookie in a reply to our pending initiation.  Raises DecodeError or AuthFailure."""
    if cookie_reply_receiver(packet) != state.sender_index:
        raise DecodeError("cookie reply for another handshake")
    nonce = packet[5:5 + COOKIE_NONCE_LEN]
    return aead_open(cookie_key(responder_link_pub), nonce, packet[5 + COOKIE_NONCE_LEN:], state.mac1)


def read_initiation(*, link_private: bytes, link_pub: bytes, packet: bytes, wall: float) -> Initiation:
    """Verify an initiation (mac1 must already be checked).  Raises DecodeError or AuthFailure."""
    msg_type = packet[0] if packet else -1
    expected = {MSG_INIT_CLIENT: INIT_CLIENT_LEN, MSG_INIT_RELAY: INIT_RELAY_LEN}.get(msg_type)
    if expected is None or len(packet) != expected:
        raise DecodeError("bad initiation length")
    r = Reader(packet[:-2 * MAC_LEN])
    r.u8()
    version = r.u8()
    if version != PROTOCOL_VERSION:
        raise DecodeError("unsupported version")
    sender_index = r.u32()
    pattern = "NK" if msg_type == MSG_INIT_CLIENT else "IK"
    noise = NoiseHandshake(pattern, initiator=False, s=link_private,
                           prologue=_prologue(msg_type, version, sender_index))
    payload = noise.read_message(r.take(r.remaining()))
    assert noise.re is not None
    pr = Reader(payload)
    if msg_type == MSG_INIT_CLIENT:
        reserved, resume = pr.take(8), pr.take(16)
        pr.end()
        if reserved != NK_RESERVED:
            raise DecodeError("nonzero reserved field")
        return Initiation(noise, sender_index, 0, noise.re, resume, None)
    identity_pub, cert_expires, cert_sig, timestamp_ns = pr.take(32), pr.u64(), pr.take(64), pr.u64()
    pr.end()
    assert noise.rs is not None
    if cert_expires < wall:
        raise AuthFailure("expired link certificate")
    verify_link_cert(identity_pub, noise.rs, cert_expires, cert_sig)
    return Initiation(noise, sender_index, timestamp_ns, noise.re, NO_RESUME, RelayPeer(identity_pub, cert_expires))


def write_response(init: Initiation, *, sender_index: int, rng: RandomBytes,
                   ephemeral: bytes | None = None) -> tuple[TransportKeys, bytes]:
    if ephemeral is not None:
        init.noise.e = ephemeral
        from shallot.crypto.primitives import x25519_public
        init.noise.e_pub = x25519_public(ephemeral)
    msg = init.noise.write_message(sender_index.to_bytes(4, "big"), rng)
    packet = bytes([MSG_RESPONSE]) + init.sender_index.to_bytes(4, "big") + msg
    return _keys(init.noise), packet


def response_receiver(packet: bytes) -> int:
    if len(packet) != RESPONSE_LEN or packet[0] != MSG_RESPONSE:
        raise DecodeError("bad response")
    return int.from_bytes(packet[1:5], "big")


def read_response(state: InitiatorState, packet: bytes) -> tuple[TransportKeys, int]:
    """Return (keys, responder's index).  Raises DecodeError or AuthFailure."""
    if response_receiver(packet) != state.sender_index:
        raise DecodeError("response for another handshake")
    payload = state.noise.read_message(packet[5:])
    if len(payload) != 4:
        raise DecodeError("bad response payload")
    return _keys(state.noise), int.from_bytes(payload, "big")
