"""The saved build replay cache (relay/replay_store.py): ``decode`` takes any bytes a crash or a stranger
left in DIR/replay and returns None or (secret, entries), never raises; encoding round-trips."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shallot.relay.replay_store import ENTRY_LEN, MAGIC, SECRET_LEN, decode, encode_entries

entries = st.lists(st.tuples(st.binary(min_size=4, max_size=4), st.binary(min_size=8, max_size=8),
                             st.integers(0, 2**32 - 1).map(float)), max_size=20)


@given(st.binary(max_size=400))
def test_decode_never_raises(data: bytes) -> None:
    out = decode(data)
    if out is not None:
        secret, got = out
        assert data.startswith(MAGIC) and len(secret) == SECRET_LEN
        assert len(got) == (len(data) - len(MAGIC) - SECRET_LEN) // ENTRY_LEN


@given(st.binary(min_size=SECRET_LEN, max_size=SECRET_LEN), entries, st.binary(max_size=ENTRY_LEN - 1))
def test_round_trip_and_a_torn_tail_is_ignored(secret: bytes, items: list, tail: bytes) -> None:
    assert decode(MAGIC + secret + encode_entries(items) + tail) == (secret, items)
