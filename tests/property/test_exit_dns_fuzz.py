"""The exit DNS forwarder's parsing (exit/dnsquery.py) on arbitrary input: only DecodeError, valid
questions round-trip (lowercased), a REFUSED answer is never longer than its query and answers exactly
that question, and the refusal policy never raises, whatever the labels."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from shallot.crypto.codec import DecodeError
from shallot.exit.dnsquery import (
    MAX_NAME_LEN,
    PendingTable,
    Question,
    answer_matches,
    parse_query,
    parse_question,
    refusal,
    refused_response,
)
from shallot.exit.policy import ExitPolicy

PRIVATE = ExitPolicy(own_networks=[ipaddress.ip_network("203.0.113.23/32")]).off_limits()
label = st.binary(min_size=1, max_size=63)
labels = st.lists(label, max_size=8).filter(lambda ls: sum(len(x) + 1 for x in ls) + 1 <= MAX_NAME_LEN)
reverse = st.one_of(
    st.lists(st.sampled_from([str(i) for i in range(256)] + ["x", "256", "01"]), max_size=5).map(
        lambda ps: (*tuple(p.encode() for p in ps), b"in-addr", b"arpa")),
    st.lists(st.sampled_from("0123456789abcdefg"), max_size=33).map(
        lambda ps: (*tuple(p.encode() for p in ps), b"ip6", b"arpa")))


def wire(txid: int, flags: int, name: tuple[bytes, ...], qtype: int, qclass: int, counts=(1, 0, 0, 0)) -> bytes:
    qname = b"".join(bytes([len(x)]) + x for x in name) + b"\x00"
    return struct.pack("!HH4H", txid, flags, *counts) + qname + struct.pack("!HH", qtype, qclass)


@settings(max_examples=3000)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_decode_error(data: bytes) -> None:
    for parse in (parse_question, parse_query):
        try:
            q = parse(data)
        except DecodeError:
            continue
        assert q.end <= len(data) and len(q.txid) == 2
        refused = refused_response(data, q)
        assert len(refused) <= len(data)


@settings(max_examples=2000)
@given(st.integers(0, 0xFFFF), labels, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(max_size=40))
def test_questions_round_trip_and_refusals_answer_them(txid: int, name: tuple[bytes, ...], qtype: int, qclass: int,
                                                       tail: bytes) -> None:
    data = wire(txid, 0x0100, tuple(name), qtype, qclass)
    q = parse_query(data + tail)  # what follows the question (an OPT record) is not its business
    assert q == Question(txid.to_bytes(2, "big"), 0x0100, tuple(x.lower() for x in name), qtype, qclass, len(data))
    refused = refused_response(data + tail, q)
    assert len(refused) <= len(data + tail) and refused[3] & 0x0F == 5
    assert answer_matches(refused, q)  # the same id and question, as a response
    assert not answer_matches(data, q)  # a query is never an answer


@settings(max_examples=2000)
@given(st.one_of(labels.map(tuple), reverse), st.lists(labels.map(tuple), max_size=3))
def test_refusal_never_raises_and_refuses_every_private_reverse_name(name: tuple[bytes, ...],
                                                                     own: list[tuple[bytes, ...]]) -> None:
    why = refusal(name, own_names=own, private=PRIVATE)
    assert why in (None, "single_label", "local_suffix", "own_name", "private_reverse")
    if name[-2:] == (b"in-addr", b"arpa") and 1 <= len(name) - 2 <= 4 and all(
            p.isdigit() and int(p) <= 255 and len(p) <= 3 for p in name[:-2]):
        octets = [int(p) for p in reversed(name[:-2])] + [0] * (6 - len(name))
        network = ipaddress.ip_network((bytes(octets), 8 * (len(name) - 2)))
        if any(p.version == 4 and network.overlaps(p) for p in PRIVATE):
            assert why in ("private_reverse", "own_name")  # refused either way
        elif not own or not any(name[-len(o):] == o for o in own if o):
            assert why is None


@settings(max_examples=500)
@given(st.lists(st.tuples(st.sampled_from("abcde"), st.booleans()), max_size=60))
def test_the_pending_table_stays_within_its_bounds(ops: list[tuple[str, bool]]) -> None:
    table = PendingTable(max_pending=6, per_client=3, timeout_s=5.0)
    live: dict[int, str] = {}
    for token, (client, expire) in enumerate(ops):
        if expire:
            for gone in table.expired(token * 0.5):
                live.pop(gone)
        admitted, evicted = table.admit(client, token, token * 0.5)
        for gone in evicted:
            live.pop(gone)
        if admitted:
            live[token] = client
        assert len(table) == len(live) <= 6
        assert all(table.count(c) == sum(1 for v in live.values() if v == c) <= 3 for c in "abcde")
