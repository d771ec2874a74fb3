"""Onion-key rotation and link-certificate renewal (crypto/keys.py, relay/forwarder.py, PROTOCOL §3.2-3.3):
a new onion key every ONION_KEY_ROTATE_S, the old one accepted for ONION_KEY_OVERLAP_S and then refused,
build replay caches that survive a rotation, and a link certificate re-signed at half its lifetime, without
which an expired certificate ends a relay's ability to extend."""

from __future__ import annotations

from shallot.core.circuit import CircuitState, destroy_text
from shallot.core.wire.cells import CMD_CREATE, DestroyReason, encode_cell
from shallot.crypto.descriptor import Descriptor
from shallot.crypto.keys import OnionKey, RelayKeys, verify_link_cert
from shallot.crypto.params import CELL_HEADER_LEN, ONION_KEY_OVERLAP_S, ONION_KEY_ROTATE_S
from tests.simnet import det_rng
from tests.unit.helpers_circuits import CellLog, make_net, relay_addr
from tests.unit.helpers_limits import link_to

DAY = 86400
CERT_LIFETIME_S = 7 * DAY


def test_a_new_onion_key_comes_after_the_rotation_period_and_the_old_one_leaves_after_the_overlap() -> None:
    keys = RelayKeys.generate(det_rng(1), 1_000_000.0)
    k0 = keys.current_onion
    rng = det_rng(2)
    assert not keys.rotate_onion_keys(rng, k0.created + ONION_KEY_ROTATE_S - 1)
    assert keys.onion_keys == [k0]
    assert keys.rotate_onion_keys(rng, k0.created + ONION_KEY_ROTATE_S)
    k1 = keys.current_onion
    assert k1 is not k0 and k1.created == k0.created + ONION_KEY_ROTATE_S and keys.onion_keys == [k1, k0]
    assert k1.public != k0.public
    assert not keys.rotate_onion_keys(rng, k1.created + ONION_KEY_OVERLAP_S - 1)  # both still accepted
    assert keys.onion_keys == [k1, k0]


def test_an_old_key_leaves_once_its_successor_is_older_than_the_overlap_even_without_a_new_key() -> None:
    now, period = 100 * DAY, ONION_KEY_ROTATE_S
    assert ONION_KEY_OVERLAP_S == period == DAY  # daily keys (review M1)
    ages = (period // 10, period + period // 10, 2 * period + period // 10)
    k2, k1, k0 = (OnionKey(det_rng(i)(32), now - age) for i, age in enumerate(ages))
    keys = RelayKeys(identity_seed=bytes(32), link_private=bytes(range(32)), onion_keys=[k2, k1, k0])
    # k0's successor k1 is older than the overlap: k0 goes; k2 is younger: k1 stays; nothing is due
    assert keys.rotate_onion_keys(det_rng(9), now)
    assert keys.onion_keys == [k2, k1]
    assert not keys.rotate_onion_keys(det_rng(9), now)


def test_a_relay_accepts_its_old_onion_key_during_the_overlap_and_refuses_it_after() -> None:
    n = make_net()
    exit_ = n.node(2)
    old = n.desc(2)
    log = CellLog({"exit": exit_})
    n.build_open([0, 1, 2])  # a build under the old key, seen by the exit (replayed below)
    (create,) = log.cells("exit", CMD_CREATE)
    created = exit_.keys.current_onion.created

    assert exit_.rotate_onion_keys(created + ONION_KEY_ROTATE_S)
    new = Descriptor.create(exit_.keys, nickname="r2", addresses=(relay_addr(2),), exit_node=True,
                            published=int(n.net.wall), lifetime_s=DAY)
    assert new.onion_pub != old.onion_pub
    for desc in (old, new):  # during the overlap both keys open records
        circ = n.client.build([n.desc(0), n.desc(1), desc], n.net.now, n.net.wall)
        n.net.run()
        assert circ.state is CircuitState.OPEN
    # the replay cache of the old key survived the rotation
    middle = n.node(1)
    middle.link.send_cell(link_to(middle, relay_addr(2)),
                          encode_cell(create.cid ^ 1, CMD_CREATE, create.cell[CELL_HEADER_LEN:]), n.net.now)
    n.net.run()
    assert exit_.counters["reject_create_replay"] == 1

    assert exit_.rotate_onion_keys(created + ONION_KEY_ROTATE_S + ONION_KEY_OVERLAP_S)
    gone = n.client.build([n.desc(0), n.desc(1), old], n.net.now, n.net.wall)
    n.net.run()
    assert gone.state is CircuitState.CLOSED and gone.close_reason == destroy_text(DestroyReason.DESTROYED)
    assert exit_.counters["reject_create_bad_record"] == 1
    assert n.node(1).counters["destroy_received_hop_rejected"] == 1  # the exit's reason stops at the middle
    kept = n.client.build([n.desc(0), n.desc(1), new], n.net.now, n.net.wall)
    n.net.run()
    assert kept.state is CircuitState.OPEN  # the key that replaced it is in its own overlap now


def test_nothing_changes_before_the_rotation_is_due() -> None:
    n = make_net()
    exit_ = n.node(2)
    ring = exit_.ring
    assert not exit_.rotate_onion_keys(exit_.keys.current_onion.created + ONION_KEY_ROTATE_S - 1)
    assert exit_.ring is ring


def test_the_link_certificate_is_renewed_once_half_its_lifetime_is_left() -> None:
    n = make_net()
    guard = n.node(0)
    cfg = guard.link.config
    first, first_sig = cfg.cert_expires, cfg.cert_sig
    assert not guard.renew_link_cert(first - CERT_LIFETIME_S / 2 - 1, CERT_LIFETIME_S)
    assert (cfg.cert_expires, cfg.cert_sig) == (first, first_sig)
    wall = first - CERT_LIFETIME_S / 2 + 1
    assert guard.renew_link_cert(wall, CERT_LIFETIME_S)
    assert cfg.cert_expires == int(wall) + CERT_LIFETIME_S and cfg.cert_sig != first_sig
    verify_link_cert(guard.keys.identity_pub, guard.keys.link_pub, cfg.cert_expires, cfg.cert_sig)  # raises if bad


def test_a_relay_whose_certificate_expired_cannot_extend_until_it_renews() -> None:
    outcomes = {}
    for renew in (False, True):
        n = make_net()
        middle = n.node(1)
        n.net.advance(CERT_LIFETIME_S + DAY)  # a week and a day later: every certificate has expired
        for i in (1, 2) if not renew else (0, 1, 2):  # only the guard's renewal differs between the runs
            assert n.node(i).renew_link_cert(n.net.wall, CERT_LIFETIME_S)
        circ = n.build([0, 1, 2])
        outcomes[renew] = circ.state
        if not renew:
            assert middle.link.counters["drop_bad_initiation"] >= 1 and middle.open_circuits == 0
    assert outcomes == {False: CircuitState.BUILDING, True: CircuitState.OPEN}
