"""No amplification (issue 12, docs/PROTOCOL.md §12.3, §13.1, §13.3): every unauthenticated request type is sent to
live relays on 127.0.0.1 — an introducer with its STUN ports and DHT socket, a second relay, and a relay that
registered with the introducer — and every byte that comes back because of it is counted, at the requester or
at the address the request named.  The table (payload bytes, and on the wire with 28 bytes of IPv4/UDP header
per datagram) is printed; every ratio, payload and wire, is at most 1.0.

The link handshake's answers are rows too: RESPONSE, and the COOKIE_REPLY of a relay under load (§4.12).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shallot.core.discovery import wire as dht_wire
from shallot.core.discovery.addresses import dht_address
from shallot.core.link import LinkConfig
from shallot.core.nat.limits import PUNCH_PROBES_UNANSWERED, PUNCH_TIMEOUT_S
from shallot.core.wire import nat_frames as nm
from shallot.core.wire import stun
from shallot.crypto import link_handshake as lh
from shallot.crypto.descriptor import Descriptor, encode_directory
from shallot.crypto.keys import RelayKeys
from shallot.relay import state as state_dir
from tests.integration.conftest import ProcGroup, relay_status, wait_until_sync

UDP_IP_HEADER = 28
Address = tuple[str, int]


@dataclass
class Row:
    name: str
    request: Callable[[Address], bytes]  # the requester's own address -> the datagram
    to: str  # "link", "alt", "dht": which socket of the introducer it goes to
    watch_other: bool = False  # the answer goes to another address (RESPONSE-DESTINATION): count it there
    settle_s: float = 0.4  # after the first answer, how long more datagrams may still come
    expect_answer: bool = True


def _initiation(link_pub: bytes) -> bytes:
    return lh.client_initiation(responder_link_pub=link_pub, sender_index=secrets.randbelow(1 << 32),
                                rng=secrets.token_bytes)[1]


def _initiation_under_load(link_pub: bytes, to: Address) -> bytes:
    """Puts the relay under load first (more than ``cookie_load_rate`` initiations with a valid mac1 in one
    second, from another socket whose answers are not counted), then gives the initiation to measure: the
    relay answers it with a COOKIE_REPLY (§4.12)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blast:
        for _ in range(LinkConfig.cookie_load_rate + 50):
            blast.sendto(_initiation(link_pub), to)
    return _initiation(link_pub)


def _free_triple() -> int:
    """A port p with p, p + 1 (DHT) and p + 2 (alternate STUN port) free on 127.0.0.1."""
    for _ in range(200):
        socks = []
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            p = s.getsockname()[1]
            if p > 65000:
                continue
            for off in (1, 2):
                t = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(t)
                t.bind(("127.0.0.1", p + off))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no three consecutive free UDP ports")


def _sock() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


def _drain(socks: list[socket.socket]) -> list[int]:
    got = []
    for s in socks:
        while True:
            try:
                got.append(len(s.recv(65536)))
            except BlockingIOError:
                break
    return got


def _measure(row: Row, target: Address) -> tuple[int, int, int, int]:
    """(bytes in, datagrams in, bytes out, datagrams out) for one request of ``row``."""
    requester, other = _sock(), _sock()
    try:
        me = requester.getsockname()
        data = row.request(other.getsockname() if row.watch_other else me)
        watched = [other] if row.watch_other else [requester]
        requester.sendto(data, target)
        sizes: list[int] = []
        deadline = time.monotonic() + (3.0 if row.expect_answer else 0.5)
        while not sizes and time.monotonic() < deadline:
            sizes += _drain(watched)
            time.sleep(0.01)
        quiet_until = time.monotonic() + row.settle_s
        while time.monotonic() < quiet_until:  # a measurement window, not a wait for an assertion
            sizes += _drain(watched)
            time.sleep(0.01)
        return len(data), 1, sum(sizes), len(sizes)
    finally:
        requester.close()
        other.close()


def _record(port: int) -> tuple[bytes, bytes]:
    keys = RelayKeys.generate(secrets.token_bytes, time.time())
    d = Descriptor.create(keys, nickname=f"amp{port}", addresses=(("127.0.0.1", port),), exit_node=False,
                          published=int(time.time()), lifetime_s=3600)
    return d.relay_id, d.encode()


def _dht(name: str, *args: object) -> bytes:
    return dht_wire.encode_request(os.urandom(dht_wire.MSG_ID_LEN), name, args)


