#!/usr/bin/env python3
"""Shallot v1 from the specification alone: derive the fixed vectors again without the product code.

    python tests/vectors/independent.py [protocol_v1.json] [circuit_build_v1.json]

Written from the text of docs/PROTOCOL.md (§1.4 primitives, §3 keys, link certificate and descriptor, §4
Noise NK link handshake, transport packet and cookie reply, §5 circuit build, §6.4 onion layers, §6.7 inner messages),
with nothing but the ``cryptography`` package's primitives and the standard library: it imports nothing
from shallot (checked at the end, and by tests/unit/test_independent_vectors.py).  It reproduces every
value of tests/vectors/protocol_v1.json (the vectors §11.2 prints) and of tests/vectors/circuit_build_v1.json
(a 3-hop CREATE as each hop receives it, each hop's reply, the CREATED layers, the circuit keys of all three
hops, and the first RELAY cell both ways through every link), byte for byte.  Prints one line per value;
exits 1 on the first mismatch.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

HERE = Path(__file__).resolve().parent
RAW = (Encoding.Raw, PublicFormat.Raw)


class Mismatch(Exception):
    pass


def check(name: str, got: bytes | int | str, expected: bytes | int | str) -> None:
    if got != expected:
        shown = got.hex() if isinstance(got, bytes) else got
        want = expected.hex() if isinstance(expected, bytes) else expected
        raise Mismatch(f"MISMATCH {name}: got {shown}, the vector says {want}")
    print(f"ok {name}")


# ------------------------------------------------------------------------------------ §1.4 primitives


def x25519_pub(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(*RAW)


def dh(private: bytes, public: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    h = crypto_hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()


def digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


def sha256(data: bytes) -> bytes:
    return digest(hashes.SHA256(), data)


def blake2s(data: bytes) -> bytes:
    return digest(hashes.BLAKE2s(32), data)


def seal(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)


def unseal(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    return ChaCha20Poly1305(key).decrypt(nonce, ciphertext, ad)


def keystream(key: bytes, nonce12: bytes, n: int) -> bytes:
    """ChaCha20 (RFC 8439), block counter 0: the library's 16-byte nonce is counter (LE) || nonce."""
    return Cipher(algorithms.ChaCha20(key, bytes(4) + nonce12), None).encryptor().update(bytes(n))


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def aes_enc(key: bytes, block: bytes) -> bytes:
    return Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(block)


def aes_dec(key: bytes, block: bytes) -> bytes:
    return Cipher(algorithms.AES(key), modes.ECB()).decryptor().update(block)


def u(n: int, size: int) -> bytes:
    return n.to_bytes(size, "big")


# ------------------------------------------------------------------------------------ §3


def relay_id(identity_pub: bytes) -> bytes:
    return blake2s(b"shallot-v1 relay-id" + identity_pub)[:20]


def onion_key_id(onion_pub: bytes) -> bytes:
    return blake2s(b"shallot-v1 onion-key-id" + onion_pub)[:4]


def address(host: str, port: int) -> bytes:
    ip = ipaddress.ip_address(host)
    return bytes([ip.version]) + ip.packed.ljust(16, b"\x00") + u(port, 2)


def policy(text: str) -> tuple[int, list[tuple[int, int]]]:
    """'accept all except 25' / 'reject all except 80-81,443' (the form §3.4 describes)."""
    words = text.split()
    ranges = []
    if "except" in words:
        for span in words[words.index("except") + 1].split(","):
            lo, _, hi = span.partition("-")
            ranges.append((int(lo), int(hi or lo)))
    return (1 if words[0] == "accept" else 0), ranges


