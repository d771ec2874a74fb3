"""Circuit-build test vectors (tests/vectors/circuit_build_v1.json): the computation shared by the generator
script (tests/vectors/make_circuit_vectors.py) and the test that checks the file byte for byte."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from shallot.core.wire.cells import MSG_DATA, decode_message, encode_message
from shallot.crypto import circuit_handshake as ch
from shallot.crypto.keys import OnionKey, RelayKeys
from shallot.crypto.onion import JUNK_LEN, ClientLayers, EndpointLayer, LayerKeys, RelayLayer
from shallot.crypto.params import CREATE_SLOTS_LEN, CREATED_SLOTS_LEN, RECORD_LEN, REPLY_LEN
from shallot.crypto.primitives import x25519_public
from shallot.relay.forwarder import OnionKeyRing

HOP_KEY_FIELDS = [f.name for f in dataclasses.fields(ch.HopKeys)]


class Tape:
    """A recorded random stream: hands out its bytes in order and fails if asked for more than it holds."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def __call__(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise AssertionError("random tape exhausted: the code under test draws more randomness than recorded")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def assert_consumed(self) -> None:
        assert self.pos == len(self.data), f"random tape not fully used ({self.pos}/{len(self.data)})"


def layer_keys_json(keys: ch.HopKeys) -> dict[str, Any]:
    lk = LayerKeys.derive(keys)
    return {"fwd_key": lk.fwd_key.hex(), "bwd_key": lk.bwd_key.hex(), "fwd_offset": lk.fwd_offset,
            "bwd_start": lk.bwd_start}


def det_bytes(label: str, n: int) -> bytes:
    return hashlib.shake_256(b"shallot test vector " + label.encode()).digest(n)


def instruction_to_json(instruction: ch.Instruction) -> dict[str, Any]:
    if isinstance(instruction, ch.ExtendTo):
        return {"kind": "extend", "host": instruction.host, "port": instruction.port,
                "link_pub": instruction.link_pub.hex(), "relay_id": instruction.relay_id.hex()}
    return {"kind": "terminate", "service": instruction.service}


def instruction_from_json(d: dict[str, Any]) -> ch.Instruction:
    if d["kind"] == "extend":
        return ch.ExtendTo(d["host"], d["port"], bytes.fromhex(d["link_pub"]), bytes.fromhex(d["relay_id"]))
    return ch.Terminate(d["service"])


def onion_ring(*privates: bytes) -> dict:
    """The key ring a relay passes to relay_open, built the way RelayNode builds it."""
    keys = RelayKeys(identity_seed=bytes(32), link_private=bytes(32),
                     onion_keys=[OnionKey(p, 0) for p in privates])
    return OnionKeyRing.from_relay_keys(keys).keys


