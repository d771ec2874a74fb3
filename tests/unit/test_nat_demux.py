"""The first-byte demux of the link socket (core/nat/demux.py, PROTOCOL §2.4): every byte value has one kind,
link packets reach the node with no NAT work in between, and no datagram makes the stack raise."""

from __future__ import annotations

from shallot.core.link import Address
from shallot.core.nat.demux import LINK_TYPES, NAT_FRAMES, Handler, Kind, kind_of, route_table
from shallot.core.wire import nat_frames as nm
from shallot.core.wire import stun
from shallot.crypto.params import MSG_INIT_CLIENT, MSG_INIT_RELAY, MSG_RESPONSE, MSG_TRANSPORT
from tests.simnet import SimNet
from tests.unit.helpers_nat import relay_stack

TXID = bytes(range(12))


def test_demux_never_confuses_stun_with_link_or_nat_packets() -> None:
    assert stun.is_stun(stun.binding_request(TXID))
    for first in (0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58):
        assert not stun.is_stun(bytes((first, 1)) + bytes(2) + stun.MAGIC_BYTES + bytes(12))


def test_every_first_byte_has_the_documented_kind() -> None:
    assert list(LINK_TYPES) == [MSG_INIT_CLIENT, MSG_INIT_RELAY, MSG_RESPONSE, MSG_TRANSPORT]
    assert list(LINK_TYPES) == [0x51, 0x52, 0x53, 0x54]
    assert NAT_FRAMES == {0x55: Kind.INTRO_REQUEST, 0x56: Kind.INTRO_ANSWER, 0x57: Kind.PUNCH, 0x58: Kind.RELAYED}
    for first in range(256):
        expected = (Kind.STUN if first < 0x40 else NAT_FRAMES[first] if first in NAT_FRAMES else Kind.LINK)
        assert kind_of(first) is expected, hex(first)


def test_route_table_hands_each_datagram_to_its_kind() -> None:
    seen: list[Kind] = []

    def recorder(kind: Kind) -> Handler:
        def handle(data: bytes, addr: Address, now: float, wall: float) -> None:
            seen.append(kind)
        return handle

    handlers = {kind: recorder(kind) for kind in Kind}
    table = route_table(handlers)
    assert len(table) == 256
    for first in LINK_TYPES:  # the data path: the node's own handler, nothing wrapped around it
        assert table[first] is handlers[Kind.LINK]
    for first, kind in NAT_FRAMES.items():
        assert table[first] is handlers[kind]
    cases = [(stun.binding_request(TXID), Kind.STUN), (bytes(20), Kind.LINK), (b"\x01\x01", Kind.LINK),
             (nm.encode_punch(nm.PUNCH_PROBE, bytes(8)), Kind.PUNCH), (b"\xff" * 30, Kind.LINK)]
    for data, kind in cases:
        seen.clear()
        table[data[0]](data, ("203.0.113.1", 1), 0.0, 0.0)
        assert seen == [kind], (data[:2], kind)


def test_garbage_on_the_link_socket_never_raises() -> None:
    net = SimNet()
    relay, _, _ = relay_stack(net, 1, serve=True)
    for data in (b"", b"\x00", b"\x55" * 40, b"\x56" * 37, b"\x57" * 12, b"\x58" * 30, bytes(20),
                 b"\x00\x01\x00\x04" + stun.MAGIC_BYTES + bytes(12)):  # STUN with a wrong length
        relay.receive_datagram(data, ("203.0.113.1", 1), net.now, net.wall)
    dropped = sum(v for k, v in relay.nat.counters.items() if k.startswith("nat_drop"))
    dropped += sum(v for k, v in relay.node.link.counters.items() if k.startswith("drop_"))
    assert dropped == 8