def descriptor(seed: bytes, link_pub: bytes, onion_pub: bytes, d: dict[str, Any]) -> bytes:
    sk = Ed25519PrivateKey.from_private_bytes(seed)
    default, ranges = policy(d["exit_policy"])
    nick = d["nickname"].encode()
    body = (b"SHD1" + bytes(d["versions"]) + sk.public_key().public_bytes(*RAW) + link_pub + onion_pub
            + u(d["published"], 8) + u(d["published"] + d["lifetime_s"], 8) + bytes([0x01 if d["exit"] else 0])
            + bytes([len(nick)]) + nick + bytes([1]) + address(*d["address"]) + bytes([0])
            + bytes([default, len(ranges)]) + b"".join(u(lo, 2) + u(hi, 2) for lo, hi in ranges))
    return body + sk.sign(b"shallot-v1 descriptor\x00" + body)


def check_keys_and_descriptor(v: dict[str, Any]) -> tuple[bytes, bytes]:
    i, exp = v["keys"]["inputs"], v["keys"]["expected"]
    seed, link_priv, onion_priv = (bytes.fromhex(i[k]) for k in ("identity_seed", "link_private", "onion_private"))
    sk = Ed25519PrivateKey.from_private_bytes(seed)
    identity_pub = sk.public_key().public_bytes(*RAW)
    check("keys.identity_pub", identity_pub, bytes.fromhex(exp["identity_pub"]))
    check("keys.relay_id", relay_id(identity_pub), bytes.fromhex(exp["relay_id"]))
    link_pub, onion_pub = x25519_pub(link_priv), x25519_pub(onion_priv)
    check("keys.link_pub", link_pub, bytes.fromhex(exp["link_pub"]))
    check("keys.onion_pub", onion_pub, bytes.fromhex(exp["onion_pub"]))
    check("keys.onion_key_id", onion_key_id(onion_pub), bytes.fromhex(exp["onion_key_id"]))
    cert = sk.sign(b"shallot-v1 link-cert" + link_pub + u(i["cert_expires"], 8))
    check("keys.link_cert_sig", cert, bytes.fromhex(exp["link_cert_sig"]))
    raw = descriptor(seed, link_pub, onion_pub, v["descriptor"]["inputs"])
    check("descriptor.length", len(raw), v["descriptor"]["expected"]["length"])
    check("descriptor.encoded", raw, bytes.fromhex(v["descriptor"]["expected"]["encoded"]))
    return link_priv, link_pub


# ------------------------------------------------------------------------------------ §4: Noise NK, transport


class Symmetric:
    """Noise SymmetricState (revision 34) with SHA-256 and ChaChaPoly; the protocol name is 32 bytes."""

    def __init__(self, name: bytes) -> None:
        assert len(name) == 32
        self.h = self.ck = name
        self.k: bytes | None = None
        self.n = 0

    def mix_hash(self, data: bytes) -> None:
        self.h = sha256(self.h + data)

    def mix_key(self, ikm: bytes) -> None:
        temp = hmac_sha256(self.ck, ikm)
        self.ck = hmac_sha256(temp, b"\x01")
        self.k = hmac_sha256(temp, self.ck + b"\x02")
        self.n = 0

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        assert self.k is not None
        out = seal(self.k, bytes(4) + self.n.to_bytes(8, "little"), plaintext, self.h)
        self.n += 1
        self.mix_hash(out)
        return out

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        assert self.k is not None
        out = unseal(self.k, bytes(4) + self.n.to_bytes(8, "little"), ciphertext, self.h)
        self.n += 1
        self.mix_hash(ciphertext)
        return out

    def split(self) -> tuple[bytes, bytes]:
        temp = hmac_sha256(self.ck, b"")
        k1 = hmac_sha256(temp, b"\x01")
        return k1, hmac_sha256(temp, k1 + b"\x02")


def nk_start(sender_index: int, responder_pub: bytes) -> Symmetric:
    s = Symmetric(b"Noise_NK_25519_ChaChaPoly_SHA256")
    s.mix_hash(b"shallot-link-v1" + bytes([0x51, 1]) + u(sender_index, 4))  # §4.2 prologue
    s.mix_hash(responder_pub)  # <- s
    return s


