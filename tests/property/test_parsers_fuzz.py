"""Every parser of untrusted input raises only its documented error, and valid values round-trip.

Hypothesis costs ~0.5 ms per example on this 2-core machine before the test body even runs, so the
parsers are grouped into two @given tests of 10,000 examples each (files a node loads; what arrives
from the network), and every example feeds *every* parser of its group its own input: each parser
still sees 10,000 inputs, and the file runs in about a minute.  An example is a ``strategies.Case``:
one selector byte per parser picks the shape of its input (0 = plain random bytes; expensive shapes
are weighted down) and a seed expands into the bytes.

Regression tests for bugs this fuzzing found (wrong error types, unchecked limits, small-order
Ed25519 keys) follow the two property tests.
"""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest
from hypothesis import given

from shallot.core.nat import NodeStack
from shallot.core.nat.demux import Kind, kind_of
from shallot.core.wire import stun
from shallot.core.wire.cells import (
    CMD_PADDING,
    COMMANDS,
    MESSAGE_TYPES,
    decode_cell,
    decode_message,
    encode_cell,
    encode_message,
)
from shallot.crypto import circuit_handshake as ch
from shallot.crypto import link_handshake as lh
from shallot.crypto.codec import DecodeError
from shallot.crypto.descriptor import (
    DIRECTORY_HEADER,
    MAX_LIFETIME_S,
    Descriptor,
    DescriptorError,
    ExitPolicySummary,
    decode_directory,
)
from shallot.crypto.keys import RelayKeys
from shallot.crypto.noise import NoiseHandshake
from shallot.crypto.params import (
    CELL_LEN,
    CREATE_SLOTS_LEN,
    INNER_LEN,
    LABEL_DESCRIPTOR,
    LABEL_LAYER,
    LABEL_PROLOGUE,
    LABEL_RECORD,
    MAX_DATA_LEN,
    MSG_INIT_RELAY,
    RECORD_LEN,
    RECORD_PAYLOAD_LEN,
)
from shallot.crypto.primitives import AuthFailure, aead_seal, ed25519_verify, hkdf, x25519, x25519_public
from shallot.crypto.replay import ReplayWindow
from tests.property.strategies import (
    DATAGRAM_MODES,
    FUZZ,
    WALL,
    Case,
    Gen,
    HandshakeCase,
    canonical_instruction,
    cases,
    counters_of,
    datagram_for,
    descriptor_pool,
    fresh_state,
    handshake_cases,
    key_pool,
    link_targets,
    random_descriptor_args,
    random_instruction,
    stale_descriptors,
    synthetic_descriptor,
    synthetic_payload,
    valid_key_json,
)
from tests.unit.helpers_vectors import onion_ring

# ============================================================================ descriptors and directories


def _descriptor_input(mode: int, g: Gen) -> bytes:
    pool = descriptor_pool()
    if mode == 0:
        return g.blob(2200, near=(2048, 2049, len(pool[0].encode())))
    if mode == 1:
        return g.text(300).encode()
    if mode == 2:
        return g.mutate(g.choice(pool).encode())
    if mode == 3:  # a valid descriptor's prefix, then junk
        raw = g.choice(pool).encode()
        cut = g.r.randrange(len(raw))
        return raw[:cut] + g.blob(300)
    if mode == 4:
        return synthetic_descriptor(g)
    return g.choice(pool + stale_descriptors()).encode()  # untouched: must decode


def _check_descriptor_decode_and_directories(c: Case) -> None:
    """Descriptor.decode and decode_directory raise only DescriptorError."""
    mode = c.mode(0, (4, 3, 2, 3, 3, 1))
    g = c.gen(0)
    data = _descriptor_input(mode, g)
    try:
        desc = Descriptor.decode(data)
    except DescriptorError:
        assert mode != 5, "a valid descriptor was rejected"
    else:
        assert desc.encode() == data, "only canonical, correctly signed bytes may decode"
        assert desc in descriptor_pool() + stale_descriptors(), "decoded something nobody signed"

    # decode_directory on arbitrary text (with and without the right first line)
    g2 = c.gen(1)
    text = g2.text(400)
    if g2.chance(0.5):
        text = DIRECTORY_HEADER + g2.choice(["\n", "\r\n", "\u2028", " \n#c\n"]) + text
    try:
        good, problems = decode_directory(text, WALL)
    except DescriptorError:
        pass
    else:
        assert good and all(d in descriptor_pool() for d in good)
        assert isinstance(problems, list)

    if c.mode(9, 2):  # every other example: directory-shaped text with an exactly predicted outcome
        _check_structured_directory(g2)


