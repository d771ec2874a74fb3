"""The first-seen history file (core/discovery/view.py decode_seen) under hypothesis: any text gives a map of
valid entries (20-byte ids, 0 <= first <= last) and never raises; a written map reads back the same."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shallot.core.discovery.view import MAX_SEEN, SEEN_HEADER, decode_seen, encode_seen

FAST = settings(max_examples=400, deadline=None)
times = st.integers(0, 2**40 - 1)
entries = st.dictionaries(st.binary(min_size=20, max_size=20), st.tuples(times, times).map(sorted), max_size=30)


@FAST
@given(st.text(max_size=400))
def test_any_text_decodes_to_valid_entries(text: str) -> None:
    for body in (text, SEEN_HEADER + "\n" + text):
        out = decode_seen(body)
        assert len(out) <= MAX_SEEN
        for rid, (first, last) in out.items():
            assert len(rid) == 20 and 0 <= first <= last


@FAST
@given(entries, st.lists(st.text(alphabet="0123456789abcdef -\n", max_size=60), max_size=5))
def test_written_history_reads_back_and_junk_lines_add_nothing_invented(seen: dict[bytes, list[int]],
                                                                         junk: list[str]) -> None:
    as_floats = {rid: (float(f), float(la)) for rid, (f, la) in seen.items()}
    text = encode_seen(as_floats)
    assert decode_seen(text) == as_floats
    out = decode_seen(text + "\n".join(junk) + "\n")
    for rid, value in as_floats.items():
        assert out[rid] == value  # junk after the entries never changes one (duplicates keep the first)
