"""Live relays (child processes on 127.0.0.1) driven by an in-process CircuitClient: build cost counted at the
socket, what each relay knows, replay protection, tampering, fuzzing and clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from shallot.commands.probe import run_probe
from shallot.core.circuit import CircuitClosed, CircuitFailed, ClientCircuit, destroy_text
from shallot.core.discovery.directory import load_directory
from shallot.core.io.circuit_client import CircuitClient
from shallot.core.wire.cells import CMD_CREATE, CMD_DESTROY, DestroyReason
from shallot.crypto import link_handshake as lh
from shallot.crypto.descriptor import Descriptor, encode_directory
from shallot.crypto.params import LINK_PACKET_LEN, MAX_DATA_LEN
from shallot.relay import state as state_dir
from shallot.relay.localnet import LocalNetwork, free_udp_ports
from tests.integration.conftest import (
    ProcGroup,
    RunningNetwork,
    counter,
    relay_circuits,
    relay_status,
    wait_until,
)

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]

EVIL_RELAY = Path(__file__).with_name("evil_relay.py")


# ---------------------------------------------------------------------------------------------- helpers


class Client(CircuitClient):
    """CircuitClient that remembers its events."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []
        self.on_event = self.seen.append

    @property
    def addr(self) -> tuple[str, int]:
        """The client's UDP address as the guard sees it."""
        ep = self.endpoint
        assert ep is not None
        if hasattr(ep, "local_address"):
            port = ep.local_address[1]
        else:  # older endpoints wrap an asyncio transport
            port = ep.transport.get_extra_info("sockname")[1]
        return "127.0.0.1", port

    def record_sent(self, sink: Callable[[bytes, tuple[str, int]], None]) -> None:
        """Call ``sink(datagram, address)`` for every datagram the client's socket sends."""
        ep = self.endpoint
        assert ep is not None
        if hasattr(ep, "tap"):
            ep.tap = lambda data, addr: sink(bytes(data), tuple(addr))
            return
        transport = ep.transport  # older endpoints: wrap the asyncio transport's sendto
        original = transport.sendto

        def recording_sendto(data: bytes, addr: Any = None) -> None:
            sink(bytes(data), tuple(addr))
            original(data, addr)

        transport.sendto = recording_sendto

    def closed_event(self, circ: ClientCircuit) -> CircuitClosed | CircuitFailed | None:
        return next((e for e in self.seen if isinstance(e, CircuitClosed | CircuitFailed) and e.circuit is circ), None)


@contextlib.asynccontextmanager
async def open_client() -> AsyncIterator[Client]:
    client = Client()
    await client.start("127.0.0.1")
    try:
        yield client
    finally:
        for circ in list(client.node.circuits.values()):
            with contextlib.suppress(Exception):
                client.close_circuit(circ)
        client.close()


async def echo(client: CircuitClient, circ: ClientCircuit, data: bytes, timeout: float = 5.0) -> bytes:
    client.send(circ, data)
    return await asyncio.wait_for(client.inbox[circ.circuit_id].get(), timeout)


def addr_of(desc: Descriptor) -> tuple[str, int]:
    return desc.address[0], desc.address[1]


