"""Our Noise NK/IK implementation against the independent ``noiseprotocol`` package (test-only oracle).

Both sides use fixed static and ephemeral keys, so every handshake message and the transport keys
must match byte for byte in both directions (ours as initiator, oracle as responder, and vice versa).  With
the Shallot framing around the oracle (header, prologue, mac1, resume token, transport header), the oracle
also reproduces the NK vectors of docs/PROTOCOL.md §11.2, and our IK link messages.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from noise.connection import Keypair, NoiseConnection

from shallot.crypto import link_handshake as lh
from shallot.crypto.keys import RelayKeys
from shallot.crypto.noise import NoiseHandshake
from shallot.crypto.primitives import x25519_public

PROLOGUE = b"shallot-link-v1"
I_STATIC = bytes(range(1, 33))
R_STATIC = bytes(range(101, 133))
I_EPH = bytes(range(33, 65))
R_EPH = bytes(range(65, 97))


def _oracle(pattern: str, initiator: bool) -> NoiseConnection:
    conn = NoiseConnection.from_name(f"Noise_{pattern}_25519_ChaChaPoly_SHA256".encode())
    if initiator:
        conn.set_as_initiator()
        conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, x25519_public(R_STATIC))
        if pattern == "IK":
            conn.set_keypair_from_private_bytes(Keypair.STATIC, I_STATIC)
        conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, I_EPH)
    else:
        conn.set_as_responder()
        conn.set_keypair_from_private_bytes(Keypair.STATIC, R_STATIC)
        conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, R_EPH)
    conn.set_prologue(PROLOGUE)
    conn.start_handshake()
    return conn


@pytest.mark.parametrize("pattern", ["NK", "IK"])
def test_ours_initiator_matches_oracle_responder(pattern: str) -> None:
    ours = NoiseHandshake(pattern, initiator=True, prologue=PROLOGUE,
                          s=I_STATIC if pattern == "IK" else None, rs=x25519_public(R_STATIC), e=I_EPH)
    oracle = _oracle(pattern, initiator=False)
    msg1 = ours.write_message(b"hello responder")
    assert oracle.read_message(msg1) == b"hello responder"
    msg2 = oracle.write_message(b"hello initiator")
    assert ours.read_message(msg2) == b"hello initiator"
    assert ours.complete and oracle.handshake_finished
    assert ours.handshake_hash == oracle.get_handshake_hash()
    send, recv = ours.split()
    # transport keys agree: the oracle decrypts what our send key seals (nonce 0), and vice versa
    from shallot.crypto.primitives import aead_open, aead_seal
    nonce0 = bytes(12)
    assert oracle.decrypt(aead_seal(send, nonce0, b"data")) == b"data"
    assert aead_open(recv, nonce0, oracle.encrypt(b"back")) == b"back"


@pytest.mark.parametrize("pattern", ["NK", "IK"])
def test_oracle_initiator_matches_ours_responder(pattern: str) -> None:
    oracle = _oracle(pattern, initiator=True)
    ours = NoiseHandshake(pattern, initiator=False, prologue=PROLOGUE, s=R_STATIC, e=R_EPH)
    msg1 = oracle.write_message(b"ping")
    assert ours.read_message(msg1) == b"ping"
    if pattern == "IK":
        assert ours.rs == x25519_public(I_STATIC)
    msg2 = ours.write_message(b"pong")
    assert oracle.read_message(msg2) == b"pong"
    assert ours.handshake_hash == oracle.get_handshake_hash()


def test_both_sides_same_bytes_as_oracle() -> None:
    """Same fixed keys: our initiator's first message equals the oracle initiator's, byte for byte."""
    for pattern in ("NK", "IK"):
        ours = NoiseHandshake(pattern, initiator=True, prologue=PROLOGUE,
                              s=I_STATIC if pattern == "IK" else None, rs=x25519_public(R_STATIC), e=I_EPH)
        assert ours.write_message(b"x") == _oracle(pattern, initiator=True).write_message(b"x")


# ------------------------------------------------------------------ the Shallot framing (docs/PROTOCOL.md §4.2-§4.4)

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "protocol_v1.json").read_text())


def _mac1(responder_link_pub: bytes, body: bytes) -> bytes:
    """§4.2 with the standard library's BLAKE2s (not ours)."""
    return hashlib.blake2s(b"shallot-v1 mac1" + responder_link_pub + body, digest_size=32).digest()[:16]


def _framed_oracle(pattern: str, initiator: bool, prologue: bytes, *, static: bytes | None, remote: bytes | None,
                   ephemeral: bytes) -> NoiseConnection:
    conn = NoiseConnection.from_name(f"Noise_{pattern}_25519_ChaChaPoly_SHA256".encode())
    conn.set_as_initiator() if initiator else conn.set_as_responder()
    if static is not None:
        conn.set_keypair_from_private_bytes(Keypair.STATIC, static)
    if remote is not None:
        conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, remote)
    conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral)
    conn.set_prologue(prologue)
    conn.start_handshake()
    return conn


def _keys_of(conn: NoiseConnection) -> tuple[bytes, bytes]:
    """(sending key, receiving key) of a finished oracle handshake."""
    return conn.noise_protocol.cipher_state_encrypt.k, conn.noise_protocol.cipher_state_decrypt.k


