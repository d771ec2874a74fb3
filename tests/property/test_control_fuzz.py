"""The control API's parsers (core/control/api.py) take anything a peer sends and raise only their one
documented error; what they accept, they write back unchanged."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shallot.core.control.api import (
    REQUESTS,
    ControlError,
    EngineConfig,
    EngineMode,
    EngineState,
    ErrorKind,
    Hello,
    HopStatus,
    PeersReply,
    RelayEntry,
    ReplyError,
    Role,
    StatusSnapshot,
    decode_request,
    encode_request,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=6)
config_like = st.dictionaries(st.sampled_from(["directory", "bootstrap", "cache", "vpn", "kill_switch", "dns", "x"]),
                              json_values | st.lists(st.text(max_size=30), max_size=3), max_size=7)
request_args = st.dictionaries(st.sampled_from(["exit", "path", "directory", "bootstrap", "vpn", "other"]),
                               json_values, max_size=4)
CHECK = settings(max_examples=400, deadline=None)


@CHECK
@given(st.one_of(json_values, config_like))
def test_engine_config_parser_total(raw: object) -> None:
    try:
        config = EngineConfig.from_json(raw)
    except ControlError as exc:
        assert exc.kind is ErrorKind.BAD_REQUEST
        return
    assert EngineConfig.from_json(config.to_json()) == config


@CHECK
@given(st.sampled_from([*REQUESTS, "make_coffee", ""]), st.one_of(request_args, config_like))
def test_request_decoder_total(cmd: str, args: dict[str, object]) -> None:
    try:
        request = decode_request(cmd, args)
    except ControlError as exc:
        assert exc.kind in (ErrorKind.BAD_REQUEST, ErrorKind.UNKNOWN_COMMAND)
        return
    wire = encode_request(7, request)
    assert wire["cmd"] == cmd and decode_request(wire["cmd"], wire["args"]) == request


@CHECK
@given(st.one_of(json_values, st.fixed_dictionaries(
    {"shallot": st.sampled_from(["control", "other"]), "version": json_values | st.sampled_from([1, 2, 3]),
     "role": json_values | st.sampled_from(["client", "relay", "exit"])},
    optional={"supports": json_values | st.lists(st.text(max_size=12), max_size=4)})))
def test_hello_parser_total(raw: object) -> None:
    try:
        hello = Hello.from_json(raw)
    except ControlError:
        return
    assert isinstance(hello.role, Role) and hello.version in (1, 2)


text = st.text(max_size=30)
relay_entries = st.builds(RelayEntry, text, text, text, st.booleans(), st.none(), st.none()) | st.builds(
    RelayEntry, text, text, text, st.booleans(), st.integers(0, 2**40), st.integers(0, 2**40))


@CHECK
@given(st.one_of(json_values, st.builds(PeersReply, st.booleans(), st.just(()),
                                        st.lists(relay_entries, max_size=3).map(tuple)).map(PeersReply.to_json)))
def test_peers_reply_parser_total(raw: object) -> None:
    try:
        reply = PeersReply.from_json(raw)
    except ReplyError:
        return
    assert PeersReply.from_json(reply.to_json()) == reply


hops = st.tuples(*(st.builds(HopStatus, st.just(role), st.text("0123456789abcdef", max_size=40), text, text,
                             st.booleans(), st.none() | st.floats(0, 1e6)) for role in ("guard", "middle", "exit")))
snapshots = st.builds(
    StatusSnapshot, st.sampled_from(EngineState), text, text,
    st.none() | st.sampled_from([ErrorKind.HELPER_MISSING, ErrorKind.HELPER_DENIED, ErrorKind.HELPER_FAILED]),
    st.sampled_from(EngineMode), st.booleans(), st.booleans(), st.none() | text.filter(bool),
    st.none() | text.filter(bool), st.just(()) | hops, st.none() | st.floats(0, 1e6),
    st.none() | st.floats(0, 1e6), st.none() | st.floats(0, 2e9), st.none() | st.floats(0, 2e9),
    st.integers(0, 2**40), st.integers(0, 2**62), st.integers(0, 2**62), st.none() | st.integers(0, 10**6),
    st.none() | st.integers(0, 10**6))


@CHECK
@given(snapshots)
def test_what_an_engine_writes_reads_back_the_same(snap: StatusSnapshot) -> None:
    assert StatusSnapshot.from_json(snap.to_json()) == snap