async def nothing_before_the_control(sock: socket.socket, relay: Descriptor, timeout: float = 15.0, *,
                                     cookies_for: int = 0) -> int:
    """A silence window with a positive control: after the packets under test, send a valid INIT_CLIENT (which
    the relay must answer) from the same socket; the first datagram back must be its RESPONSE.  The relay
    reads one socket's datagrams in order and answers in order, so a reply to anything sent earlier would
    have come first; the window closes on the control's answer, however slow the machine, instead of after a
    fixed time (in which a late reply is missed, a false pass).  The relay's per-IP handshake rate limit may
    refuse a control (fuzzing drains it): a fresh one goes out every 0.5 s.  A relay under load answers a
    control without mac2 with a COOKIE_REPLY (§4.12): the next control carries the cookie.  ``cookies_for``:
    how many initiations with a valid mac1 were under test; the relay may have answered each of those with a
    COOKIE_REPLY (49 bytes, less than the initiation) and with nothing else.  Returns the controls sent."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    ours: dict[int, lh.InitiatorState] = {}
    cookie: bytes | None = None
    cookies_seen = 0
    deadline = time.monotonic() + timeout
    while True:
        index = random.randrange(1, 2**32)
        state, init = lh.client_initiation(responder_link_pub=relay.link_pub, sender_index=index,
                                           rng=os.urandom, cookie=cookie)
        ours[index] = state
        sock.sendto(init, addr_of(relay))
        while True:
            try:
                data, _ = await asyncio.wait_for(loop.sock_recvfrom(sock, 65536), 0.5)
            except TimeoutError:
                if time.monotonic() > deadline:
                    pytest.fail("the relay never answered the control initiation: the silence before it shows nothing")
                break
            if len(data) == lh.COOKIE_REPLY_LEN and data[0] == 0x59:
                receiver = lh.cookie_reply_receiver(data)
                if receiver in ours:
                    cookie = lh.read_cookie_reply(responder_link_pub=relay.link_pub, state=ours[receiver],
                                                  packet=data)
                    break
                cookies_seen += 1
                assert cookies_seen <= cookies_for, f"a cookie reply to a packet under test ({cookies_seen})"
                continue
            is_ours = len(data) == lh.RESPONSE_LEN and data[0] == 0x53 and lh.response_receiver(data) in ours
            assert is_ours, f"the relay answered a packet under test: {data[:16].hex()}... ({len(data)} bytes)"
            return len(ours)


def addresses_in(entries: list[dict[str, Any]]) -> set[tuple[str, int]]:
    out = set()
    for e in entries:
        for key in ("previous", "next"):
            if e[key] is not None:
                out.add((e[key][0], e[key][1]))
    return out


def _entry_key(e: dict[str, Any]) -> str:
    return json.dumps(e, sort_keys=True)


def new_entries(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries in ``after`` that were not in ``before`` (a multiset difference)."""
    left = Counter(_entry_key(e) for e in before)
    out = []
    for e in after:
        k = _entry_key(e)
        if left[k]:
            left[k] -= 1
        else:
            out.append(e)
    return out


def with_prev(entries: list[dict[str, Any]], prev: tuple[str, int]) -> list[dict[str, Any]]:
    return [e for e in entries if tuple(e["previous"]) == prev]


def path_of(network: RunningNetwork) -> list[Descriptor]:
    return [network.non_exits[0], network.non_exits[1], network.exits[0]]


# ---------------------------------------------------------------------------------------------- build + echo


async def test_one_round_trip_build_and_intact_datagrams(network: RunningNetwork) -> None:
    path = path_of(network)
    rng = random.Random(1234)
    async with open_client() as client:
        # one datagram out (the CREATE) and one in (the CREATED), counted at the socket of a fresh client,
        # first try.  (The guard's keepalive that used to slip into the build now and then is pinned in memory,
        # with every relay timer running: tests/unit/test_circuit_sim.py.)
        circ = await client.build(path)
        assert client.build_datagrams[circ.circuit_id] == (1, 1)
        assert circ.build_s > 0

        sizes = [0, 1, 100, MAX_DATA_LEN - 1, MAX_DATA_LEN] + [rng.randint(0, MAX_DATA_LEN) for _ in range(200)]
        for n in sizes:
            data = os.urandom(n)
            got = await echo(client, circ, data)
            assert got == data, f"datagram of {n} bytes came back as {len(got)} different bytes"
        assert circ.sent == circ.received == len(sizes)
        with pytest.raises(ValueError):
            client.send(circ, bytes(MAX_DATA_LEN + 1))

        # a second circuit on the already-up guard link: still one datagram each way
        other = [path[0], network.non_exits[2], network.exits[1]]
        circ2 = await client.build(other)
        assert client.build_datagrams[circ2.circuit_id] == (1, 1)
        assert await echo(client, circ2, b"second circuit") == b"second circuit"
        assert await echo(client, circ, b"first still works") == b"first still works"


async def test_slow_build_is_still_one_datagram_each_way(network: RunningNetwork) -> None:
    pid = network.pids[path_of(network)[1].id_hex]
    async with open_client() as client:
        arrivals: list[int] = []
        receive = client.stack.receive_datagram  # what the socket feeds (the node sits behind the NAT demux)

        def recording_receive(data: bytes, addr: Any, now: float, wall: float) -> None:
            arrivals.append(len(data))
            receive(data, addr, now, wall)

        client.stack.receive_datagram = recording_receive  # type: ignore[method-assign]
        os.kill(pid, signal.SIGSTOP)  # the middle sits on the CREATE for a while (a slow, loaded relay)
        try:
            build = asyncio.ensure_future(client.build(path_of(network)))
            await asyncio.sleep(2.5)
        finally:
            os.kill(pid, signal.SIGCONT)
        circ = await build
        assert await echo(client, circ, b"slow but fine") == b"slow but fine"
        assert client.build_datagrams[circ.circuit_id] == (1, 1), f"datagrams in during the build: {arrivals}"


