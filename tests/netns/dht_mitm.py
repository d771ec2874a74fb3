"""An on-path attacker against discovery, for tests/netns/test_discovery_nat.py (review C2).

    python tests/netns/dht_mitm.py --lan IFACE --wan IFACE --client IP --dht-port P --spare IP[,IP...]

Runs in the client's router namespace.  It watches the client's DHT requests on ``--lan`` (an AF_PACKET
socket: it sees every frame the router forwards to and from the client) and, for every request to a
relay that is not in ``--spare`` (the attacker's own relays), races the real answer with forged ones
sent from the relay's address and port (written straight onto ``--lan`` with a packet socket, past the
router's netfilter, whose conntrack would drop a locally sent packet that mirrors a NATed flow):

* garbage  - the request's message id and a body that is not an answer (rpcudp took the first datagram
             with the right id and failed the request on it: one packet made an honest relay "silent");
* imposter - for a ping: a properly signed answer from the attacker's own identity, whose descriptor
             claims the relay's address (valid everywhere the address is not pinned to an id);
* replay   - the last genuine answer this relay sent the client (seen arriving on ``--wan``), with the
             new message id.

Dropping answers is done by the test with an nftables rule; this process only forges.  SIGTERM prints
``mitm: {json counts}`` and exits.  It sends only to the client address it is given.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import secrets
import select
import signal
import socket
import struct
import sys
import time

from shallot.core.discovery import wire
from shallot.crypto.descriptor import Descriptor
from shallot.crypto.keys import RelayKeys

ETH_P_IP = 0x0800
PACKET_OUTGOING = 4


def _checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ip_udp(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload  # UDP checksum 0: none (IPv4)
    fields = [0x45, 0, 20 + len(udp), secrets.randbelow(65536), 0, 64, 17, 0, socket.inet_aton(src),
              socket.inet_aton(dst)]
    fields[7] = _checksum(struct.pack("!BBHHHBBH4s4s", *fields))
    return struct.pack("!BBHHHBBH4s4s", *fields) + udp


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lan", required=True)
    ap.add_argument("--wan", required=True)
    ap.add_argument("--client", required=True)
    ap.add_argument("--dht-port", type=int, required=True)
    ap.add_argument("--spare", default="")
    args = ap.parse_args()
    spare = {h for h in args.spare.split(",") if h}
    counts = {"requests": 0, "garbage": 0, "imposter": 0, "replay": 0, "genuine_seen": 0}
    attacker = RelayKeys.generate(secrets.token_bytes, time.time())
    imposters: dict[str, bytes] = {}  # relay IP -> the attacker's descriptor claiming that relay's address
    genuine: dict[str, bytes] = {}  # relay IP -> the last genuine answer it sent the client
    forged: set[bytes] = set()

    def stop(*_: object) -> None:
        print(f"mitm: {json.dumps(counts)}", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    sniff = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    sniff.bind((args.lan, 0))
    wan = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    wan.bind((args.wan, 0))
    print("mitm: ready", flush=True)
    client_mac = b""

    def send(relay: str, dport: int, payload: bytes, kind: str) -> None:
        forged.add(hashlib.sha256(payload).digest())
        sniff.sendto(_ip_udp(relay, args.dht_port, args.client, dport, payload),
                     (args.lan, ETH_P_IP, 0, 0, client_mac))
        counts[kind] += 1

    while True:
        ready, _, _ = select.select([sniff, wan], [], [])
        sock = ready[0]
        data, addr = sock.recvfrom(65535)
        if len(data) < 28 or data[0] >> 4 != 4 or data[9] != 17:
            continue
        ihl = (data[0] & 0x0F) * 4
        src, dst = socket.inet_ntoa(data[12:16]), socket.inet_ntoa(data[16:20])
        sport, dport = struct.unpack("!HH", data[ihl:ihl + 4])
        payload = data[ihl + 8:]
        if not payload:
            continue
        if sock is wan:  # answers arriving for the client (before the router translates them back)
            if addr[2] != PACKET_OUTGOING and sport == args.dht_port and payload[0] == wire.RESPONSE \
                    and src not in spare and hashlib.sha256(payload).digest() not in forged:
                genuine[src] = payload
                counts["genuine_seen"] += 1
            continue
        if addr[2] == PACKET_OUTGOING or src != args.client or dport != args.dht_port or dst in spare \
                or payload[0] != wire.REQUEST or len(payload) < wire.HEADER_LEN:
            continue
        counts["requests"] += 1
        client_mac = addr[4]  # the frame's source: the client's interface
        msg_id = payload[1:wire.HEADER_LEN]
        send(dst, sport, bytes([wire.RESPONSE]) + msg_id + b"\xa7garbage" + secrets.token_bytes(64), "garbage")
        try:
            name = wire.parse_request(wire.decode_datagram(payload).body)[0]
        except wire.WireError:
            continue
        if name == "ping":
            if dst not in imposters:
                ipaddress.ip_address(dst)
                imposters[dst] = Descriptor.create(
                    attacker, nickname="imposter", addresses=((dst, args.dht_port - 1),), exit_node=True,
                    published=int(time.time()), lifetime_s=3600).encode()
            send(dst, sport, wire.encode_response(msg_id, [attacker.relay_id, imposters[dst]],
                                                  responder_id=attacker.relay_id, request=payload,
                                                  sign=attacker.sign), "imposter")
        if dst in genuine:
            send(dst, sport, genuine[dst][:1] + msg_id + genuine[dst][wire.HEADER_LEN:], "replay")


if __name__ == "__main__":
    sys.exit(main())
