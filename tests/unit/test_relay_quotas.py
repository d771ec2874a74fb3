"""Per-source circuit quotas, eviction, the replay cache's per-source accounting and the extend-target
rules (no handshake cannon) of the relay (relay/forwarder.py, relay/quotas.py, docs/PROTOCOL.md §5.7, §8.2).

Each test shows both sides of its limit: the refused source or target, and another that still passes."""

from __future__ import annotations

from shallot.core.circuit import CircuitState, ClientNode
from shallot.core.ratelimit import TokenBuckets
from shallot.core.wire.cells import CMD_CREATE, encode_cell
from shallot.crypto.descriptor import Descriptor
from shallot.crypto.keys import RelayKeys
from shallot.crypto.params import CELL_HEADER_LEN, CREATE_TIMEOUT_S, HANDSHAKE_ATTEMPTS
from shallot.relay import forwarder, quotas
from shallot.relay.quotas import DialGuard, ReplayCache
from tests.simnet import det_rng
from tests.unit.helpers_circuits import CellLog, Net, relay_addr
from tests.unit.helpers_limits import configured_net


def _client(n: Net, i: int) -> ClientNode:
    c = ClientNode(rng=det_rng(5000 + i))
    n.net.add((f"192.0.2.{20 + i}", 5555), c)
    return c


def _ghost(n: Net, addr: tuple[str, int], seed: int) -> Descriptor:
    """A relay that does not exist: a valid descriptor at an address where nobody answers."""
    keys = RelayKeys.generate(det_rng(seed), n.net.wall)
    return Descriptor.create(keys, nickname=f"ghost{seed}", addresses=(addr,), exit_node=False,
                             published=int(n.net.wall), lifetime_s=86400)


def _build(n: Net, path: list[Descriptor], client: ClientNode | None = None):
    client = client or n.client
    circ = client.build(path, n.net.now, n.net.wall)
    n.net.run()
    return circ


def _sent_to(n: Net, addr: tuple[str, int]) -> int:
    return sum(1 for _src, dst, _d in n.net.log if dst == addr)


def _view_and_lookups(node, view: set[bytes] | None) -> list[bytes]:
    """Gives ``node`` a view of extend targets (relay ids; None: nothing is in it) and returns the list its
    DHT lookups are written to."""
    node.known_target = lambda rid, pub, addr: view is not None and rid in view
    asked: list[bytes] = []
    node.lookup_relay = lambda rid, pub: asked.append(rid)
    return asked


def _run_out_handshakes(n: Net) -> None:
    for _ in range(70):  # 0.5 s steps past the whole retry schedule (31.5 s)
        n.net.advance(0.5)


# ---------------------------------------------------------------------------------------------- circuits


def test_circuits_per_source_are_capped_and_another_source_still_builds() -> None:
    n = configured_net({0: {"max_circuits_per_source": 2}})
    guard = n.node(0)
    n.build_open([0, 1, 2])
    n.build_open([0, 1, 3])
    assert n.build([0, 1, 2]).state is CircuitState.CLOSED
    assert guard.counters["reject_create_source_circuits"] == 1 and guard.open_circuits == 2
    assert n.build([0, 1, 2], client=_client(n, 1)).state is CircuitState.OPEN


def test_circuits_per_link_are_capped() -> None:
    n = configured_net({0: {"max_circuits_per_link": 1}})
    guard = n.node(0)
    n.build_open([0, 1, 2])
    assert n.build([0, 1, 3]).state is CircuitState.CLOSED
    assert guard.counters["reject_create_link_circuits"] == 1 and guard.open_circuits == 1