# ---------------------------------------------------------------------------------------------- neighbours


async def test_each_relay_knows_only_its_neighbours(network: RunningNetwork) -> None:
    guard, middle, exit_ = path = path_of(network)
    states = [network.state(d) for d in path]
    before = [await relay_circuits(s) for s in states]
    async with open_client() as client:
        circ = await client.build(path)
        assert await echo(client, circ, b"ping") == b"ping"
        after = [await relay_circuits(s) for s in states]
        g, m, e = (new_entries(b, a) for b, a in zip(before, after))
        assert len(g) == len(m) == len(e) == 1, (g, m, e)
        for entry in (g[0], m[0], e[0]):
            assert set(entry) == {"state", "previous", "next", "terminal"}, entry
            assert entry["state"] == "open"

        assert tuple(g[0]["previous"]) == client.addr
        assert tuple(g[0]["next"]) == addr_of(middle)
        assert g[0]["terminal"] is False
        assert tuple(m[0]["previous"]) == addr_of(guard)
        assert tuple(m[0]["next"]) == addr_of(exit_)
        assert m[0]["terminal"] is False
        assert tuple(e[0]["previous"]) == addr_of(middle)
        assert e[0]["next"] is None
        assert e[0]["terminal"] is True

        members = {"client": client.addr, "guard": addr_of(guard), "middle": addr_of(middle),
                   "exit": addr_of(exit_)}
        allowed = {"guard": {"client", "middle"}, "middle": {"guard", "exit"}, "exit": {"middle"}}
        for name, entries in (("guard", g), ("middle", m), ("exit", e)):
            seen = addresses_in(entries)
            for other, address in members.items():
                if other not in allowed[name]:
                    assert address not in seen, f"the {name} knows the {other}'s address"

        # closing the circuit removes it at every hop
        client.close_circuit(circ)

        async def gone() -> bool:
            now = [await relay_circuits(s) for s in states]
            return all(not new_entries(b, a) for b, a in zip(before, now))

        await wait_until(gone, 10, what="the closed circuit to disappear from every relay")


# ---------------------------------------------------------------------------------------------- replays


async def test_replayed_link_packets_are_dropped(network: RunningNetwork) -> None:
    guard, _, exit_ = path = path_of(network)
    async with open_client() as client:
        sent: list[tuple[bytes, tuple[str, int]]] = []
        client.record_sent(lambda data, addr: sent.append((data, addr)))
        circ = await client.build(path)
        mark = len(sent)
        assert await echo(client, circ, b"the original") == b"the original"
        data_packets = [p for p, a in sent[mark:] if p[0] == 0x54 and a == addr_of(guard)]
        assert len(data_packets) == 1 and len(data_packets[0]) == LINK_PACKET_LEN
        initiations = [p for p, a in sent if p[0] == 0x51]
        assert len(initiations) == 1

        g0, e0 = await relay_status(network.state(guard)), await relay_status(network.state(exit_))
        plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            plain.bind(("127.0.0.1", 0))
            for _ in range(3):
                plain.sendto(data_packets[0], addr_of(guard))
            plain.sendto(initiations[0], addr_of(guard))
            await nothing_before_the_control(plain, guard)
        finally:
            plain.close()
        g1, e1 = await relay_status(network.state(guard)), await relay_status(network.state(exit_))
        assert counter(g1, "link_drop_replay") - counter(g0, "link_drop_replay") == 3
        assert counter(g1, "link_drop_initiation_replay") - counter(g0, "link_drop_initiation_replay") == 1
        assert e1["echoed"] == e0["echoed"], "a replayed cell reached the exit's echo service"
        assert client.inbox[circ.circuit_id].empty()
        assert await echo(client, circ, b"still fine") == b"still fine"


def _client_cid() -> int:
    """A fresh circuit id from the client's half of the id space (the side that dialed sets the top bit)."""
    return random.randrange(1, 2**31) | 0x80000000


