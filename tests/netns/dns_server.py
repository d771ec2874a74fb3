"""A tiny authoritative DNS server for the testbed: A records from the command line, NXDOMAIN else.

    python dns_server.py [--slow=SECONDS] NAME=IP [NAME=IP ...]

With ``--slow``, names whose first label starts with "slow" are answered that many seconds late (a window
for the spoofing test, tests/netns/test_exit_dns.py); names with a "void" label are never answered.
"""

import ipaddress
import socket
import sys
import threading

slow = 0.0
args = sys.argv[1:]
if args and args[0].startswith("--slow="):
    slow = float(args.pop(0).split("=", 1)[1])
records = {name.lower().rstrip(".") + ".": ipaddress.IPv4Address(ip).packed
           for name, ip in (arg.split("=") for arg in args)}
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
    if "void" in labels:
        continue
    ip = records.get(name)
    flags = b"\x84\x00" if ip else b"\x84\x03"  # response, authoritative; NOERROR or NXDOMAIN
    header = query[:2] + flags + b"\x00\x01" + (b"\x00\x01" if ip else b"\x00\x00") + b"\x00\x00\x00\x00"
    answer = (b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + ip) if ip else b""
    if slow and labels and labels[0].startswith("slow"):
        threading.Timer(slow, sock.sendto, (header + question + answer, addr)).start()
    else:
        sock.sendto(header + question + answer, addr)