def test_pending_extends_per_source_are_capped() -> None:
    n = configured_net({0: {"max_pending_per_source": 2}}, n=5)
    guard = n.node(0)
    del n.net.nodes[relay_addr(4)]  # relay 4 is down: extends to it stay pending
    for _ in range(2):
        assert _build(n, [n.desc(0), n.desc(4), n.desc(2)]).state is CircuitState.BUILDING
    assert _build(n, [n.desc(0), n.desc(4), n.desc(2)]).state is CircuitState.CLOSED
    assert guard.counters["reject_create_pending_source"] == 1
    assert n.build([0, 1, 2], client=_client(n, 1)).state is CircuitState.OPEN  # another source builds
    n.net.advance(CREATE_TIMEOUT_S + 1.0)  # the pending builds time out: the first source builds again
    assert guard.counters["circuit_build_timeout"] == 2
    n.build_open([0, 1, 2])


def test_a_full_table_evicts_the_heaviest_sources_idlest_circuit_not_the_newcomer() -> None:
    n = configured_net({0: {"max_circuits": 3}})
    guard = n.node(0)
    first = n.build_open([0, 1, 2])
    n.net.advance(1.0)
    n.build_open([0, 1, 3])
    n.build_open([0, 1, 2])
    assert guard.open_circuits == 3
    other = _client(n, 1)
    assert n.build([0, 1, 2], client=other).state is CircuitState.OPEN  # room made for a light source
    assert guard.counters["circuit_evicted"] == 1 and guard.open_circuits == 3
    assert first.state is CircuitState.CLOSED  # the least recently active one went
    # the heavy source itself is refused rather than evicting the newcomer
    assert n.build([0, 1, 2]).state is CircuitState.CLOSED
    assert guard.counters["reject_create_max_circuits"] == 1 and guard.counters["circuit_evicted"] == 1


def test_a_refused_record_fills_no_replay_cache() -> None:
    n = configured_net({})
    guard = n.node(0)
    bad = _ghost(n, ("127.0.0.1", 9999), 77)  # outside a public relay's scope: check 11 refuses it
    assert _build(n, [n.desc(0), bad]).state is CircuitState.CLOSED
    assert guard.counters["reject_create_extend_address"] == 1
    assert len(guard.replay) == 0
    n.build_open([0, 1, 2])
    assert len(guard.replay) == 1


def test_replay_cache_quota_per_source() -> None:
    cache = ReplayCache(soft_cap=100, hard_cap=200)
    for i in range(3):
        assert cache.admit("a", 3) is None
        cache.add(b"k", bytes([i]) * 8, 50.0, "a")
    assert cache.admit("a", 3) == "reject_create_replay_quota"
    assert cache.admit("b", 3) is None
    cache.expire(51.0)
    assert len(cache) == 0 and cache.admit("a", 3) is None


# ---------------------------------------------------------------------------------------------- extends


def test_a_relay_with_a_view_never_dials_a_made_up_target() -> None:
    n = configured_net({})
    guard = n.node(0)
    known = {n.desc(i).relay_id: n.desc(i) for i in range(4)}
    guard.known_target = lambda rid, pub, addr: rid in known and known[rid].link_pub == pub and \
        addr in known[rid].addresses
    ghost_addr = ("10.9.0.1", 9009)
    ghost = _ghost(n, ghost_addr, 90)
    assert _build(n, [n.desc(0), ghost]).state is CircuitState.CLOSED
    # a real relay named at a made-up address is no better
    moved = Descriptor.create(n.node(1).keys, nickname="moved", addresses=(ghost_addr,), exit_node=False,
                              published=int(n.net.wall), lifetime_s=86400)
    assert _build(n, [n.desc(0), moved, n.desc(2)]).state is CircuitState.CLOSED
    assert guard.counters["reject_create_extend_unknown"] == 2
    assert _sent_to(n, ghost_addr) == 0
    n.build_open([0, 1, 2])  # relays of its view it extends to as before