def _check_structured_directory(g: Gen) -> None:
    """decode_directory on directory-shaped text: exactly the first copy of each usable descriptor is
    returned, in order, every other entry is reported as a problem, and no usable entry means an error."""
    pool, stale = descriptor_pool(), stale_descriptors()
    by_text = {d.to_text(): d for d in pool}
    header = g.choice([DIRECTORY_HEADER] * 6 + ["  " + DIRECTORY_HEADER + "\t", "shallot-directory 2", "",
                                                 g.text(30, line_breaks=False)])
    lines = [header]
    for _ in range(g.count(6)):
        k = g.r.random()
        if k < 0.12:
            line = g.choice(pool).to_text()  # the only kind of entry that costs a signature check...
        elif k < 0.17:
            line = g.choice(stale).to_text()
        elif k < 0.25:
            line = base64.b64encode(g.mutate(g.choice(pool).encode())).decode()
        elif k < 0.45:
            line = base64.b64encode(g.blob(300)).decode()
        elif k < 0.55:
            line = "# " + g.text(20, line_breaks=False)
        elif k < 0.6:
            line = ""
        else:
            line = g.text(80, line_breaks=False)
        lines.append(g.choice(["", " ", "\t"]) + line + g.choice(["", " "]) if g.chance(0.3) else line)
    if g.chance(0.2):
        lines.insert(0, "# comment")
    text = g.choice(["\n", "\r\n"]).join(lines) + g.choice(["", "\n"])

    # blank lines and comments (first non-blank character '#') are skipped
    kept = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    expected, seen = [], set()
    if kept and kept[0] == DIRECTORY_HEADER:
        for entry in kept[1:]:
            d = by_text.get(entry)
            if d is not None and d.relay_id not in seen:
                seen.add(d.relay_id)
                expected.append(d)
    if not expected:
        with pytest.raises(DescriptorError):
            decode_directory(text, WALL)
        return
    good, problems = decode_directory(text, WALL)
    assert good == expected
    assert len(problems) == len(kept) - 1 - len(good)


def _check_descriptor_round_trip_and_one_byte_change(c: Case) -> None:
    """create -> encode -> decode gives the same descriptor; any one changed byte is rejected."""
    g = c.gen(2)
    desc = Descriptor.create(**random_descriptor_args(g))
    raw = desc.encode()
    assert Descriptor.decode(raw) == desc
    i = g.r.randrange(len(raw))
    tampered = raw[:i] + bytes([raw[i] ^ g.r.randint(1, 255)]) + raw[i + 1:]
    with pytest.raises(DescriptorError) as err:
        Descriptor.decode(tampered)
    flipped = raw[i] ^ tampered[i]
    if i == 118 and flipped & 0x02:  # the extension flag (§3.4.1): the bytes after it no longer parse
        assert "malformed" in str(err.value) or "signature" in str(err.value), (i, str(err.value))
    elif 6 <= i < 102 or i == 118 or i >= len(raw) - 64:  # keys, flags, signature: the parse still succeeds
        assert "signature" in str(err.value), (i, str(err.value))


# ============================================================================ cells and end-to-end messages


def _cell_input(mode: int, g: Gen) -> bytes:
    if mode == 0:
        return g.blob(1500, near=(CELL_LEN,))
    cid = g.choice([0, 1, 2**32 - 1, g.int(0, 2**32 - 1)])
    return cid.to_bytes(4, "big") + bytes([g.int(0, 255)]) + g.bytes(CELL_LEN - 5)


def _inner_input(mode: int, g: Gen) -> bytes:
    if mode == 0:
        return g.blob(1500, near=(INNER_LEN,))
    n = g.choice([0, MAX_DATA_LEN, MAX_DATA_LEN + 1, 0xFFFF, g.int(0, 0xFFFF), g.int(0, MAX_DATA_LEN)])
    return bytes([g.int(0, 255)]) + n.to_bytes(2, "big") + g.bytes(INNER_LEN - 3)