def check_nk(v: dict[str, Any], link_priv: bytes, link_pub: bytes) -> None:
    i, exp = v["nk_handshake"]["inputs"], v["nk_handshake"]["expected"]
    sender, responder = int(i["sender_index"], 16), int(i["responder_index"], 16)
    e_priv, re_priv = bytes.fromhex(i["initiator_ephemeral_private"]), bytes.fromhex(i["responder_ephemeral_private"])
    # initiator: -> e, es ; payload reserved u64 (zero: a client sends no clock) | resume
    ini = nk_start(sender, link_pub)
    e_pub = x25519_pub(e_priv)
    ini.mix_hash(e_pub)
    ini.mix_key(dh(e_priv, link_pub))
    body = bytes([0x51, 1]) + u(sender, 4) + e_pub + ini.encrypt_and_hash(bytes(8) + bytes.fromhex(i["resume"]))
    init = body + blake2s(b"shallot-v1 mac1" + link_pub + body)[:16] + bytes(16)  # mac1 | mac2 (no cookie)
    check("nk.init_client", init, bytes.fromhex(exp["init_client"]))
    # responder: reads it, then <- e, ee ; payload its own index
    res = nk_start(int.from_bytes(init[2:6], "big"), link_pub)
    res.mix_hash(init[6:38])
    res.mix_key(dh(link_priv, init[6:38]))
    payload = res.decrypt_and_hash(init[38:78])
    check("nk.init_client payload", payload, bytes(8) + bytes.fromhex(i["resume"]))
    re_pub = x25519_pub(re_priv)
    res.mix_hash(re_pub)
    res.mix_key(dh(re_priv, init[6:38]))
    response = bytes([0x53]) + init[2:6] + re_pub + res.encrypt_and_hash(u(responder, 4))
    check("nk.response", response, bytes.fromhex(exp["response"]))
    # initiator reads the response; both split
    ini.mix_hash(response[5:37])
    ini.mix_key(dh(e_priv, response[5:37]))
    check("nk.response payload", ini.decrypt_and_hash(response[37:57]), u(responder, 4))
    k1, k2 = ini.split()
    check("nk.split agrees", res.split(), (k1, k2))
    check("nk.k1", k1, bytes.fromhex(exp["k1"]))
    check("nk.k2", k2, bytes.fromhex(exp["k2"]))
    check("nk.resume", hkdf(k1 + k2, b"shallot-v1 link-resume", b"", 16), bytes.fromhex(exp["resume"]))
    # §4.4: a PADDING cell from the client under k1
    t, texp = v["transport_packet"]["inputs"], v["transport_packet"]["expected"]
    counter = int(t["counter"], 16).to_bytes(8, "little")
    header = bytes([0x54]) + bytes.fromhex(t["receiver_index"]) + counter
    cell = u(0, 4) + bytes([5]) + bytes(1395)
    packet = header + seal(k1, bytes(4) + counter, cell, header)
    check("transport_packet.length", len(packet), 1429)
    check("transport_packet.header", header, bytes.fromhex(texp["header"]))
    check("transport_packet.sha256", sha256(packet), bytes.fromhex(texp["sha256"]))


def check_cookie(v: dict[str, Any], link_pub: bytes) -> None:
    """§4.12: the cookie of a source under a secret, the COOKIE_REPLY to the vector's INIT_CLIENT, its mac2."""
    i, exp = v["cookie_reply"]["inputs"], v["cookie_reply"]["expected"]
    init = bytes.fromhex(v["nk_handshake"]["expected"]["init_client"])
    source = ipaddress.ip_address(i["source_host"]).packed + u(i["source_port"], 2)
    cookie = hmac_sha256(bytes.fromhex(i["cookie_secret"]), source)[:16]
    check("cookie_reply.cookie", cookie, bytes.fromhex(exp["cookie"]))
    key = blake2s(b"shallot-v1 cookie" + link_pub)
    check("cookie_reply.cookie_key", key, bytes.fromhex(exp["cookie_key"]))
    nonce = bytes.fromhex(i["nonce"])
    mac1 = init[-32:-16]
    reply = bytes([0x59]) + init[2:6] + nonce + seal(key, nonce, cookie, mac1)
    check("cookie_reply.cookie_reply", reply, bytes.fromhex(exp["cookie_reply"]))
    check("cookie_reply.opened", unseal(key, reply[5:17], reply[17:], mac1), cookie)
    check("cookie_reply.mac2", hmac_sha256(cookie, init[:-16])[:16], bytes.fromhex(exp["mac2"]))


