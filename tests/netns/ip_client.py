"""Run inside the client namespace by tests/netns/test_ip_exit.py: build a SERVICE_IP circuit, get the
tunnel address, send hand-made IPv4/UDP packets through it and report what came back, as JSON."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import struct
import sys
from pathlib import Path

from shallot.core.circuit import ClientCircuit, ConfigReceived
from shallot.core.circuit.path import resolve_relay
from shallot.core.discovery.directory import load_directory
from shallot.core.io.circuit_client import CircuitClient
from shallot.core.io.udp import run
from shallot.core.wire.ipconfig import decode_config
from shallot.core.wire.ippacket import parse_packet
from shallot.crypto.circuit_handshake import SERVICE_IP


def checksum(header: bytes) -> int:
    total = sum(int.from_bytes(header[i:i + 2], "big") for i in range(0, len(header), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload  # UDP checksum 0: none (IPv4)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0x1234, 0x4000, 64, 17, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    header = header[:10] + checksum(header).to_bytes(2, "big") + header[12:]
    return header + udp


def dns_query(name: str, txid: int = 0x4242) -> bytes:
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".")) + b"\x00"
    return struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0) + qname + b"\x00\x01\x00\x01"


async def open_ip_circuit(directory: Path) -> tuple[CircuitClient, ClientCircuit, object, object, int]:
    """A SERVICE_IP circuit through the directory's guard -> middle -> exit, and its CONFIG (address,
    resolver, MTU)."""
    relays = load_directory(directory)
    path = [resolve_relay(n, relays) for n in ("guard", "middle", "exit")]
    client = CircuitClient()
    await client.start()
    configs: asyncio.Queue[bytes] = asyncio.Queue()
    client.on_event = lambda ev: configs.put_nowait(ev.data) if isinstance(ev, ConfigReceived) else None
    circ = await client.build(path, service=SERVICE_IP)
    client.node.request_config(circ, asyncio.get_running_loop().time())
    assert client.endpoint is not None
    client.endpoint.poke()
    address, resolver, mtu = decode_config(await asyncio.wait_for(configs.get(), 5))
    return client, circ, address, resolver, mtu


async def main(directory: Path, targets: list[str]) -> dict:
    client, circ, address, resolver, mtu = await open_ip_circuit(directory)
    inbox = client.inbox[circ.circuit_id]
    results = {"address": str(address), "resolver": str(resolver), "mtu": mtu, "replies": {}}
    for target in targets:
        if target.startswith("dns:"):  # ask the exit's resolver for a name
            client.send(circ, udp_packet(str(address), str(resolver), 40001, 53, dns_query(target[4:])))
            try:
                packet = await asyncio.wait_for(inbox.get(), 3)
            except TimeoutError:
                results["replies"][target] = None
                continue
            answer = packet[28:]
            ok = len(answer) >= 16 and answer[:2] == b"\x42\x42" and int.from_bytes(answer[6:8], "big") >= 1
            results["replies"][target] = str(ipaddress.IPv4Address(answer[-4:])) if ok else "no answer"
            continue
        host, port = target.rsplit(":", 1)
        payload = f"hello {target}".encode()
        client.send(circ, udp_packet(str(address), host, 40000, int(port), payload))
        try:
            packet = await asyncio.wait_for(inbox.get(), 2)
        except TimeoutError:
            results["replies"][target] = None
            continue
        info = parse_packet(packet)
        results["replies"][target] = {"src": str(info.src), "dst": str(info.dst), "data": packet[28:].decode()}
    client.close_circuit(circ)
    await asyncio.sleep(0.1)
    client.close()
    return results


if __name__ == "__main__":
    print(json.dumps(run(main(Path(sys.argv[1]), sys.argv[2:]))))
