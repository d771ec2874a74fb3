"""``shallot probe``: build one circuit and send datagrams through it to the exit's echo service."""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import struct
import time
from typing import Any

from shallot.core.errors import ShallotError
from shallot.core.io.circuit_client import CircuitClient
from shallot.crypto.codec import Address
from shallot.crypto.descriptor import Descriptor

log = logging.getLogger(__name__)


def stun_servers(relays: list[Descriptor], guard: Descriptor) -> tuple[Address, Address] | None:
    """Two public relays on different IPs to classify our NAT with (natclass.NatProbe), or None.

    The classification needs each relay's alternate STUN port, which a descriptor does not announce.
    Introducers have it: a relay behind a NAT classified its own NAT through them before it published
    them (docs/NAT.md).  So the guard's introducers come first, then those of every other NATed relay
    in the view, then any public relay (whose missing alternate port only makes the answer vaguer)."""
    candidates: list[Address] = []
    for desc in [guard, *relays]:
        if desc.reachability is not None:
            candidates += [addr for _rid, addr in desc.reachability.introducers]
    candidates += [d.address for d in relays if d.reachability is None]
    first = candidates[0] if candidates else None
    for addr in candidates[1:]:
        if first is not None and addr[0] != first[0]:
            return first, addr
    return None


async def run_probe(relays: list[Descriptor], path: list[Descriptor], *, count: int, size: int = 256,
                    timeout_s: float = 2.0) -> dict[str, Any]:
    if count < 0:
        raise ShallotError("--count must be 0 or more")
    client = CircuitClient()
    await client.start(path[0].address[0])
    try:
        nat = None
        if path[0].reachability is not None:  # a guard behind a NAT: know our own NAT first (punch or relay?)
            servers = stun_servers(relays, path[0])
            if servers is not None:
                nat = await client.classify_nat(*servers)
        circ = await client.build(path)
        build_ms = circ.build_s * 1000
        sent_dg, recv_dg = client.build_datagrams.get(circ.circuit_id, (0, 0))
        inbox = client.inbox[circ.circuit_id]
        rtts: list[float] = []
        nonce = os.urandom(8)
        for seq in range(count):
            payload = nonce + struct.pack("!Id", seq, time.monotonic())
            payload += os.urandom(max(0, size - len(payload)))
            client.send(circ, payload)
            deadline = time.monotonic() + timeout_s
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    data = await asyncio.wait_for(inbox.get(), remaining)
                except TimeoutError:
                    break
                if data == payload:
                    rtts.append((time.monotonic() - struct.unpack("!Id", data[8:20])[1]) * 1000)
                    break
        link_method = client.nat.link_method(circ.link).value if circ.link is not None else "direct"
        link_ms = (circ.create_sent_at - circ.started_at) * 1000
        client.close_circuit(circ)
        await asyncio.sleep(0.05)  # let the DESTROY leave
        return {
            "guard_link": link_method,
            "link_ms": round(link_ms, 3),
            **({"nat": nat.as_json()} if nat is not None else {}),
            "path": [d.id_hex for d in path],
            "attempts": 1,  # the CLI counts again when it draws another path (shallot/cli.py)
            "build_ms": round(build_ms, 3),
            "build_round_trips": max(sent_dg, recv_dg),
            "sent": count,
            "echoed": len(rtts),
            "rtt_ms_median": round(statistics.median(rtts), 3) if rtts else None,
        }
    finally:
        client.close()


def describe(result: dict[str, Any], relays: list[Descriptor]) -> str:
    by_id = {d.id_hex: d for d in relays}
    names = " -> ".join(f"{by_id[i].nickname} ({i[:8]})" if i in by_id else i[:8] for i in result["path"])
    rtt = f"{result['rtt_ms_median']:.2f} ms" if result["rtt_ms_median"] is not None else "n/a"
    return (f"circuit   you -> {names} -> echo\n"
            f"built in  {result['build_ms']:.2f} ms, {result['build_round_trips']} round trip(s)\n"
            f"datagrams {result['echoed']}/{result['sent']} echoed, median RTT {rtt}")
