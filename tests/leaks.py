"""What a test run left behind: its processes, testbed namespaces, temporary veths, and Shallot TUN devices
or nftables tables in the root namespace.

Every process the tests start (relays, engines, ``connect``, the helper, tcpdump, the app's engine, through
``ip netns exec``, setpriv, asyncio or Qt) inherits ``RUN_MARK`` from the environment, so the run's own
processes are found by reading ``/proc/PID/environ``, wherever they were reparented, and never anyone
else's (other test runs on the same machine).  Devices and tables are compared with what the root namespace
had when the run began, so a real Shallot VPN on the developer's machine is not a leak."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

RUN_MARK = "SHALLOT_TEST_RUN"
NETNS_ETC = Path("/etc/netns")


def mark_run() -> str:
    """Give this process (and so every child) the run's mark; idempotent."""
    return os.environ.setdefault(RUN_MARK, f"{os.getpid()}-{time.time_ns()}")


def _marked(pid: int, mark: bytes) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, a zombie (empty), or not ours to read
        return False
    return mark in environ.split(b"\0")


def run_processes() -> dict[int, str]:
    """PID -> command line of every live process carrying this run's mark, except this one."""
    mark = f"{RUN_MARK}={os.environ.get(RUN_MARK, '')}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        if _marked(pid, mark):
            with contextlib.suppress(OSError):
                found[pid] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    return found


def _lines(*argv: str) -> list[str]:
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return res.stdout.splitlines() if res.returncode == 0 else []


def root_links() -> set[str]:
    """Names of the root namespace's network devices."""
    return {m.group(1) for line in _lines("ip", "-o", "link", "show")
            if (m := re.match(r"\d+: ([^:@]+)", line))}


def root_nft_tables() -> set[str]:
    """"family name" of every nftables table in the root namespace (empty unless root)."""
    if os.geteuid() != 0:
        return set()
    return {line.removeprefix("table ").strip() for line in _lines("nft", "list", "tables")}


@dataclass
class Baseline:
    """The root namespace as the run found it."""

    links: set[str] = field(default_factory=root_links)
    tables: set[str] = field(default_factory=root_nft_tables)


@dataclass
class Leaks:
    processes: dict[int, str] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    netns_etc: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any((self.processes, self.namespaces, self.netns_etc, self.links, self.tables))

    def describe(self) -> str:
        out = [f"process {pid}: {cmd}" for pid, cmd in sorted(self.processes.items())]
        out += [f"network namespace {ns}" for ns in self.namespaces]
        out += [f"directory {d}" for d in self.netns_etc]
        out += [f"root-namespace device {name}" for name in self.links]
        out += [f"root-namespace nftables table {t}" for t in self.tables]
        return "\n".join(out)


def testbed_prefix() -> str:
    return f"shtb{os.getpid()}-"  # tests/netns/testbed.py names every namespace after the pytest process


def veth_pattern() -> re.Pattern[str]:
    return re.compile(rf"^tb{os.getpid() % 100000}\d+[ab]$")  # testbed.veth()'s temporary root-namespace names


def find(baseline: Baseline) -> Leaks:
    prefix = testbed_prefix()
    leaks = Leaks(processes=run_processes())
    leaks.namespaces = [line.split()[0] for line in _lines("ip", "netns", "list")
                        if line.strip() and line.split()[0].startswith(prefix)]
    if NETNS_ETC.is_dir():
        leaks.netns_etc = sorted(str(p) for p in NETNS_ETC.glob(f"{prefix}*"))
    veth = veth_pattern()
    leaks.links = sorted(name for name in root_links() - baseline.links
                         if name.startswith("shallot") or veth.match(name))
    leaks.tables = sorted(t for t in root_nft_tables() - baseline.tables
                          if "shallot" in t or "testbed" in t)
    return leaks


def wait_for_none(baseline: Baseline, grace_s: float = 5.0) -> Leaks:
    """``find`` until nothing is left or ``grace_s`` passed (a process may still be on its way out)."""
    deadline = time.monotonic() + grace_s
    while True:
        leaks = find(baseline)
        if not leaks or time.monotonic() >= deadline:
            return leaks
        time.sleep(0.1)


def remove(leaks: Leaks) -> None:
    """Clean up what ``find`` reported: kill the run's processes by PID, delete namespaces, devices and tables."""
    for pid in leaks.processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    for pid in leaks.processes:  # reap our own children; others are reaped by whoever adopted them
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
                time.sleep(0.05)
    for ns in leaks.namespaces:
        _lines("ip", "netns", "del", ns)
    for path in leaks.netns_etc:
        subprocess.run(["rm", "-rf", "--", path], check=False)
    for name in leaks.links:
        _lines("ip", "link", "del", name)
    for table in leaks.tables:
        _lines("nft", "delete", "table", *table.split())