def test_oracle_reproduces_the_nk_vectors_of_section_11_2() -> None:
    """The §11.2 INIT_CLIENT, RESPONSE, k1/k2/resume and transport packet, made by the oracle with the Shallot
    framing around it (header, prologue, mac1, resume token, transport header), byte for byte."""
    keys, nk, tp = VECTORS["keys"], VECTORS["nk_handshake"], VECTORS["transport_packet"]
    i, exp = nk["inputs"], nk["expected"]
    link_private = bytes.fromhex(keys["inputs"]["link_private"])
    link_pub = bytes.fromhex(keys["expected"]["link_pub"])
    head = bytes([0x51, 1]) + bytes.fromhex(i["sender_index"])
    prologue = PROLOGUE + head  # label | type | version | sender index
    client = _framed_oracle("NK", True, prologue, static=None, remote=link_pub,
                            ephemeral=bytes.fromhex(i["initiator_ephemeral_private"]))
    body = head + client.write_message(bytes(8) + bytes.fromhex(i["resume"]))  # reserved | resume
    assert (body + _mac1(link_pub, body) + bytes(16)).hex() == exp["init_client"]

    relay = _framed_oracle("NK", False, prologue, static=link_private, remote=None,
                           ephemeral=bytes.fromhex(i["responder_ephemeral_private"]))
    payload = relay.read_message(body[6:])
    assert payload == bytes(8) + bytes.fromhex(i["resume"])
    response = b"\x53" + bytes.fromhex(i["sender_index"]) + relay.write_message(bytes.fromhex(i["responder_index"]))
    assert response.hex() == exp["response"]
    assert client.read_message(response[5:]) == bytes.fromhex(i["responder_index"])

    k1, k2 = _keys_of(client)
    assert (k1.hex(), k2.hex()) == (exp["k1"], exp["k2"]) and _keys_of(relay) == (k2, k1)
    resume = HKDF(algorithm=hashes.SHA256(), length=16, salt=b"shallot-v1 link-resume", info=b"").derive(k1 + k2)
    assert resume.hex() == exp["resume"]

    # §4.4: the oracle's own cipher state seals the transport packet (nonce = the wire counter)
    header = b"\x54" + bytes.fromhex(tp["inputs"]["receiver_index"]) + int(tp["inputs"]["counter"], 16).to_bytes(
        8, "little")
    cs = client.noise_protocol.cipher_state_encrypt
    cs.set_nonce(int(tp["inputs"]["counter"], 16))
    packet = header + cs.encrypt_with_ad(header, bytes(4) + b"\x05" + bytes(1395))
    assert header.hex() == tp["expected"]["header"]
    assert hashlib.sha256(packet).hexdigest() == tp["expected"]["sha256"]


def test_ik_with_the_shallot_framing_against_the_oracle() -> None:
    """INIT_RELAY and its RESPONSE (§4.3): ours equal the oracle's byte for byte, each side reads the other's,
    and both end with the same transport keys.  (§11.2 prints no IK vector; this fixes the keys here.)"""
    initiator, responder = RelayKeys(bytes(range(32)), I_STATIC), RelayKeys(bytes(range(32, 64)), R_STATIC)
    index, ts, expires = 0x11223344, 1_800_000_000_000_000_000, 1_800_604_800
    sig = initiator.link_cert(expires)
    prologue = PROLOGUE + bytes([0x52, 1]) + index.to_bytes(4, "big")
    payload = initiator.identity_pub + expires.to_bytes(8, "big") + sig + ts.to_bytes(8, "big")

    state, ours = lh.relay_initiation(link_private=I_STATIC, identity_pub=initiator.identity_pub,
                                      cert_expires=expires, cert_sig=sig, responder_link_pub=responder.link_pub,
                                      sender_index=index, timestamp_ns=ts, rng=_no_rng, ephemeral=I_EPH)
    oracle_init = _framed_oracle("IK", True, prologue, static=I_STATIC, remote=responder.link_pub, ephemeral=I_EPH)
    body = bytes([0x52, 1]) + index.to_bytes(4, "big") + oracle_init.write_message(payload)
    assert ours == body + _mac1(responder.link_pub, body) + bytes(16) and len(ours) == lh.INIT_RELAY_LEN

    # the oracle as responder reads ours; ours as responder reads the oracle's (and checks the certificate)
    oracle_resp = _framed_oracle("IK", False, prologue, static=R_STATIC, remote=None, ephemeral=R_EPH)
    assert oracle_resp.read_message(ours[6:-32]) == payload
    assert oracle_resp.noise_protocol.handshake_state.rs.public_bytes == initiator.link_pub
    seen = lh.read_initiation(link_private=R_STATIC, link_pub=responder.link_pub, packet=ours, wall=ts / 1e9)
    assert seen.relay is not None and seen.relay.relay_id == initiator.relay_id and seen.timestamp_ns == ts

    reply_index = 0x55667788
    keys_r, response = lh.write_response(seen, sender_index=reply_index, rng=_no_rng, ephemeral=R_EPH)
    assert response == b"\x53" + index.to_bytes(4, "big") + oracle_resp.write_message(reply_index.to_bytes(4, "big"))
    assert oracle_init.read_message(response[5:]) == reply_index.to_bytes(4, "big")
    keys_i, got_index = lh.read_response(state, response)
    assert got_index == reply_index
    assert (keys_i.send, keys_i.recv) == _keys_of(oracle_init) == (keys_r.recv, keys_r.send)


def _no_rng(n: int) -> bytes:
    raise AssertionError("every key of this handshake is fixed")