def test_an_unknown_target_waits_for_a_lookup_and_is_extended_to_if_found() -> None:
    n = configured_net({})
    guard = n.node(0)
    view: set[bytes] = {n.desc(i).relay_id for i in (0, 2, 3)}
    asked = _view_and_lookups(guard, view)
    circ = _build(n, [n.desc(0), n.desc(1), n.desc(2)])
    assert circ.state is CircuitState.BUILDING and asked == [n.desc(1).relay_id]
    view.add(n.desc(1).relay_id)  # the DHT lookup found it (and it joined the view)
    guard.relay_looked_up(n.desc(1).relay_id, n.desc(1).link_pub, True, n.net.now)
    n.net.run()
    assert circ.state is CircuitState.OPEN
    # not found: refused
    view.discard(n.desc(1).relay_id)
    circ = _build(n, [n.desc(0), n.desc(1), n.desc(3)])
    guard.relay_looked_up(n.desc(1).relay_id, n.desc(1).link_pub, False, n.net.now)
    n.net.run()
    assert circ.state is CircuitState.CLOSED and guard.counters["reject_create_extend_unknown"] == 1


def test_without_a_view_a_dead_target_gets_one_dial_then_the_negative_cache() -> None:
    n = configured_net({}, n=5)
    guard = n.node(0)
    dead = relay_addr(4)
    del n.net.nodes[dead]
    assert _build(n, [n.desc(0), n.desc(4), n.desc(2)]).state is CircuitState.BUILDING
    _run_out_handshakes(n)
    assert guard.counters["dial_failed"] == 1
    assert _sent_to(n, dead) == HANDSHAKE_ATTEMPTS
    assert _build(n, [n.desc(0), n.desc(4), n.desc(2)]).state is CircuitState.CLOSED
    assert guard.counters["reject_create_dial_failed_recently"] == 1
    assert _sent_to(n, dead) == HANDSHAKE_ATTEMPTS
    n.net.advance(quotas.NEGATIVE_CACHE_S)
    assert _build(n, [n.desc(0), n.desc(4), n.desc(2)]).state is CircuitState.BUILDING  # tried again later


def test_without_a_view_dials_in_flight_per_target_host_are_capped() -> None:
    n = configured_net({})
    guard = n.node(0)
    host = "10.9.0.1"
    ghosts = [_ghost(n, (host, 9100 + i), 200 + i) for i in range(quotas.MAX_PENDING_DIALS_PER_HOST + 1)]
    states = [_build(n, [n.desc(0), g], client=_client(n, i)).state for i, g in enumerate(ghosts)]
    assert states == [CircuitState.BUILDING] * quotas.MAX_PENDING_DIALS_PER_HOST + [CircuitState.CLOSED]
    assert guard.counters["reject_create_dial_pending"] == 1
    assert sum(_sent_to(n, g.address) for g in ghosts) == quotas.MAX_PENDING_DIALS_PER_HOST
    # another host is dialed as usual
    n.build_open([0, 1, 2])


def test_dial_rate_per_target_host() -> None:
    guard = DialGuard()
    burst = int(quotas.DIALS_PER_MINUTE_PER_HOST)
    for i in range(burst):
        assert guard.refusal(("10.9.0.1", 9000 + i), 0.0) is None
    assert guard.refusal(("10.9.0.1", 9999), 0.0) == "reject_create_dial_rate"
    assert guard.refusal(("10.9.0.2", 9000), 0.0) is None
    assert guard.refusal(("10.9.0.1", 9999), 60.0 / quotas.DIALS_PER_MINUTE_PER_HOST) is None


