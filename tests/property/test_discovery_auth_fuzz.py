"""The parsers and verifiers of authenticated discovery under hypothesis: seed lists (``[ID@]HOST:PORT``)
raise only ShallotError, signed answers verify only unchanged and only for their own request, and the
address rules hold for every address."""

from __future__ import annotations

import ipaddress
import secrets

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shallot.core.discovery import wire
from shallot.core.discovery.addresses import PRIVATE_NETWORKS, is_private_range, usable_address
from shallot.core.discovery.service import Seed, parse_seeds
from shallot.core.errors import ShallotError
from shallot.crypto.keys import RelayKeys

KEYS = RelayKeys.generate(secrets.token_bytes, 1_800_000_000)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)


@FAST
@given(st.text(alphabet="0123456789abcdefABCDEF@:.,[] xyz-", max_size=120))
def test_any_seed_text_parses_or_is_one_shallot_error(text: str) -> None:
    try:
        seeds = parse_seeds(text)
    except ShallotError:
        return
    assert seeds and all(isinstance(s, Seed) and (s.relay_id is None or len(s.relay_id) == 20) for s in seeds)


@FAST
@given(st.lists(st.tuples(st.binary(min_size=20, max_size=20) | st.none(), ipv4 | ipv6, st.integers(1, 65534)),
                min_size=1, max_size=5))
def test_well_formed_seeds_round_trip(seeds: list[tuple[bytes | None, str, int]]) -> None:
    text = ",".join((f"{rid.hex()}@" if rid else "") + (f"[{h}]" if ":" in h else h) + f":{p}" for rid, h, p in seeds)
    got = parse_seeds(text)
    assert [(s.relay_id, ipaddress.ip_address(s.address[0]), s.address[1]) for s in got] == [
        (rid, ipaddress.ip_address(h), p) for rid, h, p in seeds]


@FAST
@given(st.binary(min_size=20, max_size=20), st.binary(min_size=1, max_size=60), st.data())
def test_a_signed_answer_verifies_only_unchanged_and_for_its_request(msg_id: bytes, target: bytes,
                                                                     data: st.DataObject) -> None:
    request = wire.encode_request(msg_id, "find_node", (None, target[:20].ljust(20, b"\x00")))
    raw = wire.encode_response(msg_id, [[target[:20].ljust(20, b"\x01"), "198.51.100.1", 9001]],
                               responder_id=KEYS.relay_id, request=request, sign=KEYS.sign)
    digest = wire.request_digest(request)
    assert wire.verify_answer(wire.decode_datagram(raw), identity_pub=KEYS.identity_pub,
                              responder_id=KEYS.relay_id, digest=digest)
    at = data.draw(st.integers(0, len(raw) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(raw)
    bad[at] ^= flip
    try:
        dg = wire.decode_datagram(bytes(bad))
    except wire.WireError:
        return
    assert not wire.verify_answer(dg, identity_pub=KEYS.identity_pub, responder_id=KEYS.relay_id, digest=digest)
    other = wire.request_digest(data.draw(st.binary(max_size=80).filter(lambda b: b != request)))
    assert not wire.verify_answer(wire.decode_datagram(raw), identity_pub=KEYS.identity_pub,
                                  responder_id=KEYS.relay_id, digest=other)


@FAST
@given(st.binary(max_size=200))
def test_any_response_bytes_decode_or_raise_and_never_verify(tail: bytes) -> None:
    try:
        dg = wire.decode_datagram(bytes([wire.RESPONSE]) + tail)
    except wire.WireError:
        return
    assert len(dg.signature) == wire.SIG_LEN
    assert not wire.verify_answer(dg, identity_pub=KEYS.identity_pub, responder_id=KEYS.relay_id, digest=bytes(32))


@FAST
@given(ipv4 | ipv6, st.integers(1, 65535))
def test_a_private_address_is_usable_only_in_a_private_network(host: str, port: int) -> None:
    ip = ipaddress.ip_address(host)
    private = any(ip in n for n in PRIVATE_NETWORKS if n.version == ip.version)
    assert is_private_range(host) == private
    if private:
        assert not usable_address(host, port, allow_loopback=True)
    if usable_address(host, port, allow_loopback=False):
        assert not (private or ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_link_local)
