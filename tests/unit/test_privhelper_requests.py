"""The privileged helper's request checks: it runs as root for an ordinary user, so every argument is
checked and only what a Shallot tunnel needs gets through."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shallot.core.vpn.helper import MAX_LINE, BadRequest, parse_request


def req(**kw: object) -> bytes:
    return json.dumps(kw).encode() + b"\n"


@pytest.mark.parametrize(("line", "expected"), [
    (req(op="hello", version=1, kill_switch=True), {"op": "hello", "kill_switch": True}),
    (req(op="open_tun", mtu=1360), {"op": "open_tun", "mtu": 1360}),
    (req(op="set_address", address="100.64.3.9"), {"op": "set_address", "address": "100.64.3.9"}),
    (req(op="route", guards=[["192.0.2.21", 9001], ["10.1.2.3", 443]]),
     {"op": "route", "guards": [("192.0.2.21", 9001), ("10.1.2.3", 443)]}),
    (req(op="set_dns", servers=["100.64.0.1"]), {"op": "set_dns", "servers": ["100.64.0.1"]}),
    (req(op="restore", extra="ignored"), {"op": "restore"}),
])
def test_good_requests_pass_with_only_their_checked_arguments(line: bytes, expected: dict[str, object]) -> None:
    assert parse_request(line) == expected


@pytest.mark.parametrize(("line", "why"), [
    (b"not json\n", "not JSON"),
    (b"[1, 2]\n", "object"),
    (req(op="hello", version=2, kill_switch=True), "version"),
    (req(op="hello", version=1, kill_switch="yes"), "kill_switch"),
    (req(op="open_tun", mtu=100), "mtu"),
    (req(op="open_tun", mtu=True), "mtu"),
    (req(op="set_address", address="192.168.1.5"), "100.64.0.0/10"),  # only a tunnel address
    (req(op="set_address", address="100.64.0.1 dev eth0"), "IPv4"),  # no argument smuggling into `ip`
    (req(op="route", guards=[["127.0.0.1", 9001]]), "cannot be a guard"),
    (req(op="route", guards=[["224.0.0.1", 9001]]), "cannot be a guard"),
    (req(op="route", guards=[["100.64.0.9", 9001]]), "cannot be a guard"),
    (req(op="route", guards=[["192.0.2.1", 0]]), "port"),
    (req(op="route", guards=[]), "guards"),
    (req(op="route", guards=[["192.0.2.1", 1]] * 13), "guards"),
    (req(op="set_dns", servers=["8.8.8.8"]), "100.64.0.0/10"),  # DNS stays behind the tunnel
    (req(op="set_dns", servers=[]), "servers"),
    (req(op="exec", argv=["sh"]), "unknown op"),
    (b"{" + b" " * MAX_LINE + b"}", "too long"),
])
def test_bad_requests_are_refused_with_a_reason(line: bytes, why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        parse_request(line)


@settings(max_examples=3000, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                              lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                                  st.sampled_from(["op", "mtu", "address", "guards", "servers", "version",
                                                   "kill_switch"]), inner, max_size=5),
                              max_leaves=12).map(lambda v: json.dumps(v).encode())))
def test_any_input_is_either_a_checked_request_or_a_bad_request(line: bytes) -> None:
    try:
        out = parse_request(line)
    except BadRequest:
        return
    assert out["op"] in {"hello", "open_tun", "set_address", "route", "set_dns", "restore"}
