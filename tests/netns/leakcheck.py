"""Leak checks for the kill switch: probes that *routing* would let out of the client, and a packet capture
on the client's uplink that counts exactly those probes.

* ``PROBE`` (run in the client namespace; once, or in a loop with ``probing``, which adds a bound UDP
  probe every millisecond between rounds) sends, each with its own payload: UDP, TCP (SYNs) and ICMP echoes
  from sockets bound to the uplink with SO_BINDTODEVICE (so neither the split routes nor the TUN can
  catch them), UDP to the guard's address on a port the kill switch does not allow (the guard's /32 route
  goes via the uplink), and UDP with no binding at all (it leaves by the uplink only when the TUN and its
  split routes are gone).  It reports what each send got (``ok`` or the errno name: EPERM is the firewall).
* ``Capture`` runs tcpdump on the uplink into a pcap file and is known to be running before anything is
  counted: a canary from the NAT gateway *into* the client is sent until the capture shows it.  After the
  probes, another canary is the flush barrier (the probes left before it was sent, so once it is in the
  file, they are too).  No fixed sleeps.
* ``count`` matches the probes exactly: source = the client, and the UDP/ICMP payload carrying the probe's
  nonce, or a TCP SYN from one of the source ports the probe reports.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest

from tests.netns.testbed import StandardTopology

PROBE_UDP_PORT, PROBE_TCP_PORT, PROBE_GUARD_PORT, CANARY_PORT = 7791, 7793, 7792, 7795
ICMP_ID = 0x5348
KINDS = ("udp-bound", "tcp-bound", "icmp-bound", "guard-port", "udp-routed")
SENDS = 3  # of each kind

PROBE = r"""
import errno, json, os, socket, struct, sys, time
nonce, web, guard, dev = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
udp_port, tcp_port, guard_port, icmp_id, sends = (int(a) for a in sys.argv[5:10])
until = sys.argv[10] if len(sys.argv) > 10 else None  # keep sending rounds until this file exists
out = {"tcp_ports": [], "rounds": 0}

def result(kind, fn):
    try:
        fn()
        out.setdefault(kind, []).append("ok")
    except OSError as exc:
        out.setdefault(kind, []).append(errno.errorcode.get(exc.errno, str(exc.errno)))

