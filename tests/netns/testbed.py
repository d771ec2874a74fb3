"""A scriptable testbed of Linux network namespaces (docs/TESTBED.md).

Every namespace is named ``shtb<pid>-<role>`` after the process that made it, recorded, and removed by
``close()`` (which a fixture always calls); ``remove_stale()`` clears namespaces of dead test
processes.  Traffic stays inside these namespaces: nothing here touches the root namespace's routes
or firewall.

Standard topology (``StandardTopology``)::

    client 10.10.0.2 ── natgw 10.10.0.1 | 203.0.113.10 ──┐
                                                        │  "internet": bridge br0 in ns "inet"
    guard 192.0.2.21, middle 198.51.100.22, exit 203.0.113.23, web 198.51.100.80
                                           exit 10.99.0.1 ── lan 10.99.0.10   (the exit's private network)

The "internet" hosts sit in the three documentation networks (192.0.2/24, 198.51.100/24, 203.0.113/24),
so guard, middle and exit are in different /16s as path selection demands; one flat bridge with
on-link routes joins them.

natgw masquerades the client (nftables, endpoint-independent mapping as Linux does by default).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX_RE = re.compile(r"^shtb(\d+)-")


SHALLOT_RUN = Path("/run/shallot")  # kill-switch markers and DNS backups, per namespace inode
NETNS_ETC = Path("/etc/netns")
TESTBED_RESOLV_MARK = "# the testbed's resolv.conf for this namespace (its original)"


class TestbedError(RuntimeError):
    pass


def available() -> str | None:
    """None if namespaces can be made here, else the reason they cannot."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"the '{tool}' command is missing (apt-get install iproute2 nftables)"
    return None


