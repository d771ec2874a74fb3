"""Benchmark: TCP throughput (iperf3, one stream) and ping RTT through `shallot connect` in the
network-namespace testbed, beside the same traffic over the raw path (client -> NAT -> web) in the
same run.  Needs root, iproute2, nftables and iperf3.  Prints one JSON object.

    sudo .venv/bin/python bench/vpn_bench.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shallot.crypto.descriptor import encode_directory  # noqa: E402
from shallot.relay import state as state_dir  # noqa: E402
from tests.netns.testbed import StandardTopology, Testbed, available  # noqa: E402
from tests.netns.testbed import wait_for_line as wait_line  # noqa: E402

PORT = 9100


def iperf(tb: Testbed, ns: str, server: str, seconds: float, *, download: bool = False) -> tuple[float, int]:
    """(Mbit/s received, TCP retransmissions) of one iperf3 stream: upload (client to server), or with
    ``download`` the server sending to the client (-R), the direction of Tor's bulk-download anchor."""
    argv = ["iperf3", "-c", server, "-t", str(seconds), "-J", *(["-R"] if download else [])]
    out = json.loads(tb.exec(ns, *argv, timeout=seconds + 30).stdout)
    return out["end"]["sum_received"]["bits_per_second"] / 1e6, int(out["end"]["sum_sent"].get("retransmits", 0))


def ping_ms(tb: Testbed, ns: str, target: str, count: int = 20) -> float:
    out = tb.exec(ns, "ping", "-c", str(count), "-i", "0.05", "-q", target, timeout=30).stdout
    return float(re.search(r"= [\d.]+/([\d.]+)/", out).group(1))  # type: ignore[union-attr]


def profile(role: str, pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes]:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(["py-spy", "record", "--nonblocking", "-p", str(pid), "-d", str(int(seconds)),
                             "-f", "raw", "-o", str(out / f"{role}.txt")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="also sample every shallot process with py-spy during the circuit's iperf3 run "
                         "(flat profiles DIR/<role>.txt; py-spy must be installed)")
    args = ap.parse_args()
    reason = available()
    if reason:
        raise SystemExit(f"vpn_bench: {reason}")
    tb = Testbed()
    try:
        topo = StandardTopology(tb).build()
        web, client = topo.addr["web"], topo.ns["client"]
        tb.spawn(topo.ns["web"], ["iperf3", "-s"])
        time.sleep(0.5)
        mbit, retrans = iperf(tb, client, web, args.seconds)
        down, _ = iperf(tb, client, web, args.seconds, download=True)
        raw = {"iperf3_mbit_s": round(mbit, 1), "retransmits": retrans, "iperf3_download_mbit_s": round(down, 1),
               "ping_ms": ping_ms(tb, client, web)}
        with tempfile.TemporaryDirectory() as tmp:
            states = {}
            pids: dict[str, int] = {}
            for role in ("guard", "middle", "exit"):
                states[role] = Path(tmp) / role
                state_dir.keygen(states[role], (topo.addr[role], PORT), role, role == "exit")
                argv = [sys.executable, "-m", "shallot", "exit" if role == "exit" else "relay", "--state",
                        str(states[role])] + (["--ip", "--uplink", "eth0"] if role == "exit" else [])
                proc = tb.spawn(topo.ns[role], argv)
                wait_line(proc, "listening")
                pids[role] = proc.pid  # `ip netns exec` execs in place: this is the relay's pid
            directory = Path(tmp) / "directory"
            directory.write_text(encode_directory([state_dir.read_descriptor(s) for s in states.values()]))
            connect = tb.spawn(client, [sys.executable, "-m", "shallot", "connect", "--directory",
                                        str(directory), "--path", "guard,middle,exit", "--socket",
                                        str(Path(tmp) / "engine.sock")])
            wait_line(connect, "shallot: connected")
            pids["client"] = connect.pid
            spies = [profile(role, pid, args.profile, args.seconds) for role, pid in pids.items()] \
                if args.profile else []
            mbit, retrans = iperf(tb, client, web, args.seconds)
            down, _ = iperf(tb, client, web, args.seconds, download=True)
            tunnel = {"iperf3_mbit_s": round(mbit, 1), "retransmits": retrans,
                      "iperf3_download_mbit_s": round(down, 1), "ping_ms": ping_ms(tb, client, web)}
            for spy in spies:
                spy.wait(60)
        print(json.dumps({
            "benchmark": "vpn_bench", "seconds": args.seconds,
            "raw_path": raw, "through_circuit": tunnel,
            "throughput_ratio": round(tunnel["iperf3_mbit_s"] / raw["iperf3_mbit_s"], 3),
            "download_ratio": round(tunnel["iperf3_download_mbit_s"] / raw["iperf3_download_mbit_s"], 3),
            "ping_ratio": round(tunnel["ping_ms"] / raw["ping_ms"], 2),
            "target_mbit_s": 100,
        }, indent=1))
    finally:
        tb.close()


if __name__ == "__main__":
    main()
