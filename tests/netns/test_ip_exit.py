"""The IP exit in the testbed: a client behind NAT sends IPv4 packets through guard -> middle -> exit;
the exit (TUN + nftables masquerade) puts them on the "internet", the web host sees the exit's
address, replies come back through the circuit, and the exit's private network stays unreachable."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from shallot.core.control.client import ControlClient
from shallot.crypto.descriptor import encode_directory
from shallot.crypto.params import MAX_DATA_LEN
from shallot.relay import state as state_dir
from tests.netns.leakcheck import REPORT, Capture, shown_in_the_log  # noqa: F401
from tests.netns.test_circuit_through_nat import PORT, _wait_line
from tests.netns.testbed import TESTBED_RESOLV_MARK, StandardTopology
from tests.netns.testbed import TestbedError as SetupFailed

HERE = Path(__file__).resolve().parent
ECHO_PORT = 7777


def nft_chains(topology: StandardTopology, ns: str, family: str, table: str) -> dict[str, dict]:
    """What the kernel holds for ``table`` in ``ns`` (``nft -j list table``): each chain with its hook,
    policy and rules (the rules as their JSON expressions)."""
    listing = json.loads(topology.tb.exec(ns, "nft", "-j", "list", "table", family, table).stdout)["nftables"]
    chains: dict[str, dict] = {}
    for item in listing:
        if "chain" in item:
            chains[item["chain"]["name"]] = {**item["chain"], "rules": []}
        elif "rule" in item:
            chains[item["rule"]["chain"]]["rules"].append(item["rule"]["expr"])
    return chains


def _is(key: str, value: object, op: str = "==") -> dict:
    return {"match": {"op": op, "left": {"meta": {"key": key}}, "right": value}}


@pytest.fixture(scope="module")
def ip_network(topology: StandardTopology, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("netns-ip")
    states = {}
    for role in ("guard", "middle", "exit"):
        states[role] = root / role
        state_dir.keygen(states[role], (topology.addr[role], PORT + 1), role, role == "exit")
    tb = topology.tb
    for role in ("guard", "middle"):
        _wait_line(tb.spawn(topology.ns[role], [sys.executable, "-m", "shallot", "relay", "--state",
                                                 str(states[role])]), "listening")
    _wait_line(tb.spawn(topology.ns["web"], [sys.executable, str(HERE / "dns_server.py"),
                                              f"web.shallot.test={topology.addr['web']}"]), "listening")
    _wait_line(tb.spawn(topology.ns["exit"], [sys.executable, "-m", "shallot", "exit", "--state",
                                               str(states["exit"]), "--ip", "--uplink", "eth0",
                                               "--resolver", topology.addr["web"]]), "listening")
    for role in ("web", "lan"):  # lan is the exit's private network: its server must never hear from us
        _wait_line(tb.spawn(topology.ns[role], [sys.executable, str(HERE / "udp_echo_server.py"), str(ECHO_PORT)]),
                   "listening")
    directory = root / "directory"
    directory.write_text(encode_directory([state_dir.read_descriptor(states[r]) for r in ("guard", "middle", "exit")]))
    states["directory"] = directory
    return states


def test_ip_packets_through_the_exit(topology: StandardTopology, ip_network: dict[str, Path]) -> None:
    web = f"{topology.addr['web']}:{ECHO_PORT}"
    lan = f"{topology.addr['lan']}:{ECHO_PORT}"
    res = topology.tb.exec(topology.ns["client"], sys.executable, str(HERE / "ip_client.py"),
                           str(ip_network["directory"]), web, lan, "dns:web.shallot.test", "dns:nothing.test",
                           check=False, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["address"].startswith("100.") and out["mtu"] == MAX_DATA_LEN  # one IP packet per cell
    reply = out["replies"][web]
    assert reply is not None, "no reply from the web host through the exit"
    assert reply["src"] == topology.addr["web"] and reply["dst"] == out["address"]
    # the web host saw the exit's public address, not the client's, not its tunnel address
    assert reply["data"] == f"{topology.addr['exit']} hello {web}"
    assert out["replies"][lan] is None  # the exit's private network is off limits
    # names resolve through the exit's forwarder (the testbed's resolver sits in the web namespace)
    assert out["replies"]["dns:web.shallot.test"] == topology.addr["web"]
    assert out["replies"]["dns:nothing.test"] == "no answer"

    async def exit_status() -> dict:
        client = await ControlClient.connect(ip_network["exit"] / state_dir.CONTROL_SOCKET)
        try:
            return await client.call("status")
        finally:
            await client.close()

    status = asyncio.run(exit_status())
    assert status["ip"]["ip_drop_policy"] >= 1 and status["ip"]["reject_private"] >= 1
    # the exit's table as the kernel holds it: masquerade of the pool out of the uplink, and the forward rules
    chains = nft_chains(topology, topology.ns["exit"], "ip", "shallot_exit")
    post, forward = chains["postrouting"], chains["forward"]
    assert (post["hook"], post["policy"], forward["hook"], forward["policy"]) == ("postrouting", "accept",
                                                                                  "forward", "accept")
    pool = {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                      "right": {"prefix": {"addr": "100.64.0.0", "len": 10}}}}
    assert post["rules"] == [[pool, _is("oifname", "eth0"), {"masquerade": None}]]
    tun = forward["rules"][0][0]["match"]["right"]
    assert tun.startswith("shallot-x")
    assert forward["rules"][:4] == [
        [_is("iifname", tun), _is("oifname", tun), {"drop": None}],
        [_is("iifname", tun), _is("oifname", "eth0", "!="), {"drop": None}],
        # into the TUN only answers to flows a client opened (tests/netns/test_exit_dns.py tries the rest)
        [_is("oifname", tun), {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                         "right": ["established", "related"]}}, {"accept": None}],
        [_is("oifname", tun), {"counter": "into_tun"}, {"drop": None}]]
    assert [rule[-2:] for rule in forward["rules"][4:]] == [[{"counter": "new_flow_rate"}, {"drop": None}],
                                                            [{"counter": "flow_cap"}, {"drop": None}]]
    assert status["ip"]["tun_written"] >= 1 and status["ip"]["ip_from_tun"] >= 1
    assert status["ip"]["dns_queries"] == 2 and status["ip"]["dns_answers"] == 2


def _wait_for_tcp_port(topology: StandardTopology, port: int, timeout: float = 10) -> None:
    """Wait until something listens on TCP ``port`` in the web namespace."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f":{port}" in topology.tb.exec(topology.ns["web"], "ss", "-ltn").stdout:
            return
        time.sleep(0.1)
    pytest.fail(f"nothing listens on {port} in the web namespace")


