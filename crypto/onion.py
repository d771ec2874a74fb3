"""Per-hop onion layers for RELAY cells (docs/PROTOCOL.md §6.4).  This is the per-packet hot path.

A RELAY cell's payload is a region of RELAY_LEN (1395) bytes.  Every hop keeps it that size.

Forward (towards the exit) every hop, the last one included, authenticates the layer it removes:

    region = H[8] | tag[16] | C[1371]            H = (seq + fwd_offset) mod 2^64, seq = client's counter
    M      = AES-256-GCM-Open(fwd_key, nonce = 0^4 | seq, C | tag, ad = H)   (else: tear down)
    seq must be new and not older than the hop's window                     (else: tear down)
    forwarding hop: send M | 0^24;   last hop: inner = M[:INNER_LEN]

so a changed, injected, repeated or long-delayed cell dies at the first honest hop.  The client builds
the region from the inside out; because each hop appends zeros, what a hop receives in its last bytes
is fixed by the keystreams of the hops before it (a Sphinx-style filler), which the client computes.

Backward (towards the client) the exit seals, and every hop renumbers and re-encrypts:

    exit:            region = c[8] | AES-256-GCM-Seal(bwd_key, 0^4 | c, inner, ad = c) | junk[72]
    forwarding hop:  c_in = region[:8] must be new and inside its window (else: tear down);
                     region' = c[8] | AES-256-CTR(bwd_key, iv = c | 0^8) XOR region[:1387]
    client:          peel each hop's CTR layer with the counter in front of it, then open the exit's AEAD

``c`` is each hop's own counter (from a key-derived start), so a hop's output never repeats a keystream
whatever the next hop sends: duplicates and modifications by the next hop become unrelated bytes at the
previous hop, and a repeated counter tears the circuit down.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shallot.crypto.circuit_handshake import HopKeys
from shallot.crypto.params import (
    HOP_SEQ_LEN,
    HOP_SLOT_LEN,
    HOP_WINDOW,
    INNER_LEN,
    LABEL_HOP_LAYER,
    MAX_HOPS,
    RELAY_LEN,
    REPLAY_WINDOW,
    TAG_LEN,
)
from shallot.crypto.primitives import hkdf
from shallot.crypto.replay import ReplayWindow

_ZERO4 = bytes(4)
_ZERO8 = bytes(8)
_ZERO_SLOT = bytes(HOP_SLOT_LEN)
_ZERO16 = bytes(16)
_MASK64 = (1 << 64) - 1
_CT_LEN = RELAY_LEN - HOP_SLOT_LEN  # 1371: what a forward layer's AEAD covers
_BACK_IN = RELAY_LEN - HOP_SEQ_LEN  # 1387: how much of the next hop's region a backward layer keeps
_SEALED = INNER_LEN + TAG_LEN  # the exit's backward AEAD output
JUNK_LEN = RELAY_LEN - HOP_SEQ_LEN - _SEALED  # 72 random bytes after the exit's backward AEAD
_ZERO_PAD = bytes(_CT_LEN - INNER_LEN)


class IntegrityError(Exception):
    """A cell failed its layer's check: the circuit must be torn down."""


class SequenceError(IntegrityError):
    """A cell repeated a sequence number or came too late (outside the window)."""


@dataclass(frozen=True)
class LayerKeys:
    """A hop's onion-layer keys, derived from its circuit keys with their own label (§6.4)."""

    fwd_key: bytes
    bwd_key: bytes
    fwd_offset: int
    bwd_start: int

    def __repr__(self) -> str:
        return "LayerKeys(<redacted>)"

    @classmethod
    def derive(cls, keys: HopKeys) -> LayerKeys:
        okm = hkdf(keys.fwd_body + keys.bwd_body, salt=LABEL_HOP_LAYER, info=b"", length=80)
        return cls(okm[:32], okm[32:64], int.from_bytes(okm[64:72], "big"), int.from_bytes(okm[72:80], "big") >> 16)


def _ctr(key: bytes) -> object:
    return Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()


def _hop_header(seq: int, offset: int) -> bytes:
    return ((seq + offset) & _MASK64).to_bytes(HOP_SEQ_LEN, "big")