# ------------------------------------------------------------------------------------ §5: circuit build

SLOT, SLOTS, REPLY = 148, 4, 48
KEY_NAMES = ("fwd_hdr", "fwd_body", "bwd_hdr", "bwd_body", "fwd_e2e", "bwd_e2e", "reply_layer", "auth")


PROTOID = b"shallot-v1 build x25519-sha256"  # §5.4


def record_payload(instruction: dict[str, Any], hour: int) -> bytes:
    """§5.3: version | kind | hour | EXTEND (address, link_pub, relay_id) or TERMINATE (service), zero-padded."""
    if instruction["kind"] == "extend":
        rest = (address(instruction["host"], instruction["port"]) + bytes.fromhex(instruction["link_pub"])
                + bytes.fromhex(instruction["relay_id"]))
        kind = 1
    else:
        rest, kind = bytes([instruction["service"]]), 2
    return (bytes([1, kind]) + u(hour, 4) + rest).ljust(96, b"\x00")


class Hop:
    """One hop of a build: the client's view (x) and the relay's (b, y) derive the same values (§5.4)."""

    def __init__(self, onion_priv: bytes, x_priv: bytes, y_priv: bytes, relay_id: bytes, link_pub: bytes) -> None:
        self.b, self.x, self.y = onion_priv, x_priv, y_priv
        self.ident = PROTOID + relay_id + link_pub  # §5.4: who the client means to reach at this hop
        self.B, self.X, self.Y = x25519_pub(onion_priv), x25519_pub(x_priv), x25519_pub(y_priv)
        self.dh_onion = dh(x_priv, self.B)
        assert self.dh_onion == dh(onion_priv, self.X)
        self.k_rec = hkdf(self.dh_onion, b"shallot-v1 build-record", self.X + self.B, 32)
        self.k_layer = hkdf(self.dh_onion, b"shallot-v1 build-layer", self.X + self.B, 32)
        self.KL = keystream(self.k_layer, bytes(12), 3 * SLOT)

    def circuit_keys(self, y_pub: bytes, dh_eph: bytes) -> dict[str, bytes]:
        okm = hkdf(dh_eph + self.dh_onion, b"shallot-v1 circuit-keys", self.ident + self.X + self.B + y_pub, 256)
        return {name: okm[32 * j:32 * (j + 1)] for j, name in enumerate(KEY_NAMES)}

    def auth(self, keys: dict[str, bytes], y_pub: bytes) -> bytes:
        return hmac_sha256(keys["auth"], b"shallot-v1 created" + self.ident + self.X + y_pub + self.B)[:16]


def client_slots(hops: list[Hop], payloads: list[bytes], client_rng: bytes) -> bytes:
    """§5.5: slot k = R_k xor KL_0[(k-1)*148:k*148] xor ... xor KL_{k-1}[0:148]; fillers for k >= n."""
    slots = []
    for k in range(SLOTS):
        if k >= len(hops):
            slots.append(client_rng[k * SLOT:(k + 1) * SLOT])
            continue
        hop = hops[k]
        key_id = onion_key_id(hop.B)
        record = key_id + hop.X + seal(hop.k_rec, bytes(12), payloads[k], key_id + hop.X)
        for i in range(k):
            record = xor(record, hops[i].KL[(k - i - 1) * SLOT:(k - i) * SLOT])
        slots.append(record)
    return b"".join(slots)


