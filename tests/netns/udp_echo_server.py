"""A UDP server for the testbed: answers "<source ip> <payload>" and prints each datagram it gets."""

import socket
import sys

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
while True:
    data, addr = sock.recvfrom(65535)
    print(f"got {addr[0]} {data!r}", flush=True)
    sock.sendto(f"{addr[0]} ".encode() + data, addr)
