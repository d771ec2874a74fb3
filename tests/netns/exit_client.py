"""Run inside the client namespace by tests/netns/test_exit_dns.py: one SERVICE_IP circuit through
guard -> middle -> exit, then one mode; prints "address A.B.C.D" once the circuit has its tunnel address,
then one JSON line of results.

    exit_client.py DIRECTORY ask NAME...            one DNS query at a time through the exit's forwarder
    exit_client.py DIRECTORY flood N SECONDS        N queries for void names (10 000/s), then hold the circuit
    exit_client.py DIRECTORY options HOST:PORT      one UDP packet with IPv4 options, then one without
    exit_client.py DIRECTORY flows HOST:PORT N RATE N UDP packets from N source ports, RATE a second
    exit_client.py DIRECTORY listen SECONDS         count the packets that arrive unasked
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
from pathlib import Path

from ip_client import checksum, dns_query, open_ip_circuit, udp_packet  # this folder is on sys.path (a script)

from shallot.core.io.udp import run


def with_options(packet: bytes) -> bytes:
    """``packet`` with a 4-byte IPv4 option (NOP NOP NOP EOL), header checksum redone."""
    total = int.from_bytes(packet[2:4], "big") + 4
    header = bytes([0x46, packet[1]]) + total.to_bytes(2, "big") + packet[4:10] + b"\x00\x00" + packet[12:20]
    header += b"\x01\x01\x01\x00"
    header = header[:10] + checksum(header).to_bytes(2, "big") + header[12:]
    return header + packet[20:]


def decode_answer(packet: bytes) -> str:
    answer = packet[28:]
    rcode = answer[3] & 0x0F
    if rcode:
        return f"rcode {rcode}"
    return str(ipaddress.IPv4Address(answer[-4:])) if int.from_bytes(answer[6:8], "big") else "empty"


async def main(directory: Path, mode: str, args: list[str]) -> dict:
    client, circ, address, resolver, _ = await open_ip_circuit(directory)
    me, dns = str(address), str(resolver)
    print(f"address {me}", flush=True)
    inbox = client.inbox[circ.circuit_id]
    out: dict = {"address": me}
    if mode == "ask":
        out["answers"] = {}
        for i, name in enumerate(args):
            client.send(circ, udp_packet(me, dns, 40000 + i, 53, dns_query(name)))
            try:
                out["answers"][name] = decode_answer(await asyncio.wait_for(inbox.get(), 20))
            except TimeoutError:
                out["answers"][name] = None
    elif mode == "flood":
        count, hold = int(args[0]), float(args[1])
        for i in range(count):
            client.send(circ, udp_packet(me, dns, 40000 + i % 20000, 53, dns_query(f"f{i}.void.test", i & 0xFFFF)))
            if i % 50 == 49:
                # paced (10 000 a second, far above the forwarder's quota): sent all at once, most were lost on
                # the way under load, and the flood then never reached the exit's table
                await asyncio.sleep(0.005)
        print("flooded", flush=True)
        await asyncio.sleep(hold)
        out["sent"] = count
    elif mode == "options":
        host, port = args[0].rsplit(":", 1)
        out["replies"] = {}
        for kind in ("options", "plain"):
            packet = udp_packet(me, host, 41000, int(port), kind.encode())
            client.send(circ, with_options(packet) if kind == "options" else packet)
            try:
                reply = await asyncio.wait_for(inbox.get(), 3)
                out["replies"][kind] = reply[28:].decode(errors="replace")
            except TimeoutError:
                out["replies"][kind] = None
    elif mode == "flows":
        host, port = args[0].rsplit(":", 1)
        count, rate = int(args[1]), float(args[2])
        for i in range(count):
            client.send(circ, udp_packet(me, host, 20000 + i, int(port), b"flow"))
            await asyncio.sleep(1 / rate)
        await asyncio.sleep(1)
        replies = 0
        while not inbox.empty():
            inbox.get_nowait()
            replies += 1
        out["replies"] = replies
    elif mode == "listen":
        got = 0
        deadline = asyncio.get_running_loop().time() + float(args[0])
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                await asyncio.wait_for(inbox.get(), left)
                got += 1
            except TimeoutError:
                break
        out["unasked"] = got
    client.close_circuit(circ)
    await asyncio.sleep(0.1)
    client.close()
    return out


if __name__ == "__main__":
    print(json.dumps(run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:]))), flush=True)
