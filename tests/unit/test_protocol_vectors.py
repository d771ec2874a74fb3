"""docs/PROTOCOL.md §11.2, byte for byte: every fixed vector the document prints (tests/vectors/protocol_v1.json).

Each vector is reproduced by the product code from the stated inputs (fixed keys, ephemerals, indexes,
counters, timestamps), then decoded by the receiving side's code, and encoded again, as arti's testvec tests
do.  Where a vector can go through the node machines themselves (the relay's link layer answering the
INIT_CLIENT and accepting the transport packet), it does.  The first test pins the JSON to the document, so
neither can change without the other.  An implementation written from the document alone
(tests/vectors/independent.py, tests/unit/test_independent_vectors.py) derives the same values.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

from shallot.core.link import LinkState
from shallot.core.link.session import Session
from shallot.core.wire.cells import CMD_PADDING, MSG_DATA, decode_cell, decode_message, encode_cell, encode_message
from shallot.crypto import circuit_handshake as ch
from shallot.crypto import link_handshake as lh
from shallot.crypto.descriptor import Descriptor, ExitPolicySummary, decode_directory, encode_directory
from shallot.crypto.keys import OnionKey, RelayKeys, onion_key_id, relay_id_of, verify_link_cert
from shallot.crypto.onion import ClientLayers, EndpointLayer, IntegrityError, LayerKeys
from shallot.crypto.params import HOP_SLOT_LEN, LINK_HEADER_LEN, LINK_PACKET_LEN, RECORD_LEN, RELAY_LEN
from shallot.crypto.primitives import AuthFailure, aead_open, sha256, x25519_public
from shallot.relay.forwarder import relay_link_layer
from tests.unit.helpers_vectors import HOP_KEY_FIELDS, Tape, onion_ring

ROOT = Path(__file__).resolve().parents[2]
VECTORS = json.loads((ROOT / "tests" / "vectors" / "protocol_v1.json").read_text())
H = bytes.fromhex
ZERO = lambda n: bytes(n)  # noqa: E731 - filler for the one-hop build, as the document's vector uses


def _section_11_2() -> str:
    text = (ROOT / "docs" / "PROTOCOL.md").read_text()
    return text[text.index("### 11.2 Fixed vectors"):text.index("## 12. Discovery")]


def _hex_values(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [h for v in node.values() for h in _hex_values(v)]
    if isinstance(node, int) and not isinstance(node, bool):
        return [str(node)]  # decimal inputs (wall clock, hour) as the document prints them
    return [node] if isinstance(node, str) and re.fullmatch(r"[0-9a-f]{8,}", node) else []


def _keys() -> RelayKeys:
    i = VECTORS["keys"]["inputs"]
    return RelayKeys(H(i["identity_seed"]), H(i["link_private"]), [OnionKey(H(i["onion_private"]), 0)])


# ------------------------------------------------------------------------------------------ the document


def test_the_vectors_file_is_protocol_md_section_11_2() -> None:
    """Every expected value of the JSON is printed in §11.2, and every hex string §11.2 prints is in the JSON
    (as an expected value or an input): nothing listed there goes unchecked here."""
    section = re.sub(r"\s+", "", _section_11_2())
    expected = [h for v in VECTORS.values() if isinstance(v, dict) for h in _hex_values(v["expected"])
                if not h.isdigit()]
    inputs = [h for v in VECTORS.values() if isinstance(v, dict) for h in _hex_values(v["inputs"])]
    missing = [h for h in expected if h not in section]
    assert not missing, f"tests/vectors/protocol_v1.json and docs/PROTOCOL.md §11.2 disagree: {missing}"
    rest = section
    for h in sorted(expected + inputs, key=len, reverse=True):
        rest = rest.replace(h, " ")
    assert re.findall(r"[0-9a-f]{16,}", rest) == [], "§11.2 prints a value the vectors file does not check"
    assert len(expected) == 32 and VECTORS["source"] == "docs/PROTOCOL.md §11.2"


# ------------------------------------------------------------------------------------------ §3


def test_keys_ids_and_link_certificate() -> None:
    exp = VECTORS["keys"]["expected"]
    keys = _keys()
    assert keys.identity_pub.hex() == exp["identity_pub"]
    assert keys.relay_id.hex() == exp["relay_id"] == relay_id_of(H(exp["identity_pub"])).hex()
    assert keys.link_pub.hex() == exp["link_pub"]
    assert keys.current_onion.public.hex() == exp["onion_pub"]
    assert keys.current_onion.key_id.hex() == exp["onion_key_id"] == onion_key_id(H(exp["onion_pub"])).hex()
    # the certificate as a relay makes it when it starts: cert_expires = start + 7 days
    expires = VECTORS["keys"]["inputs"]["cert_expires"]
    layer = relay_link_layer(keys, rng=Tape(b""), wall=expires - 604800)
    assert (layer.config.cert_expires, layer.config.cert_sig.hex()) == (expires, exp["link_cert_sig"])
    # the receiving side: the signature verifies for exactly this (identity, link key, expiry)
    verify_link_cert(H(exp["identity_pub"]), H(exp["link_pub"]), expires, H(exp["link_cert_sig"]))
    for wrong in ((H(exp["onion_pub"]), expires), (H(exp["link_pub"]), expires + 1)):
        with pytest.raises(AuthFailure):
            verify_link_cert(H(exp["identity_pub"]), wrong[0], wrong[1], H(exp["link_cert_sig"]))


def test_descriptor() -> None:
    i, exp = VECTORS["descriptor"]["inputs"], VECTORS["descriptor"]["expected"]
    keys = _keys()
    desc = Descriptor.create(keys, nickname=i["nickname"], addresses=(tuple(i["address"]),), exit_node=i["exit"],
                             published=i["published"], lifetime_s=i["lifetime_s"])
    raw = desc.encode()
    assert (len(raw), raw.hex()) == (exp["length"], exp["encoded"])
    got = Descriptor.decode(H(exp["encoded"]))
    assert got == desc
    assert (got.nickname, got.address, got.is_exit, got.published, got.expires) == (
        i["nickname"], tuple(i["address"]), True, i["published"], i["published"] + i["lifetime_s"])
    assert (got.version_min, got.version_max) == tuple(i["versions"])
    assert got.exit_policy == ExitPolicySummary.default_exit() and str(got.exit_policy) == i["exit_policy"]
    assert (got.identity_pub, got.link_pub, got.onion_pub) == (keys.identity_pub, keys.link_pub,
                                                                keys.current_onion.public)
    assert got.encode().hex() == exp["encoded"]
    # and through the directory file, in its text form
    text = encode_directory([got])
    assert text.splitlines()[1] == base64.b64encode(H(exp["encoded"])).decode()
    assert decode_directory(text, i["published"] + 1) == ([got], [])


# ------------------------------------------------------------------------------------------ §4


def _init_client() -> tuple[lh.InitiatorState, bytes]:
    i = VECTORS["nk_handshake"]["inputs"]
    return lh.client_initiation(responder_link_pub=_keys().link_pub, sender_index=int(i["sender_index"], 16),
                                rng=Tape(b""), resume=H(i["resume"]),
                                ephemeral=H(i["initiator_ephemeral_private"]))


def _relay_answers(packet: bytes) -> tuple[Any, list[tuple[bytes, Any]]]:
    """The relay's link layer (as a relay builds it) receives ``packet``; its random draws are the vector's:
    its index, its ephemeral, then the 6-byte start of its send counter."""
    i = VECTORS["nk_handshake"]["inputs"]
    tape = Tape(H(i["responder_index"]) + H(i["responder_ephemeral_private"]) + bytes(6))
    keys = _keys()
    layer = relay_link_layer(keys, rng=tape, wall=1_800_000_000)
    layer.receive_datagram(packet, ("198.51.100.1", 40000), 50.0, i["wall"])
    tape.assert_consumed()
    return layer, layer.datagrams_to_send()


def test_nk_init_client_and_response() -> None:
    i, exp = VECTORS["nk_handshake"]["inputs"], VECTORS["nk_handshake"]["expected"]
    state, init = _init_client()
    assert (len(init), init.hex()) == (lh.INIT_CLIENT_LEN, exp["init_client"])
    # decoded by the responder's code: the fields the client put in
    keys = _keys()
    assert lh.check_mac1(keys.link_pub, H(exp["init_client"]))
    seen = lh.read_initiation(link_private=keys.link_private, link_pub=keys.link_pub, packet=H(exp["init_client"]),
                              wall=i["wall"])
    # a client sends no clock: the reserved field is zero (review M5)
    assert (seen.sender_index, seen.timestamp_ns, seen.resume, seen.relay) == (
        int(i["sender_index"], 16), 0, H(i["resume"]), None)
    assert seen.ephemeral == x25519_public(H(i["initiator_ephemeral_private"]))
    # the relay's link layer answers it with exactly the RESPONSE of the vector, and nothing else
    layer, out = _relay_answers(H(exp["init_client"]))
    assert [(p.hex(), a) for p, a in out] == [(exp["response"], ("198.51.100.1", 40000))]
    assert layer.counters["handshake_responded"] == 1
    # a half-open handshake: the link is made by the client's first transport packet (test_transport_packet)
    assert not layer.links and layer.half_open_count == 1
    (half,) = layer._half_open.values()
    assert half.session.local_index == int(i["responder_index"], 16)
    assert half.session.resume.hex() == exp["resume"]
    # the client reads it: the transport keys and the token of §4.6
    keys_c, responder_index = lh.read_response(state, H(exp["response"]))
    assert responder_index == int(i["responder_index"], 16)
    assert (keys_c.send.hex(), keys_c.recv.hex(), keys_c.resume.hex()) == (exp["k1"], exp["k2"], exp["resume"])


def test_a_changed_byte_of_the_init_client_is_not_answered() -> None:
    """The decode side checks what it decodes: a changed mac1, or any changed byte under a recomputed mac1
    (version, index, ephemeral, ciphertext, tag), is dropped without an answer."""
    good = H(VECTORS["nk_handshake"]["expected"]["init_client"])
    link_pub = _keys().link_pub
    for pos in (1, 2, 6, 40, 70, len(good) - 17):
        bad = good[:pos] + bytes([good[pos] ^ 0x01]) + good[pos + 1:]
        if pos < len(good) - 32:
            bad = bad[:-32] + lh.mac1(link_pub, bad[:-32]) + lh.NO_MAC2
        layer = relay_link_layer(_keys(), rng=Tape(b""), wall=1_800_000_000)
        layer.receive_datagram(bad, ("198.51.100.1", 40000), 50.0, VECTORS["nk_handshake"]["inputs"]["wall"])
        expected = "drop_bad_mac1" if pos == len(good) - 17 else "drop_bad_initiation"
        assert layer.datagrams_to_send() == [] and dict(layer.counters) == {expected: 1}, (pos, layer.counters)


def test_transport_packet() -> None:
    i, exp = VECTORS["transport_packet"]["inputs"], VECTORS["transport_packet"]["expected"]
    nk = VECTORS["nk_handshake"]["expected"]
    cell = encode_cell(0, CMD_PADDING)
    session = Session(lh.TransportKeys(send=H(nk["k1"]), recv=H(nk["k2"]), resume=H(nk["resume"])),
                      local_index=int(VECTORS["nk_handshake"]["inputs"]["sender_index"], 16),
                      remote_index=int(i["receiver_index"], 16), now=0.0, first_counter=int(i["counter"], 16))
    packet = session.seal(cell)
    assert len(packet) == LINK_PACKET_LEN
    assert packet[:LINK_HEADER_LEN].hex() == exp["header"]
    assert sha256(packet).hex() == exp["sha256"]
    # decode: k1 opens it with the header as associated data, and the cell is PADDING
    header = packet[:LINK_HEADER_LEN]
    opened = aead_open(H(nk["k1"]), bytes(4) + header[5:], packet[LINK_HEADER_LEN:], header)
    assert opened == cell and decode_cell(opened) == (0, CMD_PADDING, bytes(1395))
    # and the relay that answered the vector's handshake accepts it as a keepalive: no drop, no cell
    layer, _ = _relay_answers(H(nk["init_client"]))
    handed_up: list[bytes] = []
    layer.on_cell = lambda link, c: handed_up.append(c)
    layer.receive_datagram(packet, ("198.51.100.1", 40000), 51.0, 1_800_000_001.0)
    (link,) = layer.links.values()  # the first transport packet made the link (§4.5)
    assert link.state is LinkState.UP and link.session is not None and layer.half_open_count == 0
    assert link.session.local_index == int(VECTORS["nk_handshake"]["inputs"]["responder_index"], 16)
    assert link.session.resume.hex() == VECTORS["nk_handshake"]["expected"]["resume"]
    assert link.last_recv == 51.0 and not handed_up and layer.counters["link_promoted"] == 1
    assert not [k for k in layer.counters if k.startswith("drop_")], layer.counters
    layer.receive_datagram(packet, ("198.51.100.1", 40000), 52.0, 1_800_000_002.0)
    assert layer.counters["drop_replay"] == 1  # the same packet twice: the window saw its counter


def test_cookie_reply_and_mac2() -> None:
    """§4.12: the relay under load answers the vector's INIT_CLIENT (no mac2) with exactly the COOKIE_REPLY, the
    client reads the cookie from it, and the same initiation with the vector's mac2 gets the RESPONSE."""
    i, exp = VECTORS["cookie_reply"]["inputs"], VECTORS["cookie_reply"]["expected"]
    nk_in, nk = VECTORS["nk_handshake"]["inputs"], VECTORS["nk_handshake"]["expected"]
    source = (i["source_host"], i["source_port"])
    assert lh.cookie_key(_keys().link_pub).hex() == exp["cookie_key"]
    tape = Tape(H(i["cookie_secret"]) + H(i["nonce"]) + H(nk_in["responder_index"])
                + H(nk_in["responder_ephemeral_private"]) + bytes(6) + H(i["nonce"]))
    layer = relay_link_layer(_keys(), rng=tape, wall=1_800_000_000)
    layer.config.cookie_load_rate = 0  # under load from the first initiation on
    layer.receive_datagram(H(nk["init_client"]), source, 50.0, nk_in["wall"])
    assert [(p.hex(), a) for p, a in layer.datagrams_to_send()] == [(exp["cookie_reply"], source)]
    assert len(H(exp["cookie_reply"])) == lh.COOKIE_REPLY_LEN < lh.INIT_CLIENT_LEN and not layer.half_open_count
    state, _init = _init_client()
    cookie = lh.read_cookie_reply(responder_link_pub=_keys().link_pub, state=state, packet=H(exp["cookie_reply"]))
    assert cookie.hex() == exp["cookie"]
    with_mac2 = H(nk["init_client"])[:-16] + H(exp["mac2"])
    assert lh.mac2(cookie, with_mac2[:-16]).hex() == exp["mac2"]
    assert lh.client_initiation(responder_link_pub=_keys().link_pub, sender_index=int(nk_in["sender_index"], 16),
                                rng=Tape(b""), ephemeral=H(nk_in["initiator_ephemeral_private"]),
                                cookie=cookie)[1] == with_mac2
    layer.receive_datagram(with_mac2, source, 50.5, nk_in["wall"])
    assert [(p.hex(), a) for p, a in layer.datagrams_to_send()] == [(nk["response"], source)]
    # from another port the cookie is not valid: another cookie reply, no DH (so no replay check either)
    layer.receive_datagram(with_mac2, (source[0], source[1] + 1), 50.6, nk_in["wall"])
    assert layer.counters["cookie_reply_sent"] == 2 and layer.counters["drop_initiation_replay"] == 0
    tape.assert_consumed()


