"""A tiny authoritative DNS server for the testbed: A records from the command line, NXDOMAIN else.

    python dns_server.py NAME=IP [NAME=IP ...]
"""

import ipaddress
import socket
import sys

records = {name.lower().rstrip(".") + ".": ipaddress.IPv4Address(ip).packed
           for name, ip in (arg.split("=") for arg in sys.argv[1:])}
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", 53))
print("listening", flush=True)
while True:
    query, addr = sock.recvfrom(1500)
    if len(query) < 17:
        continue
    labels, pos = [], 12
    while pos < len(query) and query[pos]:
        labels.append(query[pos + 1:pos + 1 + query[pos]].decode(errors="replace"))
        pos += 1 + query[pos]
    question = query[12:pos + 5]
    name = ".".join(labels).lower() + "."
    print(f"query {name} from {addr[0]}", flush=True)
    ip = records.get(name)
    flags = b"\x84\x00" if ip else b"\x84\x03"  # response, authoritative; NOERROR or NXDOMAIN
    header = query[:2] + flags + b"\x00\x01" + (b"\x00\x01" if ip else b"\x00\x00") + b"\x00\x00\x00\x00"
    answer = (b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + ip) if ip else b""
    sock.sendto(header + question + answer, addr)
