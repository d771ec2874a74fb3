"""The view's first-seen history (what path selection weights by) and its file next to the view cache: kept
across restarts, never able to make a relay older than this client has known it."""

from __future__ import annotations

import stat
import time
from pathlib import Path

from shallot.core.discovery.cache import load_seen, save_seen, save_view, seen_path
from shallot.core.discovery.service import ClientDiscovery
from shallot.core.discovery.view import FORGET_S, MAX_SEEN, SEEN_HEADER, NetworkView, decode_seen, encode_seen
from shallot.crypto.descriptor import Descriptor
from shallot.crypto.keys import RelayKeys
from tests.simnet import det_rng


def _desc(i: int, now: float) -> Descriptor:
    keys = RelayKeys.generate(det_rng(9100 + i), now)
    return Descriptor.create(keys, nickname=f"h{i}", addresses=((f"198.51.{i}.1", 9000),), exit_node=False,
                             published=int(now), lifetime_s=86400)


def test_the_view_remembers_when_it_first_met_each_relay() -> None:
    now = time.time()
    view = NetworkView(allow_loopback=False)
    a = _desc(1, now)
    assert view.offer_descriptor(a, now) == "added"
    assert view.known_s(now + 100) == {a.relay_id: 100.0}
    view.offer_descriptor(a, now + 50)  # "same": the first meeting stays
    assert view.known_s(now + 100)[a.relay_id] == 100.0


def test_history_from_a_file_can_only_make_a_relay_older_up_to_now() -> None:
    now = time.time()
    view = NetworkView(allow_loopback=False)
    a, b = _desc(1, now), _desc(2, now)
    view.remember({a.relay_id: (now - 5 * 86400, now - 3600), b.relay_id: (now + 86400, now + 86400)}, now)
    view.offer_descriptor(a, now)
    view.offer_descriptor(b, now)
    known = view.known_s(now)
    assert known[a.relay_id] == 5 * 86400  # kept across the restart
    assert known[b.relay_id] == 0.0  # a future time (clock went back, edited file) gains nothing


def test_the_history_survives_a_restart_through_the_cache(tmp_path: Path) -> None:
    now = time.time()
    cache = tmp_path / "view"
    a = _desc(1, now)
    save_view(cache, [a])
    save_seen(cache, {a.relay_id: (now - 3 * 86400, now - 60)})
    assert stat.S_IMODE(seen_path(cache).stat().st_mode) == 0o600
    disc = ClientDiscovery([("198.51.100.1", 9000)], cache)
    assert disc.load_cache() == 1
    assert disc.known_s()[a.relay_id] >= 3 * 86400
    assert load_seen(tmp_path / "missing") == {}


def test_long_absent_relays_are_forgotten() -> None:
    now = time.time()
    view = NetworkView(allow_loopback=False)
    a, gone = _desc(1, now), _desc(2, now)
    view.offer_descriptor(a, now)
    view.remember({gone.relay_id: (now - 90 * 86400, now - FORGET_S - 1)}, now)
    assert set(view.seen(now)) == {a.relay_id}


def test_the_file_format_round_trips_and_damage_only_loses_entries() -> None:
    rid = bytes(range(20))
    seen = {rid: (1000.0, 2000.0), bytes(20): (5.0, 5.0)}
    text = encode_seen(seen)
    assert text.splitlines()[0] == SEEN_HEADER and decode_seen(text) == seen
    other = "cd" * 20
    damaged = text + "\n".join([
        "zz" * 20 + " 1 2",  # not hex
        "ab" * 19 + " 1 2",  # a 19-byte id
        other + " 9 1",  # first seen after last seen
        other + " -1 5",  # negative
        other + f" 1 {2**40}",  # beyond any plausible time
        other + " 1",  # a field missing
        rid.hex() + " 1 1",  # a second entry for a relay: the first one stays
    ]) + "\n"
    assert decode_seen(damaged) == seen
    assert decode_seen("shallot-seen 2\n" + text) == {}


def test_a_history_file_is_read_up_to_its_cap() -> None:
    seen = {i.to_bytes(20, "big"): (1.0, 2.0) for i in range(MAX_SEEN + 5)}
    assert len(decode_seen(encode_seen(seen))) == MAX_SEEN