def _sh(argv: Sequence[str], *, check: bool = True, timeout: float = 20,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=stdin)
    if check and res.returncode != 0:
        raise TestbedError(f"{' '.join(argv)} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res


_unread: dict[int, bytes] = {}  # per process: output read from its pipe but not yet returned as a line


def wait_for_line(proc: subprocess.Popen[str], word: str, timeout: float = 20) -> str:
    """Read ``proc``'s stdout until a line contains ``word``; TestbedError if it exits or times out first.

    Reads the pipe's file descriptor directly and keeps what follows the line for the next call: two lines
    that arrive together (e.g. "listening" and "dht on") must not hide the second in a buffer select() cannot
    see."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    while True:
        buf = _unread.get(proc.pid, b"")
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            _unread[proc.pid] = buf
            if word in line.decode(errors="replace"):
                return line.decode(errors="replace") + "\n"
        if time.monotonic() >= deadline:
            raise TestbedError(f"no {word!r} line within {timeout} s")
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 65536)
            if chunk:
                _unread[proc.pid] = buf + chunk
                continue
        if proc.poll() is not None and not ready:
            err = proc.stderr.read() if proc.stderr else ""
            raise TestbedError(f"process exited ({proc.returncode}) before printing {word!r}: {err}")
        if ready and not chunk:  # end of file: the process closed its output (it is exiting)
            proc.wait(5)
            err = proc.stderr.read() if proc.stderr else ""
            raise TestbedError(f"process exited ({proc.returncode}) before printing {word!r}: {err}")


def require_testbed() -> None:
    """For fixtures: skip with the reason on a machine that cannot make namespaces, fail instead when
    CI=true (CI runs as root and must run these tests); then clear what killed runs left."""
    import pytest

    reason = available()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"netns tests must run in CI: {reason}")
        pytest.skip(reason)
    remove_stale()


def remove_stale() -> list[str]:
    """Delete testbed namespaces whose creating process is gone (a test run that was killed)."""
    removed = []
    for line in _sh(["ip", "netns", "list"], check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = PREFIX_RE.match(name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _sh(["ip", "netns", "del", name], check=False)
            removed.append(name)
    for etc in NETNS_ETC.glob("shtb*-*") if NETNS_ETC.is_dir() else []:
        m = PREFIX_RE.match(etc.name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            shutil.rmtree(etc, ignore_errors=True)
    return removed


@dataclass
class Testbed:
    __test__ = False  # not a test class, whatever pytest thinks of the name
    prefix: str = field(default_factory=lambda: f"shtb{os.getpid()}")
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    _veths: int = 0

    def name(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def add_ns(self, role: str) -> str:
        ns = self.name(role)
        _sh(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        # `ip netns exec` bind-mounts /etc/netns/NS/resolv.conf over /etc/resolv.conf: every namespace gets
        # its own, so a client under test that rewrites its DNS settings can never touch the host's
        etc = NETNS_ETC / ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"{TESTBED_RESOLV_MARK}\nnameserver 192.0.2.53\n")
        self.ip(ns, "link", "set", "lo", "up")
        return ns

    def exec(self, ns: str, *argv: str, check: bool = True, timeout: float = 20,
             stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return _sh(["ip", "netns", "exec", ns, *argv], check=check, timeout=timeout, stdin=stdin)

    def ip(self, ns: str, *args: str) -> None:
        self.exec(ns, "ip", *args)

    def veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        self._veths += 1  # temporary names in the root namespace: unique per process and call, <= 15 chars
        tag = f"tb{os.getpid() % 100000}{self._veths}"
        tmp_a, tmp_b = f"{tag}a", f"{tag}b"
        _sh(["ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b])
        try:
            _sh(["ip", "link", "set", tmp_a, "netns", ns_a, "name", if_a])
            _sh(["ip", "link", "set", tmp_b, "netns", ns_b, "name", if_b])
        except TestbedError:
            _sh(["ip", "link", "del", tmp_a], check=False)  # never leave a veth in the root namespace
            raise
        self.ip(ns_a, "link", "set", if_a, "up")
        self.ip(ns_b, "link", "set", if_b, "up")

    def address(self, ns: str, ifname: str, cidr: str) -> None:
        self.ip(ns, "addr", "add", cidr, "dev", ifname)

    def forwarding(self, ns: str) -> None:
        self.exec(ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")

    def masquerade(self, ns: str, out_if: str) -> None:
        rules = (f"table ip testbed_nat {{\n chain wan_out {{\n  type nat hook postrouting priority srcnat;\n"
                 f'  oifname "{out_if}" masquerade\n }}\n}}\n')
        self.exec(ns, "nft", "-f", "-", stdin=rules)

    def nat_router(self, ns: str, wan: str, lan: str, host: str, kind: str) -> None:
        """Make ``ns`` a NAT router of one RFC 4787 kind for the single host ``host`` behind ``lan``:

        * ``apdf`` endpoint-independent mapping, address-and-port-dependent filtering ("port-restricted
          cone": plain masquerade, Linux conntrack's own behaviour);
        * ``adf``  endpoint-independent mapping, address-dependent filtering ("restricted cone"): an
          inbound packet from a remote IP the host has sent to from that port is let in from any port;
        * ``eif``  endpoint-independent mapping and filtering ("full cone"): once the host has sent from a
          port, anyone may send to it;
        * ``edm``  endpoint-dependent mapping ("symmetric"): masquerade with fully random ports, so each
          destination sees another public port; filtering as conntrack (address and port).

        Masquerade keeps the host's source port when it can, which gives the stable (endpoint-independent)
        mapping; the sets remember, for 120 s, which host ports (and remote IPs) sent out, and the dnat
        rules let matching unsolicited packets in.  Every NAT drops unsolicited packets addressed to the
        router itself *before* conntrack confirms them: otherwise such a packet would leave a conntrack
        entry that makes masquerade pick another port for the host's next flow to that remote (the
        effect noted in ../shared/DEPENDENCIES.md), which real routers avoid with a firewall on input."""
        if kind not in ("apdf", "adf", "eif", "edm"):
            raise TestbedError(f"unknown NAT kind {kind}")
        sets, fwd, pre = "", "", ""
        if kind == "eif":
            sets = "  set seen { type inet_service; flags timeout; timeout 120s; }\n"
            fwd = f'  iifname "{lan}" meta l4proto udp update @seen {{ udp sport }}\n'
            pre = f'  iifname "{wan}" udp dport @seen dnat to {host}\n'
        elif kind == "adf":
            sets = "  set seen { type ipv4_addr . inet_service; flags timeout; timeout 120s; }\n"
            fwd = f'  iifname "{lan}" meta l4proto udp update @seen {{ ip daddr . udp sport }}\n'
            pre = f'  iifname "{wan}" meta l4proto udp ip saddr . udp dport @seen dnat to {host}\n'
        masq = "masquerade fully-random" if kind == "edm" else "masquerade"
        rules = (f"table ip testbed_nat {{\n{sets}"
                 f" chain lan_out {{\n  type filter hook forward priority filter; policy accept;\n{fwd} }}\n"
                 f" chain wan_in {{\n  type nat hook prerouting priority dstnat;\n{pre} }}\n"
                 f" chain wan_out {{\n  type nat hook postrouting priority srcnat;\n  oifname \"{wan}\" {masq}\n }}\n"
                 f" chain to_router {{\n  type filter hook input priority filter; policy accept;\n"
                 f'  iifname "{wan}" ct state new drop\n }}\n}}\n')
        self.exec(ns, "nft", "-f", "-", stdin=rules)

    def spawn(self, ns: str, argv: Sequence[str], *, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        """Stop every process we started (by PID), then delete every namespace (which removes their
        veths, bridges, routes and nftables tables with them)."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self.procs.clear()
        for ns in reversed(self.namespaces):
            inode = _netns_inode(ns)
            _sh(["ip", "netns", "del", ns], check=False)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
            if inode:  # a kill switch a test left in force here leaves its marker and DNS backup, named by inode
                for left in SHALLOT_RUN.glob(f"*.{inode}*") if SHALLOT_RUN.is_dir() else []:
                    left.unlink(missing_ok=True)
        self.namespaces.clear()


def _netns_inode(ns: str) -> int:
    """The namespace's inode, as the product names its kill-switch marker (core/vpn/killmark.py)."""
    try:
        return os.stat(f"/run/netns/{ns}").st_ino
    except OSError:
        return 0


@dataclass
class StandardTopology:
    """The namespaces and addresses of the standard testbed (see the module docstring)."""

    tb: Testbed
    ns: dict[str, str] = field(default_factory=dict)
    internet: tuple[str, ...] = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
    addr: dict[str, str] = field(default_factory=lambda: {
        "client": "10.10.0.2", "natgw_inside": "10.10.0.1", "natgw": "203.0.113.10",
        "guard": "192.0.2.21", "middle": "198.51.100.22", "exit": "203.0.113.23", "web": "198.51.100.80",
        "exit_lan": "10.99.0.1", "lan": "10.99.0.10"})

    def build(self) -> StandardTopology:
        tb, a = self.tb, self.addr
        inet = self.ns["inet"] = tb.add_ns("inet")
        tb.ip(inet, "link", "add", "br0", "type", "bridge")
        tb.ip(inet, "link", "set", "br0", "up")
        for i, role in enumerate(("natgw", "guard", "middle", "exit", "web")):
            ns = self.ns[role] = tb.add_ns(role)
            port = f"p{i}"
            tb.veth(ns, "eth0", inet, port)
            tb.ip(inet, "link", "set", port, "master", "br0")
            tb.address(ns, "eth0", f"{a[role]}/24")
            for net in self.internet:  # the other documentation networks are on the same wire
                tb.exec(ns, "ip", "route", "replace", net, "dev", "eth0")
        client = self.ns["client"] = tb.add_ns("client")
        tb.veth(client, "eth0", self.ns["natgw"], "lan0")
        tb.address(client, "eth0", f"{a['client']}/24")
        tb.address(self.ns["natgw"], "lan0", f"{a['natgw_inside']}/24")
        tb.ip(client, "route", "add", "default", "via", a["natgw_inside"])
        tb.forwarding(self.ns["natgw"])
        tb.masquerade(self.ns["natgw"], "eth0")
        lan = self.ns["lan"] = tb.add_ns("lan")
        tb.veth(self.ns["exit"], "lan0", lan, "eth0")
        tb.address(self.ns["exit"], "lan0", f"{a['exit_lan']}/24")
        tb.address(lan, "eth0", f"{a['lan']}/24")
        tb.ip(lan, "route", "add", "default", "via", a["exit_lan"])
        return self


NAT_KINDS = ("apdf", "adf", "eif", "edm")


@dataclass
class NatTopology:
    """Four public relays on the "internet" bridge, each in its own /16, and, for every NAT kind, two NAT
    routers with one host behind each (an "s" side for relays, a "c" side for dialers), so every ordered
    pair of kinds, including a kind with itself, has two distinct NATs::

        intro 192.0.2.31, intro2 198.19.0.34   the introducers, with a STUN alternate port
        mid 198.18.0.33 (relay), exit 198.51.100.32 (exit)
        <kind><side>gw  203.0.113.(40+i) | 10.0.i.1  ──  <kind><side>  10.0.i.2

    An introducer is in the entry position (core/circuit/entry.py): a path through a relay behind a NAT
    takes its middle and exit from relays that are not its introducers, hence four public relays.
    """

    tb: Testbed
    ns: dict[str, str] = field(default_factory=dict)
    addr: dict[str, str] = field(default_factory=lambda: {"intro": "192.0.2.31", "exit": "198.51.100.32",
                                                          "mid": "198.18.0.33", "intro2": "198.19.0.34"})
    publics: tuple[str, ...] = ("intro", "exit", "mid", "intro2")
    extra_nets: tuple[str, ...] = ("198.18.0.0/24", "198.19.0.0/24")

    def build(self) -> NatTopology:
        tb = self.tb
        inet = self.ns["inet"] = tb.add_ns("inet")
        tb.ip(inet, "link", "add", "br0", "type", "bridge")
        tb.ip(inet, "link", "set", "br0", "up")
        wan_hosts = [*self.publics] + [f"{k}{side}gw" for k in NAT_KINDS for side in "sc"]
        for i, role in enumerate(wan_hosts):
            ns = self.ns[role] = tb.add_ns(role)
            port = f"p{i}"
            tb.veth(ns, "eth0", inet, port)
            tb.ip(inet, "link", "set", port, "master", "br0")
            if role not in self.addr:
                self.addr[role] = f"203.0.113.{40 + i}"
            tb.address(ns, "eth0", f"{self.addr[role]}/24")
            for net in (*StandardTopology.internet, *self.extra_nets):
                tb.exec(ns, "ip", "route", "replace", net, "dev", "eth0")
        for i, role in enumerate(wan_hosts[len(self.publics):], start=1):
            host_role = role[:-2]
            gw, host = self.ns[role], tb.add_ns(host_role)
            self.ns[host_role] = host
            tb.veth(host, "eth0", gw, "lan0")
            self.addr[host_role] = f"10.0.{i}.2"
            tb.address(host, "eth0", f"10.0.{i}.2/24")
            tb.address(gw, "lan0", f"10.0.{i}.1/24")
            tb.ip(host, "route", "add", "default", "via", f"10.0.{i}.1")
            tb.forwarding(gw)
            tb.nat_router(gw, "eth0", "lan0", f"10.0.{i}.2", host_role[:-1])
        return self


@dataclass
class DiscoveryNatTopology:
    """A network for discovery and NAT traversal together (docs/TESTBED.md)::

        pub<i>   one namespace per /16 (NETS[i]), relays on <net>.11, <net>.12, ... (one IP per relay)
                 plus spare addresses <net>.20 (latecomers) and 198.19.0.30 (the exit, in pub4)
        nat<i>gw <NETS[i % 4]>.(41+i) | 10.0.(i+1).1  ──  nat<i>  10.0.(i+1).2     a relay behind a NAT of kind i
        cgw      203.0.113.50 | 10.0.9.1            ──  client 10.0.9.2          the client's own NAT (apdf)

    Several relays share a namespace, each bound to its own address; the five documentation and
    benchmarking /24s sit on one flat bridge with on-link routes, so path selection's /16 rule can be
    met as on the internet.  The NAT routers' public addresses avoid the exit's /16 (pub4's)."""

    tb: Testbed
    nat_kinds: tuple[str, ...] = ("eif", "adf", "apdf", "apdf", "edm")
    per_ns: int = 3
    ns: dict[str, str] = field(default_factory=dict)
    addr: dict[str, str] = field(default_factory=dict)
    public: list[str] = field(default_factory=list)  # relay addresses on the bridge, pub0 first
    NETS = ("192.0.2", "198.51.100", "203.0.113", "198.18.0", "198.19.0")

    def build(self) -> DiscoveryNatTopology:
        tb = self.tb
        inet = self.ns["inet"] = tb.add_ns("inet")
        tb.ip(inet, "link", "add", "br0", "type", "bridge")
        tb.ip(inet, "link", "set", "br0", "up")
        ports = 0

        def wan_host(role: str, addresses: list[str]) -> str:
            nonlocal ports
            ns = self.ns[role] = tb.add_ns(role)
            tb.veth(ns, "eth0", inet, f"p{ports}")
            tb.ip(inet, "link", "set", f"p{ports}", "master", "br0")
            ports += 1
            for a in addresses:
                tb.address(ns, "eth0", f"{a}/32")
            for net in self.NETS:  # every network is on the same wire
                tb.exec(ns, "ip", "route", "replace", f"{net}.0/24", "dev", "eth0")
            return ns

        for i, net in enumerate(self.NETS):
            hosts = [f"{net}.{11 + j}" for j in range(self.per_ns)]
            self.public += hosts
            extra = [f"{net}.20"] + (["198.19.0.30"] if i == 4 else [])
            wan_host(f"pub{i}", hosts + extra)
        self.addr["exit"] = "198.19.0.30"
        behind = [(f"nat{i}", kind, f"{self.NETS[i % 4]}.{41 + i}", i + 1) for i, kind in enumerate(self.nat_kinds)]
        behind.append(("client", "apdf", "203.0.113.50", 9))
        for role, kind, wan, subnet in behind:
            gw = wan_host(f"{role}gw", [wan])
            self.addr[f"{role}gw"] = wan
            host = self.ns[role] = tb.add_ns(role)
            self.addr[role] = f"10.0.{subnet}.2"
            tb.veth(host, "eth0", gw, "lan0")
            tb.address(host, "eth0", f"10.0.{subnet}.2/24")
            tb.address(gw, "lan0", f"10.0.{subnet}.1/24")
            tb.ip(host, "route", "add", "default", "via", f"10.0.{subnet}.1")
            tb.forwarding(gw)
            tb.nat_router(gw, "eth0", "lan0", f"10.0.{subnet}.2", kind)
        return self

    def pub_ns(self, address: str) -> str:
        """The namespace that holds a public address."""
        net = address.rsplit(".", 1)[0]
        return self.ns[f"pub{self.NETS.index(net)}"]


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.netns.testbed up`` builds the standard topology and waits (Ctrl-C tears it
    down); ``clean`` removes namespaces left by killed runs."""
    args = argv if argv is not None else sys.argv[1:]
    reason = available()
    if reason:
        print(f"testbed: {reason}", file=sys.stderr)
        return 1
    if args[:1] == ["clean"]:
        print("\n".join(remove_stale()) or "nothing to clean")
        return 0
    if args[:1] != ["up"]:
        print("usage: python -m tests.netns.testbed up|clean", file=sys.stderr)
        return 2
    tb = Testbed()
    try:
        topo = StandardTopology(tb).build()
        for role, ns in topo.ns.items():
            print(f"{role:8} {ns:24} {topo.addr.get(role, '')}")
        print("up; Ctrl-C tears it down", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        tb.close()
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
