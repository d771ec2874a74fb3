"""Per-hop onion layers for RELAY cells (docs/PROTOCOL.md §6).  This is the per-packet hot path.

A RELAY cell carries a 16-byte onion header H and a BODY_LEN body.  Forward (towards the exit):

    hop (not last):  H' = AES256-Dec(fwd_hdr, H);  body ^= ChaCha20(fwd_body, nonce = 0^4 | H[:12])
    last hop:        P  = AES256-Dec(fwd_hdr, H) = seq u64 | 0^8
                     inner = ChaCha20-Poly1305-Open(fwd_e2e, nonce = 0^4 | seq, body, ad = P)

Backward (towards the client), each hop adds a layer:

    last hop:        P = seq u64 | 0^8;  body = Seal(bwd_e2e, 0^4 | seq, inner, ad = P);  H = AES256-Enc(bwd_hdr, P)
    hop (not last):  H' = AES256-Enc(bwd_hdr, H);  body ^= ChaCha20(bwd_body, nonce = 0^4 | H'[:12])

AES-256 on a single block is a keyed permutation, so the header is different on every link and only
the client (which knows every hop's keys) can predict it.  Every bit of the cell is covered by the
end-to-end AEAD: a hop that flips a bit makes the exit (forward) or the client (backward) fail its
check, and that endpoint tears the circuit down.
"""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from shallot.crypto.circuit_handshake import HopKeys
from shallot.crypto.params import BODY_LEN, INNER_LEN, ONION_HEADER_LEN, REPLAY_WINDOW
from shallot.crypto.replay import ReplayWindow

_ZERO8 = bytes(8)
_ZERO4 = bytes(4)
_NONCE_PREFIX = bytes(4)


class IntegrityError(Exception):
    """An end-to-end check failed: the circuit must be torn down."""


class _Stream:
    """ChaCha20 keystream XOR with a per-cell nonce; one cipher context reused via reset_nonce."""

    __slots__ = ("ctx",)

    def __init__(self, key: bytes) -> None:
        self.ctx = Cipher(algorithms.ChaCha20(key, bytes(16)), None).encryptor()

    def xor(self, header: bytes, body: bytes) -> bytes:
        ctx = self.ctx
        ctx.reset_nonce(_NONCE_PREFIX + header[:12])
        return ctx.update(body)


class RelayLayer:
    """A forwarding hop's view of one circuit: peel forward, add backward."""

    __slots__ = ("_bwd_hdr", "_bwd_stream", "_fwd_hdr", "_fwd_stream")

    def __init__(self, keys: HopKeys) -> None:
        self._fwd_hdr = Cipher(algorithms.AES(keys.fwd_hdr), modes.ECB()).decryptor()
        self._fwd_stream = _Stream(keys.fwd_body)
        self._bwd_hdr = Cipher(algorithms.AES(keys.bwd_hdr), modes.ECB()).encryptor()
        self._bwd_stream = _Stream(keys.bwd_body)

    def forward(self, header: bytes, body: bytes) -> tuple[bytes, bytes]:
        return self._fwd_hdr.update(header), self._fwd_stream.xor(header, body)

    def contexts(self) -> tuple[Any, Any, Any, Any]:
        """(forward header permutation, forward stream, backward header permutation, backward stream)
        cipher contexts, for a relay's inlined hot path; semantics exactly as forward()/backward()."""
        return self._fwd_hdr, self._fwd_stream.ctx, self._bwd_hdr, self._bwd_stream.ctx

    def backward(self, header: bytes, body: bytes) -> tuple[bytes, bytes]:
        out = self._bwd_hdr.update(header)
        return out, self._bwd_stream.xor(out, body)


