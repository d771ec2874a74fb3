"""Thin, typed wrappers over the ``cryptography`` primitives Shallot uses.

Randomness is always passed in as ``rng(n) -> bytes`` so handshakes can be replayed from test vectors.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

RandomBytes = Callable[[int], bytes]

__all__ = [
    "AuthFailure",
    "ChaCha20Poly1305",
    "InvalidTag",
    "RandomBytes",
    "aead_open",
    "aead_seal",
    "blake2s",
    "ed25519_public",
    "ed25519_sign",
    "ed25519_verify",
    "hkdf",
    "hmac_sha256",
    "sha256",
    "x25519",
    "x25519_keypair",
    "x25519_public",
]


class AuthFailure(Exception):
    """A MAC, AEAD tag, signature or DH check failed."""


def x25519_public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class X25519Key:
    """A private X25519 key kept as a library object: loading one costs a scalar multiplication, so
    code that uses a key more than once keeps this instead of the raw bytes."""

    __slots__ = ("_key", "public")

    def __init__(self, private: bytes) -> None:
        self._key = X25519PrivateKey.from_private_bytes(private)
        self.public = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def exchange(self, public: bytes) -> bytes:
        try:
            return self._key.exchange(X25519PublicKey.from_public_bytes(public))
        except ValueError as exc:  # cryptography rejects an all-zero result
            raise AuthFailure("low-order X25519 point") from exc

    def __repr__(self) -> str:
        return "X25519Key(<secret>)"


class KeyPool:
    """Fresh X25519 keys made ahead of time (each costs a scalar multiplication), so a circuit build does
    not wait for them.  Every key is handed out once and then forgotten: forward secrecy is unchanged."""

    def __init__(self, rng: RandomBytes, size: int) -> None:
        self._rng = rng
        self.size = size
        self._keys: list[X25519Key] = []

    def take(self) -> X25519Key:
        return self._keys.pop() if self._keys else X25519Key(self._rng(32))

    def refill(self) -> None:
        """Top the pool up; call when idle (a timer tick), never on the packet path."""
        while len(self._keys) < self.size:
            self._keys.append(X25519Key(self._rng(32)))


def x25519_keypair(rng: RandomBytes) -> tuple[bytes, bytes]:
    """Return (private, public) raw 32-byte keys; the private key is ``rng(32)`` (clamped by X25519)."""
    private = rng(32)
    return private, x25519_public(private)


def x25519(private: bytes, public: bytes) -> bytes:
    """Raw X25519; raises AuthFailure on a low-order peer key (all-zero shared secret)."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # cryptography rejects an all-zero result
        raise AuthFailure("low-order X25519 point") from exc
    return shared


def ed25519_public(seed: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def ed25519_sign(seed: bytes, message: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).sign(message)


_P25519 = 2**255 - 19
# The eight small-order points of edwards25519 (the torsion subgroup), with the sign bit cleared, as in
# "Taming the many EdDSAs" (ePrint 2020/1244) and libsodium's blocklist.  A small-order public key
# verifies forged signatures (A = identity accepts R = identity, S = 0 for every message).
_SMALL_ORDER_Y = frozenset(bytes.fromhex(h) for h in (
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
))


def ed25519_key_acceptable(public: bytes) -> bool:
    """False for non-canonical encodings and small-order points, which OpenSSL would still accept."""
    if len(public) != 32:
        return False
    y = public[:31] + bytes((public[31] & 0x7F,))
    return int.from_bytes(y, "little") < _P25519 and y not in _SMALL_ORDER_Y


def ed25519_verify(public: bytes, signature: bytes, message: bytes) -> None:
    if not ed25519_key_acceptable(public):
        raise AuthFailure("unacceptable Ed25519 public key (small order or non-canonical)")
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError) as exc:
        raise AuthFailure("bad Ed25519 signature") from exc


def hkdf(ikm: bytes, *, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()


def sha256(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


def blake2s(data: bytes) -> bytes:
    """Unkeyed BLAKE2s-256."""
    h = hashes.Hash(hashes.BLAKE2s(32))
    h.update(data)
    return h.finalize()


def aead_seal(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes = b"") -> bytes:
    return ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)


def aead_open(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes = b"") -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, ciphertext, ad)
    except InvalidTag as exc:
        raise AuthFailure("AEAD tag mismatch") from exc

