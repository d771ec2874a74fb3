"""The JSON-lines framing of the control API and the privileged helper (core/wire/jsonlines.py) and the
helper's request parser take any bytes: the framer never holds more than its limit, never lets the tail of an
over-long line through, and cuts a stream the same way however it is chunked; ``loads`` and
``parse_request`` raise only their one documented error."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from shallot.core.vpn.helper_protocol import BadRequest, parse_request
from shallot.core.wire.jsonlines import MAX_DEPTH, TOO_LONG, LineFramer, depth, loads

CHECK = settings(max_examples=300, deadline=None)
LIMIT = 64
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='ab"\\[]{} \x01é', max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='k"[]{', max_size=4), inner,
                                                                 max_size=3),
    max_leaves=40)


def _reference(stream: bytes) -> list[bytes | object]:
    """What the framer must give: every complete line, an over-long one as TOO_LONG (an unfinished one too, as
    soon as it is over the limit)."""
    *complete, rest = stream.split(b"\n")
    return [line if len(line) <= LIMIT else TOO_LONG for line in complete] + ([TOO_LONG] if len(rest) > LIMIT else [])


@CHECK
@given(st.lists(st.binary(max_size=200) | st.sampled_from([b"\n", b"x" * 70, b"y" * 64 + b"\n"]), max_size=30))
def test_framer_is_chunking_independent_and_bounded(chunks: list[bytes]) -> None:
    framer = LineFramer(LIMIT)
    got: list[bytes | object] = []
    for chunk in chunks:
        got += framer.feed(chunk)
        assert framer.pending <= LIMIT
    assert got == _reference(b"".join(chunks))
    one = LineFramer(LIMIT)
    assert one.feed(b"".join(chunks)) == got


@CHECK
@given(st.binary(max_size=300))
def test_loads_raises_only_value_error(line: bytes) -> None:
    try:
        loads(line)
    except ValueError:
        pass


@CHECK
@given(json_values)
def test_depth_is_the_real_nesting(value: object) -> None:
    text = json.dumps(value, ensure_ascii=False)

    def nesting(v: object) -> int:
        if isinstance(v, list):
            return 1 + max(map(nesting, v), default=0)
        if isinstance(v, dict):
            return 1 + max(map(nesting, v.values()), default=0)
        return 0

    assert depth(text) == nesting(value)
    if nesting(value) <= MAX_DEPTH:
        assert loads(text.encode()) == value


@CHECK
@given(st.integers(min_value=MAX_DEPTH + 1, max_value=20_000), st.sampled_from(["[", '{"a":', '[{"b":']))
def test_anything_deeper_than_the_limit_is_refused(n: int, opener: str) -> None:
    text = opener * n  # unclosed, as an attacker would send it: the parser would recurse before failing
    try:
        loads(text.encode())
    except ValueError as exc:
        assert "deeper" in str(exc)
    else:
        raise AssertionError("accepted")


@CHECK
@given(st.binary(max_size=5000) | json_values.map(lambda v: json.dumps({"op": "route", "guards": v}).encode()))
def test_helper_parse_request_raises_only_bad_request(line: bytes) -> None:
    try:
        parse_request(line)
    except BadRequest:
        pass