class EndpointLayer:
    """The last hop's view of one circuit: open forward cells, seal backward cells."""

    __slots__ = ("_bwd_aead", "_bwd_hdr", "_fwd_aead", "_fwd_hdr", "_send_seq", "replay")

    def __init__(self, keys: HopKeys, window: int = REPLAY_WINDOW) -> None:
        self._fwd_hdr = Cipher(algorithms.AES(keys.fwd_hdr), modes.ECB()).decryptor()
        self._fwd_aead = ChaCha20Poly1305(keys.fwd_e2e)
        self._bwd_hdr = Cipher(algorithms.AES(keys.bwd_hdr), modes.ECB()).encryptor()
        self._bwd_aead = ChaCha20Poly1305(keys.bwd_e2e)
        self._send_seq = 0
        self.replay = ReplayWindow(window)

    def open_forward(self, header: bytes, body: bytes) -> bytes:
        plain = self._fwd_hdr.update(header)
        if plain[8:] != _ZERO8:
            raise IntegrityError("forward header check failed")
        seq = int.from_bytes(plain[:8], "big")
        if not self.replay.would_accept(seq):
            raise IntegrityError("replayed or stale forward cell")
        try:
            inner = self._fwd_aead.decrypt(_ZERO4 + plain[:8], body, plain)
        except InvalidTag:
            raise IntegrityError("forward cell failed authentication") from None
        self.replay.check_and_set(seq)
        return inner

    def seal_backward(self, inner: bytes) -> tuple[bytes, bytes]:
        seq = self._send_seq
        self._send_seq = seq + 1
        plain = seq.to_bytes(8, "big") + _ZERO8
        body = self._bwd_aead.encrypt(_ZERO4 + plain[:8], inner, plain)
        return self._bwd_hdr.update(plain), body


class ClientLayers:
    """The client's view of a whole circuit: wrap forward cells through every hop, unwrap backward ones."""

    __slots__ = ("_bwd_aead", "_bwd_hdr_dec", "_bwd_streams", "_fwd_aead", "_fwd_hdr_enc", "_fwd_streams",
                 "_send_seq", "replay")

    def __init__(self, hops: list[HopKeys], window: int = REPLAY_WINDOW) -> None:
        last = hops[-1]
        self._fwd_hdr_enc = [Cipher(algorithms.AES(h.fwd_hdr), modes.ECB()).encryptor() for h in hops]
        self._fwd_streams = [_Stream(h.fwd_body) for h in hops[:-1]]
        self._fwd_aead = ChaCha20Poly1305(last.fwd_e2e)
        self._bwd_hdr_dec = [Cipher(algorithms.AES(h.bwd_hdr), modes.ECB()).decryptor() for h in hops]
        self._bwd_streams = [_Stream(h.bwd_body) for h in hops[:-1]]
        self._bwd_aead = ChaCha20Poly1305(last.bwd_e2e)
        self._send_seq = 0
        self.replay = ReplayWindow(window)

    def wrap(self, inner: bytes) -> tuple[bytes, bytes]:
        """inner must be INNER_LEN bytes; returns (header for the first hop, body)."""
        seq = self._send_seq
        self._send_seq = seq + 1
        plain = seq.to_bytes(8, "big") + _ZERO8
        body = self._fwd_aead.encrypt(_ZERO4 + plain[:8], inner, plain)
        header = plain
        encs = self._fwd_hdr_enc
        streams = self._fwd_streams
        for i in range(len(encs) - 1, -1, -1):
            header = encs[i].update(header)
            if i < len(streams):
                body = streams[i].xor(header, body)
        return header, body

    def unwrap(self, header: bytes, body: bytes) -> bytes:
        """Return the INNER_LEN plaintext; raises IntegrityError (tear the circuit down)."""
        streams = self._bwd_streams
        decs = self._bwd_hdr_dec
        for i in range(len(decs)):
            if i < len(streams):
                body = streams[i].xor(header, body)
            header = decs[i].update(header)
        if header[8:] != _ZERO8:
            raise IntegrityError("backward header check failed")
        seq = int.from_bytes(header[:8], "big")
        if not self.replay.would_accept(seq):
            raise IntegrityError("replayed or stale backward cell")
        try:
            inner = self._bwd_aead.decrypt(_ZERO4 + header[:8], body, header)
        except InvalidTag:
            raise IntegrityError("backward cell failed authentication") from None
        self.replay.check_and_set(seq)
        return inner


assert BODY_LEN == INNER_LEN + 16 and ONION_HEADER_LEN == 16
