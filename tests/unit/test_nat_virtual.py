"""Relayed links (core/nat/virtual.py): the virtual address, framing datagrams for the relay-server, the direct
probe that upgrades a relayed link."""

from __future__ import annotations

from collections import Counter

from shallot.core.link import Address, Link, LinkState, PeerKind, Session
from shallot.core.nat.virtual import (
    RelayedPaths,
    is_virtual,
    probe_direct,
    session_of,
    virtual_address,
)
from shallot.core.wire import nat_frames as nm
from shallot.crypto.link_handshake import TransportKeys

SERVER: Address = ("198.51.100.1", 9000)


def test_a_virtual_address_is_port_zero_and_names_its_session() -> None:
    session = bytes(range(8))
    addr = virtual_address(session)
    assert addr == ("via-0001020304050607", 0) and is_virtual(addr) and session_of(addr) == session
    assert not is_virtual(("203.0.113.1", 9000))


def test_datagrams_for_a_known_session_leave_as_relayed_to_its_server() -> None:
    paths = RelayedPaths()
    assert not paths
    known, unknown = b"K" * 8, b"U" * 8
    paths.add(known, SERVER)
    assert paths and paths.server_for(known) == SERVER and paths.server_for(unknown) is None
    packet = b"\x54" + bytes(40)
    out = [(packet, virtual_address(known)), (packet, ("203.0.113.9", 1)), (packet, virtual_address(unknown))]
    paths.frame(out)
    assert out[0] == (b"\x58" + known + packet, SERVER) and nm.relayed_session(out[0][0]) == known
    assert out[1] == (packet, ("203.0.113.9", 1))  # a real address: untouched
    assert out[2] == (packet, virtual_address(unknown))  # a session we do not know: left as it is


def test_the_direct_probe_is_one_authenticated_keepalive() -> None:
    keys = TransportKeys(send=bytes(32), recv=bytes(32), resume=bytes(16))
    link = Link(1, virtual_address(b"K" * 8), PeerKind.RELAY, True, state=LinkState.UP,
                session=Session(keys, 1, 2, 0.0, 0))
    sent: list[tuple[bytes, Address]] = []
    counters: Counter[str] = Counter()
    probe_direct(link, ("203.0.113.9", 7), 5.0, lambda d, a: sent.append((d, a)), counters)
    (data, addr), = sent
    assert addr == ("203.0.113.9", 7) and data[0] == 0x54 and link.last_send == 5.0
    assert counters["nat_upgrade_probe"] == 1
