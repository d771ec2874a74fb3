"""NAT traversal pieces without sockets: the STUN codec, the RFC 5780 classifier, the punch/relay decision,
the descriptor's reachability extension, the NAT message codecs, the STUN server's limits, and whole
introductions (punched, relayed, relayed then upgraded) between sans-I/O nodes on tests/simnet."""

from __future__ import annotations

import pytest

from shallot.core.circuit import ClientNode
from shallot.core.link import LinkState
from shallot.core.nat import NatLayer
from shallot.core.nat.classify import OPEN, Behaviour, NatProbe, NatType, Plan, classify, plan_link
from shallot.core.wire import nat_frames as nm
from shallot.core.wire import stun
from shallot.crypto.codec import DecodeError
from shallot.crypto.descriptor import FLAG_EXTENSIONS, Descriptor, DescriptorError, Reachability
from shallot.crypto.keys import RelayKeys
from shallot.relay.forwarder import RelayNode
from tests.simnet import SimNet, det_rng

EI, AD, APD = Behaviour.ENDPOINT_INDEPENDENT, Behaviour.ADDRESS_DEPENDENT, Behaviour.ADDRESS_AND_PORT_DEPENDENT
TXID = bytes(range(12))


# ---------------------------------------------------------------- STUN codec
def test_binding_request_layout_and_fingerprint() -> None:
    req = stun.binding_request(TXID)
    assert len(req) == 28 and req[:2] == b"\x00\x01" and req[2:4] == b"\x00\x08"
    assert req[4:8] == bytes.fromhex("2112a442") and req[8:20] == TXID
    msg = stun.decode(req)
    assert msg.msg_type == stun.BINDING_REQUEST and msg.has_fingerprint
    bare = stun.binding_request(TXID, fingerprint=False)
    assert len(bare) == 20 and not stun.decode(bare).attributes


@pytest.mark.parametrize("addr", [("203.0.113.7", 40000), ("2001:db8::1", 9), ("::ffff:192.0.2.1", 1)])
def test_xor_mapped_address_round_trip(addr: tuple[str, int]) -> None:
    resp = stun.decode(stun.binding_response(TXID, addr, fingerprint=True))
    host = addr[0].replace("::ffff:", "")
    assert stun.mapped_address(resp) == (host, addr[1])


def test_xor_mapped_address_known_bytes() -> None:
    # RFC 8489 §14.2: port XOR 0x2112, IPv4 XOR the magic cookie
    value = stun.encode_xor_address(("192.0.2.1", 32853), TXID)
    assert value == bytes.fromhex("0001") + (32853 ^ 0x2112).to_bytes(2, "big") + bytes(
        a ^ b for a, b in zip(bytes((192, 0, 2, 1)), bytes.fromhex("2112a442")))


def test_decode_rejects_tampering_truncation_and_trailing_bytes() -> None:
    resp = stun.binding_response(TXID, ("198.51.100.1", 5), fingerprint=True)
    for i in range(len(resp)):
        bad = bytearray(resp)
        bad[i] ^= 0x01
        with pytest.raises(DecodeError):
            mapped = stun.mapped_address(stun.decode(bytes(bad)))
            assert mapped == ("198.51.100.1", 5)  # a flip outside the checked fields would still decode right
            raise DecodeError("unchanged")
    for n in range(len(resp)):
        with pytest.raises(DecodeError):
            stun.decode(resp[:n])
    with pytest.raises(DecodeError):
        stun.decode(resp + bytes(4))


def test_demux_never_confuses_stun_with_link_or_nat_packets() -> None:
    assert stun.is_stun(stun.binding_request(TXID))
    for first in (0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58):
        assert not stun.is_stun(bytes((first, 1)) + bytes(2) + stun.MAGIC_BYTES + bytes(12))


# ---------------------------------------------------------------- classification and plan
def test_classify_rfc5780_cases() -> None:
    m1, m2, m3 = ("203.0.113.1", 1000), ("203.0.113.1", 2000), ("203.0.113.1", 3000)
    assert classify(None, None, None, eif=False, adf=False).udp_blocked
    t = classify(m1, m1, None, eif=True, adf=True)
    assert (t.mapping, t.filtering, t.behind_nat) == (EI, EI, True)
    assert classify(m1, m1, None, eif=False, adf=True).filtering is AD
    assert classify(m1, m1, None, eif=False, adf=False).filtering is APD
    assert classify(m1, m2, m2, eif=False, adf=False).mapping is AD
    assert classify(m1, m2, m3, eif=False, adf=False).mapping is APD
    assert not classify(m1, m1, None, eif=True, adf=True, local=m1).behind_nat