def test_held_extends_are_capped_per_source_and_lookups_per_second(monkeypatch) -> None:
    n = configured_net({})
    guard = n.node(0)
    asked = _view_and_lookups(guard, None)  # nothing is in the view: every extend waits
    monkeypatch.setattr(forwarder, "MAX_PARKED_PER_SOURCE", 2)
    ghosts = [_ghost(n, ("10.9.0.1", 9100 + i), 300 + i) for i in range(3)]
    states = [_build(n, [n.desc(0), g]).state for g in ghosts]
    assert states == [CircuitState.BUILDING] * 2 + [CircuitState.CLOSED]
    assert guard.counters["lookup_refused_source"] == 1 and len(asked) == 2
    # another source holds its own; the global lookup rate still bounds what all sources ask for
    guard._lookups = TokenBuckets(1.0, 1.0, max_keys=1)
    other = _client(n, 1)
    fresh = [_ghost(n, ("10.9.0.2", 9100 + i), 400 + i) for i in range(2)]
    states = [_build(n, [n.desc(0), g], client=other).state for g in fresh]
    assert states == [CircuitState.BUILDING, CircuitState.CLOSED]
    assert guard.counters["lookup_refused_rate"] == 1 and len(asked) == 3


def test_only_a_dial_that_never_came_up_goes_in_the_negative_cache() -> None:
    guard = DialGuard()
    target = ("10.9.0.1", 9000)
    assert guard.refusal(target, 0.0) is None
    guard.started(1, target)
    guard.up(1)  # the handshake completed: a later close is no failed dial
    assert guard.down(1, target, 1.0) is False and guard.pending == 0
    assert guard.down(7, target, 1.0) is False  # a link this guard never dialed
    assert guard.refusal(target, 2.0) is None
    guard.started(2, target)
    assert guard.down(2, target, 3.0) is True
    assert guard.refusal(target, 4.0) == "reject_create_dial_failed_recently"


def test_a_tag_added_twice_counts_once() -> None:
    cache = ReplayCache(soft_cap=100, hard_cap=200)
    for _ in range(2):  # e.g. a saved file that holds an entry twice
        cache.add(b"k", b"t" * 8, 50.0, "restored")
    assert len(cache) == 1 and cache.by_source["restored"] == 1 and cache.seen(b"k", b"t" * 8)


def test_relay_tier_links_have_their_own_pending_cap_and_skip_the_client_quotas() -> None:
    # the middle: one circuit per client source, but the guard's relay link is relay-tier (no view: every
    # relay link is) and only its pending extends are capped, here at 1
    n = configured_net({1: {"max_circuits_per_source": 1, "relay_max_pending_per_link": 1}}, n=5)
    middle = n.node(1)
    n.build_open([0, 1, 2])
    n.build_open([0, 1, 3])  # a second circuit from the same guard: the client quota does not apply
    del n.net.nodes[relay_addr(4)]
    assert _build(n, [n.desc(0), n.desc(1), n.desc(4)]).state is CircuitState.BUILDING
    assert _build(n, [n.desc(0), n.desc(1), n.desc(4)]).state is CircuitState.CLOSED
    assert middle.counters["reject_create_pending_link"] == 1 and middle.open_circuits == 3


def test_pending_extends_per_client_link_are_capped() -> None:
    n = configured_net({0: {"max_pending_per_link": 1}}, n=5)
    guard = n.node(0)
    del n.net.nodes[relay_addr(4)]
    assert _build(n, [n.desc(0), n.desc(4), n.desc(2)]).state is CircuitState.BUILDING
    assert _build(n, [n.desc(0), n.desc(4), n.desc(2)]).state is CircuitState.CLOSED
    assert guard.counters["reject_create_pending_link"] == 1


def test_a_closed_open_circuit_does_not_free_a_pending_slot() -> None:
    n = configured_net({0: {"max_pending_per_source": 2}}, n=5)
    guard = n.node(0)
    done = n.build_open([0, 1, 2])
    del n.net.nodes[relay_addr(4)]
    for _ in range(2):
        assert _build(n, [n.desc(0), n.desc(4), n.desc(2)]).state is CircuitState.BUILDING
    n.client.close(done, n.net.now)
    n.net.run()
    assert _build(n, [n.desc(0), n.desc(4), n.desc(2)]).state is CircuitState.CLOSED
    assert guard.counters["reject_create_pending_source"] == 1