async def test_replayed_create_is_rejected(network: RunningNetwork) -> None:
    guard = path_of(network)[0]
    path = path_of(network)
    async with open_client() as client:
        creates: list[bytes] = []
        cells_in: list[bytes] = []
        link_layer = client.node.link
        send_cell, on_cell = link_layer.send_cell, link_layer.on_cell

        def recording_send_cell(link: Any, cell: bytes, now: float) -> None:
            if cell[4] == CMD_CREATE:
                creates.append(bytes(cell))
            send_cell(link, cell, now)

        def recording_on_cell(link: Any, cell: bytes) -> None:
            cells_in.append(bytes(cell))
            on_cell(link, cell)

        link_layer.send_cell = recording_send_cell  # type: ignore[method-assign]
        link_layer.on_cell = recording_on_cell
        circ = await client.build(path)
        assert len(creates) == 1
        g0 = await relay_status(network.state(guard))

        new_cid = _client_cid()
        replay = new_cid.to_bytes(4, "big") + creates[0][4:]
        assert circ.link is not None
        link_layer.send_cell(circ.link, replay, time.monotonic())
        assert client.endpoint is not None
        client.endpoint.poke()

        async def answered() -> bytes | None:
            return next((c for c in cells_in if int.from_bytes(c[:4], "big") == new_cid), None)

        answer = await wait_until(answered, 10, what="the guard's answer to the replayed CREATE")
        assert answer[4] == CMD_DESTROY
        assert answer[5] == DestroyReason.HOP_REJECTED
        g1 = await relay_status(network.state(guard))
        assert counter(g1, "reject_create_replay") - counter(g0, "reject_create_replay") == 1
        assert counter(g1, "circuit_extended") == counter(g0, "circuit_extended"), "the replay was forwarded"
        assert await echo(client, circ, b"original circuit unharmed") == b"original circuit unharmed"

        # the same CREATE replayed by somebody else, on another link to the guard: rejected as well
        async with open_client() as other:
            other_circ = await other.build([guard, network.non_exits[2], network.exits[1]])
            seen2: list[bytes] = []
            on_cell2 = other.node.link.on_cell
            other.node.link.on_cell = lambda link, cell: (seen2.append(bytes(cell)), on_cell2(link, cell))
            cid2 = _client_cid()
            assert other_circ.link is not None and other.endpoint is not None
            other.node.link.send_cell(other_circ.link, cid2.to_bytes(4, "big") + creates[0][4:], time.monotonic())
            other.endpoint.poke()

            async def answered2() -> bytes | None:
                return next((c for c in seen2 if int.from_bytes(c[:4], "big") == cid2), None)

            answer2 = await wait_until(answered2, 10, what="the guard's answer on the second link")
            assert answer2[4] == CMD_DESTROY and answer2[5] == DestroyReason.HOP_REJECTED
            g2 = await relay_status(network.state(guard))
            assert counter(g2, "reject_create_replay") - counter(g0, "reject_create_replay") == 2


async def test_a_create_replayed_after_the_relay_restarted_is_rejected(network: RunningNetwork, procs: ProcGroup,
                                                                       tmp_path: Path) -> None:
    """Review PoC A.4 with real processes: a CREATE recorded on its way to a relay is replayed after that
    relay restarted (SIGTERM, same state directory): the build replay cache saved in DIR/replay refuses it."""
    state = tmp_path / "victim"
    state_dir.keygen(state, ("127.0.0.1", free_udp_ports(1)[0]), "victim", False)
    victim = procs.start("relay", "--state", state, "--directory", network.directory)
    victim.wait_line("listening")
    _guard, middle, exit_ = path_of(network)
    path = [state_dir.read_descriptor(state), middle, exit_]
    async with open_client() as client:
        creates: list[bytes] = []
        send_cell = client.node.link.send_cell

        def recording_send_cell(link: Any, cell: bytes, now: float) -> None:
            if cell[4] == CMD_CREATE:
                creates.append(bytes(cell))
            send_cell(link, cell, now)

        client.node.link.send_cell = recording_send_cell  # type: ignore[method-assign]
        circ = await client.build(path)
        assert await echo(client, circ, b"before") == b"before" and len(creates) == 1
    victim.signal(signal.SIGTERM)
    assert victim.wait() == 0
    assert (state / "replay").stat().st_size > 8 + 32, "nothing saved in DIR/replay"
    victim = procs.start("relay", "--state", state, "--directory", network.directory)
    victim.wait_line("listening")
    path[0] = state_dir.read_descriptor(state)  # re-signed at start; same keys
    async with open_client() as client:
        cells_in: list[bytes] = []
        on_cell = client.node.link.on_cell
        client.node.link.on_cell = lambda link, cell: (cells_in.append(bytes(cell)), on_cell(link, cell))
        circ = await client.build(path)  # the restarted relay works, and gives us a link to it
        s0 = await relay_status(state)
        cid = _client_cid()
        assert circ.link is not None and client.endpoint is not None
        client.node.link.send_cell(circ.link, cid.to_bytes(4, "big") + creates[0][4:], time.monotonic())
        client.endpoint.poke()

        async def answered() -> bytes | None:
            return next((c for c in cells_in if int.from_bytes(c[:4], "big") == cid), None)

        answer = await wait_until(answered, 10, what="the restarted relay's answer to the replayed CREATE")
        assert answer[4] == CMD_DESTROY and answer[5] == DestroyReason.HOP_REJECTED
        s1 = await relay_status(state)
        assert counter(s1, "reject_create_replay") - counter(s0, "reject_create_replay") == 1
        assert counter(s1, "circuit_extended") == counter(s0, "circuit_extended"), "the replay was extended again"