def test_every_unauthenticated_answer_is_at_most_its_request(tmp_path: Path, procs: ProcGroup) -> None:
    p1, p2, p3 = _free_triple(), _free_triple(), _free_triple()
    states = [tmp_path / n for n in ("intro", "second", "natted")]
    descs = [state_dir.keygen(s, ("127.0.0.1", p), s.name, False) for s, p in zip(states, (p1, p2, p3), strict=True)]
    procs.start("relay", "--state", states[0], "--dht", "--stun-alt-port").wait_line("serving as a seed")
    seed = f"{descs[0].id_hex}@127.0.0.1:{p1}"
    procs.start("relay", "--state", states[1], "--bootstrap", seed, "--stun-alt-port").wait_line("dht on", timeout=60)
    introducers = tmp_path / "introducers"
    introducers.write_text(encode_directory(descs[:2]))
    procs.start("relay", "--state", states[2], "--introducers", introducers).wait_line("behind NAT", timeout=60)
    wait_until_sync(lambda: asyncio.run(relay_status(states[0]))["nat"]["registrations"] == 1, timeout=30,
                    what="the third relay's registration at the introducer")
    natted_id = descs[2].relay_id

    # records to page through: a full list_records page
    stored = [_record(40000 + 2 * i) for i in range(20)]
    dht_target = dht_address(("127.0.0.1", p1))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        for key, value in stored:
            s.sendto(_dht("store", None, key, value), dht_target)
            s.recv(4096)

    rows = [
        Row("STUN Binding", lambda me: stun.binding_request(os.urandom(12)), "link"),
        Row("STUN Binding, no FINGERPRINT", lambda me: stun.binding_request(os.urandom(12), fingerprint=False), "link"),
        Row("STUN Binding unpadded (RFC 5389 client)", lambda me: stun.binding_request(os.urandom(12), pad_to=0),
            "link", expect_answer=False),
        Row("STUN CHANGE-REQUEST(port)", lambda me: stun.binding_request(os.urandom(12), change_port=True), "link"),
        Row("STUN to the alternate port", lambda me: stun.binding_request(os.urandom(12)), "alt"),
        Row("STUN CHANGE-REQUEST(IP) via OTHER-RELAY", lambda me: stun.binding_request(
            os.urandom(12), change_ip=True, change_port=True, other_relay=("127.0.0.1", p2)), "link"),
        Row("STUN RESPONSE-DESTINATION (reflected)", lambda dest: stun.binding_request(
            os.urandom(12), response_destination=dest), "link", watch_other=True),
        Row("INTRO_REQUEST, unknown target", lambda me: nm.IntroRequest(os.urandom(8), os.urandom(20), 1, 1).encode(),
            "link"),
        Row("INTRO_REQUEST + registrant's PUNCH probes", lambda me: nm.IntroRequest(
            os.urandom(8), natted_id, 1, 1).encode(), "link", settle_s=PUNCH_TIMEOUT_S + 1.0),
        Row("PUNCH, unknown token", lambda me: nm.encode_punch(nm.PUNCH_PROBE, os.urandom(8)), "link",
            expect_answer=False),
        Row("DHT ping (client)", lambda me: _dht("ping", None, None), "dht"),
        Row("DHT ping (relay, unbound id)", lambda me: _dht("ping", os.urandom(20), None), "dht"),
        Row("DHT find_node", lambda me: _dht("find_node", None, os.urandom(20)), "dht"),
        Row("DHT find_value (held)", lambda me: _dht("find_value", None, descs[0].relay_id), "dht"),
        Row("DHT find_value (not held)", lambda me: _dht("find_value", None, os.urandom(20)), "dht"),
        Row("DHT store", lambda me: _dht("store", None, *_record(41000 + secrets.randbelow(9000) * 2)), "dht"),
        Row("DHT list_records (first page)", lambda me: _dht("list_records", None, None), "dht"),
        Row("DHT ping unpadded (old format)", lambda me: _dht("ping", None, None).rstrip(b"\0"), "dht",
            expect_answer=False),
        Row("link INIT_CLIENT (RESPONSE)", lambda me: _initiation(descs[0].link_pub), "link"),
        Row("link INIT_CLIENT under load (COOKIE_REPLY)",
            lambda me: _initiation_under_load(descs[0].link_pub, ("127.0.0.1", p1)), "link", settle_s=0.2),
    ]
    sockets = {"link": ("127.0.0.1", p1), "alt": ("127.0.0.1", p1 + 2), "dht": dht_target}
    table = []
    for row in rows:
        bin_, nin, bout, nout = _measure(row, sockets[row.to])
        wire_ratio = (bout + UDP_IP_HEADER * nout) / (bin_ + UDP_IP_HEADER * nin)
        table.append((row, bin_, bout, nout, bout / bin_, wire_ratio))
    lines = [f"{'request':45} {'in B':>6} {'out B':>6} {'dgrams':>6} {'ratio':>6} {'wire':>6}"]
    lines += [f"{r.name:45} {bi:6d} {bo:6d} {n:6d} {ratio:6.2f} {wr:6.2f}" for r, bi, bo, n, ratio, wr in table]
    print("\namplification (bytes out / bytes in, per request):\n" + "\n".join(lines))
    answered = {r.name for r, _, bo, *_ in table if bo}
    missing = [r.name for r in rows if r.expect_answer and r.name not in answered]
    assert not missing, f"no answer at all (the measurement would mean nothing): {missing}"
    over = [(r.name, ratio, wr) for r, _, _, _, ratio, wr in table if ratio > 1.0 or wr > 1.0]
    assert not over, f"amplification above 1.0: {over}\n" + "\n".join(lines)
    # the measurement saw what it should: a page of records near its budget, the registrant's probes
    by_name = {r.name: (bo, n, ratio) for r, _, bo, n, ratio, _ in table}
    assert by_name["DHT list_records (first page)"][2] > 0.5
    assert by_name["INTRO_REQUEST + registrant's PUNCH probes"][1] == PUNCH_PROBES_UNANSWERED + 1
    assert by_name["link INIT_CLIENT (RESPONSE)"][0] == lh.RESPONSE_LEN
    assert by_name["link INIT_CLIENT under load (COOKIE_REPLY)"][0] == lh.COOKIE_REPLY_LEN

