"""The record checks and the store's and view's edges (core/discovery/records.py, storage.py, view.py, PROTOCOL
§12.2): the size limit at its boundary, a version nobody speaks, newest wins even when a rotated onion key
makes the newer encoding sort lower, pages that end exactly at their limits, and the same record twice."""

from __future__ import annotations

import secrets

import pytest

from shallot.core.discovery.records import MAX_RECORD_LEN, RecordError, supersedes, validate_record
from shallot.core.discovery.storage import RecordStorage
from shallot.core.discovery.view import NetworkView
from shallot.crypto.descriptor import Descriptor
from shallot.crypto.keys import RelayKeys
from shallot.crypto.params import LABEL_DESCRIPTOR, ONION_KEY_ROTATE_S
from tests.simnet import det_rng

NOW = 1_800_000_000


def _desc(keys: RelayKeys | None = None, *, published: int = NOW, host: str = "198.51.100.7",
          nick: str = "r") -> Descriptor:
    keys = keys or RelayKeys.generate(secrets.token_bytes, NOW)
    return Descriptor.create(keys, nickname=nick, addresses=((host, 9000),), exit_node=False, published=published,
                             lifetime_s=3600)


def _reason(key: object, value: object) -> str:
    with pytest.raises(RecordError) as info:
        validate_record(key, value, NOW, allow_loopback=False)
    return info.value.reason


def test_the_size_limit_is_exactly_max_record_len() -> None:
    d = _desc()
    assert _reason(d.relay_id, b"x" * MAX_RECORD_LEN) == "malformed"  # as long as allowed: it gets parsed
    assert _reason(d.relay_id, b"x" * (MAX_RECORD_LEN + 1)) == "size"  # one more: not even parsed


def test_a_record_of_a_relay_that_speaks_no_version_we_know_is_refused() -> None:
    keys = RelayKeys.generate(secrets.token_bytes, NOW)
    d = _desc(keys)
    fields = {**d.__dict__, "version_min": 2, "version_max": 3}
    unsigned = Descriptor(**{**fields, "signature": b""})
    future = Descriptor(**{**fields, "signature": keys.sign(LABEL_DESCRIPTOR + unsigned.body())})
    assert _reason(future.relay_id, future.encode()) == "version"
    assert validate_record(d.relay_id, d.encode(), NOW, allow_loopback=False) == d


def test_the_newer_descriptor_wins_even_when_its_encoding_sorts_lower() -> None:
    """After an onion-key rotation the bytes before ``published`` differ, so byte order is not time order."""
    for seed in range(100):
        keys = RelayKeys.generate(det_rng(seed), NOW)
        old = _desc(keys, published=NOW)
        keys.rotate_onion_keys(det_rng(seed + 1000), NOW + ONION_KEY_ROTATE_S)  # a new onion key ...
        new = _desc(keys, published=NOW + 10)  # ... in a descriptor signed ten seconds later
        if new.encode() < old.encode():
            break
    else:
        raise AssertionError("no rotated key sorted lower in 100 tries")
    assert supersedes(new, old) and not supersedes(old, new)
    view = NetworkView(allow_loopback=False)
    assert view.offer(None, new.encode(), NOW + 10) == "added"
    assert view.offer(None, old.encode(), NOW + 10) == "stale"


def test_the_same_record_twice_is_the_same_not_stale() -> None:
    d = _desc()
    view = NetworkView(allow_loopback=False)
    assert [view.offer(None, d.encode(), NOW) for _ in range(2)] == ["added", "same"]
    assert view.rejected() == {}


def test_pages_end_exactly_at_their_byte_and_count_limits() -> None:
    st = RecordStorage(lambda: float(NOW), allow_loopback=False)
    descs = [_desc(host=f"198.{i}.0.1") for i in range(3)]
    for d in descs:
        st.offer(d.relay_id, d.encode())
    sizes = sorted(len(d.encode()) for d in descs)
    assert len(set(sizes)) == 1  # every record here is the same size
    size = sizes[0]
    page, cursor = st.page(None, max_bytes=2 * size, max_count=16)  # room for exactly two
    assert len(page) == 2 and cursor is not None
    page, cursor = st.page(None, max_bytes=3 * size, max_count=2)  # room for three, but only two allowed
    assert len(page) == 2 and cursor is not None
    page, cursor = st.page(None, max_bytes=3 * size, max_count=3)
    assert len(page) == 3 and cursor is None