def test_an_empty_table_of_size_zero_refuses_and_an_exit_that_is_full_refuses_its_only_source() -> None:
    n = configured_net({0: {"max_circuits": 0}, 2: {"max_circuits": 1}})
    assert n.build([0, 1, 2]).state is CircuitState.CLOSED
    assert n.node(0).counters["reject_create_max_circuits"] == 1
    n.build_open([3, 1, 2])
    assert n.build([3, 1, 2], client=_client(n, 1)).state is CircuitState.CLOSED  # one middle link: heaviest
    assert n.node(2).counters["reject_create_max_circuits"] == 1 and n.node(2).open_circuits == 1


def test_a_copy_of_a_held_create_is_refused_as_a_replay_once_the_first_is_accepted() -> None:
    n = configured_net({})
    middle = n.node(1)
    view: set[bytes] = {n.desc(i).relay_id for i in (0, 1, 3)}
    asked = _view_and_lookups(middle, view)
    log = CellLog({"middle": middle})
    circ = n.build([0, 1, 2])
    assert circ.state is CircuitState.BUILDING and len(middle._parked) == 1
    (create,) = log.cells("middle", CMD_CREATE)
    # a malicious guard sends the same CREATE again (another circuit id) while the first is held
    guard = n.node(0)
    link = guard.link.link_to(n.desc(1).link_pub)
    assert link is not None
    guard.link.send_cell(link, encode_cell(0x80000077, CMD_CREATE, create.cell[CELL_HEADER_LEN:]), n.net.now)
    n.net.run()
    assert len(middle._parked) == 2 and asked == [n.desc(2).relay_id], dict(middle.counters)
    view.add(n.desc(2).relay_id)
    middle.relay_looked_up(n.desc(2).relay_id, n.desc(2).link_pub, True, n.net.now)
    n.net.run()
    assert middle.counters["circuit_extended"] == 1 and middle.counters["reject_create_replay"] == 1


def test_create_rate_counts_an_ipv6_64_as_one_source() -> None:
    n = configured_net({0: {"creates_per_second": 0.001, "creates_burst": 1.0}})
    guard = n.node(0)
    first, second = ClientNode(rng=det_rng(6001)), ClientNode(rng=det_rng(6002))
    n.net.add(("2001:db8:1:2::10", 5555), first)
    n.net.add(("2001:db8:1:2::99", 5555), second)  # another address of the same /64
    assert n.build([0, 1, 2], client=first).state is CircuitState.OPEN
    assert n.build([0, 1, 2], client=second).state is CircuitState.CLOSED
    assert guard.counters["reject_create_rate"] == 1
    third = ClientNode(rng=det_rng(6003))
    n.net.add(("2001:db8:1:3::10", 5555), third)  # another /64
    assert n.build([0, 1, 2], client=third).state is CircuitState.OPEN


def test_a_copy_of_an_accepted_create_is_refused_before_any_work_on_its_target() -> None:
    """The replay check comes before the extend target is looked at: a replayed CREATE costs no DHT lookup,
    no held slot and no reply key (the check in ``_may_accept`` alone would catch it only after all that)."""
    n = configured_net({})
    middle = n.node(1)
    log = CellLog({"middle": middle})
    assert n.build([0, 1, 2]).state is CircuitState.OPEN
    (create,) = log.cells("middle", CMD_CREATE)
    asked = _view_and_lookups(middle, None)  # had the copy got that far, it would wait for a lookup
    guard = n.node(0)
    link = guard.link.link_to(n.desc(1).link_pub)
    assert link is not None
    guard.link.send_cell(link, encode_cell(0x80000078, CMD_CREATE, create.cell[CELL_HEADER_LEN:]), n.net.now)
    n.net.run()
    assert middle.counters["reject_create_replay"] == 1
    assert not middle._parked and asked == [] and middle.counters["create_held_for_lookup"] == 0