# ---------------------------------------------------------------------------------------------- tampering


@contextlib.contextmanager
def listed(network: RunningNetwork, desc: Descriptor) -> Any:
    """``desc`` is in the network's directory file while the block runs: the relays' view (``--directory``),
    as a relay that published its descriptor.  An exit ends circuits only for previous hops in its view
    (docs/PROTOCOL.md §5.7); the file is restored after, so no other test's paths can pick a dead relay."""
    original = network.directory.read_text()
    network.directory.write_text(encode_directory([*load_directory(network.directory), desc]))
    try:
        yield
    finally:
        network.directory.write_text(original)


@pytest.mark.parametrize(("flip", "part"), [("forward", "body"), ("backward", "body"),
                                            ("forward", "header"), ("backward", "header")])
async def test_tampering_middle_is_detected(network: RunningNetwork, procs: ProcGroup, tmp_path: Path,
                                            flip: str, part: str) -> None:
    guard, exit_ = network.non_exits[1], network.exits[1]
    evil_state = tmp_path / "evil"
    state_dir.keygen(evil_state, ("127.0.0.1", free_udp_ports(1)[0]), "evil", False)
    evil = procs.start("--state", evil_state, "--flip", flip, "--nth", "3", "--part", part, script=EVIL_RELAY)
    evil.wait_line("listening")
    directory = tmp_path / "directory"
    directory.write_text(encode_directory([guard, state_dir.read_descriptor(evil_state), exit_]))
    relays = load_directory(directory)
    by_nick = {d.nickname: d for d in relays}
    path = [by_nick[guard.nickname], by_nick["evil"], by_nick[exit_.nickname]]
    g_state, e_state = network.state(guard), network.state(exit_)

    with listed(network, path[1]):
        await _tampered_circuit(network, client_path=path, evil=evil, evil_state=evil_state, g_state=g_state,
                                e_state=e_state, flip=flip)