def _check_cell_and_message_codecs(c: Case) -> None:
    mode = c.mode(1, 2)
    g = c.gen(3)
    # arbitrary bytes: DecodeError or a canonical cell
    cell = _cell_input(mode, g)
    try:
        cid, cmd, payload = decode_cell(cell)
    except DecodeError:
        pass
    else:
        assert cmd in COMMANDS and (cid != 0 or cmd == CMD_PADDING)
        assert encode_cell(cid, cmd, payload) == cell
    inner = _inner_input(mode, g)
    try:
        msg_type, data = decode_message(inner)
    except DecodeError:
        pass
    else:
        assert msg_type in MESSAGE_TYPES and len(data) <= MAX_DATA_LEN
        assert inner[:3 + len(data)] == encode_message(msg_type, data)[:3 + len(data)]

    # round trips for every valid value
    cmd = g.choice(sorted(COMMANDS))
    cid = g.int(0 if cmd == CMD_PADDING else 1, 2**32 - 1)
    payload = g.blob(CELL_LEN - 5, near=(CELL_LEN - 5,))
    encoded = encode_cell(cid, cmd, payload)
    assert len(encoded) == CELL_LEN
    assert decode_cell(encoded) == (cid, cmd, payload.ljust(CELL_LEN - 5, b"\x00"))
    msg_type = g.choice(sorted(MESSAGE_TYPES))
    data = g.blob(MAX_DATA_LEN, near=(0, MAX_DATA_LEN))
    encoded = encode_message(msg_type, data)
    assert len(encoded) == INNER_LEN
    assert decode_message(encoded) == (msg_type, data)


# ============================================================================ circuit build records


def _record_keys(dh_onion: bytes, x_pub: bytes, onion_pub: bytes) -> tuple[bytes, bytes]:
    """docs/PROTOCOL.md §5, written out independently of crypto/circuit_handshake.py."""
    info = x_pub + onion_pub
    return (hkdf(dh_onion, salt=LABEL_RECORD, info=info, length=32),
            hkdf(dh_onion, salt=LABEL_LAYER, info=info, length=32))


