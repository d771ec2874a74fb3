"""The transport keys of one completed link handshake: seal outgoing cells, keep the replay window
(docs/PROTOCOL.md §4.4, §4.6).  Receiving is done by ``LinkLayer`` on its per-packet path."""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from shallot.crypto import link_handshake as lh
from shallot.crypto.params import MSG_TRANSPORT, REPLAY_WINDOW
from shallot.crypto.replay import ReplayWindow

NONCE_PREFIX = bytes(4)
_TRANSPORT = bytes((MSG_TRANSPORT,))


class Session:
    """Transport keys of one completed handshake."""

    __slots__ = ("created", "header_prefix", "local_index", "recv_aead", "remote_index", "resume", "send_aead",
                 "send_counter", "sent", "window")

    def __init__(self, keys: lh.TransportKeys, local_index: int, remote_index: int, now: float,
                 first_counter: int) -> None:
        self.send_aead = ChaCha20Poly1305(keys.send)
        self.recv_aead = ChaCha20Poly1305(keys.recv)
        self.resume = keys.resume
        self.local_index = local_index
        self.remote_index = remote_index
        self.created = now
        self.send_counter = first_counter
        self.sent = 0
        self.window = ReplayWindow(REPLAY_WINDOW)
        self.header_prefix = _TRANSPORT + remote_index.to_bytes(4, "big")

    def seal(self, cell: bytes) -> bytes:
        counter = self.send_counter
        self.send_counter = counter + 1
        self.sent += 1
        ctr = counter.to_bytes(8, "little")  # on the wire as in the nonce: little-endian (Noise/WireGuard style)
        header = self.header_prefix + ctr
        return header + self.send_aead.encrypt(NONCE_PREFIX + ctr, cell, header)