async def _tampered_circuit(network: RunningNetwork, *, client_path: list[Descriptor], evil: Any, evil_state: Path,
                            g_state: Path, e_state: Path, flip: str) -> None:
    path = client_path
    async with open_client() as client:
        circ = await client.build(path)
        inbox = client.inbox[circ.circuit_id]  # the client drops its own reference once the circuit closes
        for i in range(2):  # the first two cells each way pass untouched
            assert await echo(client, circ, b"fine %d" % i) == b"fine %d" % i
        evil_addr = addr_of(path[1])
        assert with_prev(await relay_circuits(g_state), client.addr)
        assert len(await relay_circuits(evil_state)) == 1
        assert with_prev(await relay_circuits(e_state), evil_addr)
        e0 = await relay_status(e_state)

        client.send(circ, b"this one gets tampered with")

        async def closed() -> Any:
            return client.closed_event(circ)

        event = await wait_until(closed, 10, what="the client to see the circuit closed")
        assert circ.circuit_id not in client.node.circuits
        with pytest.raises(ValueError):
            client.send(circ, b"after the teardown")
        evil.wait_line(f"evil: flipped {flip} cell 3", timeout=5)

        async def everywhere_closed() -> bool:
            return (not with_prev(await relay_circuits(g_state), client.addr)
                    and not await relay_circuits(evil_state)
                    and not with_prev(await relay_circuits(e_state), evil_addr))

        await wait_until(everywhere_closed, 10, what="every relay to drop the tampered circuit")
        e1 = await relay_status(e_state)
        m1 = await relay_status(evil_state)
        exit_failures = counter(e1, "circuit_integrity_failure") - counter(e0, "circuit_integrity_failure")
        # the flip happens before the (otherwise honest) evil relay's own layer check: forward, that check is
        # the first honest one after the flip (like a tampering guard seen by an honest middle, §6.6)
        hop_failures = counter(m1, "hop_integrity_failure") + counter(m1, "hop_sequence_failure")
        assert exit_failures == 0
        if flip == "forward":
            assert hop_failures == 1 and client.node.counters["circuit_integrity_failure"] == 0
            assert event.reason == destroy_text(DestroyReason.DESTROYED), event.reason
        else:  # backward the relay cannot authenticate what the exit wrote: the client catches it, unless the
            # flip turned the exit's counter into a stale one, which the relay's window catches
            assert hop_failures + client.node.counters["circuit_integrity_failure"] == 1
            if hop_failures == 0:
                assert "integrity" in event.reason, event.reason
                assert counter(e1, "destroy_received_destroyed") - counter(e0, "destroy_received_destroyed") == 1
        assert inbox.empty(), "a tampered datagram was delivered"
        assert circ.circuit_id not in client.inbox  # and nothing of the closed circuit is kept
    assert "Traceback" not in evil.stderr()


@pytest.mark.parametrize(("role", "attack"), [("guard", "dup"), ("guard", "flip"), ("guard", "inject"),
                                              ("exit", "dup"), ("exit", "flip"), ("exit", "inject")])
async def test_an_evil_guard_or_exit_is_stopped_by_the_honest_middle(network: RunningNetwork, procs: ProcGroup,
                                                                     tmp_path: Path, role: str, attack: str) -> None:
    """Review H3: the guard spoils a cell it sends forward, or the exit one it sends backward (after their own
    honest layers).  Forward the honest middle tears down (counted); backward it tears down a duplicate, and
    turns a flipped or injected cell into unrelated bytes that the client refuses.  The client sees the end."""
    evil_state = tmp_path / "evil"
    state_dir.keygen(evil_state, ("127.0.0.1", free_udp_ports(1)[0]), "evil", role == "exit")
    direction = "forward" if role == "guard" else "backward"
    evil = procs.start("--state", evil_state, "--attack", attack, "--on", direction, "--nth", "3",
                       script=EVIL_RELAY)
    evil.wait_line("listening")
    evil_desc = state_dir.read_descriptor(evil_state)
    middle = network.non_exits[2]
    path = [evil_desc, middle, network.exits[1]] if role == "guard" else [network.non_exits[1], middle, evil_desc]
    directory = tmp_path / "directory"
    directory.write_text(encode_directory(path))
    relays = {d.nickname: d for d in load_directory(directory)}
    path = [relays[d.nickname] for d in path]
    m_state = network.state(middle)

    # the evil relay is in the relays' view, as a relay that published its descriptor: a relay extends only
    # to relays of its view (docs/PROTOCOL.md §5.7)
    with listed(network, relays["evil"]):
        async with open_client() as client:
            circ = await client.build(path)
            for i in range(2):  # cells 1 and 2 each way pass untouched
                assert await echo(client, circ, b"fine %d" % i) == b"fine %d" % i
            m0 = await relay_status(m_state)
            client.send(circ, b"the third cell")

            async def closed() -> Any:
                return client.closed_event(circ)

            event = await wait_until(closed, 10, what="the client to see the circuit closed")
            evil.wait_line(f"evil: {attack} {direction} cell 3", timeout=5)

            async def middle_dropped_it() -> bool:
                return not await relay_circuits(m_state)

            await wait_until(middle_dropped_it, 10, what="the middle to drop the circuit")
            m1 = await relay_status(m_state)

            def grew(name: str) -> int:
                return counter(m1, name) - counter(m0, name)

            middle_caught = grew("hop_integrity_failure") + grew("hop_sequence_failure")
            if role == "guard" or attack == "dup":
                assert middle_caught == 1, (grew("hop_integrity_failure"), grew("hop_sequence_failure"))
                assert grew("hop_sequence_failure" if attack == "dup" else "hop_integrity_failure") == 1
                assert client.node.counters["circuit_integrity_failure"] == 0
            else:  # an exit's own cell: only the client can check its content
                assert middle_caught == 0 and client.node.counters["circuit_integrity_failure"] == 1
                assert "integrity" in event.reason
            print(f"\nevil {role} {attack}: middle caught {middle_caught}, client: {event.reason!r}")
        assert "Traceback" not in evil.stderr()


