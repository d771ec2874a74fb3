"""Replay across restarts, one-hop circuits, coarse clocks (issue 11; review M1, M2, M5; PROTOCOL §5.3, §5.7).

* A.4: a guard records the CREATE it forwards and replays it after the middle restarted: the middle refuses
  it, because its build replay cache was saved (relay/replay_store.py) and restored.
* A.6: an identity minted a moment ago dials the exit with IK and sends TERMINATE: the exit refuses it,
  because the previous hop is no relay in its view; a relay in its view still gets through.
* The build record carries the client's hour, accepted with RECORD_SLACK_S on both sides.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shallot.core.circuit import CircuitState
from shallot.core.wire.cells import CMD_CREATE, CMD_CREATED, CMD_DESTROY, encode_cell
from shallot.crypto import circuit_handshake as ch
from shallot.crypto.keys import RelayKeys
from shallot.crypto.params import CELL_HEADER_LEN, RECORD_EPOCH_S, RECORD_SLACK_S
from shallot.relay.forwarder import RelayConfig, RelayNode
from shallot.relay.replay_store import ENTRY_LEN, MAGIC, ReplayStore, decode
from tests.simnet import det_rng, endpoint_services
from tests.unit.helpers_circuits import CellLog, make_net, relay_addr

# ------------------------------------------------------------------------------------------ A.4 (M1)


def _restart(n, i: int, restore: list | None, secret: bytes) -> RelayNode:
    """Replace relay i by a fresh process with the same keys (keys.json), as after a crash or an update."""
    old = n.node(i)
    node = RelayNode(old.keys, rng=det_rng(777 + i), wall=n.net.wall, config=old.config,
                     services=endpoint_services())
    if restore is not None:
        node.restore_replay(secret, restore, n.net.wall)
    n.relays[i] = (node, n.desc(i))
    n.net.add(relay_addr(i), node)
    return node


def _capture_create(n, into: int) -> tuple:
    log = CellLog({"middle": n.node(into)})
    circ = n.build_open([0, 1, 2])
    (create,) = log.cells("middle", CMD_CREATE)
    return circ, create.cell[CELL_HEADER_LEN:]


def _replay_from_guard(n, payload: bytes) -> RelayNode:
    """The guard (malicious) sends the recorded CREATE again to the middle, on a fresh relay link."""
    guard, middle = n.node(0), n.desc(1)
    link = guard.link.open_link(middle.address, middle.link_pub, n.net.now, n.net.wall,
                                peer_relay_id=middle.relay_id)
    n.net.run()
    guard.link.send_cell(link, encode_cell(0x80000077, CMD_CREATE, payload), n.net.now)  # dialer's id space
    n.net.run()
    return n.node(1)


@pytest.mark.parametrize("saved", [True, False])
def test_a4_a_create_replayed_after_the_middle_restarted_is_refused(saved: bool, tmp_path: Path) -> None:
    """The review's PoC A.4.  With the cache saved to the state directory and restored at start the replay
    is refused; without (saved=False: what the code did before) the middle extends it again."""
    n = make_net()
    middle = n.node(1)
    store = ReplayStore(tmp_path)
    secret, _ = store.load(middle.replay_secret, n.net.wall)
    middle.restore_replay(secret, [], n.net.wall)  # as relay/service.py does at start: journal on
    _circ, payload = _capture_create(n, 1)
    store.append(middle.replay_journal)  # the service flushes at least every FLUSH_S
    middle.replay_journal.clear()
    store.close()
    n.net.advance(60.0)
    restored = ReplayStore(tmp_path).load(os.urandom(32), n.net.wall) if saved else None
    new = _restart(n, 1, restored[1] if restored else None, restored[0] if restored else os.urandom(32))
    exit_before = n.node(2).counters["circuit_terminated_here"]
    _replay_from_guard(n, payload)
    if saved:
        assert new.counters["reject_create_replay"] == 1 and new.counters["circuit_extended"] == 0
        assert n.node(2).counters["circuit_terminated_here"] == exit_before  # the exit never saw it again
    else:
        assert new.counters["circuit_extended"] == 1  # the attack the persistent cache stops


def test_the_saved_cache_drops_expired_entries_and_a_torn_entry(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path)
    secret, entries = store.load(b"s" * 32, 1000.0)
    assert (secret, entries) == (b"s" * 32, [])
    assert (tmp_path / "replay").stat().st_mode & 0o777 == 0o600
    store.append([(b"k" * 4, b"t" * 8, 5000.0), (b"k" * 4, b"u" * 8, 1500.0)])
    store.close()
    with open(tmp_path / "replay", "ab") as f:
        f.write(b"\x01" * (ENTRY_LEN - 3))  # a crash in the middle of an append
    secret2, entries2 = ReplayStore(tmp_path).load(b"x" * 32, 2000.0)
    assert secret2 == b"s" * 32 and entries2 == [(b"k" * 4, b"t" * 8, 5000.0)]
    assert (tmp_path / "replay").stat().st_size == len(MAGIC) + 32 + ENTRY_LEN  # compacted
    (tmp_path / "replay").write_bytes(b"garbage")
    assert ReplayStore(tmp_path).load(b"y" * 32, 2000.0) == (b"y" * 32, [])  # not a replay file: start anew
    assert decode(b"") is None


def test_restored_entries_of_keys_the_relay_no_longer_holds_are_dropped() -> None:
    n = make_net()
    node = n.node(1)
    key_id = node.keys.current_onion.key_id
    got = node.restore_replay(b"z" * 32, [(key_id, b"a" * 8, n.net.wall + 10), (b"gone", b"b" * 8, n.net.wall + 10),
                                          (key_id, b"c" * 8, n.net.wall - 1)], n.net.wall)
    assert got == 1 and node.replay_entries() == [(key_id, b"a" * 8, n.net.wall + 10)]


# ------------------------------------------------------------------------------------------ A.6 (M2)


def _minted_one_hop(n, exit_i: int, seed: int = 4040) -> tuple[RelayNode, list]:
    """A freshly minted identity (in nobody's view) dials the exit with IK and asks for TERMINATE."""
    fake = RelayNode(RelayKeys.generate(det_rng(seed), n.net.wall), rng=det_rng(seed + 1), wall=n.net.wall)
    n.net.add(("203.0.113.66", 4444 + seed), fake)
    exd = n.desc(exit_i)
    link = fake.link.open_link(exd.address, exd.link_pub, n.net.now, n.net.wall, peer_relay_id=exd.relay_id)
    n.net.run()
    hop = ch.HopTarget(exd.onion_pub, ch.Terminate(ch.SERVICE_ECHO), ch.HopIdentity(exd.relay_id, exd.link_pub))
    _pending, slots = ch.client_create([hop], hour=ch.record_hour(n.net.wall), rng=os.urandom)
    replies: list = []
    inner = fake.link.on_cell
    fake.link.on_cell = lambda lk, cell: (replies.append(cell[4]), inner(lk, cell))
    fake.link.send_cell(link, encode_cell(0x80000001, CMD_CREATE, slots), n.net.now)
    n.net.run()
    return fake, replies


def _views(n, known: set[int]) -> None:
    """Give every relay a view holding the relays ``known`` (what relay/service.py does from the DHT)."""
    ids = {(n.desc(i).relay_id, n.desc(i).link_pub) for i in known}
    for node, _desc in n.relays:
        node.known_relay = lambda rid, pub: (rid, pub) in ids


def test_a6_an_exit_refuses_a_one_hop_circuit_from_a_minted_identity() -> None:
    n = make_net()
    _views(n, {0, 1, 2, 3})
    exit_ = n.node(2)
    _fake, replies = _minted_one_hop(n, 2)
    assert exit_.counters["reject_create_unknown_relay"] == 1 and exit_.counters["circuit_terminated_here"] == 0
    assert replies == [CMD_DESTROY]
    # a relay in its view still ends circuits there: the ordinary 3-hop build works
    assert n.build([0, 1, 2]).state is CircuitState.OPEN


def test_without_a_view_the_exit_keeps_the_old_rule() -> None:
    """A relay with neither DHT nor directory file (relay/service.py warns at start) cannot tell: the PoC
    then succeeds, which is why every deployment is told to give one."""
    n = make_net()
    _fake, replies = _minted_one_hop(n, 2)
    assert replies == [CMD_CREATED] and n.node(2).counters["circuit_terminated_here"] == 1


def test_a_middle_not_yet_in_the_exits_view_cannot_end_circuits_but_can_still_extend() -> None:
    """A relay that joined after the exit's last crawl: the exit refuses to terminate for it (the client
    builds again; the exit's service crawls for it), while as a guard it extends as a client's link would."""
    n = make_net(5, exits={2, 3})
    _views(n, {0, 2, 3, 4})  # relay 1 is new
    circ = n.build([0, 1, 2])
    assert circ.state is CircuitState.CLOSED and n.node(2).counters["reject_create_unknown_relay"] == 1
    assert n.build([1, 0, 2]).state is CircuitState.OPEN  # 1 as a guard: its CREATE reaches 0 on a relay link


def test_an_unknown_relay_link_gets_the_client_create_budget() -> None:
    """The relay-tier CREATE bucket (500/s per link) is for relays in our view; an unknown IK peer is
    limited per source IP like a client (review H4 iii)."""
    n = make_net()
    _views(n, set())
    exit_ = n.node(2)
    exit_.config = RelayConfig(is_exit=True, creates_per_second=0.0, creates_burst=1.0)
    exit_._client_creates.rate, exit_._client_creates.burst = 0.0, 1.0
    _minted_one_hop(n, 2, seed=50)
    _minted_one_hop(n, 2, seed=60)  # another identity from the same IP address: the same bucket
    assert exit_.counters["reject_create_rate"] == 1 and exit_.counters["reject_create_unknown_relay"] == 1


# ------------------------------------------------------------------------------------------ M5: the hour


def test_a_record_names_the_hour_and_is_accepted_with_slack() -> None:
    h = 500_000
    start, end = h * RECORD_EPOCH_S, (h + 1) * RECORD_EPOCH_S
    assert ch.record_hour(start) == ch.record_hour(end - 1) == h
    assert ch.record_time_ok(h, start - RECORD_SLACK_S) and not ch.record_time_ok(h, start - RECORD_SLACK_S - 1)
    assert ch.record_time_ok(h, end + RECORD_SLACK_S - 1) and not ch.record_time_ok(h, end + RECORD_SLACK_S)
    assert ch.record_expiry(h) == end + RECORD_SLACK_S


def test_every_hop_sees_the_same_hour_and_nothing_finer() -> None:
    n = make_net()
    log = CellLog({"guard": n.node(0), "middle": n.node(1), "exit": n.node(2)})
    seen: list[int] = []
    for offset in (0.0, 59.0, 61.0, 1799.0):  # four builds within one hour (the client's wall clock moves)
        circ = n.build([0, 1, 2], wall_offset=offset - (n.net.wall % RECORD_EPOCH_S) + 1)
        assert circ.state is CircuitState.OPEN
    for s in log.cells("guard", CMD_CREATE):
        opened = ch.relay_open(s.cell[CELL_HEADER_LEN:CELL_HEADER_LEN + 592], n.node(0).ring.keys, rng=os.urandom)
        seen.append(opened.hour)
    assert len(seen) == 4 and len(set(seen)) == 1


def test_a_terminate_from_a_relay_the_exit_does_not_know_waits_for_a_lookup() -> None:
    """With a DHT the exit asks for the unknown relay's record and holds the CREATE meanwhile: found (it
    joined since our last crawl) -> the circuit opens; not found -> refused; no answer -> refused after
    PARK_TIMEOUT_S."""
    from shallot.relay.forwarder import PARK_TIMEOUT_S
    n = make_net(5, exits={2, 3})
    _views(n, {0, 2, 3, 4})  # relay 1 joined after the exits' last crawl
    exit_ = n.node(2)
    asked: list[bytes] = []
    exit_.lookup_relay = lambda rid, pub: asked.append(rid)
    circ = n.build([0, 1, 2])
    assert asked == [n.desc(1).relay_id] and circ.state is CircuitState.BUILDING
    assert exit_.counters["create_held_for_lookup"] == 1
    exit_.relay_looked_up(n.desc(1).relay_id, n.desc(1).link_pub, True, n.net.now)
    n.net.run()
    assert circ.state is CircuitState.OPEN and exit_.counters["circuit_terminated_here"] == 1
    refused = n.build([4, 1, 2])
    exit_.relay_looked_up(n.desc(1).relay_id, n.desc(1).link_pub, False, n.net.now)
    n.net.run()
    assert refused.state is CircuitState.CLOSED and exit_.counters["reject_create_unknown_relay"] == 1
    n.node(3).lookup_relay = lambda rid, pub: None  # never answers
    late = n.build([4, 1, 3])
    n.net.advance(PARK_TIMEOUT_S + 1.5)
    assert late.state is CircuitState.CLOSED and n.node(3).counters["reject_create_unknown_relay"] >= 1


def _mint(n, exit_i: int, seed: int) -> tuple[RelayNode, object]:
    fake = RelayNode(RelayKeys.generate(det_rng(seed), n.net.wall), rng=det_rng(seed + 1), wall=n.net.wall)
    n.net.add(("203.0.113.66", 4444 + seed), fake)
    exd = n.desc(exit_i)
    link = fake.link.open_link(exd.address, exd.link_pub, n.net.now, n.net.wall, peer_relay_id=exd.relay_id)
    n.net.run()
    return fake, link


def _terminate(n, fake: RelayNode, link: object, exit_i: int, cid: int, slots: bytes | None = None) -> bytes:
    exd = n.desc(exit_i)
    if slots is None:
        hop = ch.HopTarget(exd.onion_pub, ch.Terminate(ch.SERVICE_ECHO), ch.HopIdentity(exd.relay_id, exd.link_pub))
        _pending, slots = ch.client_create([hop], hour=ch.record_hour(n.net.wall), rng=os.urandom)
    fake.link.send_cell(link, encode_cell(cid, CMD_CREATE, slots), n.net.now)  # type: ignore[arg-type]
    n.net.run()
    return slots


def test_held_creates_are_bounded_answered_per_relay_and_never_on_a_closed_link(monkeypatch) -> None:
    from shallot.relay import forwarder
    monkeypatch.setattr(forwarder, "MAX_PARKED", 2)
    n = make_net()
    _views(n, {0, 1, 2, 3})
    exit_ = n.node(2)
    asked: list[bytes] = []
    exit_.lookup_relay = lambda rid, pub: asked.append(rid)
    a, la = _mint(n, 2, 70)
    b, lb = _mint(n, 2, 80)
    slots = _terminate(n, a, la, 2, 0x80000001)
    _terminate(n, a, la, 2, 0x80000001, slots)  # the same circuit id again while held: a duplicate
    assert exit_.counters["drop_create_duplicate_circuit"] == 1
    _terminate(n, b, lb, 2, 0x80000002)
    assert exit_.counters["create_held_for_lookup"] == 2 and asked == [a.keys.relay_id, b.keys.relay_id]
    _terminate(n, b, lb, 2, 0x80000003)  # a third: too many held, refused at once
    assert exit_.counters["reject_create_unknown_relay"] == 1
    exit_.relay_looked_up(a.keys.relay_id, a.keys.link_pub, True, n.net.now)  # only a's is answered
    n.net.run()
    assert exit_.counters["circuit_terminated_here"] == 1 and len(exit_._parked) == 1
    (b_link,) = [lk for lk in exit_.link.links.values() if lk.peer_relay_id == b.keys.relay_id]
    exit_.link.close_link(b_link, "test: b's link died while its CREATE was held")
    exit_.relay_looked_up(b.keys.relay_id, b.keys.link_pub, True, n.net.now)
    n.net.run()
    assert exit_.counters["circuit_terminated_here"] == 1 and not exit_._parked