# ------------------------------------------------------------------------------------------ §5, §6


def _one_hop() -> tuple[list[ch.PendingHop], bytes, ch.RecordOpened, ch.HopKeys, bytes]:
    i = VECTORS["one_hop_build"]["inputs"]
    onion = H(i["onion_private"])
    k = VECTORS["keys"]["expected"]
    ident = ch.HopIdentity(H(k["relay_id"]), H(k["link_pub"]))  # the relay of "keys" (review L1)
    hop = ch.HopTarget(x25519_public(onion), ch.Terminate(i["service"]), ident)
    pending, slots = ch.client_create([hop], hour=i["hour"], rng=ZERO, ephemerals=[H(i["x_private"])])
    opened = ch.relay_open(slots, onion_ring(onion), rng=ZERO)
    keys, reply = ch.relay_reply(opened, ident, rng=Tape(b""), y_private=H(i["y_private"]))
    return pending, slots, opened, keys, reply


def test_one_hop_build() -> None:
    i, exp = VECTORS["one_hop_build"]["inputs"], VECTORS["one_hop_build"]["expected"]
    pending, slots, opened, keys, reply = _one_hop()
    assert slots[:RECORD_LEN].hex() == exp["slot0"]
    assert slots[:4].hex() == VECTORS["keys"]["expected"]["onion_key_id"]
    # decoded by the hop: its instruction and the client's hour
    assert (opened.instruction, opened.hour) == (ch.Terminate(i["service"]), i["hour"])
    assert opened.x_pub == x25519_public(H(i["x_private"])) == H(exp["slot0"])[4:36]
    assert ch.decode_payload(ch.encode_payload(opened.instruction, opened.hour)) == (opened.instruction,
                                                                                     opened.hour)
    assert reply.hex() == exp["reply"] and reply[:32] == x25519_public(H(i["y_private"]))
    names = {f: ("auth_key" if f == "auth" else f) for f in HOP_KEY_FIELDS}
    assert {names[f]: getattr(keys, f).hex() for f in HOP_KEY_FIELDS} == exp["hop_keys"]
    # the client checks the reply and derives the same keys; a changed auth byte fails
    created = ch.relay_created_first(H(exp["reply"]), rng=ZERO)
    assert ch.client_created(pending, created) == [keys]
    with pytest.raises(AuthFailure):
        ch.client_created(pending, created[:47] + bytes([created[47] ^ 1]) + created[48:])