@pytest.mark.parametrize(("a", "b", "plan"), [
    (NatType(APD, APD), NatType(APD, APD), Plan.RELAY),
    (NatType(APD, APD), NatType(EI, APD), Plan.RELAY),
    (NatType(EI, APD), NatType(AD, APD), Plan.RELAY),
    (NatType(APD, APD), NatType(EI, AD), Plan.PUNCH),
    (NatType(EI, EI), NatType(APD, APD), Plan.PUNCH),
    (NatType(EI, APD), NatType(EI, APD), Plan.PUNCH),
    (NatType(), NatType(APD, APD), Plan.PUNCH),  # unknown: try, the timeout falls back
    (NatType(APD, APD), OPEN, Plan.DIRECT),
    (NatType(APD, APD), None, Plan.DIRECT),
])
def test_plan_link(a: NatType, b: NatType | None, plan: Plan) -> None:
    assert plan_link(a, b) is plan


class FakeNat:
    """A NAT of given behaviour in front of the probe, and relays that answer as ours do."""

    def __init__(self, edm: bool, filtering: Behaviour) -> None:
        self.edm, self.filtering = edm, filtering
        self.sent_to: set[tuple[str, int]] = set()
        self.ports: dict[tuple[str, int], int] = {}

    def mapped(self, dest: tuple[str, int]) -> tuple[str, int]:
        key = dest if self.edm else ("*", 0)
        return ("203.0.113.9", self.ports.setdefault(key, 40000 + len(self.ports)))

    def lets_in(self, source: tuple[str, int]) -> bool:
        if self.filtering is EI:
            return True
        if self.filtering is AD:
            return any(h == source[0] for h, _ in self.sent_to)
        return source in self.sent_to


@pytest.mark.parametrize(("edm", "filtering"), [(False, EI), (False, AD), (False, APD), (True, APD)])
def test_probe_machine_classifies_a_model_nat(edm: bool, filtering: Behaviour) -> None:
    r1, r1alt, r2, r2alt = ("192.0.2.1", 9000), ("192.0.2.1", 9001), ("198.51.100.1", 9000), ("198.51.100.1", 9001)
    nat = FakeNat(edm, filtering)
    probe = NatProbe(r1, r1alt, r2, r2alt, det_rng(1))
    now = 0.0
    probe.start(now)
    for _ in range(100):
        if probe.done:
            break
        for data, dest in probe.outbox:
            nat.sent_to.add(dest)
            msg = stun.decode(data)
            mapped = nat.mapped(dest)
            flags = stun.change_flags(msg)
            source = r2 if flags & stun.CHANGE_IP else (dest[0], dest[1] + 1) if flags & stun.CHANGE_PORT else dest
            if nat.lets_in(source):
                probe.receive(stun.decode(stun.binding_response(msg.txid, mapped, fingerprint=True)), source, now)
        probe.outbox.clear()
        now += 0.31
        probe.handle_timer(now)
    assert probe.result is not None
    assert probe.result.filtering is filtering
    assert probe.result.mapping is (APD if edm else EI)


# ---------------------------------------------------------------- descriptor extension
def _keys(seed: int) -> RelayKeys:
    return RelayKeys.generate(det_rng(seed), 1_800_000_000.0)


def test_descriptor_reachability_round_trip_and_signature() -> None:
    intro = _keys(2)
    reach = Reachability(3, 3, ((intro.relay_id, ("192.0.2.1", 9000)), (bytes(20), ("2001:db8::2", 9))))
    desc = Descriptor.create(_keys(1), nickname="natted", addresses=(("203.0.113.5", 40000),), exit_node=False,
                             published=1_800_000_000, lifetime_s=3600, reachability=reach)
    assert desc.flags & FLAG_EXTENSIONS
    back = Descriptor.decode(desc.encode())
    assert back.reachability == reach and back == desc
    raw = bytearray(desc.encode())
    raw[-64 - 5] ^= 1  # inside the introducer address: covered by the signature
    with pytest.raises(DescriptorError):
        Descriptor.decode(bytes(raw))
    plain = Descriptor.create(_keys(1), nickname="public", addresses=(("203.0.113.5", 9),), exit_node=False,
                              published=1_800_000_000, lifetime_s=3600)
    assert not plain.flags & FLAG_EXTENSIONS and Descriptor.decode(plain.encode()).reachability is None


def test_reachability_limits() -> None:
    with pytest.raises(DecodeError):
        Reachability.decode(bytes((1, 1, 0)))  # no introducer
    with pytest.raises(DecodeError):
        Reachability.decode(bytes((4, 1, 1)) + bytes(20) + bytes(19))  # code out of range
    with pytest.raises(DescriptorError):
        Descriptor.create(_keys(1), nickname="x", addresses=(("203.0.113.5", 9),), exit_node=False,
                          published=1, lifetime_s=60, reachability=Reachability(1, 1, ()))