class _ForwardCheck:
    """Open one forward layer: the part every hop, the last one included, does the same way."""

    __slots__ = ("_aead", "_offset", "window")

    def __init__(self, lk: LayerKeys, window: int) -> None:
        self._aead = AESGCM(lk.fwd_key)
        self._offset = lk.fwd_offset
        self.window = ReplayWindow(window)

    def open(self, region: bytes | memoryview) -> bytes:
        if len(region) != RELAY_LEN:
            raise IntegrityError("bad region length")
        h = bytes(region[:HOP_SEQ_LEN])
        seq = (int.from_bytes(h, "big") - self._offset) & _MASK64
        window = self.window
        if not window.would_accept(seq):
            raise SequenceError("repeated or stale forward cell")
        try:
            m = self._aead.decrypt(_ZERO4 + seq.to_bytes(8, "big"),
                                   b"".join((region[HOP_SLOT_LEN:], region[HOP_SEQ_LEN:HOP_SLOT_LEN])), h)
        except InvalidTag:
            raise IntegrityError("forward cell failed its hop's authentication") from None
        window.check_and_set(seq)
        return m


class RelayLayer:
    """A forwarding hop's view of one circuit: check and peel forward, renumber and add backward."""

    __slots__ = ("_bwd_ctr", "_bwd_next", "_bwd_window", "_fwd")

    def __init__(self, keys: HopKeys, window: int = HOP_WINDOW) -> None:
        lk = LayerKeys.derive(keys)
        self._fwd = _ForwardCheck(lk, window)
        self._bwd_ctr = _ctr(lk.bwd_key)
        self._bwd_next = lk.bwd_start
        self._bwd_window = ReplayWindow(window)

    def forward(self, region: bytes | memoryview) -> bytes:
        """The region for the next hop; raises IntegrityError (tear the circuit down)."""
        return self._fwd.open(region) + _ZERO_SLOT

    def backward(self, region: bytes | memoryview) -> bytes:
        """The region for the previous hop; raises SequenceError on a repeated or stale counter."""
        if len(region) != RELAY_LEN:
            raise IntegrityError("bad region length")
        if not self._bwd_window.check_and_set(int.from_bytes(region[:HOP_SEQ_LEN], "big")):
            raise SequenceError("repeated or stale backward cell")
        c = self._bwd_next
        self._bwd_next = c + 1
        cb = c.to_bytes(HOP_SEQ_LEN, "big")
        ctx = self._bwd_ctr
        ctx.reset_nonce(cb + _ZERO8)  # type: ignore[attr-defined]
        return cb + ctx.update(region[:_BACK_IN])  # type: ignore[attr-defined]


class EndpointLayer:
    """The last hop's view of one circuit: open forward cells, seal backward cells."""

    __slots__ = ("_bwd_aead", "_fwd", "_send_seq")

    def __init__(self, keys: HopKeys, window: int = REPLAY_WINDOW) -> None:
        lk = LayerKeys.derive(keys)
        self._fwd = _ForwardCheck(lk, window)
        self._bwd_aead = AESGCM(lk.bwd_key)
        self._send_seq = lk.bwd_start

    @property
    def replay(self) -> ReplayWindow:
        return self._fwd.window

    def open_forward(self, region: bytes | memoryview) -> bytes:
        return self._fwd.open(region)[:INNER_LEN]

    def seal_backward(self, inner: bytes, junk: bytes) -> bytes:
        """``junk``: JUNK_LEN random bytes (the tail the hops towards the client cut off)."""
        c = self._send_seq
        self._send_seq = c + 1
        cb = c.to_bytes(HOP_SEQ_LEN, "big")
        return cb + self._bwd_aead.encrypt(_ZERO4 + cb, inner, cb) + junk


