"""The privileged helper's request checks: it runs as root for an ordinary user, so every argument is
checked and only what a Shallot tunnel needs gets through."""

from __future__ import annotations

import json
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shallot.core.vpn.helper_protocol import (
    MAX_LINE,
    BadReply,
    BadRequest,
    Done,
    Hello,
    OpenTun,
    Refused,
    Request,
    Restore,
    Route,
    SetAddress,
    SetDns,
    Welcome,
    encode_hello,
    encode_open_tun,
    encode_reply,
    encode_restore,
    encode_route,
    encode_set_address,
    encode_set_dns,
    parse_reply,
    parse_request,
)

REQUESTS = (Hello, OpenTun, SetAddress, Route, SetDns, Restore)


def req(**kw: object) -> bytes:
    return json.dumps(kw).encode() + b"\n"


@pytest.mark.parametrize(("line", "expected"), [
    (req(op="hello", version=1, kill_switch=True), Hello(kill_switch=True)),
    (req(op="open_tun", mtu=1360), OpenTun(mtu=1360)),
    (req(op="set_address", address="100.64.3.9"), SetAddress(IPv4Address("100.64.3.9"))),
    (req(op="route", guards=[["192.0.2.21", 9001], ["10.1.2.3", 443]]),
     Route(((IPv4Address("192.0.2.21"), 9001), (IPv4Address("10.1.2.3"), 443)))),
    (req(op="set_dns", servers=["100.64.0.1"]), SetDns((IPv4Address("100.64.0.1"),))),
    (req(op="restore", extra="ignored"), Restore()),
])
def test_good_requests_pass_with_only_their_checked_arguments(line: bytes, expected: Request) -> None:
    assert parse_request(line) == expected


def test_the_engine_sends_the_documented_lines_and_the_helper_reads_them_back() -> None:
    """docs/PROTOCOL.md §9.6 byte for byte: the engine and helper of one install talk to each other, but the
    documented lines stay."""
    lines = {
        encode_hello(True): b'{"op": "hello", "version": 1, "kill_switch": true}\n',
        encode_open_tun(1360): b'{"op": "open_tun", "mtu": 1360}\n',
        encode_set_address("100.64.0.7"): b'{"op": "set_address", "address": "100.64.0.7"}\n',
        encode_route([("192.0.2.21", 9001)]): b'{"op": "route", "guards": [["192.0.2.21", 9001]]}\n',
        encode_set_dns(["100.64.0.1"]): b'{"op": "set_dns", "servers": ["100.64.0.1"]}\n',
        encode_restore(): b'{"op": "restore"}\n',
    }
    for line, documented in lines.items():
        assert line == documented
        assert isinstance(parse_request(line), REQUESTS)


def test_replies_are_the_documented_lines_and_read_back() -> None:
    assert encode_reply(Welcome(uid=1000)) == b'{"ok": true, "version": 1, "uid": 1000}\n'
    assert encode_reply(Done()) == b'{"ok": true}\n'
    assert encode_reply(Refused("no")) == b'{"ok": false, "error": "no"}\n'
    assert len(json.loads(encode_reply(Refused("x" * 1000)))["error"]) == 300
    for reply in (Welcome(uid=1000), Done(), Refused("no")):
        assert parse_reply(encode_reply(reply)) == reply
    assert parse_reply(b"[1]\n") == Refused("")  # whatever is not a success is a refusal
    assert parse_reply(b'{"ok": true, "uid": true}\n') == Done()
    with pytest.raises(BadReply):
        parse_reply(b"garbage\n")


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
    assert isinstance(out, REQUESTS)


def test_the_helper_refuses_everything_before_hello_and_changes_nothing() -> None:
    """The root side's dispatch (core/vpn/helper.py) before a session exists: these need no root, because
    nothing is carried out."""
    from shallot.core.vpn.helper import _Session

    session = _Session(uid=1000)
    for line in (encode_open_tun(1360), encode_set_address("100.64.0.7"), encode_restore()):
        assert session.handle(line) == (Refused("say hello first"), [])
    assert session.handle(b"nonsense\n") == (Refused("not JSON"), [])
    assert session.net is None