def build(hops: list[Hop], payloads: list[bytes], client_rng: bytes, relay_rngs: list[bytes],
          name: str) -> tuple[list[bytes], list[bytes], list[bytes], list[dict[str, bytes]]]:
    """Run §5.5-§5.8: what every hop receives, replies and sends back, and the keys the client checks."""
    received = [client_slots(hops, payloads, client_rng)]
    replies, keys = [], []
    for k, hop in enumerate(hops):
        slots = received[k]
        check(f"{name}.hop{k} key id", slots[:4], onion_key_id(hop.B))
        opened = unseal(hop.k_rec, bytes(12), slots[36:SLOT], slots[:36])  # §5.6 step 2
        check(f"{name}.hop{k} record", opened, payloads[k])
        relay_keys = hop.circuit_keys(hop.Y, dh(hop.y, slots[4:36]))
        replies.append(hop.Y + hop.auth(relay_keys, hop.Y))
        keys.append(relay_keys)
        if k + 1 < len(hops):  # §5.6 step 3: strip one layer, shift, append the hop's filler slot
            received.append(xor(slots[SLOT:], hop.KL) + relay_rngs[k][:SLOT])
    sent_back = [b""] * len(hops)
    sent_back[-1] = replies[-1] + relay_rngs[-1][SLOT:SLOT + 3 * REPLY]  # TERMINATE: reply, then filler
    for k in range(len(hops) - 2, -1, -1):  # §5.6 step 6
        s = sent_back[k + 1]
        sent_back[k] = replies[k] + xor(s[:3 * REPLY], keystream(keys[k]["reply_layer"], bytes(12), 3 * REPLY))
    data = sent_back[0]  # §5.8: the client's check, hop by hop
    for k, hop in enumerate(hops):
        y_pub, auth = data[:32], data[32:REPLY]
        client_keys = hop.circuit_keys(y_pub, dh(hop.x, y_pub))
        check(f"{name}.hop{k} auth", auth, hop.auth(client_keys, y_pub))
        check(f"{name}.hop{k} client keys", b"".join(client_keys.values()), b"".join(keys[k].values()))
        data = xor(data[REPLY:], keystream(client_keys["reply_layer"], bytes(12), len(data) - REPLY))
    return received, replies, sent_back, keys


# ------------------------------------------------------------------------------------ §6.4, §6.7


REGION = 1395  # RELAY payload: the onion-layer region
SEQ, TAG = 8, 16
ZSLOT = SEQ + TAG  # a forward hop slot: H | tag
INNER = REGION - 4 * ZSLOT  # 1299
CT = REGION - ZSLOT  # 1371


def inner_message(msg_type: int, data: bytes) -> bytes:
    return (bytes([msg_type]) + u(len(data), 2) + data).ljust(INNER, b"\x00")


def layer_keys(keys: dict[str, bytes]) -> dict[str, Any]:
    """§6.4: okm = HKDF(fwd_body || bwd_body, "shallot-v1 hop-layer", "", 80)."""
    okm = hkdf(keys["fwd_body"] + keys["bwd_body"], b"shallot-v1 hop-layer", b"", 80)
    return {"fwd_key": okm[:32], "bwd_key": okm[32:64], "fwd_offset": int.from_bytes(okm[64:72], "big"),
            "bwd_start": int.from_bytes(okm[72:80], "big") >> 16}


def gcm_keystream(key: bytes, nonce12: bytes, n: int) -> bytes:
    """The keystream AES-256-GCM XORs over its plaintext: E_K(nonce || ctr32) for ctr32 = 2, 3, ..."""
    blocks = (n + 15) // 16
    return b"".join(aes_enc(key, nonce12 + u(2 + b, 4)) for b in range(blocks))[:n]


def hop_open(lk: dict[str, Any], region: bytes) -> tuple[int, bytes]:
    h, tag, c = region[:SEQ], region[SEQ:ZSLOT], region[ZSLOT:]
    seq = (int.from_bytes(h, "big") - lk["fwd_offset"]) % 2**64
    return seq, AESGCM(lk["fwd_key"]).decrypt(bytes(4) + u(seq, 8), c + tag, h)