def compute(inputs: dict[str, Any]) -> dict[str, Any]:
    """Run a whole circuit build (client, every relay, back to the client) from the vector's inputs and
    return every intermediate wire value.  Also checks that client and relays agree on every HopKeys."""
    hops = inputs["hops"]
    onion_privs = [bytes.fromhex(h["onion_private"]) for h in hops]
    onion_pubs = [x25519_public(k) for k in onion_privs]
    idents = [ch.HopIdentity(bytes.fromhex(h["relay_id"]), bytes.fromhex(h["link_pub"])) for h in hops]
    targets = [ch.HopTarget(pub, instruction_from_json(h["instruction"]), ident)
               for pub, h, ident in zip(onion_pubs, hops, idents)]
    client_tape = Tape(bytes.fromhex(inputs["client_rng"]))
    pending, slots = ch.client_create(targets, hour=inputs["hour"], rng=client_tape,
                                      ephemerals=[bytes.fromhex(h["x_private"]) for h in hops])
    client_tape.assert_consumed()

    create_slots, replies, relay_keys, openeds, tapes = [], [], [], [], []
    for i, hop in enumerate(hops):
        assert len(slots) == CREATE_SLOTS_LEN
        create_slots.append(slots)
        tape = Tape(bytes.fromhex(hop["relay_rng"]))
        opened = ch.relay_open(slots, onion_ring(onion_privs[i]), rng=tape)
        assert opened.hour == inputs["hour"]
        assert opened.instruction == targets[i].instruction
        keys, reply = ch.relay_reply(opened, idents[i], rng=tape, y_private=bytes.fromhex(hop["y_private"]))
        openeds.append(opened)
        replies.append(reply)
        relay_keys.append(keys)
        tapes.append(tape)
        slots = opened.forward_slots

    created_slots: list[bytes] = [b""] * len(hops)
    back = ch.relay_created_first(replies[-1], rng=tapes[-1])
    created_slots[-1] = back
    for i in range(len(hops) - 2, -1, -1):
        back = ch.relay_created_wrap(relay_keys[i], replies[i], back)
        created_slots[i] = back
    for tape in tapes:
        tape.assert_consumed()
    assert all(len(s) == CREATED_SLOTS_LEN for s in created_slots)

    client_keys = ch.client_created(pending, created_slots[0])
    assert client_keys == relay_keys, "client and relays derived different HopKeys"

    # §6.4: the first RELAY cell each way (onion header | body), as each hop receives it going forward and as
    # each hop sends it going backward
    forward_inner = encode_message(MSG_DATA, bytes.fromhex(inputs["forward_data"]))
    backward_inner = encode_message(MSG_DATA, bytes.fromhex(inputs["backward_data"]))
    client_layers = ClientLayers(client_keys)
    region = client_layers.wrap(forward_inner)
    forward_cells = [region]
    for keys in relay_keys[:-1]:
        region = RelayLayer(keys).forward(region)
        forward_cells.append(region)
    exit_layer = EndpointLayer(relay_keys[-1])
    assert exit_layer.open_forward(region) == forward_inner
    region = exit_layer.seal_backward(backward_inner, bytes.fromhex(inputs["exit_junk"]))
    backward_cells = [region]
    for keys in reversed(relay_keys[:-1]):
        region = RelayLayer(keys).backward(region)
        backward_cells.insert(0, region)
    inner = client_layers.unwrap(region)
    assert inner == backward_inner and decode_message(inner)[0] == MSG_DATA

    return {
        "onion_public": [p.hex() for p in onion_pubs],
        "x_public": [p.x_pub.hex() for p in pending],
        "create_slots": [s.hex() for s in create_slots],
        "replies": [r.hex() for r in replies],
        "created_slots": [s.hex() for s in created_slots],
        "hop_keys": [{name: getattr(k, name).hex() for name in HOP_KEY_FIELDS} for k in relay_keys],
        "layer_keys": [layer_keys_json(k) for k in relay_keys],
        "forward_cells": [c.hex() for c in forward_cells],
        "backward_cells": [c.hex() for c in backward_cells],
    }


def make_inputs() -> dict[str, Any]:
    """Fixed inputs: a 3-hop build (guard extends over IPv4, middle over IPv6, exit terminates in echo)."""
    hops = []
    instructions = [
        ch.ExtendTo("198.51.100.7", 9001, det_bytes("middle link key", 32), det_bytes("middle relay id", 20)),
        ch.ExtendTo("2001:db8::42", 443, det_bytes("exit link key", 32), det_bytes("exit relay id", 20)),
        ch.Terminate(ch.SERVICE_ECHO),
    ]
    # who each hop is (bound into its keys, §5.4): the guard's own, then what the previous hop extends to
    idents = [(det_bytes("guard relay id", 20), det_bytes("guard link key", 32)),
              *((ins.relay_id, ins.link_pub) for ins in instructions[:-1] if isinstance(ins, ch.ExtendTo))]
    for i, instruction in enumerate(instructions):
        rng_len = RECORD_LEN + (CREATED_SLOTS_LEN - REPLY_LEN if i == len(instructions) - 1 else 0)
        hops.append({
            "onion_private": det_bytes(f"hop {i} onion key", 32).hex(),
            "x_private": det_bytes(f"hop {i} client ephemeral", 32).hex(),
            "y_private": det_bytes(f"hop {i} relay ephemeral", 32).hex(),
            "relay_id": idents[i][0].hex(),
            "link_pub": idents[i][1].hex(),
            "instruction": instruction_to_json(instruction),
            "relay_rng": det_bytes(f"hop {i} relay rng", rng_len).hex(),
        })
    return {
        "hour": 500_000,
        "client_rng": det_bytes("client rng", CREATE_SLOTS_LEN).hex(),
        "hops": hops,
        "forward_data": b"shallot vector: forward".hex(),
        "backward_data": b"shallot vector: backward".hex(),
        "exit_junk": det_bytes("exit backward junk", JUNK_LEN).hex(),
    }