class ClientLayers:
    """The client's view of a whole circuit: wrap forward cells through every hop, unwrap backward ones."""

    __slots__ = ("_bwd_aead", "_bwd_ctrs", "_fwd_aeads", "_fwd_ctrs", "_offsets", "_send_seq", "replay")

    def __init__(self, hops: list[HopKeys], window: int = REPLAY_WINDOW) -> None:
        if not 1 <= len(hops) <= MAX_HOPS:
            raise ValueError(f"a circuit has 1..{MAX_HOPS} hops")
        lks = [LayerKeys.derive(h) for h in hops]
        self._fwd_aeads = [AESGCM(lk.fwd_key) for lk in lks]
        self._fwd_ctrs = [_ctr(lk.fwd_key) for lk in lks]  # the same keystream as the AEAD, for the filler
        self._offsets = [lk.fwd_offset for lk in lks]
        self._bwd_ctrs = [_ctr(lk.bwd_key) for lk in lks[:-1]]
        self._bwd_aead = AESGCM(lks[-1].bwd_key)
        self._send_seq = 0
        self.replay = ReplayWindow(window)

    def _xor_keystream_tail(self, hop: int, seq8: bytes, data: bytes) -> bytes:
        """data XOR the last len(data) bytes of hop's forward keystream over _CT_LEN bytes (GCM is AES-CTR from
        counter block 2, so an AES-CTR context started at the right block does the XOR)."""
        start = _CT_LEN - len(data)
        ctx = self._fwd_ctrs[hop]
        ctx.reset_nonce(_ZERO4 + seq8 + (2 + start // 16).to_bytes(4, "big"))  # type: ignore[attr-defined]
        ctx.update(_ZERO16[:start % 16])  # type: ignore[attr-defined]
        return ctx.update(data)  # type: ignore[attr-defined]

    def wrap(self, inner: bytes) -> bytes:
        """inner must be INNER_LEN bytes; returns the region the first hop receives."""
        seq = self._send_seq
        self._send_seq = seq + 1
        seq8 = seq.to_bytes(8, "big")
        nonce = _ZERO4 + seq8
        n = len(self._fwd_aeads)
        # filler = what hop j finds in its last j * 24 bytes: hop j-1's zeros after every earlier layer came off
        filler = b""
        for j in range(2, n):
            filler = self._xor_keystream_tail(j - 1, seq8, filler + _ZERO_SLOT)
        if n > 1:
            filler += _ZERO_SLOT
            m = inner + _ZERO_PAD[:_CT_LEN - INNER_LEN - len(filler)] + self._xor_keystream_tail(n - 1, seq8, filler)
        else:
            m = inner + _ZERO_PAD
        aeads, offsets = self._fwd_aeads, self._offsets
        for j in range(n - 1, 0, -1):
            h = _hop_header(seq, offsets[j])
            x = aeads[j].encrypt(nonce, m, h)
            m = h + x[_CT_LEN:] + x[:_CT_LEN - HOP_SLOT_LEN]  # what hop j-1's layer must open to
        h = _hop_header(seq, offsets[0])
        x = aeads[0].encrypt(nonce, m, h)
        return h + x[_CT_LEN:] + x[:_CT_LEN]

    def unwrap(self, region: bytes | memoryview) -> bytes:
        """Return the INNER_LEN plaintext; raises IntegrityError (tear the circuit down)."""
        if len(region) != RELAY_LEN:
            raise IntegrityError("bad region length")
        data = bytes(region)
        for ctx in self._bwd_ctrs:
            ctx.reset_nonce(data[:HOP_SEQ_LEN] + _ZERO8)  # type: ignore[attr-defined]
            data = ctx.update(data[HOP_SEQ_LEN:])  # type: ignore[attr-defined]
        cb = data[:HOP_SEQ_LEN]
        seq = int.from_bytes(cb, "big")
        if not self.replay.would_accept(seq):
            raise SequenceError("replayed or stale backward cell")
        try:
            inner = self._bwd_aead.decrypt(_ZERO4 + cb, data[HOP_SEQ_LEN:HOP_SEQ_LEN + _SEALED], cb)
        except InvalidTag:
            raise IntegrityError("backward cell failed authentication") from None
        self.replay.check_and_set(seq)
        return inner


assert INNER_LEN + (MAX_HOPS - 1) * HOP_SLOT_LEN == _CT_LEN and JUNK_LEN >= (MAX_HOPS - 1) * HOP_SEQ_LEN
