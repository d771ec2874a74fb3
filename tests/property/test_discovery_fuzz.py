"""Discovery parsers under hypothesis: whatever arrives from the DHT raises only the documented error
(or is counted and refused), and no tampered record ever validates."""

from __future__ import annotations

import secrets
import time

import umsgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shallot.core.discovery import wire
from shallot.core.discovery.records import REASONS, RecordError, validate_record
from shallot.core.discovery.storage import RecordStorage
from shallot.core.discovery.view import NetworkView
from shallot.crypto.descriptor import Descriptor
from shallot.crypto.keys import RelayKeys

NOW = 1_800_000_000
KEYS = RelayKeys.generate(secrets.token_bytes, NOW)
GOOD = Descriptor.create(KEYS, nickname="fuzz", addresses=(("198.51.100.9", 9000),), exit_node=True,
                         published=NOW, lifetime_s=3600)
RAW = GOOD.encode()
FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=20)
    | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12)
rpc_names = st.sampled_from([*wire.RPCS, "stun", "__init__", "transport", "rpc_ping", ""]) | st.text(max_size=12)


@FAST
@given(st.binary(max_size=300), st.integers(0, 255))
def test_any_datagram_decodes_or_raises_wire_error(tail: bytes, first: int) -> None:
    for data in (bytes([first]) + tail, bytes([first % 2]) + bytes(20) + tail):
        try:
            wire.decode_datagram(data)
        except wire.WireError as exc:
            assert exc.reason in ("short", "long", "kind", "msgpack", "unpadded", "padding")


@FAST
@given(st.binary(max_size=1400))
def test_any_request_of_the_minimum_size_decodes_or_raises_wire_error(tail: bytes) -> None:
    data = bytes(1 + wire.MSG_ID_LEN) + tail
    data += bytes(max(0, wire.REQUEST_MIN_LEN - len(data)))
    try:
        wire.decode_datagram(data)
    except wire.WireError as exc:
        assert exc.reason in ("long", "msgpack", "padding")


@FAST
@given(st.sampled_from(sorted(wire.RPCS)), st.lists(st.none() | st.binary(max_size=1100), max_size=3),
       st.integers(0, 3000), st.integers(1, 255))
def test_requests_are_padded_and_only_zero_padding_decodes(name: str, args: list[object], extra: int,
                                                           byte: int) -> None:
    data = wire.encode_request(bytes(20), name, tuple(args)) + bytes(extra)
    assert len(data) >= wire.REQUEST_MIN_LEN
    if len(data) > wire.MAX_DATAGRAM:
        return
    assert wire.decode_datagram(data).body == [name, args]
    body_len = len(wire.encode_request(bytes(20), name, tuple(args)).rstrip(b"\0"))
    if body_len < len(data):  # a nonzero byte in the padding: refused
        spoilt = bytearray(data)
        spoilt[-1] = byte
        try:
            wire.decode_datagram(bytes(spoilt))
        except wire.WireError as exc:
            assert exc.reason == "padding"
        else:
            raise AssertionError("a request with nonzero padding decoded")
    assert len(data[:wire.REQUEST_MIN_LEN - 1]) < wire.REQUEST_MIN_LEN
    try:
        wire.decode_datagram(data[:wire.REQUEST_MIN_LEN - 1])
    except wire.WireError as exc:
        assert exc.reason == "unpadded"
    else:
        raise AssertionError("a request shorter than the minimum decoded")


@FAST
@given(msgpack_values | st.lists(st.tuples(st.binary(min_size=20, max_size=20), st.sampled_from(
    ["198.51.100.1", "2001:db8::ffff:ffff:ffff:ffff"]), st.integers(1, 65535)).map(list), max_size=25),
    st.integers(0, 2000))
def test_an_answer_is_never_longer_than_its_room(result: object, room: int) -> None:
    unsigned = wire.encode_result_within(bytes(20), result, room)
    if unsigned is not None:
        assert len(unsigned) + wire.SIG_LEN <= room


@FAST
@given(rpc_names, st.lists(msgpack_values, max_size=4))
def test_any_request_body_parses_only_if_allowed_and_well_typed(name: str, args: list[object]) -> None:
    body = umsgpack.unpackb(umsgpack.packb([name, args]))
    try:
        got_name, got_args = wire.parse_request(body)
    except wire.WireError as exc:
        assert exc.reason in ("shape", "unknown_rpc", "bad_args")
        return
    assert got_name in wire.RPCS and len(got_args) == len(wire.RPCS[got_name])


@FAST
@given(msgpack_values)
def test_any_result_parses_or_raises_wire_error(value: object) -> None:
    for parse in (wire.parse_ping_result, wire.parse_store_result, wire.parse_contacts,
                  wire.parse_find_value_result, wire.parse_page_result):
        try:
            parse(value)
        except wire.WireError:
            pass


@FAST
@given(st.integers(0, len(RAW) - 1), st.integers(1, 255))
def test_no_single_byte_change_of_a_record_validates(index: int, xor: int) -> None:
    raw = bytearray(RAW)
    raw[index] ^= xor
    try:
        validate_record(GOOD.relay_id, bytes(raw), NOW, allow_loopback=False)
    except RecordError as exc:
        assert exc.reason in REASONS
    else:
        raise AssertionError("a tampered record validated")


@FAST
@given(st.binary(max_size=40) | msgpack_values, st.binary(max_size=2100) | msgpack_values)
def test_storage_and_view_count_garbage_and_never_raise(key: object, value: object) -> None:
    store = RecordStorage(lambda: float(NOW), allow_loopback=False)
    outcome = store.offer(key, value)
    assert outcome in REASONS
    assert len(store) == 0 and sum(store.counters.values()) == 1
    view = NetworkView(allow_loopback=False)
    assert view.offer(None, value, time.time()) in REASONS
    assert len(view) == 0
