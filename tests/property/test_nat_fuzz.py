"""NAT traversal parsers on arbitrary and mutated bytes: only DecodeError, and valid values round-trip.
A whole relay node stack (server roles, which parse the most) never raises on any datagram and stays bounded."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shallot.core.nat import NatPart, NodeStack
from shallot.core.nat.limits import MAX_SESSIONS
from shallot.core.wire import nat_frames as nm
from shallot.core.wire import stun
from shallot.crypto.codec import DecodeError
from shallot.crypto.descriptor import Reachability
from shallot.crypto.keys import RelayKeys
from shallot.relay.forwarder import RelayNode, relay_link_layer
from tests.simnet import det_rng

ipv4 = st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)).map(
    lambda t: ".".join(map(str, t)))
addresses = st.tuples(ipv4, st.integers(1, 65535))
txids = st.binary(min_size=12, max_size=12)
seeds = [stun.binding_request(bytes(12)), stun.binding_response(bytes(12), ("192.0.2.1", 9), fingerprint=True),
         nm.IntroRequest(bytes(8), bytes(20)).encode(), nm.IntroAnswer(bytes(8), 0, ("192.0.2.1", 9)).encode(),
         nm.encode_punch(0, bytes(8)), b"\x58" + bytes(8) + b"\x54" + bytes(20)]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes, or a valid message with a few bytes changed, cut or extended."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=80))
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) + draw(st.binary(max_size=8))


DECODERS = (stun.decode, nm.IntroRequest.decode, nm.IntroAnswer.decode, nm.decode_punch, nm.relayed_session,
            Reachability.decode)


@settings(max_examples=3000, deadline=None)
@given(mutated())
def test_parsers_raise_only_decode_error(data: bytes) -> None:
    for decode in DECODERS:
        try:
            decode(data)
        except DecodeError:
            pass
    try:
        msg = stun.decode(data)
    except DecodeError:
        return
    for attr in (stun.ATTR_XOR_MAPPED_ADDRESS, stun.ATTR_RESPONSE_DESTINATION, stun.ATTR_OTHER_RELAY):
        try:
            stun.address_attr(msg, attr)
        except DecodeError:
            pass


@settings(max_examples=500, deadline=None)
@given(txids, addresses, st.booleans(), st.booleans(), st.booleans())
def test_stun_round_trip(txid: bytes, addr: tuple[str, int], fp: bool, cip: bool, cport: bool) -> None:
    req = stun.decode(stun.binding_request(txid, change_ip=cip, change_port=cport, other_relay=addr, fingerprint=fp))
    assert req.txid == txid and stun.address_attr(req, stun.ATTR_OTHER_RELAY) == addr
    assert stun.change_flags(req) == (stun.CHANGE_IP if cip else 0) | (stun.CHANGE_PORT if cport else 0)
    assert stun.mapped_address(stun.decode(stun.binding_response(txid, addr, fingerprint=fp))) == addr


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=8, max_size=8), st.binary(min_size=20, max_size=20), st.integers(0, 3),
       st.integers(0, 3), addresses, st.binary(min_size=8, max_size=8))
def test_nat_messages_round_trip(rid: bytes, target: bytes, mapping: int, filtering: int,
                                 addr: tuple[str, int], session: bytes) -> None:
    req = nm.IntroRequest(rid, target, mapping, filtering)
    assert nm.IntroRequest.decode(req.encode()) == req
    ans = nm.IntroAnswer(rid, nm.STATUS_OK, addr, session)
    assert nm.IntroAnswer.decode(ans.encode()) == ans
    intro = nm.Introduce(addr, rid, session, mapping, filtering)
    assert nm.Introduce.decode(intro.cell()) == intro


def _relay_stack() -> NodeStack:
    keys, rng = RelayKeys.generate(det_rng(1), 1.8e9), det_rng(2)
    link = relay_link_layer(keys, rng=rng, wall=1.8e9)
    nat = NatPart(link, rng=det_rng(3), serve=True)
    return NodeStack(RelayNode(keys, rng=rng, wall=1.8e9, link=link, nat_cells=nat.control_cell), nat)


_server = _relay_stack()


@settings(max_examples=2000, deadline=None)
@given(mutated(), addresses)
def test_server_never_raises_and_stays_bounded(data: bytes, src: tuple[str, int]) -> None:
    _server.receive_datagram(data, src, 100.0, 1.8e9)
    _server.nat.receive_alt(data, src, 100.0)
    for out, _dest in _server.datagrams_to_send() + _server.nat.alt_datagrams_to_send():
        assert len(out) <= max(len(data) + 24, 40)  # never much more than what came in
    assert _server.nat.introducer is not None and len(_server.nat.introducer.sessions) <= MAX_SESSIONS