def forward_cells(keys: list[dict[str, bytes]], inner: bytes, seq: int) -> list[bytes]:
    """The client wraps; returns the region each hop receives; every hop opens its layer (§6.4)."""
    n = len(keys)
    lks = [layer_keys(k) for k in keys]
    nonce = bytes(4) + u(seq, 8)
    ks = [gcm_keystream(lk["fwd_key"], nonce, CT) for lk in lks]
    # what hop j receives in its last j*24 bytes (the zeros earlier hops appended, after their layers):
    # filler_1 = 0^24; filler_{j+1} = (filler_j XOR ks_j[CT - 24j:]) || 0^24
    filler = b""
    for j in range(1, n):
        if j > 1:
            filler = xor(filler, ks[j - 1][CT - len(filler):])
        filler += bytes(ZSLOT)
    plain = inner + bytes(CT - INNER - len(filler)) + xor(filler, ks[n - 1][CT - len(filler):])
    regions: list[bytes] = []
    for j in range(n - 1, -1, -1):
        h = u((seq + lks[j]["fwd_offset"]) % 2**64, 8)
        sealed = AESGCM(lks[j]["fwd_key"]).encrypt(nonce, plain, h)
        region = h + sealed[-TAG:] + sealed[:-TAG]
        regions.insert(0, region)
        plain = region[:CT]
        if j:
            assert region[CT:] == bytes(ZSLOT)
    for j in range(n):  # every hop opens its own layer; a forwarding hop appends 24 zero bytes
        got_seq, m = hop_open(lks[j], regions[j])
        assert got_seq == seq
        if j + 1 < n:
            assert m + bytes(ZSLOT) == regions[j + 1]
        else:
            assert m[:INNER] == inner
    return regions


def backward_cells(keys: list[dict[str, bytes]], inner: bytes, junk: bytes) -> list[bytes]:
    """The last hop seals; returns the region each hop sends; the client opens it (§6.4)."""
    n = len(keys)
    lks = [layer_keys(k) for k in keys]
    c = u(lks[-1]["bwd_start"], 8)
    region = c + AESGCM(lks[-1]["bwd_key"]).encrypt(bytes(4) + c, inner, c) + junk
    assert len(region) == REGION
    cells = [region]
    for i in range(n - 2, -1, -1):  # forwarding hop i: own counter, AES-256-CTR over the first 1387 bytes
        c = u(lks[i]["bwd_start"], 8)
        ctr = Cipher(algorithms.AES(lks[i]["bwd_key"]), modes.CTR(c + bytes(8))).encryptor()
        region = c + ctr.update(region[:REGION - SEQ])
        cells.insert(0, region)
    data = region
    for i in range(n - 1):  # the client
        ctr = Cipher(algorithms.AES(lks[i]["bwd_key"]), modes.CTR(data[:SEQ] + bytes(8))).decryptor()
        data = ctr.update(data[SEQ:])
    c = data[:SEQ]
    assert AESGCM(lks[-1]["bwd_key"]).decrypt(bytes(4) + c, data[SEQ:SEQ + INNER + TAG], c) == inner
    return cells


