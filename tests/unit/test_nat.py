"""NAT traversal codecs and decisions without sockets: the STUN codec, the RFC 5780 classifier (core/nat/classify.py),
the punch/relay decision, the descriptor's reachability extension, the NAT message codecs, and the choice of
STUN servers for ``probe``.  The roles of core/nat have their own files (test_nat_<role>.py)."""

from __future__ import annotations

import pytest

from shallot.core.nat.classify import OPEN, Behaviour, NatProbe, NatType, Plan, classify, plan_link
from shallot.core.wire import nat_frames as nm
from shallot.core.wire import stun
from shallot.crypto.codec import DecodeError
from shallot.crypto.descriptor import FLAG_EXTENSIONS, Descriptor, DescriptorError, Reachability
from shallot.crypto.keys import RelayKeys
from tests.simnet import det_rng

EI, AD, APD = Behaviour.ENDPOINT_INDEPENDENT, Behaviour.ADDRESS_DEPENDENT, Behaviour.ADDRESS_AND_PORT_DEPENDENT
TXID = bytes(range(12))


# ---------------------------------------------------------------- STUN codec
def test_binding_request_layout_and_fingerprint() -> None:
    req = stun.binding_request(TXID, pad_to=0)
    assert len(req) == 28 and req[:2] == b"\x00\x01" and req[2:4] == b"\x00\x08"
    assert req[4:8] == bytes.fromhex("2112a442") and req[8:20] == TXID
    msg = stun.decode(req)
    assert msg.msg_type == stun.BINDING_REQUEST and msg.has_fingerprint
    bare = stun.binding_request(TXID, fingerprint=False, pad_to=0)
    assert len(bare) == 20 and not stun.decode(bare).attributes


def test_binding_requests_are_padded_to_the_longest_answer() -> None:
    # PADDING (private 0xC05C, comprehension-optional) before FINGERPRINT: 20 header + 4 + 20 zeros + 8
    req = stun.binding_request(TXID)
    assert len(req) == stun.MAX_RESPONSE_LEN == 52 and req[20:24] == bytes.fromhex("c05c0014")
    assert req[24:44] == bytes(20) and stun.decode(req).has_fingerprint
    assert len(stun.binding_request(TXID, fingerprint=False)) == 52
    # a request already long enough gets no padding
    long_req = stun.binding_request(TXID, change_ip=True, other_relay=("2001:db8::1", 9))
    assert len(long_req) == 20 + 8 + 24 + 8 and stun.decode(long_req).get(stun.ATTR_PADDING) is None


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
    assert len(req.encode()) == nm.INTRO_REQUEST_LEN == 280 and nm.IntroRequest.decode(req.encode()) == req
    with pytest.raises(DecodeError):  # the padding is zeros, to the last byte
        nm.IntroRequest.decode(req.encode()[:-1] + b"\x01")
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
