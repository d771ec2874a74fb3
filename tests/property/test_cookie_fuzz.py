"""The cookie reply (crypto/link_handshake.py, docs/PROTOCOL.md §4.12) as a parser of untrusted datagrams.

An initiator takes a COOKIE_REPLY from anyone: the parser must raise only DecodeError / AuthFailure, never
accept a reply the responder did not make for this very initiation, and the link layer must count and drop
every bad one without answering or changing its pending handshake.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shallot.core.link import LinkConfig, LinkLayer
from shallot.crypto import link_handshake as lh
from shallot.crypto.codec import DecodeError
from shallot.crypto.params import MSG_COOKIE_REPLY
from shallot.crypto.primitives import AuthFailure, x25519_keypair
from tests.simnet import det_rng

SETTINGS = settings(max_examples=300, deadline=None)
RESPONDER_PRIV, RESPONDER_PUB = x25519_keypair(det_rng(1))
STATE, INIT = lh.client_initiation(responder_link_pub=RESPONDER_PUB, sender_index=0x01020304, rng=det_rng(2))
COOKIE = bytes(range(16))
GOOD = lh.write_cookie_reply(responder_link_pub=RESPONDER_PUB, initiation=INIT, cookie=COOKIE, rng=det_rng(3))

replies = st.one_of(
    st.binary(max_size=2 * lh.COOKIE_REPLY_LEN),
    st.binary(min_size=lh.COOKIE_REPLY_LEN - 5, max_size=lh.COOKIE_REPLY_LEN - 5).map(
        lambda rest: bytes([MSG_COOKIE_REPLY]) + GOOD[1:5] + rest),  # our index, random rest
)


def test_the_genuine_reply_is_read_and_is_smaller_than_the_initiation() -> None:
    assert lh.read_cookie_reply(responder_link_pub=RESPONDER_PUB, state=STATE, packet=GOOD) == COOKIE
    assert len(GOOD) == lh.COOKIE_REPLY_LEN <= lh.INIT_CLIENT_LEN < lh.INIT_RELAY_LEN


@SETTINGS
@given(packet=replies)
def test_a_random_cookie_reply_is_refused_with_decode_error_or_auth_failure(packet: bytes) -> None:
    try:
        lh.read_cookie_reply(responder_link_pub=RESPONDER_PUB, state=STATE, packet=packet)
    except (DecodeError, AuthFailure):
        return
    raise AssertionError("a cookie reply nobody made was accepted")


@SETTINGS
@given(edits=st.lists(st.tuples(st.integers(0, lh.COOKIE_REPLY_LEN - 1), st.integers(1, 255)), min_size=1,
                      max_size=4))
def test_every_change_to_a_genuine_reply_is_refused(edits: list[tuple[int, int]]) -> None:
    bad = bytearray(GOOD)
    for pos, flip in edits:
        bad[pos] ^= flip
    if bytes(bad) == GOOD:
        return
    try:
        lh.read_cookie_reply(responder_link_pub=RESPONDER_PUB, state=STATE, packet=bytes(bad))
    except (DecodeError, AuthFailure):
        return
    raise AssertionError("a changed cookie reply was accepted")


@SETTINGS
@given(packet=replies)
def test_the_link_layer_drops_bad_cookie_replies_and_keeps_its_handshake(packet: bytes) -> None:
    priv, pub = x25519_keypair(det_rng(4))
    client = LinkLayer(LinkConfig(link_private=priv, link_pub=pub), rng=det_rng(5))
    link = client.open_link(("192.0.2.1", 9000), RESPONDER_PUB, 10.0, 1_800_000_000.0)
    client.datagrams_to_send()
    pending = link.pending
    if packet == GOOD:
        return
    client.receive_datagram(packet, ("192.0.2.1", 9000), 10.1, 1_800_000_000.1)
    assert client.datagrams_to_send() == [] and link.pending is pending and link.cookie is None
    assert sum(v for k, v in client.counters.items() if k.startswith("drop_")) == 1
