"""What a node knows of its own NAT (core/nat/own.py): its type, learnt once from the probe, and its public
address, whose changes are events (NatClassified, PublicAddressChanged) rather than flags to poll."""

from __future__ import annotations

from collections import Counter

from shallot.core.link import Address
from shallot.core.nat.classify import Behaviour, NatProbe, NatType
from shallot.core.nat.events import NatClassified, NatEvent, PublicAddressChanged
from shallot.core.nat.own import OwnNat
from shallot.core.wire import stun
from tests.simnet import det_rng

SERVER: Address = ("198.51.100.1", 9000)


def test_own_nat_learns_its_type_once_and_reports_a_moved_public_address() -> None:
    events: list[NatEvent] = []
    sent: list[tuple[bytes, Address]] = []
    counters: Counter[str] = Counter()
    own = OwnNat(send=lambda d, a: sent.append((d, a)), counters=counters, emit=events.append)
    assert own.known() == NatType() and own.timer() is None
    me = ("203.0.113.7", 4000)
    own.start_probe(NatProbe(SERVER, (SERVER[0], 9002), ("198.51.100.2", 9000), ("198.51.100.2", 9002),
                             det_rng(1), local=me), 0.0)
    now = 0.0
    while own.nat_type is None:  # every test answered as by an open network
        data, dest = sent.pop()
        msg = stun.decode(data)
        assert own.on_probe_answer(stun.decode(stun.binding_response(msg.txid, me, fingerprint=True)), dest, now)
        now += 0.01
    assert own.nat_type.behind_nat is False and own.nat_type.filtering is Behaviour.ENDPOINT_INDEPENDENT
    assert own.public == me and events == [NatClassified(own.nat_type)] and own.timer() is None
    assert not own.on_probe_answer(stun.decode(stun.binding_response(bytes(12), me, fingerprint=True)), SERVER, 1.0)
    own.mapped_address_seen(me)  # the same: nothing to say
    own.mapped_address_seen(("203.0.113.7", 4999))
    assert events[1:] == [PublicAddressChanged(("203.0.113.7", 4999), me)]
    assert counters["nat_public_address_changed"] == 1
