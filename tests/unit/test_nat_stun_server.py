"""The STUN server of a public relay (core/nat/stun_server.py, PROTOCOL §13.1): answers bounded by their cause,
rate limits, CHANGE-REQUEST forwarding only inside the relay's scope, the alternate port."""

from __future__ import annotations

from collections import Counter

from shallot.core.link import Address
from shallot.core.nat.limits import FORWARD_BURST
from shallot.core.nat.stun_server import StunServer
from shallot.core.wire import stun
from tests.simnet import SimNet
from tests.unit.helpers_nat import relay_stack

TXID = bytes(range(12))
SRC: Address = ("203.0.113.50", 1234)


class Server:
    def __init__(self, *, own_host: str = "0.0.0.0", has_alt_port: bool = False) -> None:
        self.sent: list[tuple[bytes, Address]] = []
        self.counters: Counter[str] = Counter()
        self.server = StunServer(send=lambda data, addr: self.sent.append((data, addr)), counters=self.counters,
                                 own_host=own_host, has_alt_port=has_alt_port)

    def ask(self, request: bytes, src: Address = SRC, *, alt: bool = False, now: float = 0.0) -> None:
        self.server.answer_binding(stun.decode(request), request, src, now, alt=alt)


def test_relay_answers_binding_without_amplification_and_rate_limits() -> None:
    net = SimNet()
    relay, _, _ = relay_stack(net, 1, serve=True)
    src = ("203.0.113.50", 1234)
    for fp in (False, True):
        req = stun.binding_request(TXID, fingerprint=fp)
        relay.receive_datagram(req, src, net.now, net.wall)
        (resp, dest), = relay.datagrams_to_send()
        assert dest == src and stun.mapped_address(stun.decode(resp)) == src
        assert len(resp) <= len(req)  # no amplification: our requests are padded
    for _ in range(100):
        relay.receive_datagram(stun.binding_request(TXID), src, net.now, net.wall)
    assert len(relay.datagrams_to_send()) <= 40 and relay.nat.counters["nat_drop_stun_rate"] >= 60
    quiet, _, _ = relay_stack(net, 2, serve=False)  # not a server: silent
    quiet.receive_datagram(stun.binding_request(TXID), src, net.now, net.wall)
    assert not quiet.datagrams_to_send() and quiet.nat.counters["nat_drop_stun_unexpected"] == 1


def test_answer_mirrors_the_fingerprint_and_is_never_longer_than_the_request() -> None:
    s = Server()
    for fp in (False, True):
        req = stun.binding_request(TXID, fingerprint=fp)
        s.ask(req)
        resp, dest = s.sent.pop()
        assert dest == SRC and stun.decode(resp).has_fingerprint is fp
        assert len(resp) <= len(req)
    assert s.counters["nat_stun_answered"] == 2


def test_an_unpadded_request_that_would_get_a_longer_answer_is_dropped() -> None:
    s = Server()
    bare = stun.binding_request(TXID, pad_to=0)  # 28 bytes; the answer would be 40
    s.ask(bare)
    assert not s.sent and s.counters["nat_drop_stun_amplification"] == 1
    s.ask(stun.binding_request(TXID, fingerprint=False, pad_to=0))  # 20 -> 32: dropped too
    assert not s.sent and s.counters["nat_drop_stun_amplification"] == 2


def test_change_ip_is_forwarded_to_the_other_relay_inside_our_scope_only() -> None:
    other = ("10.2.0.1", 9000)
    s = Server()  # bound to 0.0.0.0: private relays are in scope
    req = stun.binding_request(TXID, change_ip=True, change_port=True, other_relay=other)
    s.ask(req)
    (fwd, dest), = s.sent
    msg = stun.decode(fwd)
    assert dest == other and msg.txid == TXID and len(fwd) <= len(req)
    assert stun.address_attr(msg, stun.ATTR_RESPONSE_DESTINATION) == SRC  # the other relay answers the requester
    assert s.counters["nat_stun_forwarded"] == 1
    loopback = Server(own_host="127.0.0.1")  # a loopback test relay aims at loopback only (§5.7 scope)
    loopback.ask(req)
    loopback.ask(stun.binding_request(TXID, change_ip=True))  # no OTHER-RELAY at all
    assert not loopback.sent and loopback.counters["nat_drop_stun_change_ip"] == 2


def test_response_destination_is_answered_there_within_one_global_bucket() -> None:
    dest = ("198.51.100.7", 40000)
    s = Server()
    req = stun.binding_request(TXID, response_destination=dest)
    for i in range(int(FORWARD_BURST) + 10):
        s.ask(req, (f"203.0.113.{i}", 1))  # many sources: only the global bucket limits them
    assert len(s.sent) == int(FORWARD_BURST) and all(addr == dest for _, addr in s.sent)
    assert stun.mapped_address(stun.decode(s.sent[0][0])) == dest
    assert s.counters["nat_drop_stun_rate"] == 10


def test_change_port_leaves_from_the_alternate_port_if_there_is_one() -> None:
    req = stun.binding_request(TXID, change_port=True)
    without = Server()
    without.ask(req)
    assert not without.sent and not without.server.alt_datagrams_to_send()
    assert without.counters["nat_drop_stun_no_alt_port"] == 1
    with_alt = Server(has_alt_port=True)
    with_alt.ask(req)
    with_alt.ask(stun.binding_request(TXID), ("203.0.113.51", 1), alt=True)  # came to the alternate port
    assert not with_alt.sent
    assert [addr for _, addr in with_alt.server.alt_datagrams_to_send()] == [SRC, ("203.0.113.51", 1)]
    assert with_alt.server.alt_datagrams_to_send() == []  # handed over once


def test_alternate_port_takes_only_stun() -> None:
    net = SimNet()
    relay, _, _ = relay_stack(net, 1, serve=True)
    relay.nat.receive_alt(b"\x54" + bytes(40), SRC, net.now)
    assert relay.nat.counters["nat_drop_alt_not_stun"] == 1
    assert relay.nat.stun_server is not None
    relay.nat.stun_server.has_alt_port = True  # as the relay service sets it once the port is open
    relay.nat.receive_alt(stun.binding_request(TXID), SRC, net.now)
    (resp, dest), = relay.nat.alt_datagrams_to_send()
    assert dest == SRC and stun.mapped_address(stun.decode(resp)) == SRC
