"""Relay keys and the on-disk identity file.

* identity: Ed25519, long-term; the relay id is BLAKE2s(label || identity public key)[:20].
* link key: X25519 static used by the Noise link handshakes; signed by the identity (descriptor, link cert).
* onion keys: X25519, used only by circuit builds; rotate every ONION_KEY_ROTATE_S, old ones are still
  accepted for ONION_KEY_OVERLAP_S so descriptors already handed out keep working.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

from shallot.crypto.params import (
    LABEL_LINK_CERT,
    LABEL_ONION_KEY_ID,
    LABEL_RELAY_ID,
    ONION_KEY_OVERLAP_S,
    ONION_KEY_ROTATE_S,
)
from shallot.crypto.primitives import (
    RandomBytes,
    blake2s,
    ed25519_public,
    ed25519_sign,
    ed25519_verify,
    x25519_public,
)

RELAY_ID_LEN = 20


@lru_cache(maxsize=1 << 14)  # a hash that path selection asks for hundreds of times per path
def relay_id_of(identity_pub: bytes) -> bytes:
    return blake2s(LABEL_RELAY_ID + identity_pub)[:RELAY_ID_LEN]


def onion_key_id(onion_pub: bytes) -> bytes:
    return blake2s(LABEL_ONION_KEY_ID + onion_pub)[:4]


def link_cert_message(link_pub: bytes, expires: int) -> bytes:
    return LABEL_LINK_CERT + link_pub + expires.to_bytes(8, "big")


def verify_link_cert(identity_pub: bytes, link_pub: bytes, expires: int, signature: bytes) -> None:
    ed25519_verify(identity_pub, signature, link_cert_message(link_pub, expires))


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str, n: int) -> bytes:
    raw = base64.b64decode(s, validate=True)
    if len(raw) != n:
        raise ValueError("bad key length")
    return raw


@dataclass
class OnionKey:
    private: bytes
    created: int  # unix seconds

    @cached_property
    def public(self) -> bytes:
        return x25519_public(self.private)

    @cached_property
    def key_id(self) -> bytes:
        return onion_key_id(self.public)

    def __repr__(self) -> str:  # never print key material
        return f"OnionKey(id={self.key_id.hex()}, created={self.created})"


@dataclass
class RelayKeys:
    identity_seed: bytes
    link_private: bytes
    onion_keys: list[OnionKey] = field(default_factory=list)  # newest first

    def __repr__(self) -> str:
        return f"RelayKeys(id={self.relay_id.hex()})"

    @classmethod
    def generate(cls, rng: RandomBytes, wall: float) -> RelayKeys:
        return cls(identity_seed=rng(32), link_private=rng(32), onion_keys=[OnionKey(rng(32), int(wall))])

    @cached_property
    def identity_pub(self) -> bytes:
        return ed25519_public(self.identity_seed)

    @cached_property
    def relay_id(self) -> bytes:
        return relay_id_of(self.identity_pub)

    @cached_property
    def link_pub(self) -> bytes:
        return x25519_public(self.link_private)

    @property
    def current_onion(self) -> OnionKey:
        return self.onion_keys[0]

    def sign(self, message: bytes) -> bytes:
        return ed25519_sign(self.identity_seed, message)

    def link_cert(self, expires: int) -> bytes:
        return self.sign(link_cert_message(self.link_pub, expires))

    def rotate_onion_keys(self, rng: RandomBytes, wall: float) -> bool:
        """Add a new onion key when the current one is older than the rotation period; drop keys whose
        overlap has passed.  Returns True when the set changed (so the descriptor must be re-signed)."""
        changed = False
        if wall - self.current_onion.created >= ONION_KEY_ROTATE_S:
            self.onion_keys.insert(0, OnionKey(rng(32), int(wall)))
            changed = True
        # a key stays usable until OVERLAP after the key that replaced it was created
        keep = [self.onion_keys[0]]
        for older, newer in zip(self.onion_keys[1:], self.onion_keys):
            if wall - newer.created < ONION_KEY_OVERLAP_S:
                keep.append(older)
        if len(keep) != len(self.onion_keys):
            changed = True
        self.onion_keys = keep
        return changed

    def to_json(self) -> str:
        return json.dumps({
            "format": "shallot-relay-keys-1",
            "identity_seed": _b64(self.identity_seed),
            "link_private": _b64(self.link_private),
            "onion_keys": [{"private": _b64(k.private), "created": k.created} for k in self.onion_keys],
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> RelayKeys:
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            if d.get("format") != "shallot-relay-keys-1":
                raise ValueError("unknown key file format")
            keys = cls(identity_seed=_unb64(d["identity_seed"], 32), link_private=_unb64(d["link_private"], 32),
                       onion_keys=[OnionKey(_unb64(k["private"], 32), int(k["created"])) for k in d["onion_keys"]])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"corrupt key file: {exc}") from None
        if not keys.onion_keys:
            raise ValueError("corrupt key file: no onion key")
        return keys