# ---------------------------------------------------------------------------------------------- fuzzing


def _fuzz_datagrams(target: Descriptor, real: list[bytes], rng: random.Random) -> list[bytes]:
    def rnd(n: int) -> bytes:
        return rng.randbytes(n)

    out: list[bytes] = [b""] * 50
    out += [rnd(rng.randint(0, 3000)) for _ in range(1200)]
    right = {0x51: lh.INIT_CLIENT_LEN, 0x52: lh.INIT_RELAY_LEN, 0x53: lh.RESPONSE_LEN, 0x54: LINK_PACKET_LEN}
    assert right == {0x51: 110, 0x52: 246, 0x53: 57, 0x54: 1429}
    for kind, length in right.items():
        out += [bytes((kind,)) + rnd(length - 1) for _ in range(150)]  # right length, random content
        out += [bytes((kind,)) + rnd(rng.randint(0, length - 2)) for _ in range(75)]  # truncated
        out += [bytes((kind,)) + rnd(rng.randint(length, 3000)) for _ in range(75)]  # oversized
    for kind, length, n in ((0x51, lh.INIT_CLIENT_LEN, 200), (0x52, lh.INIT_RELAY_LEN, 100)):
        for i in range(n):  # random initiations with a valid mac1: they reach the Noise decoder
            body = bytes((kind, 1 if i % 2 else rng.randrange(256))) + rnd(length - 2 - 32)
            out.append(body + lh.mac1(target.link_pub, body) + rnd(16))  # mac1 | a random mac2
    for _ in range(300):  # mutated copies of real packets of a live link (right index, broken rest)
        p = bytearray(rng.choice(real))
        choice = rng.randrange(3)
        if choice == 0:
            for _ in range(rng.randint(1, 4)):
                p[rng.randrange(5, len(p))] ^= 1 << rng.randrange(8)
        elif choice == 1:
            p = p[:rng.randrange(1, len(p))]
        else:
            p += rnd(rng.randint(1, 1000))
        out.append(bytes(p))
    rng.shuffle(out)
    return out