_ONION_KEYS = (key_pool()[0].current_onion, key_pool()[1].current_onion)  # current and an overlapping one
_RING = onion_ring(*(ok.private for ok in _ONION_KEYS))  # built exactly as RelayNode builds its ring
_RING_PUBS = [ok.public for ok in _ONION_KEYS]
_IDENT = ch.HopIdentity(bytes(20), bytes(32))  # who the hop is does not matter to relay_open
_LOW_ORDER = [bytes(32), (1).to_bytes(32, "little"),
              bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")]


def _check_build_record_codecs_and_relay_open(c: Case) -> None:
    slots_mode = c.mode(2, (5, 3, 4, 3, 2, 3))
    payload_mode = c.mode(3, 3)
    g = c.gen(4)
    # decode_payload on arbitrary bytes
    if payload_mode == 0:
        payload = g.blob(120, near=(RECORD_PAYLOAD_LEN,))
    elif payload_mode == 1:
        payload = synthetic_payload(g)
    else:
        payload = g.mutate(ch.encode_payload(random_instruction(g), g.int(0, 2**32 - 1)))
    try:
        instruction, hour = ch.decode_payload(payload)
    except DecodeError:
        pass
    else:
        assert isinstance(instruction, ch.ExtendTo | ch.Terminate)
        if len(payload) == RECORD_PAYLOAD_LEN:
            assert ch.encode_payload(instruction, hour) == payload, "decode_payload accepted a non-canonical record"

    # round trip of every valid instruction
    instruction, hour = random_instruction(g), g.int(0, 2**32 - 1)
    encoded = ch.encode_payload(instruction, hour)
    assert len(encoded) == RECORD_PAYLOAD_LEN
    assert ch.decode_payload(encoded) == (canonical_instruction(instruction), hour)

    # relay_open with a real key ring: only DecodeError / AuthFailure
    _check_relay_open(slots_mode, g)


def _check_relay_open(mode: int, g: Gen) -> None:
    expect: tuple | None = None  # (instruction, hour) the record must open to, if any
    must_fail = True
    if mode == 0:  # random slots: unknown onion key id (fails before any DH)
        slots = g.bytes(CREATE_SLOTS_LEN)
    elif mode == 1:  # wrong length
        slots = g.blob(CREATE_SLOTS_LEN + 10, near=(CREATE_SLOTS_LEN,))
        if len(slots) == CREATE_SLOTS_LEN:
            slots = slots + b"\x00"
    elif mode == 2:  # our key id, random (or low-order) X, random AEAD
        x_pub = g.choice(_LOW_ORDER) if g.chance(0.2) else g.bytes(32)
        slots = g.choice([ok.key_id for ok in _ONION_KEYS]) + x_pub + g.bytes(CREATE_SLOTS_LEN - 36)
    elif mode == 3:  # a correctly sealed record around an arbitrary payload: exercises decode_payload
        onion_pub = g.choice(_RING_PUBS)
        x_priv = g.bytes(32)
        x_pub = x25519_public(x_priv)
        k_rec, _ = _record_keys(x25519(x_priv, onion_pub), x_pub, onion_pub)
        payload = synthetic_payload(g)
        key_id = ch.onion_key_id(onion_pub)
        slots = key_id + x_pub + aead_seal(k_rec, bytes(12), payload, key_id + x_pub) + g.bytes(3 * RECORD_LEN)
        try:
            expect = ch.decode_payload(payload)
            must_fail = False
        except DecodeError:
            pass
    elif mode == 4:  # a valid record with one byte of the first slot changed
        hops = [ch.HopTarget(g.choice(_RING_PUBS), random_instruction(g), _IDENT)]
        _pending, slots = ch.client_create(hops, hour=g.int(0, 2**32 - 1), rng=g.r.randbytes)
        slots = g.flip_one(slots, hi=RECORD_LEN)
    else:  # a valid record written by the client
        hops = [ch.HopTarget(g.choice(_RING_PUBS), random_instruction(g), _IDENT) for _ in range(max(1, g.count(4)))]
        hour = g.int(0, 2**32 - 1)
        _pending, slots = ch.client_create(hops, hour=hour, rng=g.r.randbytes)
        expect, must_fail = (canonical_instruction(hops[0].instruction), hour), False
    try:
        opened = ch.relay_open(slots, _RING, rng=g.r.randbytes)
    except (DecodeError, AuthFailure):
        assert must_fail, f"relay_open rejected a valid record (mode {mode})"
        return
    assert not must_fail, f"relay_open accepted a bad record (mode {mode})"
    assert (canonical_instruction(opened.instruction), opened.hour) == expect
    assert len(opened.forward_slots) == CREATE_SLOTS_LEN


# ============================================================================ link handshakes


def _noise_initiation(g: Gen) -> tuple[bytes, bytes, bytes]:
    """An IK initiation that is valid Noise but carries an arbitrary (wrongly certified) payload.
    Returns (responder private, responder public, packet)."""
    hc = g.choice(handshake_cases())
    sender = g.int(0, 2**32 - 1)
    prologue = LABEL_PROLOGUE + bytes([MSG_INIT_RELAY, 1]) + sender.to_bytes(4, "big")
    noise = NoiseHandshake("IK", initiator=True, s=g.bytes(32), rs=hc.responder_pub, prologue=prologue)
    # never a small-order identity key: those verify forged signatures (see test_small_order_identity_key_...)
    identity = g.choice(key_pool()).identity_pub if g.chance(0.5) else g.r.randbytes(32)
    payload = identity + g.int(0, 2**64 - 1).to_bytes(8, "big") + g.bytes(64) + g.bytes(8)
    body = bytes([MSG_INIT_RELAY, 1]) + sender.to_bytes(4, "big") + noise.write_message(payload, g.r.randbytes)
    return hc.responder_private, hc.responder_pub, body + lh.mac1(hc.responder_pub, body) + lh.NO_MAC2


def _check_link_handshake_parsers(c: Case) -> None:
    """read_initiation, response_receiver and read_response raise only DecodeError / AuthFailure."""
    init_mode = c.mode(4, (6, 5, 4, 2, 3))
    resp_mode = c.mode(5, (3, 2, 2, 2))
    g = c.gen(5)
    hc: HandshakeCase = g.choice(handshake_cases())  # type: ignore[assignment]
    priv, pub = hc.responder_private, hc.responder_pub
    # read_initiation: only DecodeError / AuthFailure
    must_fail = True
    if init_mode == 0:
        packet = g.blob(300, near=(lh.INIT_CLIENT_LEN, lh.INIT_RELAY_LEN))
    elif init_mode == 1:  # right type, right length, random rest (mac1 is the caller's job: not checked)
        kind = g.choice((0x51, 0x52))
        packet = bytes([kind, g.choice((1, 1, 0))]) + g.bytes(
            (lh.INIT_CLIENT_LEN if kind == 0x51 else lh.INIT_RELAY_LEN) - 2)
    elif init_mode == 2:  # a valid initiation with 1-3 edits outside mac1 and mac2
        packet = g.mutate(hc.initiation, protect_tail=32)
        must_fail = packet[:-32] != hc.initiation[:-32] or len(packet) != len(hc.initiation)
    elif init_mode == 3:
        priv, pub, packet = _noise_initiation(g)
    else:
        packet, must_fail = hc.initiation, False
    try:
        init = lh.read_initiation(link_private=priv, link_pub=pub, packet=packet, wall=WALL)
    except (DecodeError, AuthFailure):
        assert must_fail, "read_initiation rejected a valid initiation"
    else:
        assert not must_fail, f"read_initiation accepted a bad initiation (mode {init_mode})"
        assert init.timestamp_ns == (0 if init.relay is None else int(WALL * 1e9))  # clients send no clock

    # response_receiver and read_response
    must_fail = True
    state = fresh_state(hc)  # read_response mutates the state (even when it fails)
    if resp_mode == 0:
        packet = g.blob(100, near=(lh.RESPONSE_LEN,))
    elif resp_mode == 1:  # our index, random rest
        packet = bytes([0x53]) + state.sender_index.to_bytes(4, "big") + g.bytes(lh.RESPONSE_LEN - 5)
    elif resp_mode == 2:
        packet = g.flip_one(hc.response)
    else:
        packet, must_fail = hc.response, False
    try:
        receiver = lh.response_receiver(packet)
    except DecodeError:
        assert must_fail
    else:
        assert receiver == int.from_bytes(packet[1:5], "big")
    try:
        _keys, _remote = lh.read_response(state, packet)
    except (DecodeError, AuthFailure):
        assert must_fail, "read_response rejected the valid response"
    else:
        assert not must_fail, f"read_response accepted a forged response (mode {resp_mode})"


# ============================================================================ key files


def _check_relay_keys_from_json(c: Case) -> None:
    """RelayKeys.from_json raises only ValueError; valid key files round-trip."""
    mode = c.mode(6, 4)
    g = c.gen(6)
    valid = False
    if mode == 0:
        text = g.text(200)
    elif mode == 1:
        text = json.dumps({"format": "shallot-relay-keys-1", **{g.choice(["identity_seed", "link_private",
                           "onion_keys", "x"]): g.json_value() for _ in range(4)}})
        if g.chance(0.3):
            text = json.dumps(g.json_value())
    elif mode == 2:  # a valid key file with one field replaced, removed or its text edited
        doc = json.loads(valid_key_json(g))
        k = g.r.random()
        target = doc["onion_keys"][0] if k < 0.4 else doc
        field = g.choice(sorted(target))
        if g.chance(0.3):
            del target[field]
        else:
            target[field] = g.json_value()
        text = json.dumps(doc)
        if g.chance(0.3):
            text = g.mutate(text.encode()).decode("utf-8", "replace")
    else:
        text, valid = valid_key_json(g), True
    try:
        keys = RelayKeys.from_json(text)
    except ValueError:
        assert not valid, "a valid key file was rejected"
    else:
        assert keys.onion_keys
        if valid:
            assert keys.to_json() == text


@pytest.mark.parametrize("text", ["[]", "0", "null", '"keys"', "true"])
def test_relay_keys_from_json_non_object_is_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        RelayKeys.from_json(text)


def test_relay_keys_from_json_infinite_created_is_value_error() -> None:
    doc = json.loads(valid_key_json(Gen(1)))
    doc["onion_keys"][0]["created"] = float("inf")
    with pytest.raises(ValueError):
        RelayKeys.from_json(json.dumps(doc))  # json.dumps writes Infinity, which json.loads accepts


# ============================================================================ datagrams into the node machines


def _check_receive_datagram(c: Case) -> None:
    """LinkLayer, RelayNode, ClientNode and the production node stacks (the NAT demux in front of a relay and a
    client node): no exception, no event, no link changed.  A datagram the demux hands to the link layer (all
    of them, for the bare machines): nothing sent and exactly one link drop counter, the NAT part untouched.
    One it hands to the NAT part (STUN, NAT frames): the link layer and the node untouched, exactly one NAT
    counter, and an answer (unauthenticated STUN and introduction requests get one) only to the source."""
    mode = c.mode(7, DATAGRAM_MODES)
    source = ("198.51.100.9", 4000)
    for n, target in enumerate(link_targets()):
        g = c.gen(8 + n)
        data = datagram_for(target, mode, g)
        to_link = target.nat is None or _routes_to_link(data)
        before = counters_of(target)
        links = dict(target.layer.links)
        _clock[0] += 1.0  # the handshake rate limit refills between examples
        target.node.receive_datagram(data, source, _clock[0], WALL)  # type: ignore[attr-defined]
        sent = target.layer.datagrams_to_send()
        assert not target.events(), target.name
        assert target.layer.links == links
        after = counters_of(target)
        changed = [_changes(b, a) for b, a in zip(before, after)]
        assert changed[1] == {}, f"{target.name}: the node counted {changed[1]}"
        counted = changed[0] if to_link else changed[2]
        assert changed[2 if to_link else 0] == {}, f"{target.name}: {changed}"
        assert len(counted) == 1, f"{target.name}: {changed}"
        (name, delta), = counted.items()
        if to_link:
            assert sent == [], f"{target.name} answered an unauthenticated link packet"
            assert name.startswith("drop_") and delta == 1, f"{target.name}: {counted}"
        else:
            assert delta == 1 and all(addr == source for _, addr in sent), f"{target.name}: {counted}, {sent}"


def _routes_to_link(data: bytes) -> bool:
    kind = kind_of(data[0] if data else 0)
    return kind is Kind.LINK or (kind is Kind.STUN and not stun.is_stun(data))


def _changes(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


_clock = [1000.0]


# ============================================================================ anti-replay window


def _check_replay_window(c: Case) -> None:
    """ReplayWindow against a reference model: accept iff never seen and newer than (highest seen - size)."""
    size = [1, 2, 3, 8, 63, 64, 65, 2048][c.mode(8, 8)]
    g = c.gen(12)
    n_ops = g.r.randint(1, 80)
    window = ReplayWindow(size)
    seen: set[int] = set()
    top = -1
    for _ in range(n_ops):
        k = g.r.random()
        if k < 0.6 and top >= 0:
            seq = max(0, top + g.r.randint(-size - 2, 3))
        elif k < 0.7:
            seq = g.choice(list(seen)) if seen else 0
        elif k < 0.8:
            seq = max(0, top + g.choice([size - 1, size, size + 1, 10 * size, 2**40]))
        else:
            seq = g.int(0, 2**64 - 1)
        expected = seq not in seen and seq > top - size
        assert window.would_accept(seq) == expected
        assert window.would_accept(seq) == expected, "would_accept must not change the window"
        assert window.check_and_set(seq) == expected, (size, sorted(seen)[-5:], top, seq)
        if expected:
            seen.add(seq)
            top = max(top, seq)


# ============================================================================ the Hypothesis tests (10,000 each)


@FUZZ
@given(cases)
def test_descriptor_directory_and_key_file_parsers(case: bytes) -> None:
    """Files a node loads: descriptors, the directory file, the relay key file."""
    c = Case(case)
    _check_descriptor_decode_and_directories(c)
    _check_descriptor_round_trip_and_one_byte_change(c)
    _check_relay_keys_from_json(c)


@FUZZ
@given(cases)
def test_wire_parsers(case: bytes) -> None:
    """What arrives from the network.  From anyone: handshake messages and arbitrary datagrams into
    LinkLayer / RelayNode / ClientNode and the production node stacks (the NAT demux in front of them).
    Inside authenticated links: cells, end-to-end messages, build records (relay_open with a real key ring)
    and the anti-replay window every packet goes through."""
    c = Case(case)
    _check_link_handshake_parsers(c)
    _check_receive_datagram(c)
    _check_cell_and_message_codecs(c)
    _check_build_record_codecs_and_relay_open(c)
    _check_replay_window(c)


def test_fuzz_targets_are_live() -> None:
    """The datagram targets really have the sessions the fuzzer aims at (else modes 4/5 test nothing), and the
    stacks are the production ones: a link packet goes through the demux to the node's link layer."""
    targets = {t.name: t for t in link_targets()}
    assert set(targets) == {"LinkLayer", "RelayNode", "ClientNode", "RelayStack", "ClientStack"}
    for target in targets.values():
        assert target.established and target.pending
    for name in ("RelayStack", "ClientStack"):
        stack = targets[name].node
        assert isinstance(stack, NodeStack) and stack.node.link is targets[name].layer is stack.nat.link


# ============================================================================ descriptor creation limits


def _create(**overrides: object) -> Descriptor:
    args = {"keys": key_pool()[0], "nickname": "ok", "addresses": (("192.0.2.1", 9001),), "exit_node": False,
            "published": int(WALL), "lifetime_s": 86400} | overrides
    return Descriptor.create(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("nickname", ["relay\n", "", "x" * 33, "r\u00e9lay", "a b"])
def test_bad_nicknames_are_rejected_by_create_and_decode(nickname: str) -> None:
    with pytest.raises(DescriptorError):
        _create(nickname=nickname)
    good = _create(nickname="relay")
    raw = good.body()
    n = raw.index(b"relay")
    forged = raw[:n - 1] + bytes([len(nickname.encode())]) + nickname.encode() + raw[n + 5:]
    keys = key_pool()[0]
    with pytest.raises(DescriptorError):
        Descriptor.decode(forged + keys.sign(LABEL_DESCRIPTOR + forged))  # correctly signed, bad nickname


@pytest.mark.parametrize("overrides", [
    {"addresses": ()},
    {"addresses": tuple(("192.0.2.1", 9000 + i) for i in range(5))},
    {"family": (bytes(20),) * 17},
    {"exit_policy": ExitPolicySummary(True, ((1, 1),) * 33)},
    {"exit_policy": ExitPolicySummary(True, ((10, 5),))},
    {"lifetime_s": 0},
    {"lifetime_s": MAX_LIFETIME_S + 1},
], ids=["no_address", "five_addresses", "family_17", "ranges_33", "range_lo_gt_hi", "lifetime_0",
        "lifetime_too_long"])
def test_create_refuses_what_decode_would_reject(overrides: dict) -> None:
    """Both ends enforce each limit: create() refuses to sign it, and decode() refuses it when someone signs
    it anyway (the same descriptor built field by field, past create's checks, then correctly signed)."""
    with pytest.raises(DescriptorError):
        _create(**overrides)
    good = _create()
    fields = {k: v for k, v in overrides.items() if k != "lifetime_s"}
    if "lifetime_s" in overrides:
        fields["expires"] = good.published + overrides["lifetime_s"]  # type: ignore[operator]
    forged = dataclasses.replace(good, **fields, signature=b"")
    body = forged.body()
    with pytest.raises(DescriptorError):
        Descriptor.decode(body + key_pool()[0].sign(LABEL_DESCRIPTOR + body))


# ============================================================================ small-order Ed25519 keys

NEUTRAL_POINT = b"\x01" + bytes(31)  # encoding of the Ed25519 neutral element: a small-order "public key"
TRIVIAL_SIGNATURE = NEUTRAL_POINT + bytes(32)  # R = neutral element, S = 0: [0]B == R + [h]A for every message


@pytest.mark.parametrize("what", ["primitive", "descriptor"])
def test_small_order_identity_key_cannot_sign_anything(what: str) -> None:
    if what == "primitive":
        with pytest.raises(AuthFailure):
            ed25519_verify(NEUTRAL_POINT, TRIVIAL_SIGNATURE, b"any message at all")
        return
    good = _create(nickname="weak")
    body = good.body()
    forged = body[:6] + NEUTRAL_POINT + body[38:]  # identity_pub is at offset 6
    with pytest.raises(DescriptorError):
        Descriptor.decode(forged + TRIVIAL_SIGNATURE)
