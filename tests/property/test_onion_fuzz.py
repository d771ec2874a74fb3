"""The per-hop onion layers (crypto/onion.py, docs/PROTOCOL.md §6.4) as parsers of untrusted regions.

A forwarding hop, the exit and the client take whatever region a neighbour sends: they must answer with a
result or IntegrityError only, never accept a region nobody made, and reject every change to a real one.
"""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from shallot.crypto.circuit_handshake import HopKeys
from shallot.crypto.onion import JUNK_LEN, ClientLayers, EndpointLayer, IntegrityError, RelayLayer, SequenceError
from shallot.crypto.params import HOP_SEQ_LEN, INNER_LEN, MAX_HOPS, RELAY_LEN

KEYS = [HopKeys(*(bytes([16 * h + i]) * 32 for i in range(8))) for h in range(MAX_HOPS)]
SETTINGS = settings(max_examples=300, deadline=None)

regions = st.one_of(st.binary(min_size=RELAY_LEN, max_size=RELAY_LEN), st.binary(max_size=2 * RELAY_LEN))


@SETTINGS
@given(region=regions, hop=st.integers(0, MAX_HOPS - 1))
def test_a_hop_never_accepts_a_region_nobody_made(region: bytes, hop: int) -> None:
    for layer in (RelayLayer(KEYS[hop]).forward, EndpointLayer(KEYS[hop]).open_forward,
                  ClientLayers(KEYS[:hop + 1]).unwrap):
        try:
            layer(region)
        except IntegrityError:
            continue
        raise AssertionError("a random region passed an authenticated layer")


@SETTINGS
@given(hops=st.integers(1, MAX_HOPS), inner=st.binary(min_size=INNER_LEN, max_size=INNER_LEN),
       edits=st.lists(st.tuples(st.integers(0, RELAY_LEN - 1), st.integers(1, 255)), min_size=1, max_size=4))
def test_every_change_to_a_forward_region_is_caught_by_the_first_hop(hops: int, inner: bytes,
                                                                     edits: list[tuple[int, int]]) -> None:
    region = bytearray(ClientLayers(KEYS[:hops]).wrap(inner))
    for position, mask in edits:
        region[position] ^= mask
    first = RelayLayer(KEYS[0]) if hops > 1 else EndpointLayer(KEYS[0])
    step = first.forward if isinstance(first, RelayLayer) else first.open_forward
    try:
        step(bytes(region))
    except IntegrityError:
        return
    # only a set of edits that cancel out may pass, and then the region is the original one
    assert bytes(region) == ClientLayers(KEYS[:hops]).wrap(inner)


@SETTINGS
@given(hops=st.integers(1, MAX_HOPS), inner=st.binary(min_size=INNER_LEN, max_size=INNER_LEN),
       back=st.binary(min_size=INNER_LEN, max_size=INNER_LEN), junk=st.binary(min_size=JUNK_LEN, max_size=JUNK_LEN))
def test_round_trip_through_every_hop(hops: int, inner: bytes, back: bytes, junk: bytes) -> None:
    relays = [RelayLayer(k) for k in KEYS[:hops - 1]]
    exit_ = EndpointLayer(KEYS[hops - 1])
    client = ClientLayers(KEYS[:hops])
    region = client.wrap(inner)
    for relay in relays:
        region = relay.forward(region)
    assert exit_.open_forward(region) == inner
    region = exit_.seal_backward(back, junk)
    for relay in reversed(relays):
        region = relay.backward(region)
    assert client.unwrap(region) == back


@SETTINGS
@given(cells=st.lists(st.binary(min_size=RELAY_LEN, max_size=RELAY_LEN), min_size=1, max_size=20))
def test_a_backward_hop_outputs_fixed_size_regions_and_refuses_repeated_counters(cells: list[bytes]) -> None:
    relay = RelayLayer(KEYS[1])
    seen: set[int] = set()
    outputs: list[bytes] = []
    for cell in cells:
        counter = int.from_bytes(cell[:HOP_SEQ_LEN], "big")
        try:
            out = relay.backward(cell)
        except SequenceError:
            assert counter in seen or (seen and counter < max(seen))
            continue
        assert counter not in seen
        seen.add(counter)
        assert len(out) == RELAY_LEN
        outputs.append(out[:HOP_SEQ_LEN])
    assert len(set(outputs)) == len(outputs), "a backward hop reused its own counter"


def test_random_regions_really_are_random() -> None:  # the fuzz above is not vacuous
    region = os.urandom(RELAY_LEN)
    try:
        RelayLayer(KEYS[0]).forward(region)
    except IntegrityError:
        pass
    else:
        raise AssertionError("accepted random bytes")
