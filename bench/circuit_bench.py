"""Benchmark: circuit build time and 3-hop datagram goodput, each beside a plain-UDP 3-hop chain.

    python bench/circuit_bench.py [--seconds 5] [--builds 50] [--payload 1280] [--window 64]

Relays run as separate processes (``python -m shallot relay``) on 127.0.0.1; the baseline is
three ``bench/plain_chain.py`` hops on the same event loop (uvloop).  Two loads, same for both:

* one-way: the client sends 1280-byte datagrams as fast as it can for N seconds; the exit's discard
  service (or the last plain hop) counts what arrived: goodput, packets/s and loss.
* echo: ``--window`` datagrams in flight, each echoed back by the exit (or the last plain hop).

Build time is the median of ``--builds`` CREATE -> CREATED exchanges over warm links (links to the
guard and between relays already up), beside the round-trip time of one datagram over the plain
chain.  CPU microseconds per packet are read from /proc for every process.  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shallot.core.circuit import CircuitBuilt, ClientCircuit, ClientNode, DatagramReceived
from shallot.core.control.client import ControlClient
from shallot.core.discovery.directory import load_directory
from shallot.core.errors import ShallotError
from shallot.core.io.udp import SOCKET_BUFFER_BYTES, open_endpoint, run
from shallot.crypto.circuit_handshake import SERVICE_DISCARD, SERVICE_ECHO
from shallot.relay.localnet import LocalNetwork, free_udp_ports

HERE = Path(__file__).resolve().parent


def cpu_seconds(pids: list[int]) -> list[float]:
    """CPU seconds (user + system) of this process, then of each given process."""
    out = [time.process_time()]
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out.append((int(fields[11]) + int(fields[12])) / tick)
        except (OSError, IndexError, ValueError):
            out.append(float("nan"))
    return out


def summarise(sent: int, delivered: int, nbytes: int, elapsed: float, c0: list[float], c1: list[float]) -> dict:
    return {"packets_per_s": round(delivered / elapsed, 1), "mbit_per_s": round(nbytes * 8 / elapsed / 1e6, 2),
            "sent": sent, "delivered": delivered, "loss": round(1 - delivered / sent, 5) if sent else None,
            # CPU microseconds per delivered datagram: client first, then each hop in path order
            "cpu_us_per_packet": [round((b - a) / max(delivered, 1) * 1e6, 1) for a, b in zip(c0, c1)],
            "cpu_cores_busy": round(sum(b - a for a, b in zip(c0, c1)) / elapsed, 2)}


BURST = 32  # datagrams per send burst, paced or not, in both setups


async def blast(send_burst: Callable[[int], None], seconds: float, rate: float | None = None) -> tuple[int, float]:
    """Send bursts of BURST datagrams for ``seconds``: back to back (rate None) or with the bursts
    spaced to average ``rate`` datagrams/s.  Returns (sent, elapsed)."""
    sent = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while (now := time.perf_counter()) < end:
        if rate is not None:
            wait = t0 + sent / rate - now
            if wait > 0:
                await asyncio.sleep(wait)  # sleep, never spin: the relays need the CPU
                continue
        send_burst(BURST)
        sent += BURST
        if rate is None:
            await asyncio.sleep(0)
    return sent, time.perf_counter() - t0


async def one_way(send_burst: Callable[[int], None], delivered: Callable[[], Any], seconds: float,
                  pids: list[int]) -> dict[str, Any]:
    """Highest offered rate whose loss stays <= 1% (RFC 2544-style search, same for both setups).

    A first unpaced run gives the scale; paced runs then step down from 1.5x its delivered rate."""
    async def trial(rate: float | None) -> dict[str, Any]:
        d0, b0 = await delivered()
        c0 = cpu_seconds(pids)
        sent, elapsed = await blast(send_burst, seconds, rate)
        c1 = cpu_seconds(pids)
        d1, b1 = await delivered()
        for _ in range(50):  # let queues drain: count until two reads agree
            await asyncio.sleep(0.1)
            last = (d1, b1)
            d1, b1 = await delivered()
            if (d1, b1) == last:
                break
        result = summarise(sent, d1 - d0, b1 - b0, elapsed, c0, c1)
        result["offered_per_s"] = round(sent / elapsed, 1)
        return result

    unpaced = await trial(None)
    best = None
    for factor in (1.5, 1.3, 1.15, 1.0, 0.85, 0.7, 0.55, 0.4, 0.25):
        result = await trial(unpaced["packets_per_s"] * factor)
        if result["loss"] is not None and result["loss"] <= 0.01:
            best = result
            break
    return {"unpaced": unpaced, "max_rate_loss_le_1pct": best,
            "mbit_per_s": best["mbit_per_s"] if best else 0.0, "packets_per_s": best["packets_per_s"] if best else 0.0}


class EchoLoad:
    """Keeps ``window`` datagrams in flight; each echo releases the next one."""

    def __init__(self, payload: bytes, window: int) -> None:
        self.payload, self.window = payload, window
        self.sent = self.echoed = self.bytes = 0
        self.running = False

    async def run(self, send_burst: Callable[[int], None], seconds: float, pids: list[int]) -> dict:
        self.running = True
        self.sent += self.window
        send_burst(self.window)
        await asyncio.sleep(0.5)  # warm up
        s0, e0, b0, t0, c0 = self.sent, self.echoed, self.bytes, time.perf_counter(), cpu_seconds(pids)
        await asyncio.sleep(seconds)
        s1, e1, b1, t1, c1 = self.sent, self.echoed, self.bytes, time.perf_counter(), cpu_seconds(pids)
        self.running = False
        await asyncio.sleep(0.3)
        return summarise(s1 - s0, e1 - e0, b1 - b0, t1 - t0, c0, c1)


# ---------------------------------------------------------------------------------------- baseline
async def plain_chain(last: str) -> tuple[list[asyncio.subprocess.Process], tuple[str, int]]:
    ports = free_udp_ports(3)
    procs = []
    for port, nxt in zip(ports, [str(ports[1]), str(ports[2]), last]):
        p = await asyncio.create_subprocess_exec(sys.executable, str(HERE / "plain_chain.py"), str(port), nxt,
                                                 stdout=asyncio.subprocess.PIPE)
        procs.append(p)
    for p in procs:
        assert p.stdout is not None
        await asyncio.wait_for(p.stdout.readline(), 10)
    return procs, ("127.0.0.1", ports[0])


async def stop(procs: list[asyncio.subprocess.Process]) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
    for p in procs:
        await p.wait()


class PlainClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.on_data: Callable[[bytes], None] = lambda data: None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.on_data(data)


async def measure_plain(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    payload = os.urandom(args.payload)
    out: dict[str, Any] = {}
    # echo load and RTT
    procs, first = await plain_chain("echo")
    try:
        transport, proto = await loop.create_datagram_endpoint(PlainClient, local_addr=("127.0.0.1", 0))
        rtts = []
        for _ in range(args.rtt_samples):
            fut = loop.create_future()
            proto.on_data = lambda d, f=fut: f.done() or f.set_result(time.perf_counter())
            t0 = time.perf_counter()
            transport.sendto(b"x" * 64, first)
            with contextlib.suppress(asyncio.TimeoutError):
                rtts.append((await asyncio.wait_for(fut, 2) - t0) * 1000)
        out["rtt_ms_median"] = round(statistics.median(rtts), 3) if rtts else None
        load = EchoLoad(payload, args.window)

        def on_echo(data: bytes) -> None:
            if load.running:
                load.echoed += 1
                load.bytes += len(data)
                load.sent += 1
                transport.sendto(payload, first)

        proto.on_data = on_echo
        out["echo"] = await load.run(lambda n: [transport.sendto(payload, first) for _ in range(n)], args.seconds,
                                     [p.pid for p in procs])
        transport.close()
    finally:
        await stop(procs)
    # one-way load into a sink
    procs, first = await plain_chain("sink")
    try:
        transport, proto = await loop.create_datagram_endpoint(PlainClient, local_addr=("127.0.0.1", 0))
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)

        async def sink_count() -> tuple[int, int]:
            fut = loop.create_future()
            proto.on_data = lambda d: fut.done() or fut.set_result(json.loads(d))
            transport.sendto(b"STATS", first)
            stats = await asyncio.wait_for(fut, 5)
            return stats["count"], stats["bytes"]

        out["one_way"] = await one_way(lambda n: [transport.sendto(payload, first) for _ in range(n)], sink_count,
                                       args.seconds, [p.pid for p in procs])
        transport.close()
    finally:
        await stop(procs)
    return out


# ---------------------------------------------------------------------------------------- circuit
async def measure_circuit(net: LocalNetwork, args: argparse.Namespace) -> dict[str, Any]:
    relays = load_directory(net.directory)
    # LocalNetwork(3, 1) makes relay0, relay1 and exit2: that is the path, in process order
    path = [d for d in relays if not d.is_exit] + [d for d in relays if d.is_exit]
    pids = [p.pid for p in net.procs]
    node = ClientNode(rng=secrets.token_bytes)
    payload = os.urandom(args.payload)
    load = EchoLoad(payload, args.window)
    waiting: dict[str, asyncio.Future[Any] | None] = {"built": None, "echo": None}

    def after() -> None:
        events = node.events
        while events:
            ev = events.popleft()
            if isinstance(ev, DatagramReceived):
                fut = waiting["echo"]
                if fut is not None and not fut.done():
                    fut.set_result(time.perf_counter())
                elif load.running:
                    load.echoed += 1
                    load.bytes += len(ev.data)
                    load.sent += 1
                    node.send(ev.circuit, payload, time.monotonic())
                continue
            fut = waiting["built"]
            if fut is not None and not fut.done():
                if isinstance(ev, CircuitBuilt):
                    fut.set_result(ev.circuit)
                else:
                    fut.set_exception(ShallotError(f"circuit failed: {getattr(ev, 'reason', ev)}"))

    ep = await open_endpoint(node, ("127.0.0.1", 0), after=after)
    loop = asyncio.get_running_loop()

    async def build(service: int) -> ClientCircuit:
        waiting["built"] = loop.create_future()
        node.build(path, time.monotonic(), time.time(), service=service)
        ep.poke()
        return await asyncio.wait_for(waiting["built"], 10)

    def burst_to(circ: ClientCircuit) -> Callable[[int], None]:
        def burst(n: int) -> None:
            now = time.monotonic()
            for _ in range(n):
                node.send(circ, payload, now)
            ep.flush()
        return burst

    out: dict[str, Any] = {}
    try:
        await build(SERVICE_ECHO)  # warms the three links; every later build runs over them
        build_ms = []
        for _ in range(args.builds):
            circ = await build(SERVICE_ECHO)
            build_ms.append(circ.build_s * 1000)
            node.close(circ, time.monotonic())
            ep.poke()
            await asyncio.sleep(0.002)
        out["build_ms_median"] = round(statistics.median(build_ms), 3)
        out["build_ms_p90"] = round(statistics.quantiles(build_ms, n=10)[-1], 3)
        out["builds"] = len(build_ms)
        circ = await build(SERVICE_ECHO)
        rtts = []
        for _ in range(args.rtt_samples):
            waiting["echo"] = loop.create_future()
            t0 = time.perf_counter()
            node.send(circ, b"x" * 64, time.monotonic())
            ep.flush()
            with contextlib.suppress(asyncio.TimeoutError):
                rtts.append((await asyncio.wait_for(waiting["echo"], 2) - t0) * 1000)
        waiting["echo"] = None
        out["rtt_ms_median"] = round(statistics.median(rtts), 3) if rtts else None
        out["echo"] = await load.run(burst_to(circ), args.seconds, pids)
        node.close(circ, time.monotonic())
        ep.poke()
        # one-way into the exit's discard service
        sink = await build(SERVICE_DISCARD)
        control = await ControlClient.connect(net.states[-1] / "control.sock")

        async def exit_count() -> tuple[int, int]:
            stats = await control.call("status")
            return stats["discarded"], stats["discarded_bytes"]

        out["one_way"] = await one_way(burst_to(sink), exit_count, args.seconds, pids)
        await control.close()
        out["io"] = {"client_batched_reads": ep.batched_reads, "client_batched_sends": ep.batched_sends}
    finally:
        ep.close()
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="shallot-bench-") as tmp:
        net = LocalNetwork(Path(tmp), 3, 1)
        net.create()
        try:
            await net.start()
            circuit = await measure_circuit(net, args)
        finally:
            await net.stop()
    plain = await measure_plain(args)

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    return {
        "benchmark": "circuit_bench",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loop": "uvloop",
                    "kernel": platform.release()},
        "params": {"seconds": args.seconds, "payload_bytes": args.payload, "window": args.window,
                   "builds": args.builds},
        "circuit": circuit,
        "plain_chain": plain,
        "goodput_ratio_one_way": ratio(circuit["one_way"]["mbit_per_s"], plain["one_way"]["mbit_per_s"]),
        "goodput_ratio_echo": ratio(circuit["echo"]["mbit_per_s"], plain["echo"]["mbit_per_s"]),
        "build_ms_median": circuit["build_ms_median"],
        "build_ms_vs_plain_rtt": ratio(circuit["build_ms_median"], plain["rtt_ms_median"]),
        "targets": {"goodput_ratio_min": 0.5, "build_ms_max": 5.0},
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each load trial")
    ap.add_argument("--builds", type=int, default=50)
    ap.add_argument("--payload", type=int, default=1280)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--rtt-samples", type=int, default=50)
    print(json.dumps(run(main(ap.parse_args())), indent=1))