def _start_connect(topology: StandardTopology, directory: Path, tmp_path: Path, *extra: str,
                   prefix: tuple[str, ...] = (), pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[str]:
    """`shallot connect` in the client namespace, waited for until it says it is connected."""
    argv = [*prefix, sys.executable, "-m", "shallot", "connect", "--directory", str(directory), "--path",
            "guard,middle,exit", "--socket", str(tmp_path / "engine.sock"), *extra]
    if pass_fds:
        connect = subprocess.Popen(["ip", "netns", "exec", topology.ns["client"], *argv], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, pass_fds=pass_fds,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        topology.tb.procs.append(connect)
    else:
        connect = topology.tb.spawn(topology.ns["client"], argv)
    try:
        _wait_line(connect, "shallot: connected", timeout=30)
    except SetupFailed:
        connect.terminate()
        _, err = connect.communicate(timeout=15)
        raise SetupFailed(f"connect did not connect; its stderr:\n{err[-3000:]}") from None
    return connect


def _resolv_conf(topology: StandardTopology) -> str:
    return topology.tb.exec(topology.ns["client"], "cat", "/etc/resolv.conf").stdout


UDP_ASK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(b"through the tunnel", (sys.argv[1], int(sys.argv[2])))
print(s.recvfrom(2048)[0].decode())
"""


def test_connect_routes_the_client_namespace_through_the_circuit(topology: StandardTopology,
                                                                 ip_network: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    tb, client_ns = topology.tb, topology.ns["client"]
    routes_before = tb.exec(client_ns, "ip", "route", "show").stdout
    resolv_before = _resolv_conf(topology)
    assert TESTBED_RESOLV_MARK in resolv_before
    connect = _start_connect(topology, ip_network["directory"], tmp_path)
    # DNS goes to the exit's resolver, through the tunnel
    assert "nameserver 100.64.0.1" in _resolv_conf(topology)
    # an ordinary program in the client namespace now reaches the web host as the exit
    res = tb.exec(client_ns, sys.executable, "-c", UDP_ASK, topology.addr["web"], str(ECHO_PORT), check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{topology.addr['exit']} through the tunnel"
    assert tb.exec(client_ns, "ping", "-c", "1", "-W", "3", topology.addr["web"], check=False).returncode == 0
    assert "shallot_client" in tb.exec(client_ns, "nft", "list", "tables").stdout  # the kill switch is on
    output = nft_chains(topology, client_ns, "inet", "shallot_client")["output"]
    assert (output["hook"], output["policy"]) == ("output", "drop")
    guard_udp = [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                            "right": topology.addr["guard"]}},
                 {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": PORT + 1}},
                 {"accept": None}]
    assert output["rules"] == [[_is("oifname", "lo"), {"accept": None}],
                               [_is("oifname", "shallot0"), {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}},
                                                                       "right": "ipv4"}}, {"accept": None}],
                               guard_udp]
    # TCP: a 100 MB download over HTTP arrives whole
    site = tmp_path / "site"
    site.mkdir()
    blob = os.urandom(100 * 1024 * 1024)
    (site / "big").write_bytes(blob)
    (site / "index.html").write_text("hello through shallot\n")
    web = tb.spawn(topology.ns["web"], [sys.executable, "-m", "http.server", "8080", "--bind", "0.0.0.0",
                                        "--directory", str(site)])
    _wait_for_tcp_port(topology, 8080)
    # by name: the testbed's resolver (web namespace) answers through the exit's DNS forwarder
    page = tb.exec(client_ns, "curl", "-sS", "--max-time", "10", "http://web.shallot.test:8080/", check=False)
    assert page.returncode == 0, page.stderr
    assert page.stdout == "hello through shallot\n"
    started = time.monotonic()
    got = tb.exec(client_ns, "curl", "-sS", "--max-time", "150", "-o", str(tmp_path / "got"),
                  f"http://{topology.addr['web']}:8080/big", check=False, timeout=160)
    seconds = time.monotonic() - started
    assert got.returncode == 0, got.stderr
    assert hashlib.sha256((tmp_path / "got").read_bytes()).hexdigest() == hashlib.sha256(blob).hexdigest()
    print(f"100 MB through the circuit in {seconds:.1f} s ({800 / seconds:.0f} Mbit/s)")
    web.terminate()
    _, web_log = web.communicate(timeout=10)
    requests = [line for line in web_log.splitlines() if '"GET ' in line]
    assert len(requests) == 2 and all(line.startswith(topology.addr["exit"] + " ") for line in requests), web_log
    routes = tb.exec(client_ns, "ip", "route", "show").stdout
    assert "0.0.0.0/1 dev shallot0" in routes and "128.0.0.0/1 dev shallot0" in routes
    assert f"{topology.addr['guard']} via" in routes  # the encrypted UDP to the guard still goes out directly
    tagged = tb.exec(client_ns, "ip", "-4", "route", "show", "proto", "147").stdout.splitlines()
    assert sorted(line.split()[0] for line in tagged) == sorted(["0.0.0.0/1", "128.0.0.0/1", topology.addr["guard"]])
    connect.terminate()
    assert connect.wait(15) == 0
    # everything is put back
    assert tb.exec(client_ns, "ip", "route", "show").stdout == routes_before
    assert "shallot" not in tb.exec(client_ns, "nft", "list", "tables").stdout
    assert "shallot0" not in tb.exec(client_ns, "ip", "link", "show").stdout
    assert _resolv_conf(topology) == resolv_before


def test_cleanup_after_a_crashed_connect_leaves_nothing(topology: StandardTopology, ip_network: dict[str, Path],
                                                        tmp_path: Path) -> None:
    tb, client_ns = topology.tb, topology.ns["client"]
    routes_before = tb.exec(client_ns, "ip", "route", "show").stdout
    resolv_before = _resolv_conf(topology)
    connect = _start_connect(topology, ip_network["directory"], tmp_path)
    connect.kill()  # no chance to clean up
    connect.wait()
    assert "shallot_client" in tb.exec(client_ns, "nft", "list", "tables").stdout  # the kill switch stays
    assert "nameserver 100.64.0.1" in _resolv_conf(topology)
    res = tb.exec(client_ns, sys.executable, "-m", "shallot", "connect", "--cleanup")
    assert "removed nftables table" in res.stdout and "restored /etc/resolv.conf" in res.stdout
    assert _resolv_conf(topology) == resolv_before
    assert tb.exec(client_ns, "ip", "route", "show").stdout == routes_before
    assert "shallot" not in tb.exec(client_ns, "nft", "list", "tables").stdout
    assert "shallot0" not in tb.exec(client_ns, "ip", "link", "show").stdout
    again = tb.exec(client_ns, sys.executable, "-m", "shallot", "connect", "--cleanup")
    assert again.stdout.strip() == "nothing to clean up"


V6_PROBE = r"""
import errno, json, socket, struct, sys
nonce, dst = sys.argv[1], sys.argv[2]
out = {}
def result(kind, fn):
    try:
        fn()
        out.setdefault(kind, []).append("ok")
    except OSError as exc:
        out.setdefault(kind, []).append(errno.errorcode.get(exc.errno, str(exc.errno)))
for i in range(3):
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        result("udp6", lambda: s.sendto(f"{nonce} udp6 {i}".encode(), (dst, 53)))
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:  # the kernel sums it
        result("icmp6", lambda: s.sendto(struct.pack("!BBHHH", 128, 0, 0, 0x5348, i) + f"{nonce} icmp6 {i}".encode(),
                                         (dst, 0)))
print(json.dumps(out))
"""


def _v6_probes(topology: StandardTopology, capture: Capture, label: str) -> tuple[dict[str, int], dict]:
    """UDP and ICMPv6 echoes from the client to natgw's IPv6 address, each with a nonce; how many the
    capture on natgw's side of the link saw, and what each send got."""
    nonce = f"v6-{secrets.token_hex(6)}"
    res = topology.tb.exec(topology.ns["client"], sys.executable, "-c", V6_PROBE, nonce, "fd00:10::1")
    sends = json.loads(res.stdout)
    packets = [p for p in capture.packets() if p.src == "fd00:10::2"]
    counts = {kind: sum(1 for p in packets if p.payload.startswith(f"{nonce} {kind} ".encode())
                        and (p.proto, p.icmp[0]) in ((17, 0), (58, 128))) for kind in ("udp6", "icmp6")}
    REPORT.append(f"[IPv6, {label}] probe packets on the link: {counts} (sends: {sends})")
    return counts, sends


@pytest.mark.parametrize("kill_switch", [False, True], ids=["no-kill-switch", "kill-switch"])
@pytest.mark.usefixtures("shown_in_the_log")
def test_no_ipv6_leak_even_without_the_kill_switch(topology: StandardTopology, ip_network: dict[str, Path],
                                                   tmp_path: Path, kill_switch: bool) -> None:
    """The tunnel is IPv4 only, so while connected IPv6 must not go out at all, kill switch or not.  The
    capture on natgw is known to be running (a canary across the link came through, tests/netns/leakcheck.py),
    and the same sends before connecting and after disconnecting are its positive control."""
    tb, client_ns, natgw = topology.tb, topology.ns["client"], topology.ns["natgw"]
    tb.exec(client_ns, "ip", "-6", "addr", "replace", "fd00:10::2/64", "dev", "eth0", "nodad")
    tb.exec(natgw, "ip", "-6", "addr", "replace", "fd00:10::1/64", "dev", "lan0", "nodad")
    assert tb.exec(client_ns, "ping", "-6", "-c", "1", "-W", "2", "fd00:10::1", check=False).returncode == 0
    capture = Capture(topology, tmp_path / "lan0.pcap", iface="lan0", at="natgw", canary_from="natgw",
                      canary_to="fd00:10::2", filter="ip6").start()
    try:
        before, _ = _v6_probes(topology, capture, "before connecting (the control)")
        assert before == {"udp6": 3, "icmp6": 3}, "the capture does not see IPv6 from the client at all"
        connect = _start_connect(topology, ip_network["directory"], tmp_path,
                                 *([] if kill_switch else ["--no-kill-switch"]))
        output = nft_chains(topology, client_ns, "inet", "shallot_client")["output"]
        if kill_switch:  # the policy drops IPv6 with everything else that is not the tunnel
            assert (output["hook"], output["policy"]) == ("output", "drop")
        else:
            assert (output["hook"], output["policy"]) == ("output", "accept")
            assert output["rules"] == [[_is("oifname", "lo"), {"accept": None}],
                                       [_is("nfproto", "ipv6"), {"drop": None}]]
        ping6 = tb.exec(client_ns, "ping", "-6", "-c", "3", "-i", "0.2", "-W", "1", "fd00:10::1", check=False)
        connected, sends = _v6_probes(topology, capture,
                                      "connected, " + ("kill switch" if kill_switch else "--no-kill-switch"))
        # IPv4 still flows through the tunnel (with the kill switch off, the v4 side proves the table is the v6 block)
        assert tb.exec(client_ns, "ping", "-c", "1", "-W", "3", topology.addr["web"], check=False).returncode == 0
        assert ping6.returncode != 0
        assert set(sends["udp6"]) == set(sends["icmp6"]) == {"EPERM"}  # refused locally: the firewall
        assert connected == {"udp6": 0, "icmp6": 0}
        connect.terminate()
        assert connect.wait(15) == 0
        after, _ = _v6_probes(topology, capture, "after disconnecting")
        assert after == {"udp6": 3, "icmp6": 3}
    finally:
        capture.stop()
    # and IPv6 works again afterwards
    assert tb.exec(client_ns, "ping", "-6", "-c", "1", "-W", "2", "fd00:10::1", check=False).returncode == 0


def _unprivileged_prefix() -> tuple[tuple[str, ...], str]:
    """How to run the engine without privileges: as uid nobody when it can read our interpreter and code
    (a world-readable checkout), else as uid 0 with every capability dropped, which takes away exactly the
    powers the helper has (CAP_NET_ADMIN for TUN, routes and nftables; CAP_DAC_OVERRIDE for /etc)."""
    drop = ("setpriv", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs")
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                            "import shallot.core.engine"], capture_output=True, cwd="/")
    if probe.returncode == 0:
        return (*drop, "--reuid=65534", "--regid=65534", "--clear-groups"), "nobody"
    return drop, "root without capabilities"


def test_an_unprivileged_engine_connects_through_the_helper(topology: StandardTopology,
                                                            ip_network: dict[str, Path], tmp_path: Path) -> None:
    tb, client_ns = topology.tb, topology.ns["client"]
    routes_before = tb.exec(client_ns, "ip", "route", "show").stdout
    resolv_before = _resolv_conf(topology)
    prefix, who = _unprivileged_prefix()
    sockdir = Path(tempfile.mkdtemp(prefix="shallot-unpriv-"))
    os.chmod(sockdir, 0o700)
    directory = sockdir / "directory"  # the pytest tmp dirs are root's alone
    shutil.copy(ip_network["directory"], directory)
    os.chmod(directory, 0o644)
    if who == "nobody":
        os.chown(sockdir, 65534, 65534)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:  # started the way pkexec starts it: as root, the socket as stdin, the user's uid in PKEXEC_UID
        helper = subprocess.Popen(["ip", "netns", "exec", client_ns, sys.executable, "-m", "shallot", "-v",
                                   "helper"], stdin=ours, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, env={**os.environ, "PKEXEC_UID": "65534" if who == "nobody" else "0"})
        tb.procs.append(helper)
        ours.close()
        os.set_inheritable(theirs.fileno(), True)
        connect = _start_connect(topology, directory, sockdir, "--helper-fd", str(theirs.fileno()),
                                 prefix=prefix, pass_fds=(theirs.fileno(),))
        theirs.close()
        print(f"engine runs as {who}")
        # the engine has no network privileges; the helper did the work
        caps = _effective_caps(connect.pid)
        assert caps == 0, f"the engine holds capabilities {caps:#x}"
        res = tb.exec(client_ns, sys.executable, "-c", UDP_ASK, topology.addr["web"], str(ECHO_PORT), check=False)
        assert res.stdout.strip() == f"{topology.addr['exit']} through the tunnel", res.stderr
        assert "nameserver 100.64.0.1" in _resolv_conf(topology)
        assert "shallot_client" in tb.exec(client_ns, "nft", "list", "tables").stdout
        tun_owner = tb.exec(client_ns, "cat", "/sys/class/net/shallot0/owner").stdout.strip()
        assert tun_owner == ("65534" if who == "nobody" else "-1")  # the helper hands the device to the user
        connect.terminate()
        assert connect.wait(15) == 0
        # the engine closed the session: the helper restored everything and exited
        assert helper.wait(15) == 0
        assert tb.exec(client_ns, "ip", "route", "show").stdout == routes_before
        assert "shallot" not in tb.exec(client_ns, "nft", "list", "tables").stdout
        assert "shallot0" not in tb.exec(client_ns, "ip", "link", "show").stdout
        assert _resolv_conf(topology) == resolv_before
    finally:
        ours.close()
        theirs.close()
        shutil.rmtree(sockdir, ignore_errors=True)


def _effective_caps(pid: int) -> int:
    """CapEff of the Python process under ``ip netns exec`` and setpriv (which exec in place)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapEff line")