def check_one_hop(v: dict[str, Any]) -> None:
    i, exp = v["one_hop_build"]["inputs"], v["one_hop_build"]["expected"]
    relay = v["keys"]["expected"]  # the hop is the relay of "keys" (its id was checked there)
    hop = Hop(bytes.fromhex(i["onion_private"]), bytes.fromhex(i["x_private"]), bytes.fromhex(i["y_private"]),
              bytes.fromhex(relay["relay_id"]), bytes.fromhex(relay["link_pub"]))
    payload = record_payload({"kind": "terminate", "service": i["service"]}, i["hour"])
    zeros = bytes(SLOTS * SLOT)  # the document's one-hop vector uses zero filler
    received, replies, _back, keys = build([hop], [payload], zeros, [zeros], "one_hop")
    check("one_hop.slot0", received[0][:SLOT], bytes.fromhex(exp["slot0"]))
    check("one_hop.reply", replies[0], bytes.fromhex(exp["reply"]))
    for name in KEY_NAMES:
        doc_name = "auth_key" if name == "auth" else name
        check(f"one_hop.{doc_name}", keys[0][name], bytes.fromhex(exp["hop_keys"][doc_name]))
    c, cexp = v["first_relay_cell"]["inputs"], v["first_relay_cell"]["expected"]
    lk = layer_keys(keys[0])
    check("first_relay_cell.layer_fwd_key", lk["fwd_key"], bytes.fromhex(cexp["layer_fwd_key"]))
    check("first_relay_cell.layer_bwd_key", lk["bwd_key"], bytes.fromhex(cexp["layer_bwd_key"]))
    check("first_relay_cell.fwd_offset", lk["fwd_offset"], cexp["fwd_offset"])
    check("first_relay_cell.bwd_start", lk["bwd_start"], cexp["bwd_start"])
    (cell,) = forward_cells(keys, inner_message(1, bytes.fromhex(c["data"])), c["seq"])
    check("first_relay_cell.hop_slot", cell[:ZSLOT], bytes.fromhex(cexp["hop_slot"]))
    check("first_relay_cell.region_sha256", sha256(cell), bytes.fromhex(cexp["region_sha256"]))


def check_circuit_build(v: dict[str, Any]) -> None:
    i, exp = v["inputs"], v["expected"]
    hops = [Hop(*(bytes.fromhex(h[k]) for k in ("onion_private", "x_private", "y_private", "relay_id", "link_pub")))
            for h in i["hops"]]
    payloads = [record_payload(h["instruction"], i["hour"]) for h in i["hops"]]
    for k, hop in enumerate(hops):
        check(f"build.onion_public[{k}]", hop.B.hex(), exp["onion_public"][k])
        check(f"build.x_public[{k}]", hop.X.hex(), exp["x_public"][k])
    received, replies, sent_back, keys = build(hops, payloads, bytes.fromhex(i["client_rng"]),
                                               [bytes.fromhex(h["relay_rng"]) for h in i["hops"]], "build")
    for k in range(len(hops)):
        check(f"build.create_slots[{k}]", received[k].hex(), exp["create_slots"][k])
        check(f"build.replies[{k}]", replies[k].hex(), exp["replies"][k])
        check(f"build.created_slots[{k}]", sent_back[k].hex(), exp["created_slots"][k])
        check(f"build.hop_keys[{k}]", {n: b.hex() for n, b in keys[k].items()}, exp["hop_keys"][k])
    fwd = forward_cells(keys, inner_message(1, bytes.fromhex(i["forward_data"])), 0)
    bwd = backward_cells(keys, inner_message(1, bytes.fromhex(i["backward_data"])), bytes.fromhex(i["exit_junk"]))
    for k in range(len(hops)):
        lk = layer_keys(keys[k])
        check(f"build.layer_keys[{k}]", {"fwd_key": lk["fwd_key"].hex(), "bwd_key": lk["bwd_key"].hex(),
                                         "fwd_offset": lk["fwd_offset"], "bwd_start": lk["bwd_start"]},
              exp["layer_keys"][k])
        check(f"build.forward_cells[{k}]", fwd[k].hex(), exp["forward_cells"][k])
        check(f"build.backward_cells[{k}]", bwd[k].hex(), exp["backward_cells"][k])


def main(argv: list[str]) -> int:
    protocol = Path(argv[1]) if len(argv) > 1 else HERE / "protocol_v1.json"
    circuit = Path(argv[2]) if len(argv) > 2 else HERE / "circuit_build_v1.json"
    try:
        v = json.loads(protocol.read_text())
        link_priv, link_pub = check_keys_and_descriptor(v)
        check_nk(v, link_priv, link_pub)
        check_cookie(v, link_pub)
        check_one_hop(v)
        check_circuit_build(json.loads(circuit.read_text()))
    except Mismatch as exc:
        print(exc)
        return 1
    leaked = sorted(m for m in sys.modules if m == "shallot" or m.startswith("shallot."))
    if leaked:
        print(f"NOT INDEPENDENT: imported {leaked}")
        return 2
    print("all vectors reproduced")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