async def _send_gso_trains(sock: socket.socket, addr: tuple[str, int], rng: random.Random) -> int:
    """Trains of equal-size garbage datagrams in one UDP_SEGMENT send, so a relay that reads with UDP_GRO
    gets them coalesced.  Returns how many datagrams went out (0 if the kernel has no GSO)."""
    sent = 0
    for _ in range(30):
        seg = rng.choice([lh.RESPONSE_LEN, lh.INIT_CLIENT_LEN, lh.INIT_RELAY_LEN, LINK_PACKET_LEN,
                          rng.randint(2, 1472)])
        n = rng.randint(2, min(40, 60000 // seg))
        kind = rng.choice([0x51, 0x52, 0x53, 0x54, rng.randrange(256)])
        payload = b"".join(bytes((kind,)) + rng.randbytes(seg - 1) for _ in range(n))
        tail = rng.random() < 0.5
        if tail:  # a shorter last segment
            payload += bytes((kind,)) + rng.randbytes(rng.randint(0, seg - 2))
        try:
            sock.sendmsg([payload], [(socket.SOL_UDP, 103, struct.pack("=H", seg))], 0, addr)  # UDP_SEGMENT
        except BlockingIOError:
            await asyncio.sleep(0.01)
            continue
        except OSError:
            return sent  # no GSO here
        sent += n + tail
        await asyncio.sleep(0.002)
    return sent


def _drops(status: dict[str, Any]) -> int:
    return sum(v for k, v in status["counters"].items() if k.startswith("link_drop_"))


async def _caught_up(state: Path, s0: dict[str, Any], sent: int, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while _drops(await relay_status(state)) - _drops(s0) < sent * 0.95 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def test_a_relays_control_socket_answers_deep_json_and_goes_on(network: RunningNetwork) -> None:
    state = next(iter(network.states.values()))
    reader, writer = await asyncio.open_unix_connection(str(state / state_dir.CONTROL_SOCKET))
    try:
        assert json.loads(await asyncio.wait_for(reader.readline(), 5))["role"] in ("relay", "exit")
        for line in (b'{"id": 1, "cmd": "status", "args": {"x": ' + b"[" * 30_000 + b"\n",
                     b"x" * 100_000 + b'{"id": 9, "cmd": "status"}\n'):
            writer.write(line)
            await writer.drain()
            bad = json.loads(await asyncio.wait_for(reader.readline(), 5))
            assert bad["ok"] is False and bad["error"]["kind"] == "bad-request", bad
        writer.write(b'{"id": 2, "cmd": "status"}\n')
        await writer.drain()
        good = json.loads(await asyncio.wait_for(reader.readline(), 5))
        assert good["id"] == 2 and good["ok"] is True  # the same connection, and no answer to the tail (id 9)
    finally:
        writer.close()


async def test_fuzzing_a_live_relay(network: RunningNetwork) -> None:
    target = network.non_exits[3]
    path = [target, network.non_exits[0], network.exits[0]]
    state = network.state(target)
    rng = random.Random(20240601)
    async with open_client() as client:
        real: list[bytes] = []
        client.record_sent(lambda data, addr: real.append(data) if data[0] == 0x54 and addr == addr_of(target)
                           else None)
        circ = await client.build(path)
        for i in range(5):
            assert await echo(client, circ, b"before %d" % i) == b"before %d" % i
        assert real

        datagrams = _fuzz_datagrams(target, real, rng)
        assert len(datagrams) >= 3000
        s0 = await relay_status(state)
        plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            plain.bind(("127.0.0.1", 0))
            plain.setblocking(False)
            for i, d in enumerate(datagrams):
                plain.sendto(d, addr_of(target))
                if i % 50 == 49:  # pace a little so the relay, not the kernel, drops them
                    await asyncio.sleep(0.002)
                if i % 500 == 499:  # and let a slow (loaded) relay catch up now and then
                    await _caught_up(state, s0, i + 1)
            total = len(datagrams) + await _send_gso_trains(plain, addr_of(target), rng)
            # under load (§4.12) the relay may answer the 300 initiations with a valid mac1 with cookie replies
            controls = await nothing_before_the_control(plain, target, cookies_for=300)
        finally:
            plain.close()

        assert network.alive(target), "the fuzzed relay died"
        s1 = await relay_status(state)
        delta = {k: counter(s1, k) - counter(s0, k) for k in s1["counters"]}
        drops = {k: v for k, v in delta.items() if k.startswith("link_drop_") and v}
        for name in ("link_drop_empty", "link_drop_unknown_type", "link_drop_bad_length", "link_drop_bad_mac1",
                     "link_drop_unknown_index", "link_drop_bad_tag"):
            assert delta.get(name, 0) > 0, f"{name} did not increase: {drops}"
        assert delta.get("link_drop_bad_initiation", 0) + delta.get("link_drop_handshake_rate", 0) > 0, drops
        assert sum(drops.values()) >= total // 2, (total, drops)
        assert 1 <= delta.get("link_handshake_responded", 0) <= controls, "the relay answered a fuzzed initiation"

        # the circuit that was open during the fuzzing still works, and so does a fresh one
        for i in range(5):
            assert await echo(client, circ, b"after %d" % i) == b"after %d" % i
    result = await run_probe(network.descriptors, path, count=20)
    assert result["sent"] == result["echoed"] == 20
    logs = "".join(network.output.get(target.id_hex, []))
    assert "Traceback" not in logs and "ERROR" not in logs, logs[-3000:]


# ---------------------------------------------------------------------------------------------- clean stop


async def test_sigterm_stops_every_relay_cleanly(tmp_path: Path) -> None:
    net = LocalNetwork(tmp_path, 6, 2)
    net.create()
    try:
        await net.start()
        relays = load_directory(net.directory)
        result = await run_probe(relays, [relays[0], relays[1], relays[-1]], count=3)
        assert result["echoed"] == 3
        socks = [s / state_dir.CONTROL_SOCKET for s in net.states]
        assert all(s.exists() for s in socks)
        procs = list(net.procs)
        codes = await net.stop()  # SIGTERM each, then wait
        assert codes == [0] * 6
        for s in socks:
            assert not s.exists(), f"{s} left behind"
        for proc in procs:
            assert proc.stderr is not None
            err = await proc.stderr.read()
            assert b"Traceback" not in err, err.decode(errors="replace")
    finally:
        await net.stop()