# ---------------------------------------------------------------- NAT message codecs
def test_nat_messages_round_trip_and_reject_garbage() -> None:
    req = nm.IntroRequest(bytes(range(8)), bytes(range(20)), 3, 2)
    assert len(req.encode()) == nm.INTRO_REQUEST_LEN and nm.IntroRequest.decode(req.encode()) == req
    ans = nm.IntroAnswer(bytes(8), nm.STATUS_OK, ("203.0.113.9", 4), bytes(range(8)))
    assert len(ans.encode()) == nm.INTRO_ANSWER_LEN and nm.IntroAnswer.decode(ans.encode()) == ans
    assert len(ans.encode()) <= len(req.encode())  # an introducer's answer never amplifies
    assert nm.decode_punch(nm.encode_punch(nm.PUNCH_REPLY, bytes(range(8)))) == (1, bytes(range(8)))
    intro = nm.Introduce(("203.0.113.9", 4), bytes(8), bytes(range(8)), 1, 3)
    assert nm.Introduce.decode(intro.cell()) == intro
    for data in (req.encode()[:-1], ans.encode() + b"\0", nm.encode_punch(2, bytes(8)), b"\x58" + bytes(8) + b"\x01"):
        with pytest.raises(DecodeError):
            for decoder in (nm.IntroRequest.decode, nm.IntroAnswer.decode, nm.decode_punch, nm.relayed_session):
                try:
                    decoder(data)
                except DecodeError:
                    continue
                raise AssertionError(f"{decoder} accepted {data!r}")
            raise DecodeError("all rejected")


# ---------------------------------------------------------------- STUN server behaviour
def _relay(net: SimNet, i: int, *, serve: bool) -> tuple[NatLayer, RelayKeys, tuple[str, int]]:
    keys = _keys(100 + i)
    addr = (f"10.{i}.0.1", 9000)
    layer = NatLayer(RelayNode(keys, rng=det_rng(i), wall=net.wall), rng=det_rng(50 + i), serve=serve)
    net.add(addr, layer)
    return layer, keys, addr


def test_relay_answers_binding_without_amplification_and_rate_limits() -> None:
    net = SimNet()
    relay, _, _ = _relay(net, 1, serve=True)
    src = ("203.0.113.50", 1234)
    for fp in (False, True):
        req = stun.binding_request(TXID, fingerprint=fp)
        relay.receive_datagram(req, src, net.now, net.wall)
        (resp, dest), = relay.datagrams_to_send()
        assert dest == src and stun.mapped_address(stun.decode(resp)) == src
        assert len(resp) <= len(req) + 24 and (len(resp) + 28) / (len(req) + 28) < 1.3
    for _ in range(100):
        relay.receive_datagram(stun.binding_request(TXID), src, net.now, net.wall)
    assert len(relay.datagrams_to_send()) <= 40 and relay.counters["nat_drop_stun_rate"] >= 60
    quiet, _, _ = _relay(net, 2, serve=False)  # not a server: silent
    quiet.receive_datagram(stun.binding_request(TXID), src, net.now, net.wall)
    assert not quiet.datagrams_to_send() and quiet.counters["nat_drop_stun_unexpected"] == 1


# ---------------------------------------------------------------- whole introductions
class Scene:
    """Introducer I, a relay B behind a 'NAT' (its descriptor names I), a client A; a tap decides which
    direct A<->B datagrams get through."""

    def __init__(self, a_nat: NatType, b_nat: NatType) -> None:
        self.net = SimNet()
        self.intro, ikeys, self.i_addr = _relay(self.net, 1, serve=True)
        self.b, bkeys, self.b_addr = _relay(self.net, 2, serve=False)
        self.b.nat_type = b_nat
        self.b.register([(ikeys.relay_id, self.i_addr, ikeys.link_pub)], self.net.now, self.net.wall)
        self.client = ClientNode(rng=det_rng(7))
        self.a = NatLayer(self.client, rng=det_rng(8))
        self.a.nat_type = a_nat
        self.client.dial = self.a.dial
        self.a_addr = ("192.0.2.10", 5555)
        self.net.add(self.a_addr, self.a)
        self.direct_ok = True
        ends = {self.a_addr, self.b_addr}
        self.net.tap = lambda src, dst, data: None if ({src, dst} == ends and not self.direct_ok) else data
        self.net.run()
        self.desc = Descriptor.create(bkeys, nickname="natted", addresses=(self.b_addr,), exit_node=False,
                                      published=int(self.net.wall), lifetime_s=3600,
                                      reachability=Reachability(int(b_nat.mapping), int(b_nat.filtering),
                                                                ((ikeys.relay_id, self.i_addr),)))

    def dial(self) -> object:
        link = self.a.dial(self.desc, self.net.now, self.net.wall)
        for _ in range(40):
            self.net.run()
            if link.state is LinkState.UP:
                break
            self.net.advance(0.1)
        return link


