"""Noise protocol framework (revision 34), only what Shallot's link layer uses.

Patterns ``NK`` (anonymous client -> relay) and ``IK`` (relay -> relay), with 25519, ChaChaPoly and
SHA256.  This is the plain Noise HandshakeState/SymmetricState; message framing, mac1 and replay
checks live in :mod:`shallot.crypto.link_handshake`.  Checked byte-for-byte against the independent
``noiseprotocol`` package in ``tests/unit/test_noise_oracle.py``.
"""

from __future__ import annotations

from shallot.crypto.primitives import (
    AuthFailure,
    ChaCha20Poly1305,
    InvalidTag,
    RandomBytes,
    hmac_sha256,
    sha256,
    x25519,
    x25519_keypair,
    x25519_public,
)

DHLEN = 32
TAGLEN = 16
_PATTERNS: dict[str, tuple[list[str], list[list[str]]]] = {
    # name: (pre-messages known to the initiator about the responder, message tokens)
    "NK": (["s"], [["e", "es"], ["e", "ee"]]),
    "IK": (["s"], [["e", "es", "s", "ss"], ["e", "ee", "se"]]),
}


def _nonce(n: int) -> bytes:
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "little")


def noise_hkdf(ck: bytes, ikm: bytes, outputs: int) -> list[bytes]:
    temp = hmac_sha256(ck, ikm)
    out1 = hmac_sha256(temp, b"\x01")
    if outputs == 2:
        return [out1, hmac_sha256(temp, out1 + b"\x02")]
    out2 = hmac_sha256(temp, out1 + b"\x02")
    return [out1, out2, hmac_sha256(temp, out2 + b"\x03")]


class _Symmetric:
    def __init__(self, protocol_name: bytes) -> None:
        self.h = protocol_name.ljust(32, b"\x00") if len(protocol_name) <= 32 else sha256(protocol_name)
        self.ck = self.h
        self.k: bytes | None = None
        self.n = 0

    def mix_hash(self, data: bytes) -> None:
        self.h = sha256(self.h + data)

    def mix_key(self, ikm: bytes) -> None:
        self.ck, self.k = noise_hkdf(self.ck, ikm, 2)
        self.n = 0

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        if self.k is None:
            ciphertext = plaintext
        else:
            ciphertext = ChaCha20Poly1305(self.k).encrypt(_nonce(self.n), plaintext, self.h)
            self.n += 1
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        if self.k is None:
            plaintext = ciphertext
        else:
            try:
                plaintext = ChaCha20Poly1305(self.k).decrypt(_nonce(self.n), ciphertext, self.h)
            except InvalidTag as exc:
                raise AuthFailure("Noise message failed authentication") from exc
            self.n += 1
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        k1, k2 = noise_hkdf(self.ck, b"", 2)
        return k1, k2


class NoiseHandshake:
    """One Noise handshake.  ``s`` is our static private key, ``rs`` the responder's static public key.

    ``e`` fixes our ephemeral private key (test vectors only); otherwise it is drawn from ``rng``.
    """

    def __init__(self, pattern: str, *, initiator: bool, prologue: bytes, s: bytes | None = None,
                 rs: bytes | None = None, e: bytes | None = None) -> None:
        if pattern not in _PATTERNS:
            raise ValueError(f"unsupported Noise pattern {pattern}")
        premessages, self._messages = _PATTERNS[pattern]
        self.initiator = initiator
        self.sym = _Symmetric(f"Noise_{pattern}_25519_ChaChaPoly_SHA256".encode())
        self.sym.mix_hash(prologue)
        self.s = s
        self.s_pub = x25519_public(s) if s is not None else None
        self.e = e
        self.e_pub = x25519_public(e) if e is not None else None
        self.rs = rs
        self.re: bytes | None = None
        self._index = 0
        for token in premessages:  # responder's static key is a pre-message in both patterns
            assert token == "s"
            responder_static = rs if initiator else self.s_pub
            if responder_static is None:
                raise ValueError("pattern needs the responder's static key")
            self.sym.mix_hash(responder_static)

    @property
    def complete(self) -> bool:
        return self._index >= len(self._messages)

    @property
    def handshake_hash(self) -> bytes:
        return self.sym.h

    def _dh(self, token: str) -> bytes:
        a, b = token[0], token[1]
        if not self.initiator:
            a, b = b, a  # tokens are written from the initiator's point of view
        local = self.e if a == "e" else self.s
        remote = self.re if b == "e" else self.rs
        if local is None or remote is None:
            raise ValueError(f"missing key for {token}")
        return x25519(local, remote)

    def write_message(self, payload: bytes, rng: RandomBytes | None = None) -> bytes:
        out = bytearray()
        for token in self._messages[self._index]:
            if token == "e":
                if self.e is None:
                    if rng is None:
                        raise ValueError("no ephemeral key and no rng")
                    self.e, self.e_pub = x25519_keypair(rng)
                assert self.e_pub is not None
                out += self.e_pub
                self.sym.mix_hash(self.e_pub)
            elif token == "s":
                assert self.s_pub is not None
                out += self.sym.encrypt_and_hash(self.s_pub)
            else:
                self.sym.mix_key(self._dh(token))
        out += self.sym.encrypt_and_hash(payload)
        self._index += 1
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """Process one handshake message.  On failure the state is left exactly as before, so a forged
        message cannot spoil the handshake for the genuine one that follows."""
        sym = self.sym
        saved = (sym.h, sym.ck, sym.k, sym.n, self.re, self.rs, self._index)
        try:
            return self._read_message(bytes(message))
        except Exception:
            sym.h, sym.ck, sym.k, sym.n, self.re, self.rs, self._index = saved
            raise

    def _read_message(self, message: bytes) -> bytes:
        pos = 0
        for token in self._messages[self._index]:
            if token == "e":
                if len(message) < pos + DHLEN:
                    raise AuthFailure("truncated Noise message")
                self.re = message[pos:pos + DHLEN]
                pos += DHLEN
                self.sym.mix_hash(self.re)
            elif token == "s":
                n = DHLEN + (TAGLEN if self.sym.k is not None else 0)
                if len(message) < pos + n:
                    raise AuthFailure("truncated Noise message")
                self.rs = self.sym.decrypt_and_hash(message[pos:pos + n])
                pos += n
            else:
                self.sym.mix_key(self._dh(token))
        payload = self.sym.decrypt_and_hash(message[pos:])
        self._index += 1
        return payload

    def split(self) -> tuple[bytes, bytes]:
        """Return (send_key, receive_key) for this side."""
        k1, k2 = self.sym.split()
        return (k1, k2) if self.initiator else (k2, k1)