def bound(kind, proto):
    s = socket.socket(socket.AF_INET, kind, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
    return s

def checksum(data):
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF

def one_round(i):
    with bound(socket.SOCK_DGRAM, 0) as s:
        result("udp-bound", lambda: s.sendto(f"{nonce} udp-bound {i}".encode(), (web, udp_port)))
    with bound(socket.SOCK_STREAM, 0) as s:
        s.bind(("0.0.0.0", 0))
        out["tcp_ports"].append(s.getsockname()[1])
        s.setblocking(False)
        def syn():
            code = s.connect_ex((web, tcp_port))  # the SYN leaves (or is refused) inside connect()
            if code not in (0, errno.EINPROGRESS):
                raise OSError(code, os.strerror(code))
        result("tcp-bound", syn)
    with bound(socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        payload = f"{nonce} icmp-bound {i}".encode()
        header = struct.pack("!BBHHH", 8, 0, 0, icmp_id, i)
        packet = struct.pack("!BBHHH", 8, 0, checksum(header + payload), icmp_id, i) + payload
        result("icmp-bound", lambda: s.sendto(packet, (web, 0)))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        result("guard-port", lambda: s.sendto(f"{nonce} guard-port {i}".encode(), (guard, guard_port)))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        result("udp-routed", lambda: s.sendto(f"{nonce} udp-routed {i}".encode(), (web, udp_port)))
    out["rounds"] += 1

i = 0
while True:
    for _ in range(sends):
        one_round(i)
        i += 1
    if until is None or os.path.exists(until):
        break
    if i == sends:
        open(until + ".started", "w").close()  # the first round is out
    # between full rounds, a bound UDP probe every millisecond: a window of a few ms would not go unseen
    with bound(socket.SOCK_DGRAM, 0) as s:
        for j in range(50):
            result("udp-bound", lambda: s.sendto(f"{nonce} udp-bound {i}.{j}".encode(), (web, udp_port)))
            time.sleep(0.001)
print(json.dumps(out))
"""

CANARY = r"""
import socket, sys
with socket.socket(socket.AF_INET6 if ":" in sys.argv[2] else socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.sendto(sys.argv[1].encode(), (sys.argv[2], int(sys.argv[3])))
"""


@dataclass(frozen=True)
class Packet:
    proto: int  # 1 ICMP, 6 TCP, 17 UDP, 58 ICMPv6
    src: str
    dst: str
    sport: int = 0
    dport: int = 0
    syn: bool = False
    icmp: tuple[int, int] = (0, 0)  # type, identifier
    payload: bytes = b""


def read_pcap(path: Path) -> list[Packet]:
    """IPv4 and IPv6 packets of a classic pcap file (tcpdump -w) on an Ethernet device; a record still being
    written at the end is left for the next read."""
    data = path.read_bytes() if path.exists() else b""
    if len(data) < 24:
        return []
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    packets, offset = [], 24
    while offset + 16 <= len(data):
        incl = struct.unpack(endian + "IIII", data[offset:offset + 16])[2]
        frame = data[offset + 16:offset + 16 + incl]
        if len(frame) < incl:
            break
        offset += 16 + incl
        packet = _ip(frame)
        if packet is not None:
            packets.append(packet)
    return packets


def _ip(frame: bytes) -> Packet | None:
    ip = frame[14:]
    if frame[12:14] == b"\x08\x00" and len(ip) >= 20:
        ihl, proto = (ip[0] & 0x0F) * 4, ip[9]
        src, dst = str(IPv4Address(ip[12:16])), str(IPv4Address(ip[16:20]))
        body = ip[ihl:struct.unpack("!H", ip[2:4])[0]]
    elif frame[12:14] == b"\x86\xdd" and len(ip) >= 40:  # no extension headers in these tests
        proto = ip[6]
        src, dst = str(IPv6Address(ip[8:24])), str(IPv6Address(ip[24:40]))
        body = ip[40:40 + struct.unpack("!H", ip[4:6])[0]]
    else:
        return None
    if proto == 17 and len(body) >= 8:
        sport, dport = struct.unpack("!HH", body[:4])
        return Packet(proto, src, dst, sport, dport, payload=body[8:])
    if proto == 6 and len(body) >= 14:
        sport, dport = struct.unpack("!HH", body[:4])
        flags = body[13]
        return Packet(proto, src, dst, sport, dport, syn=bool(flags & 0x02) and not flags & 0x10)
    if proto in (1, 58) and len(body) >= 8:
        return Packet(proto, src, dst, icmp=(body[0], struct.unpack("!H", body[4:6])[0]), payload=body[8:])
    return Packet(proto, src, dst)


@dataclass
class Probe:
    """One round of probes: what was sent, and what each send got."""

    nonce: str
    results: dict[str, list[str]]
    tcp_ports: list[int]
    rounds: int = 0

    def count(self, packets: list[Packet], client: str) -> dict[str, int]:
        """How many of this round's probes the capture saw leave the client, per kind."""
        counts = dict.fromkeys(KINDS, 0)
        for p in packets:
            if p.src != client:
                continue
            if p.proto == 6 and p.syn and p.dport == PROBE_TCP_PORT and p.sport in self.tcp_ports:
                counts["tcp-bound"] += 1
            elif p.proto == 1 and p.icmp == (8, ICMP_ID) and p.payload.startswith(f"{self.nonce} icmp-bound".encode()):
                counts["icmp-bound"] += 1
            elif p.proto == 17:
                for kind in ("udp-bound", "guard-port", "udp-routed"):
                    if p.payload.startswith(f"{self.nonce} {kind} ".encode()):
                        counts[kind] += 1
        return counts


@dataclass
class Capture:
    """tcpdump on the client's uplink (by default; ``at``/``iface``: another capture point), both directions,
    known to be running: canaries go from ``canary_from`` to ``canary_to`` (the NAT gateway into the client)
    across the capture point until one shows in the file."""

    topology: StandardTopology
    path: Path
    iface: str = "eth0"
    at: str = "client"
    canary_from: str = "natgw"
    canary_to: str = ""  # default: the client's address
    filter: str = "udp or tcp or icmp"
    proc: subprocess.Popen[bytes] | None = None
    seen: list[Packet] = field(default_factory=list)

    @property
    def client(self) -> str:
        return self.topology.addr["client"]

    def start(self, timeout: float = 15.0) -> Capture:
        ns = self.topology.ns[self.at]
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "tcpdump", "-i", self.iface, "-n", "-U", "-w",
                                      str(self.path), self.filter],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.barrier(timeout, what="the capture to start")
        return self

    def barrier(self, timeout: float = 15.0, *, what: str = "the capture to catch up") -> None:
        """Send canaries across the capture point until the capture holds one.  Everything the client sent
        before this call is then in the file too (it went out before the canary was even sent)."""
        token = f"canary {secrets.token_hex(8)}".encode()
        to = self.canary_to or self.client
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, "tcpdump exited"
            self.topology.tb.exec(self.topology.ns[self.canary_from], sys.executable, "-c", CANARY, token.decode(),
                                  to, str(CANARY_PORT))
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                if any(p.proto == 17 and p.dst == to and p.payload == token for p in read_pcap(self.path)):
                    return
                time.sleep(0.02)
        raise AssertionError(f"waited {timeout} s for {what}")

    def packets(self) -> list[Packet]:
        self.barrier()
        return read_pcap(self.path)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def _args(topology: StandardTopology, nonce: str, iface: str, sends: int) -> list[str]:
    return [nonce, topology.addr["web"], topology.addr["guard"], iface, str(PROBE_UDP_PORT), str(PROBE_TCP_PORT),
            str(PROBE_GUARD_PORT), str(ICMP_ID), str(sends)]


def _probe(nonce: str, stdout: str) -> Probe:
    out: dict[str, Any] = json.loads(stdout)
    return Probe(nonce, {k: v for k, v in out.items() if k in KINDS}, out["tcp_ports"], out["rounds"])


def probe(topology: StandardTopology, *, iface: str = "eth0") -> Probe:
    """Send one round of every probe (SENDS of each kind) from the client namespace."""
    nonce = f"probe-{secrets.token_hex(6)}"
    res = topology.tb.exec(topology.ns["client"], sys.executable, "-c", PROBE, *_args(topology, nonce, iface, SENDS),
                           timeout=30)
    return _probe(nonce, res.stdout)


@contextlib.contextmanager
def probing(topology: StandardTopology, workdir: Path, *, iface: str = "eth0") -> Iterator[list[Probe]]:
    """Probe rounds every 50 ms from the client namespace for as long as the ``with`` block runs (the
    first round has gone out when it starts); the list holds the finished Probe afterwards."""
    nonce = f"probe-{secrets.token_hex(6)}"
    stop = workdir / f"stop-{nonce}"
    proc = subprocess.Popen(["ip", "netns", "exec", topology.ns["client"], sys.executable, "-c", PROBE,
                             *_args(topology, nonce, iface, 1), str(stop)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    done: list[Probe] = []
    started = stop.with_name(stop.name + ".started")
    try:
        deadline = time.monotonic() + 15
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the prober did not start"
            time.sleep(0.02)
        yield done
    finally:
        stop.touch()
        out, err = proc.communicate(timeout=30)
        stop.unlink(missing_ok=True)
        started.unlink(missing_ok=True)
    assert proc.returncode == 0, err
    done.append(_probe(nonce, out))


REPORT: list[str] = []  # one line per counted round; shown_in_the_log prints them even under -q


def leaks(capture: Capture, topology: StandardTopology, label: str) -> dict[str, int]:
    """One round of probes, counted on the uplink; printed with what the sends got."""
    p = probe(topology)
    counts = p.count(capture.packets(), capture.client)
    sends = {k: ",".join(sorted(set(v))) for k, v in p.results.items()}
    REPORT.append(f"[{label}] probe packets on the uplink: {counts}  (sends: {sends})")
    return counts


@pytest.fixture
def shown_in_the_log(capsys: pytest.CaptureFixture[str]) -> Iterator[list[str]]:
    """The packet counts of a test, printed past pytest's capture (CI logs show them, pass or fail)."""
    REPORT.clear()
    yield REPORT
    with capsys.disabled():
        print("".join(f"\n    {line}" for line in REPORT))
    REPORT.clear()


def marker_file(topology: StandardTopology, role: str = "client") -> Path:
    """The kill switch's marker of a testbed namespace (core/vpn/killmark.py): /run is shared with the host,
    the namespace's inode is that of its /run/netns file."""
    from shallot.core.vpn.killmark import RUN_DIR
    return RUN_DIR / f"kill-switch.{Path('/run/netns', topology.ns[role]).stat().st_ino}"