def test_introduction_punches_a_direct_link() -> None:
    scene = Scene(NatType(EI, APD), NatType(EI, APD))
    link = scene.dial()
    assert link.state is LinkState.UP and link.addr == scene.b_addr
    assert scene.a.link_method(link) == "hole-punched"
    assert scene.intro.counters["nat_introduced"] == 1 and scene.b.counters["nat_introduced_to_peer"] == 1
    assert scene.intro.counters["nat_relayed"] == 0
    b_links = scene.b.status()["links"]
    assert {"client": "hole-punched"}.items() <= {lk["peer"]: lk["method"] for lk in b_links}.items()


def test_impossible_punch_goes_through_the_relay_then_upgrades_when_a_path_opens() -> None:
    scene = Scene(NatType(APD, APD), NatType(APD, APD))
    scene.direct_ok = False
    link = scene.dial()
    assert link.state is LinkState.UP and link.addr[1] == 0 and scene.a.link_method(link) == "relayed"
    relayed = scene.intro.counters["nat_relayed"]
    assert relayed >= 2 and scene.a.counters["nat_relay_fallback"] == 1
    # the introducer saw only link packets (ciphertext) and the two addresses
    assert all(src in (scene.a_addr, scene.b_addr) for src, dst, _ in scene.net.log if dst == scene.i_addr
               and _[:1] == b"\x58")
    scene.direct_ok = True  # e.g. one NAT was replaced: the next punch gets through and both ends roam
    for _ in range(25):
        scene.net.advance(1.0)
        if link.addr == scene.b_addr:
            break
    assert link.state is LinkState.UP and link.addr == scene.b_addr
    assert scene.a.link_method(link) == "hole-punched"


def test_punch_that_times_out_falls_back_to_the_relay() -> None:
    scene = Scene(NatType(EI, APD), NatType(EI, APD))  # predicted to punch ...
    scene.direct_ok = False  # ... but the path is broken
    link = scene.dial()
    assert link.state is LinkState.UP and scene.a.link_method(link) == "relayed"
    assert scene.a.counters["nat_relay_fallback"] == 1


def test_garbage_on_the_link_socket_never_raises() -> None:
    net = SimNet()
    relay, _, _ = _relay(net, 1, serve=True)
    for data in (b"", b"\x00", b"\x55" * 40, b"\x56" * 37, b"\x57" * 12, b"\x58" * 30, bytes(20),
                 b"\x00\x01\x00\x04" + stun.MAGIC_BYTES + bytes(12)):  # STUN with a wrong length
        relay.receive_datagram(data, ("203.0.113.1", 1), net.now, net.wall)
    dropped = sum(v for k, v in relay.counters.items() if k.startswith("nat_drop"))
    dropped += sum(v for k, v in relay.node.link.counters.items() if k.startswith("drop_"))
    assert dropped == 8


def _desc(seed: int, host: str, introducers: tuple[tuple[str, int], ...] = ()) -> Descriptor:
    reach = Reachability(1, 3, tuple((bytes(20), a) for a in introducers)) if introducers else None
    return Descriptor.create(_keys(seed), nickname=f"r{seed}", addresses=((host, 9000),), exit_node=False,
                             published=1_800_000_000, lifetime_s=3600, reachability=reach)


def test_probe_classifies_through_introducers_which_have_the_alternate_port() -> None:
    from shallot.commands.probe import stun_servers
    public = [_desc(i, f"198.51.100.{i}") for i in range(1, 4)]
    other_nat = _desc(10, "203.0.113.10", (("192.0.2.7", 9000), ("192.0.2.8", 9000)))
    guard = _desc(11, "203.0.113.11", (("198.51.100.2", 9000), ("198.51.100.2", 9100)))
    relays = [*public, other_nat, guard]
    # the guard's first introducer, then the next candidate on another IP (here another NATed relay's)
    assert stun_servers(relays, guard) == (("198.51.100.2", 9000), ("192.0.2.7", 9000))
    lone = _desc(12, "203.0.113.12", (("198.51.100.3", 9000),))
    assert stun_servers([*public, lone], lone) == (("198.51.100.3", 9000), ("198.51.100.1", 9000))
    # nothing on two different IPs: no classification (the dial then tries to punch and may fall back)
    assert stun_servers([lone], lone) is None
