"""Our Noise NK/IK implementation against the independent ``noiseprotocol`` package (test-only oracle).

Both sides use fixed static and ephemeral keys, so every handshake message and the transport keys
must match byte for byte in both directions (ours as initiator, oracle as responder, and vice versa).
"""

from __future__ import annotations

import pytest
from noise.connection import Keypair, NoiseConnection

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