def test_first_relay_cell() -> None:
    i, exp = VECTORS["first_relay_cell"]["inputs"], VECTORS["first_relay_cell"]["expected"]
    *_, keys, _reply = _one_hop()
    lk = LayerKeys.derive(keys)
    assert (lk.fwd_key.hex(), lk.bwd_key.hex(), lk.fwd_offset, lk.bwd_start) == (
        exp["layer_fwd_key"], exp["layer_bwd_key"], exp["fwd_offset"], exp["bwd_start"])
    inner = encode_message(MSG_DATA, H(i["data"]))
    region = ClientLayers([keys]).wrap(inner)
    assert len(region) == RELAY_LEN
    assert (region[:HOP_SLOT_LEN].hex(), sha256(region).hex()) == (exp["hop_slot"], exp["region_sha256"])
    # decoded at the exit: sequence number 0, DATA "hello"; a second copy is a replay
    exit_layer = EndpointLayer(keys)
    assert exit_layer.open_forward(region) == inner
    assert decode_message(inner) == (MSG_DATA, b"hello")
    assert exit_layer.replay.would_accept(i["seq"]) is False
    with pytest.raises(IntegrityError):
        exit_layer.open_forward(region)
    # encoded again from scratch: the same bytes (no randomness in the forward layers)
    assert ClientLayers([keys]).wrap(encode_message(MSG_DATA, b"hello")) == region
